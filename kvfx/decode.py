"""Decoding helpers shared by the demo, the tests and the benchmarks (HF causal LMs, static cache)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import StaticCache, StoppingCriteria


@dataclass
class StepClock(StoppingCriteria):
    """A stopping criterion that never stops: it timestamps each generated token, so decode speed is
    measured inside the real `generate` loop (prefill and compilation excluded)."""

    times: list[float] = field(default_factory=list)
    progress: object = None  # a tqdm bar to advance, if any

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        if self.progress is not None:
            self.progress.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the decode steps (after the first token, which the prefill makes)."""
        if len(self.times) < 2:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


@torch.no_grad()
def teacher_forced_logits(model, prompt: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits [N, vocab] of each decode step when the model is fed `targets` [N] one token at a time
    through a static cache (prefill the prompt, then one-token steps): the decode path, not a prefill."""
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + targets.numel() + 1)
    logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
    out = [logits]
    start = prompt.shape[1]
    for i, token in enumerate(targets[:-1].tolist()):
        step = torch.tensor([[token]], device=prompt.device)
        pos = torch.tensor([[start + i]], device=prompt.device)
        out.append(model(step, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1])
    return torch.cat(out).float()
