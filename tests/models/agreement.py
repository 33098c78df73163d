"""How the model tests measure agreement with eager (the foundation's int8 tolerance)."""
from __future__ import annotations

import torch


def assert_int8_agrees(eager_tokens, eager_logits, tokens, logits, prompt_len: int) -> None:
    """Per-token int8 keeps every K/V element within max|row|/254, so logits move by far less than
    their spread: each step's logits within 2% of eager's logit range, on every step up to the
    first token that differs (later steps have different inputs)."""
    new = (eager_tokens != tokens)[0, prompt_len:]
    steps = int(new.int().argmax()) + 1 if new.any() else new.numel()
    for a, b in zip(eager_logits[:, :steps].unbind(1), logits[:, :steps].unbind(1)):
        assert (a - b).abs().max() <= 0.02 * (a.max() - a.min())


def hf_greedy(model, ids: torch.Tensor, new_tokens: int, cache: str, **kw):
    """(tokens, per-step logits [B, new_tokens, V]) of HF generate with a "static" or "dynamic" cache."""
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         cache_implementation="static" if cache == "static" else None,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)
