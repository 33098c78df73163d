"""KV storage formats: what a site's cache becomes, and the bytes it holds.

A format turns the model's fp cache buffer [B, Hkv, S, D] into a store (the tensors kvfx owns
instead: a `KVStore` for int8, a `KiviStore` for int4/int2/fp8, a `TokenStore` for any format under a
policy) and says how to allocate, adopt and rebuild it. "none" without a policy keeps the model's
buffer as is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from kvfx.kernels.int8 import dequantize_int8_reference, quantize_int8_reference
from kvfx.kernels.kivi import KiviStore, store_write_reference
from kvfx.kernels.token_store import TokenFormat


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

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype the store dequantizes to (its qparams')."""
        return self.k_qparams.dtype

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
    """Per-token asymmetric int8 (`kvfx.kernels.int8`): the store is a `KVStore`."""

    name: str = "int8"
    tensor_names = ("k_codes", "k_qparams", "v_codes", "v_qparams")

    def unsupported(self, head_dim: int) -> str:
        """Why a site of this head dim cannot use this format ("" if it can)."""
        return ""

    def allocate(self, shape, dtype: torch.dtype, device: torch.device, layer: int = 0, layers: int = 1) -> KVStore:
        """An empty store for a cache buffer of `shape` [B, Hkv, S, D] in `dtype` (sizes may be symbolic;
        the layer does not matter to this format)."""
        def codes():
            return torch.zeros(shape, dtype=torch.uint8, device=device)

        def qparams():  # (scale 0, zero 0): unwritten slots read as zeros, like HF's zeroed cache
            return torch.zeros((*shape[:-1], 2), dtype=dtype, device=device)

        return KVStore(codes(), qparams(), codes(), qparams())

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, layer: int = 0, layers: int = 1) -> KVStore:
        """A store holding the current content of fp buffers `keys`, `values` (all positions)."""
        return KVStore(*quantize_int8_reference(keys), *quantize_int8_reference(values))

    def from_tensors(self, tensors) -> KVStore:
        return KVStore(*tensors)


@dataclass(frozen=True)
class KiviFormat:
    """KIVI int8/int4/int2 or fp8 (`kvfx.kernels.kivi`): the store is a `KiviStore`."""

    name: str
    bits: int
    fp8: bool
    group_size: int
    residual: int
    tensor_names = ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "k_ring", "v_ring")

    def unsupported(self, head_dim: int) -> str:
        """Why a site of this head dim cannot use this format ("" if it can)."""
        try:
            KiviStore.validate(head_dim, self.bits, self.group_size, self.residual, self.fp8)
        except ValueError as err:
            return f"{self.name} storage: {err}"
        return ""

    def allocate(self, shape, dtype: torch.dtype, device: torch.device, layer: int = 0, layers: int = 1) -> KiviStore:
        b, h, s, d = shape
        return KiviStore.allocate(b, h, s, d, dtype, device, self.bits, self.group_size, self.residual, self.fp8)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, layer: int = 0, layers: int = 1) -> KiviStore:
        """A store holding every position of fp buffers `keys`, `values`, written as one prompt."""
        store = self.allocate(keys.shape, keys.dtype, keys.device)
        store_write_reference(store, keys, values, 0)
        return store

    def from_tensors(self, tensors) -> KiviStore:
        return KiviStore(*tensors, self.bits, self.group_size, self.residual, self.fp8)


# The `kv` choices. None: the cache stays in the model's dtype (kvfx only rewrites attention).
FORMAT_NAMES = ("none", "int8", "int4", "int2", "fp8")
# Version of the store tensors' layout, carried in the options JSON the kvfx ops receive: inductor's FX
# graph cache hashes the graph (and so that string) but not a custom op's Python, so a graph compiled
# against an older layout must miss rather than assert the old shapes. Bump it with any layout change.
# 2: KIVI value params token-minor, [B, H, NG, D / G, G]; 3: KIVI int4 key params slot-major.
STORE_LAYOUT = 3
_KIVI = {"int4": (4, False), "int2": (2, False), "fp8": (8, True)}


def format_for(kv: str, group_size: int = 32, residual: int = 128) -> Int8Format | KiviFormat | None:
    if kv == "none":
        return None
    if kv == "int8":
        return Int8Format()
    bits, fp8 = _KIVI[kv]
    return KiviFormat(kv, bits, fp8, group_size, residual)


def format_from_json(options: str):
    """The format of a `KVConfig` given as its JSON (how the kvfx ops receive the options)."""
    fields = json.loads(options)
    if fields["policy"] != "none":
        return TokenFormat(options)
    return format_for(fields["kv"], fields["group_size"], fields["residual"])
