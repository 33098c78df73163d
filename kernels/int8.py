"""Symmetric int8 KV storage: one scale per token per KV head.

x [..., D] -> codes int8 [..., D], scale [..., 1] with scale = max|x| / 127 and x' = codes * scale.
Per element the round-trip error is at most scale / 2 (= max|x| / 254), so keys and values keep
~0.4% of their row's range; this is the foundation's format, chosen because it needs no token
groups (a one-token decode write quantizes immediately) and no zero point (one scale per row).
"""
from __future__ import annotations

import torch

INT8_MAX = 127.0


def quantize_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dim. Returns (codes int8 like x, scale [..., 1] in x.dtype)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    # A zero row keeps scale 1 so dequantization returns exact zeros (no 0/0).
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    codes = torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale.to(x.dtype)


def dequantize_int8_reference(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_int8_reference`: codes * scale in `dtype`."""
    return (codes.to(torch.float32) * scale.to(torch.float32)).to(dtype)
