"""KV storage formats: what a site's cache becomes, and the bytes it holds.

A format turns the model's fp cache buffer [B, Hkv, S, D] into a `KVStore` (the tensors kvfx owns
instead) and says how to write into it and read it back. "none" keeps the model's buffer as is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfx.kernels.int8 import dequantize_int8_reference, quantize_int8_reference


@dataclass
class KVStore:
    """The memory kvfx holds for one attention site's cache (keys and values).

    k_codes, v_codes: [B, Hkv, S, D] uint8.  k_qparams, v_qparams: [B, Hkv, S, 2] (scale, zero) in the
    model dtype (`kvfx.kernels.int8`).
    """

    k_codes: torch.Tensor
    k_qparams: torch.Tensor
    v_codes: torch.Tensor
    v_qparams: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k_codes, self.k_qparams, self.v_codes, self.v_qparams)

    def nbytes(self) -> int:
        """Bytes really held: the storages of the tensors, not a formula."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision keys and values [B, Hkv, S, D] (for inspection and tests)."""
        return (dequantize_int8_reference(self.k_codes, self.k_qparams, dtype),
                dequantize_int8_reference(self.v_codes, self.v_qparams, dtype))


@dataclass(frozen=True)
class Int8Format:
    name: str = "int8"

    def allocate(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> KVStore:
        """An empty store for a cache buffer of `shape` [B, Hkv, S, D] in `dtype`."""
        def codes():
            return torch.zeros(shape, dtype=torch.uint8, device=device)

        def qparams():  # (scale 1, zero 0): unwritten slots read as zeros
            return torch.tensor([1.0, 0.0], dtype=dtype, device=device).expand(*shape[:-1], 2).contiguous()

        return KVStore(codes(), qparams(), codes(), qparams())

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> KVStore:
        """A store holding the current content of fp buffers `keys`, `values` (all positions)."""
        return KVStore(*quantize_int8_reference(keys), *quantize_int8_reference(values))


# name -> format; None means the cache stays in the model's dtype (kvfx only rewrites attention).
FORMATS: dict[str, Int8Format | None] = {"none": None, "int8": Int8Format()}
