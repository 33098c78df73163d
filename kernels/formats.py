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

    k_codes, v_codes: [B, Hkv, S, D] int8.  k_scale, v_scale: [B, Hkv, S, 1] in the model dtype.
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.k_codes, self.k_scale, self.v_codes, self.v_scale)

    def nbytes(self) -> int:
        """Bytes really held: the storages of the tensors, not a formula."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision keys and values [B, Hkv, S, D] (for inspection and tests)."""
        return (dequantize_int8_reference(self.k_codes, self.k_scale, dtype),
                dequantize_int8_reference(self.v_codes, self.v_scale, dtype))


@dataclass(frozen=True)
class Int8Format:
    name: str = "int8"

    def allocate(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> KVStore:
        """An empty store for a cache buffer of `shape` [B, Hkv, S, D] in `dtype`."""
        scale_shape = (*shape[:-1], 1)

        def codes():
            return torch.zeros(shape, dtype=torch.int8, device=device)

        def scale():
            return torch.ones(scale_shape, dtype=dtype, device=device)

        return KVStore(codes(), scale(), codes(), scale())

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> KVStore:
        """A store holding the current content of fp buffers `keys`, `values` (all positions)."""
        k_codes, k_scale = quantize_int8_reference(keys)
        v_codes, v_scale = quantize_int8_reference(values)
        return KVStore(k_codes, k_scale, v_codes, v_scale)


# name -> format; None means the cache stays in the model's dtype (kvfx only rewrites attention).
FORMATS: dict[str, Int8Format | None] = {"none": None, "int8": Int8Format()}
