"""The store of a cache under a policy: C slots per (row, KV head), one token each, in any `kv` format.

An eviction policy reuses slots one token at a time, so every token is quantized on its own
(`TokenCodec`): "none" keeps the model dtype, "int8" is per-token asymmetric (`kvfx.kernels.int8`),
"int4"/"int2" quantize keys and values per token over groups of `group_size` channels (KIVI's value
layout, bit-packed), "fp8" is e4m3 with one scale per token. KIVI's per-channel keys would need G
consecutive tokens to share a scale, which a slot reused by a later token breaks: under a policy keys
are per token (documented in docs/ARCHITECTURE.md with its measured cost).

Tensors of a store for B rows, H KV heads, C slots, head dim D (all contiguous):

    k_codes, v_codes    [B, H, C, codec.code_width(D)]  codes (model dtype for "none")
    k_params, v_params  [B, H, C, codec.param_width(D)] model dtype: per-token (scale, zero) (int8),
                        (scales, zeros) per channel group (int4/int2), scale (fp8), [..., 0] ("none")
    slot_pos            [B, H, C] int32: the token's logical position, -1 = empty
    score               [B, H, C] fp32: accumulated attention (H2O) / prompt score (SnapKV)
    page_min, page_max  [B, H, ceil(C / P), D] model dtype (`page_bounds="fp8"`: e4m3, rounded outward):
                        Quest's per-page key bounds ([0] otherwise)

Quest's bounds come from the keys as they arrive, before quantization: a written token widens its
page's bounds to its key (or sets them, when no other slot of the page holds a token), and a bulk refill
gives each page the union of its slots' bounds (a new token's key, an old slot's former page bounds).
So a page is ranked as at full precision whatever the `kv` format, and the bounds stay bounds of the
page's true keys. Bounds of the dequantized keys misranked pages under int4 (SmolLM2 passkey, Quest at
1/8 of the pages + int4: 5/6 vs 6/6 for 1K-2K prompts; see docs/ARCHITECTURE.md). A token leaving a page
that keeps others (a row mask's hole, a full store's oldest) leaves the bounds as they were: still
bounds, looser until the page empties.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from kvfx.kernels.int8 import dequantize_int8_reference, quantize_int8_reference
from kvfx.kernels.kivi import FP8_MAX, quantize_asym_reference, pack_codes, round_e4m3_outward, unpack_codes
from kvfx.kernels.policies import PolicySpec
from kvfx.kernels.quest import QUEST_MAX_PAGES


@dataclass(frozen=True)
class TokenCodec:
    """Per-token quantization of one `kv` format: x [..., D] <-> (codes, params)."""

    kv: str
    group_size: int

    @property
    def bits(self) -> int:
        return {"int4": 4, "int2": 2}.get(self.kv, 8)

    def code_width(self, d: int) -> int:
        return d * self.bits // 8 if self.kv in ("int4", "int2") else d

    def code_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return {"none": dtype, "fp8": torch.float8_e4m3fn}.get(self.kv, torch.uint8)

    def param_width(self, d: int) -> int:
        return {"none": 0, "int8": 2, "fp8": 1}.get(self.kv, 2 * d // self.group_size)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv == "none":
            return x, x.new_empty((*x.shape[:-1], 0))
        if self.kv == "int8":
            return quantize_int8_reference(x)
        if self.kv == "fp8":
            amax = x.float().abs().amax(-1, keepdim=True)
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(x.dtype)
            return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
        codes, scale, zero = quantize_asym_reference(x.unflatten(-1, (-1, self.group_size)), -1, self.bits, x.dtype)
        return pack_codes(codes.flatten(-2), self.bits), torch.cat([scale, zero], -1).flatten(-2)

    def dequantize(self, codes: torch.Tensor, params: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kv == "none":
            return codes.to(dtype)
        if self.kv == "int8":
            return dequantize_int8_reference(codes, params, dtype)
        if self.kv == "fp8":
            return (codes.float() * params.float()).to(dtype)
        x = unpack_codes(codes, self.bits).float().unflatten(-1, (-1, self.group_size))
        scale, zero = params.float().unflatten(-1, (-1, 2)).unbind(-1)
        return (x * scale[..., None] + zero[..., None]).flatten(-2).to(dtype)


def dropped_positions(slot_pos: torch.Tensor, count) -> torch.Tensor:
    """`slot_pos` once positions [0, count) are gone and the rest numbered from 0: how a policy's store follows
    a sliding window (HF's static layer rolls one slot a step; its DynamicCache keeps the last W - 1 tokens of
    each call). A token at position p moves to p - count, or leaves its slot empty (-1) when that is < 0; a
    held-back candidate (-2 - p) alike. The policies rank by position order only, which this keeps."""
    held = slot_pos <= -2
    moved = torch.where(held, -2 - slot_pos, slot_pos) - count
    return torch.where(slot_pos == -1, -1, torch.where(moved < 0, -1, torch.where(held, -2 - moved, moved)))


@dataclass
class TokenStore:
    """The tensors one attention site's cache holds under a policy (layout in the module docstring)."""

    k_codes: torch.Tensor
    k_params: torch.Tensor
    v_codes: torch.Tensor
    v_params: torch.Tensor
    slot_pos: torch.Tensor
    score: torch.Tensor
    page_min: torch.Tensor
    page_max: torch.Tensor
    codec: TokenCodec
    dtype: torch.dtype
    page_size: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor))

    def nbytes(self) -> int:
        """Bytes really held: the storages of the tensors, not a formula."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def dequantize(self, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `slots` (default: every) slots [B, H, slots, D] in the model dtype
        (empty slots: garbage)."""
        return (self.codec.dequantize(self.k_codes[:, :, :slots], self.k_params[:, :, :slots], self.dtype),
                self.codec.dequantize(self.v_codes[:, :, :slots], self.v_params[:, :, :slots], self.dtype))

    def drop_positions(self, count: int) -> None:
        """Forget positions [0, count) and number the others from 0 (a sliding window moved on by count)."""
        if count:
            self.slot_pos.copy_(dropped_positions(self.slot_pos, count))

    def write(self, source: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor,
              score: torch.Tensor) -> None:
        """Refill every slot from `source` [B, H, C] (< C: that old slot, which stays where it is (`place`),
        >= C: new token source - C, -1: empty). positions, score [B, H, n_old + T]: the candidates' (old
        slots first). In place: only the kept new tokens' codes move (no copy of the store)."""
        b, h, c = self.slot_pos.shape
        t = k_new.shape[2]
        n_old = positions.shape[2] - t
        cand = torch.where(source >= c, source - c + n_old, source).clamp(min=0)  # index among candidates
        slot_pos = positions.gather(-1, cand).masked_fill(source < 0, -1).to(self.slot_pos.dtype)
        new_score = score.gather(-1, cand).masked_fill(source < 0, 0.0)
        # Each new token's slot (-1: dropped); a dropped one repeats its row's first kept token's write
        # (the same slot, the same value: no race), or rewrites slot 0 with itself when none is kept.
        is_new = source >= c
        dest = torch.full((b, h, t), -1, device=source.device, dtype=source.dtype).scatter_reduce_(
            2, torch.where(is_new, source - c, 0), torch.where(is_new, torch.arange(c, device=source.device), -1),
            "amax")
        kept = dest >= 0
        first = kept.to(torch.uint8).argmax(-1, keepdim=True)
        any_kept = kept.any(-1, keepdim=True)
        token = torch.where(kept, torch.arange(t, device=source.device), first)
        slot = torch.where(any_kept, dest.gather(-1, token), 0)
        for codes, params, x in ((self.k_codes, self.k_params, k_new), (self.v_codes, self.v_params, v_new)):
            new_codes, new_params = self.codec.quantize(x.to(self.dtype))
            for dst, new in ((_bytes(codes), _bytes(new_codes)), (params, new_params)):
                width = dst.shape[-1]
                value = torch.where(any_kept[..., None],
                                    new.to(dst.dtype).gather(2, token[..., None].expand(b, h, t, width)), dst[:, :, :1])
                dst.scatter_(2, slot[..., None].expand(b, h, t, width), value)
        if self.page_min.numel():
            self._refill_bounds(source, slot, kept, k_new)
        self.slot_pos.copy_(slot_pos)
        self.score.copy_(new_score)

    def put(self, slot: torch.Tensor, keep: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
            position: torch.Tensor, score: torch.Tensor) -> None:
        """Write one new token [B, H, 1, D] into `slot` [B, H, 1] of each (row, head) where `keep`
        [B, H, 1] (elsewhere the slot keeps its content); Quest's bounds of that page follow."""
        def scatter(dst: torch.Tensor, new: torch.Tensor) -> None:
            dst, new = _bytes(dst), _bytes(new)
            index = slot.view(*slot.shape, *[1] * (dst.dim() - 3)).expand(*slot.shape, *dst.shape[3:])
            mask = keep.view(*keep.shape, *[1] * (dst.dim() - 3))
            dst.scatter_(2, index, torch.where(mask, new.to(dst.dtype), dst.gather(2, index)))

        for codes, params, x in ((self.k_codes, self.k_params, k_new), (self.v_codes, self.v_params, v_new)):
            new_codes, new_params = self.codec.quantize(x.to(self.dtype))
            scatter(codes, new_codes)
            scatter(params, new_params)
        scatter(self.slot_pos, position)
        scatter(self.score, score)
        if self.page_min.numel():
            self._widen_bounds(slot, keep, k_new)

    def _widen_bounds(self, slot: torch.Tensor, keep: torch.Tensor, k_new: torch.Tensor) -> None:
        """Quest's bounds of the page of `slot` [B, H, 1] after k_new [B, H, 1, D] was written there (where
        `keep`): widened to the key, or the key alone when no other slot of the page holds a token."""
        b, h, c = self.slot_pos.shape
        p = self.page_size
        page = slot // p
        held = self.slot_pos.view(b, h, c // p, p).gather(2, page[..., None].expand(b, h, 1, p))
        others = ((held >= 0) & (torch.arange(p, device=slot.device) != slot[..., None] % p)).any(-1, keepdim=True)
        key = k_new.to(self.dtype).float()  # the key as stored and as the finish kernel widens by it
        index = page[..., None].expand(b, h, 1, key.shape[-1])
        for bound, widen, up in ((self.page_min, torch.minimum, False), (self.page_max, torch.maximum, True)):
            old = _bytes(bound).gather(2, index).view(bound.dtype).float()
            new = torch.where(keep[..., None], torch.where(others, widen(old, key), key), old)
            _bytes(bound).scatter_(2, index, _bytes(_as_bound(new, up, bound.dtype)))

    def _refill_bounds(self, source: torch.Tensor, slot: torch.Tensor, kept: torch.Tensor, k_new: torch.Tensor
                       ) -> None:
        """Quest's bounds after `write` (source: each slot's candidate; the new tokens' slots, and which
        are kept): per page, the min / max of its former bounds while it keeps an old slot and of the keys
        written there; 0 for a page left empty."""
        b, h, c = self.slot_pos.shape
        p = self.page_size
        keeps_old = ((source >= 0) & (source < c)).view(b, h, c // p, p).any(3, keepdim=True)
        live = (source >= 0).view(b, h, c // p, p).any(3, keepdim=True)
        page = (slot // p)[..., None].expand(*slot.shape, k_new.shape[-1])
        key = k_new.to(self.dtype).float()  # the key as stored and as the finish kernel widens by it
        for bound, fill, reduce, up in ((self.page_min, float("inf"), "amin", False),
                                        (self.page_max, float("-inf"), "amax", True)):
            new = torch.where(keeps_old, bound.float(), fill).scatter_reduce_(
                2, page, key.masked_fill(~kept[..., None], fill), reduce)
            bound.copy_(_as_bound(new.masked_fill(~live, 0.0), up, bound.dtype))

    def bound_pages(self) -> None:
        """Quest's bounds of every page from the keys held, dequantized (for a store whose slots were set
        by hand, as the tests do; the store's own writes keep the bounds of the keys before quantization)."""
        b, h, c = self.slot_pos.shape
        p = self.page_size
        codes, params = (t.view(b, h, c // p, p, -1) for t in (self.k_codes, self.k_params))
        keys = self.codec.dequantize(codes, params, torch.float32)
        live = (self.slot_pos >= 0).view(b, h, c // p, p, 1)
        low = keys.masked_fill(~live, float("inf")).amin(3).nan_to_num(0.0, posinf=0.0)
        high = keys.masked_fill(~live, float("-inf")).amax(3).nan_to_num(0.0, neginf=0.0)
        self.page_min.copy_(_as_bound(low, False, self.page_min.dtype))
        self.page_max.copy_(_as_bound(high, True, self.page_max.dtype))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """t, or its bytes when fp8 (gather / scatter / where / cat have no fp8 kernels: move the bytes)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _as_bound(x: torch.Tensor, up: bool, dtype: torch.dtype) -> torch.Tensor:
    """Quest's page bound x (fp32) as stored: in `dtype`, or e4m3 rounded outward (`page_bounds="fp8"`)
    so that a max stays >= and a min <= every key of its page."""
    return round_e4m3_outward(x, up) if dtype == torch.float8_e4m3fn else x.to(dtype)


@dataclass(frozen=True)
class TokenFormat:
    """The store format of a config with a policy (built from the config's JSON: `KVConfig.format`)."""

    options: str
    tensor_names = ("k_codes", "k_params", "v_codes", "v_params", "slot_pos", "score", "page_min", "page_max")

    @property
    def spec(self) -> PolicySpec:
        return PolicySpec.parse(self.options)

    @property
    def name(self) -> str:
        return f"{self.spec.kv}+{self.spec.policy}"

    @property
    def codec(self) -> TokenCodec:
        return TokenCodec(self.spec.kv, self.spec.group_size)

    def unsupported(self, head_dim: int) -> str:
        """Why a site of this head dim cannot use this policy ("" if it can)."""
        if self.spec.kv in ("int4", "int2") and head_dim % self.spec.group_size:
            return f"{self.spec.kv} storage: group_size={self.spec.group_size} must divide head_dim={head_dim}"
        return ""

    def allocate(self, shape, dtype: torch.dtype, device: torch.device, layer: int = 0, layers: int = 1) -> TokenStore:
        """An empty store for a cache buffer of `shape` [B, H, S, D] (sizes may be symbolic)."""
        b, h, s, d = shape
        spec, codec = self.spec, self.codec
        c = spec.capacity(s, layer, layers)
        pages = (c + spec.page_size - 1) // spec.page_size if spec.policy == "quest" else 0
        if isinstance(pages, int) and pages >= QUEST_MAX_PAGES:
            from kvfx.errors import KVFXError
            raise KVFXError(f"kvfx policy 'quest': page_size={spec.page_size} splits a {c}-token cache into {pages} "
                            f"pages per head; the page selection takes at most {QUEST_MAX_PAGES - 1}: "
                            f"use page_size >= {-(-c // (QUEST_MAX_PAGES - 1))}")

        def codes():
            return torch.zeros((b, h, c, codec.code_width(d)), dtype=codec.code_dtype(dtype), device=device)

        def params():
            return torch.zeros((b, h, c, codec.param_width(d)), dtype=dtype, device=device)

        def bounds():
            bound_dtype = torch.float8_e4m3fn if spec.page_bounds == "fp8" else dtype
            return torch.zeros((b, h, pages, d) if pages else (0,), dtype=bound_dtype, device=device)

        return TokenStore(codes(), params(), codes(), params(),
                          torch.full((b, h, c), -1, dtype=torch.int32, device=device),
                          torch.zeros((b, h, c), dtype=torch.float32, device=device),
                          bounds(), bounds(), codec, dtype, spec.page_size)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, layer: int = 0, layers: int = 1) -> TokenStore:
        """A store for fp buffers the model filled before kvfx saw them: only an all-zero (fresh)
        buffer can be adopted, since a policy must see the tokens arrive to choose among them."""
        from kvfx.errors import KVFXError

        if keys.any() or values.any():
            raise KVFXError(f"kvfx policy {self.spec.policy!r} needs to see the prompt's tokens arrive: "
                            "compile the prefill with kvfx too (this cache already holds tokens)")
        return self.allocate(keys.shape, keys.dtype, keys.device, layer, layers)

    def from_tensors(self, tensors) -> TokenStore:
        dtype = (tensors[0] if self.spec.kv == "none" else tensors[1]).dtype  # the model dtype
        return TokenStore(*tensors, self.codec, dtype, self.spec.page_size)
