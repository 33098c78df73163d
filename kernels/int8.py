"""Asymmetric int8 KV storage: one (scale, zero) pair per token per KV head.

x [..., D] -> codes uint8 [..., D] and qparams [..., 2] = (scale, zero) with zero = min(x),
scale = (max(x) - min(x)) / 255, x' = codes * scale + zero. Per element the round-trip error is at
most scale / 2 = range / 510.

Why asymmetric and per token: a decode step quantizes its one new token at once (no token groups to
wait for), and keys carry per-channel offsets that a symmetric (absmax) scale spends half its codes
on. Measured on SmolLM2-135M, 256 teacher-forced decode steps, fake-quantizing the cache: symmetric
int8 agrees with fp on 98.0% of top-1 tokens (max logit error 0.93), asymmetric on 99.6% (0.54);
quantizing only the keys symmetrically already costs 2.3 points, so the keys decide it.
Bytes per element: 1 + 2 * itemsize / D (fp16, D=64: 0.53x of fp16; fp32: 0.28x of fp32).
"""
from __future__ import annotations

import torch

LEVELS = 255.0


def quantize_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dim. Returns (codes uint8 like x, qparams [..., 2] in x.dtype)."""
    xf = x.float()
    low, high = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
    # A constant row keeps scale 1 so it dequantizes to exactly its value (codes 0, zero = value).
    scale = torch.where(high > low, (high - low) / LEVELS, torch.ones_like(high))
    codes = torch.round((xf - low) / scale).clamp_(0, LEVELS).to(torch.uint8)
    return codes, torch.cat([scale, low], dim=-1).to(x.dtype)


def dequantize_int8_reference(codes: torch.Tensor, qparams: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int8_reference`: codes * scale + zero, in `dtype`."""
    qparams = qparams.float()
    return (codes.float() * qparams[..., :1] + qparams[..., 1:]).to(dtype)
