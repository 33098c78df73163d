"""Decoding helpers shared by the demo, the tests and the benchmarks (HF causal LMs, static cache)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version
from transformers import StaticCache, StoppingCriteria

# generate()'s keyword for a cache: transformers 5.24 renamed `past_key_values` to `cache` (the old name
# warns from then on); earlier 5.x know only the old one.
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


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


def prefill(model, prompt: torch.Tensor, cache, chunk: int | None = None) -> torch.Tensor:
    """Run `prompt` [B, T] into `cache` in one call or, with `chunk`, in calls of that many tokens (as a
    server's chunked prefill does: each call attends over the cache so far, and only the last position's
    logits are made); the last position's logits [B, vocab]."""
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"prefill chunk must be a token count >= 1 (or None: the prompt in one call), got {chunk!r}")
    if chunk is None:
        return model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
    for start in range(0, prompt.shape[1], chunk):
        ids = prompt[:, start:start + chunk]
        pos = torch.arange(start, start + ids.shape[1], device=prompt.device)
        logits = model(ids, past_key_values=cache, use_cache=True, cache_position=pos,
                       position_ids=pos[None].expand(prompt.shape[0], -1), logits_to_keep=1).logits
    return logits[:, -1]


@torch.no_grad()
def decode_steps(model, prompt: torch.Tensor, steps: int, forced: torch.Tensor | None = None,
                 cache: StaticCache | None = None, prefill_chunk: int | None = None
                 ) -> tuple[torch.Tensor, list[float]]:
    """Prefill `prompt` [B, T] into a static cache (a new one, or `cache`; in calls of `prefill_chunk`
    tokens if given), then run `steps` one-token decode steps: greedy, or fed `forced` [steps] (teacher
    forcing). Returns the last-position logits of the prefill and of every step but the last,
    [steps, B, vocab] fp32, and each decode step's time."""
    if cache is None:
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps)
    logits = prefill(model, prompt, cache, prefill_chunk)
    out, times = [logits.float()], []
    for i in range(steps - 1):
        token = forced[i].view(1, 1).expand(prompt.shape[0], 1) if forced is not None else logits.argmax(-1, keepdim=True)
        pos = torch.full((prompt.shape[0], 1), prompt.shape[1] + i, device=prompt.device)
        start = time.perf_counter()
        logits = model(token, past_key_values=cache, position_ids=pos, use_cache=True).logits[:, -1]
        times.append(time.perf_counter() - start)
        out.append(logits.float())
    return torch.stack(out), times


def teacher_forced_logits(model, prompt: torch.Tensor, targets: torch.Tensor,
                          cache: StaticCache | None = None) -> torch.Tensor:
    """Logits [N, vocab] of each decode step when the model is fed `targets` [N] one token at a time
    through a static cache: the decode path, not one long prefill."""
    logits, _ = decode_steps(model, prompt, targets.numel(), forced=targets, cache=cache)
    return logits[:, 0]
