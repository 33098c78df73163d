"""The quantized store of a cache that grows by concatenation (HF DynamicCache, nanoGPT `present`).

The model never holds this cache's data: each call's graph writes the new tokens into a `CatStore`
and returns, in place of the concatenated K/V, a shape-only placeholder (`kvfx.runtime`); the next
call passes that placeholder back as its past, and the store is found by its identity.

Memory is sequence-major ([S, B, H, D] underneath, seen as [B, H, S, D]): the view of the first n
slots then has the same strides whatever the capacity, so one compiled graph serves every length,
and growing is a copy into a larger allocation, amortized by growing 25% (in steps of 64 slots).
`CatStore` holds int8 (a `KVStore` of per-token codes and (scale, zero)). A sliding window (the caller
keeps the last W - 1 tokens) drops the older tokens before each call, so its memory follows the window,
not the sequence. `GrowingStore` holds the KIVI formats and Quest, whose stores are laid out by position;
under a sliding window a KIVI one drops whole groups of G, so it holds up to G - 1 tokens older than the
window (the graph masks them out) and positions in it are relative to the first kept group.
"""
from __future__ import annotations

import torch

from kvfx.kernels.formats import Int8Format, KVStore
from kvfx.kernels.int8 import quantize_int8_reference
from kvfx.kernels.kivi import dequantize_reference
from kvfx.kernels.token_store import TokenFormat

_STEP = 64


def seq_major_store(fmt: Int8Format, shape, dtype: torch.dtype, device: torch.device) -> KVStore:
    """A store for [B, H, S, D] (sizes may be symbolic) whose tensors are [S, B, H, *] in memory.

    Not views of a permuted tensor: a view as a graph's example input makes AOTAutograd give its
    base fresh symbolic sizes that no guard can name."""
    b, h, s, d = shape
    layout = fmt.allocate((s, b, h, d), dtype, torch.device("meta"))  # the format's tensors, sequence first
    return KVStore(*(torch.empty_strided(t.permute(1, 2, 0, 3).shape, t.permute(1, 2, 0, 3).stride(),
                                         dtype=t.dtype, device=device).zero_() for t in layout.tensors()))


class CatStore:
    """An int8 `KVStore` of `capacity` slots of which the first `length` hold tokens."""

    def __init__(self, fmt: Int8Format, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 0):
        self.fmt, self.dtype, self.device = fmt, dtype, device
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.length = 0
        self.start = 0  # a sliding window's caller holds only slots [start, length) (`keep_last`)
        self.full = seq_major_store(fmt, (batch, heads, capacity, head_dim), dtype, device)

    @property
    def capacity(self) -> int:
        return self.full.k_codes.shape[2]

    def view(self, n: int) -> KVStore:
        """The first n slots (what a graph that grows the cache to n tokens reads and writes)."""
        self.reserve(n)
        return KVStore(*(t[:, :, :n] for t in self.full.tensors()))

    def reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        capacity = -(-max(n, self.capacity * 5 // 4) // _STEP) * _STEP
        old = self.full
        self.full = seq_major_store(self.fmt, (self.batch, self.heads, capacity, self.head_dim), self.dtype,
                                    self.device)
        for new, kept in zip(self.full.tensors(), old.tensors()):
            new[:, :, :self.length] = kept[:, :, :self.length]

    def keep_last(self, keep: int) -> None:
        """The caller keeps only the last `keep` tokens (HF's sliding window keeps W - 1)."""
        self.start = max(0, self.length - keep)

    def drop_front(self) -> None:
        """Move the tokens the caller holds to the front, so that a graph that grows them reads slots
        [0, n) as any concatenated cache does: a copy of the window, as HF's own concatenation makes."""
        if not self.start:
            return
        n = self.length - self.start
        for t in self.full.tensors():
            t[:, :, :n] = t[:, :, self.start:self.length].clone()
        self.length, self.start = n, 0

    def fork(self, length: int) -> "CatStore":
        """A new store holding this one's first `length` tokens (a past the model went back to)."""
        store = CatStore(self.fmt, self.batch, self.heads, self.head_dim, self.dtype, self.device, length)
        for new, kept in zip(store.full.tensors(), self.full.tensors()):
            new[:, :, :length] = kept[:, :, :length]
        store.length = length
        return store

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize a past the model built without kvfx (fp keys, values [B, H, L, D]) into slots 0..L-1."""
        n = keys.shape[2]
        view = self.view(n)
        for codes, qparams, x in ((view.k_codes, view.k_qparams, keys), (view.v_codes, view.v_qparams, values)):
            new_codes, new_qparams = quantize_int8_reference(x)
            codes.copy_(new_codes)
            qparams.copy_(new_qparams.to(qparams.dtype))
        self.length = n

    def nbytes(self) -> int:
        """Bytes really held (the whole capacity)."""
        return self.full.nbytes()

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens the caller holds, [B, H, length - start, D]."""
        return KVStore(*(t[:, :, self.start:self.length] for t in self.full.tensors())).dequantize(dtype)


class GrowingStore:
    """A store sized by the cache length (KIVI's int4/int2/fp8, Quest's `TokenStore`, which keeps every token,
    or an evicting policy's of a fractional budget, whose capacity is that share of the length) for a cache that
    grows by concatenation, holding `length` tokens. A policy's slots hold tokens in any order: a larger
    store keeps them in the same slots, its new ones empty.

    The stores are sized by the cache length in whole groups (KIVI's packed part: G * floor(S / G)), pages
    (Quest: P * ceil(S / P)) or slots (a budget of 0.2: ceil(0.2 S)), and their kernels read them contiguous:
    a view of a larger allocation would change the strides. So the graph gets the store's own tensors, sized
    for the call's length S, and the store is re-made larger when the length crosses a boundary: a copy every
    G (P) tokens, where HF's DynamicCache copies its whole fp cache every step (a policy's: every 1 / 0.2 = 5
    tokens, of the kept fifth)."""

    def __init__(self, fmt, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 layer: int = 0, layers: int = 1):
        self.fmt, self.length = fmt, 0
        self.start = 0  # a sliding window's caller holds only positions [start, length) (`keep_last`)
        self.allocate = lambda n: fmt.allocate((batch, heads, n, head_dim), dtype, device, layer, layers)
        # What of the store's shape a cache length n decides: KIVI's whole groups, a TokenStore's capacity
        # (Quest's whole pages). Compared each call instead of the shapes, which would cost an allocation.
        self.extent = (lambda n: fmt.spec.capacity(n, layer, layers)) if isinstance(fmt, TokenFormat) else \
            (lambda n: n // fmt.group_size)
        self.store, self.sized_for = self.allocate(0), self.extent(0)
        # Under a sliding window: where the call's first cache token sits in the store (a graph input, [1]).
        self.offset = torch.zeros(1, dtype=torch.int64, device=device)

    def view(self, n: int) -> tuple[torch.Tensor, ...]:
        """The store's tensors, sized for a cache of n tokens (what a graph that grows it to n reads and writes)."""
        if self.extent(n) != self.sized_for:
            grown = self.allocate(n)  # (smaller, too: a sliding window's next call may be shorter)
            for new, kept in zip(grown.tensors(), self.store.tensors()):  # by position: the first groups / pages
                if new.shape == kept.shape:
                    new.copy_(kept)
                elif kept.numel():  # (Quest's bounds of no page are [0])
                    both = min(new.shape[2], kept.shape[2])
                    new[:, :, :both].copy_(kept[:, :, :both])
            self.store, self.sized_for = grown, self.extent(n)
        return self.store.tensors()

    def keep_last(self, keep: int) -> None:
        """The caller keeps only the last `keep` tokens (HF's sliding window keeps W - 1): the whole groups
        before them go (`KiviStore.drop_front`), a copy of the store every G tokens."""
        drop = max(self.length - keep, 0) // self.store.group_size * self.store.group_size
        if drop:
            self.store.drop_front(drop)
            self.length -= drop
        self.start = max(self.length - keep, 0)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize a past the model built without kvfx (fp keys, values [B, H, L, D]) as one prompt."""
        self.store, self.length = self.fmt.adopt(keys, values), keys.shape[2]
        self.sized_for = self.extent(self.length)

    def nbytes(self) -> int:
        return self.store.nbytes()

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A KIVI store's tokens the caller holds, in position order (a policy's store holds them by slot)."""
        return tuple(t[:, :, self.start:] for t in dequantize_reference(self.store, self.length, dtype))
