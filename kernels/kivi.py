"""KIVI quantized KV storage: the store layout, quantize-and-store (reference + Triton), dequantize.

Formats (one `KiviStore` class, chosen by `bits` / `fp8`):

- **int8 / int4 / int2** (KIVI, asymmetric min/max): scale = (max - min) / (2^b - 1), zero = min,
  q = clamp(floor((x - zero) / scale + 0.5), 0, 2^b - 1), x' = q * scale + zero. A zero range keeps
  scale 1, so a constant dequantizes exactly to its value. Keys: one (scale, zero) per channel per
  group of G consecutive tokens. Values: one (scale, zero) per token per group of G channels.
  Rounding is half-up (floor(y + 0.5)) rather than torch.round's half-to-even so that the Triton
  kernel and the reference compute the same codes.
- **fp8** (bits=8, fp8=True): e4m3 codes, one fp32 scale per (batch row, KV head) for keys and one
  for values, set by the first write of a row (start == 0) to amax / 448 over that write's tokens and
  kept for the row's later tokens, which saturate at +-448 * scale (vLLM's static-scale behaviour).
- **none** (bits=16): the codes are the model-dtype values themselves; the same kernels read it, so
  benchmarks compare formats under one implementation.

Static positions (a HF StaticCache addresses its cache by absolute position 0..max_len-1, and so do
we). For a row of length L (tokens at positions 0..L-1):

    qlen(L) = G * floor(max(L - R, 0) / G)

tokens [0, qlen) live in the packed store at their own position, tokens [qlen, L) (between R and
R + G - 1 of them once L >= R) in a full-precision ring buffer of W = R + G slots at slot pos % W.
Keys and values share the boundary; when a write makes a group of G tokens fall out of the residual
window it is quantized at once (a prefill quantizes every complete group beyond the residual
directly). Since qlen is a pure function of L, the store keeps no per-row state: every function
takes the per-row lengths (ragged rows are free), and a write and an attention agree on the
boundary by construction. R must be a multiple of G (R = 0 is allowed: then only the unfinished
group stays in full precision; the benchmark runs fp8 and none that way).

Layout of a store for B rows, H KV heads, capacity S = max_len, head dim D, PB = 8 // bits codes per
byte, NG = S // G quantized groups (qlen never exceeds G * floor(S / G)), all tensors contiguous:

    k_codes, v_codes  [B, H, NG*G, D // PB] uint8; codes packed along D, little end first (code i
                      of a byte at bits [i*b, (i+1)*b), channel d in byte d // PB, slot d % PB).
                      fp8: [B, H, NG*G, D] float8_e4m3fn; none: [B, H, NG*G, D] model dtype.
    k_scale, k_zero   [B, H, NG, D] model dtype (per channel per group of G tokens), int4:
                      slot-major, index I * D/2 + j holds channel 2 * j + I, so the params of code slot I
                      (channels I, I + 2, ...) lie together, as the decode kernel takes them in pairs
                      (`slot_major` / `channel_major`); int2, int8: channel order;
                      fp8: k_scale [B, H] fp32, k_zero empty; none: both empty.
    v_scale, v_zero   [B, H, NG, D // G, G] model dtype (per token per group of G channels, the G
                      tokens of a token group contiguous: the decode kernel's value dequantization
                      takes the params of consecutive tokens in pairs, as loaded);
                      fp8: v_scale [B, H] fp32, v_zero empty; none: both empty.
    k_ring, v_ring    [B, H, R + G, D] model dtype (residual ring buffer).

The packed store spans all S positions although the newest R..R+G-1 live in the ring: addressing
stays pos-based and the overhead is (R + G) / S of the codes.

Preconditions (not checked, a check would need a device sync): writes append (the tokens written to
a row start at its current length, `start`), and lengths never exceed max_len.
`store_write` / `store_write_triton` run the Triton kernels (CUDA tensors, or CPU under
TRITON_INTERPRET=1); `store_write_reference` is the plain-PyTorch definition and the CPU path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # largest finite float8_e4m3fn
VALID_BITS = (2, 4, 8, 16)


def levels(bits: int) -> int:
    return (1 << bits) - 1


def quantized_length(lengths: torch.Tensor, group_size: int, residual: int) -> torch.Tensor:
    """qlen(L) = G * floor(max(L - R, 0) / G): how many leading tokens of a row are in the packed store."""
    return (lengths - residual).clamp(min=0) // group_size * group_size


def use_triton(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU ones under the interpreter (the tests)."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class KiviStore:
    """The tensors one attention site's quantized cache holds (layout in the module docstring)."""

    k_codes: torch.Tensor
    v_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    k_ring: torch.Tensor
    v_ring: torch.Tensor
    bits: int
    group_size: int
    residual: int
    fp8: bool = False

    @property
    def ring_size(self) -> int:
        return self.residual + self.group_size

    @property
    def dtype(self) -> torch.dtype:
        return self.k_ring.dtype

    @property
    def head_dim(self) -> int:
        return self.k_ring.shape[-1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor))

    def nbytes(self) -> int:
        """Bytes really held: the storages of the tensors, not a formula."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def drop_front(self, count: int) -> None:
        """Forget positions [0, count), a multiple of G, in place: position p moves to p - count. The packed
        groups move count / G groups down and the ring turns by count, so a row of length L - count reads
        the tokens a row of length L read at the same places (qlen(L - count) = qlen(L) - count, or both
        parts in the ring). A sliding window's store (kvfx.cat_store.GrowingStore.keep_last)."""
        groups = count // self.group_size
        params = (self.k_scale, self.k_zero, self.v_scale, self.v_zero) if self.bits != 16 and not self.fp8 else ()
        for t, step in [(self.k_codes, count), (self.v_codes, count), *((p, groups) for p in params)]:
            kept = max(t.shape[2] - step, 0)
            t[:, :, :kept] = t[:, :, step:step + kept].clone()
        for ring in (self.k_ring, self.v_ring):
            ring.copy_(ring.roll(-count, 2))

    @staticmethod
    def validate(head_dim: int, bits: int, group_size: int, residual: int, fp8: bool) -> None:
        if bits not in VALID_BITS:
            raise ValueError(f"bits={bits}: valid values are {VALID_BITS} (16 = no quantization)")
        if fp8 and bits != 8:
            raise ValueError(f"fp8 needs bits=8, got bits={bits}")
        # Powers of two >= 16: the kernels tile one group of tokens per step (tl.arange, tl.dot N >= 16).
        if group_size < 16 or group_size & (group_size - 1):
            raise ValueError(f"group_size={group_size}: must be a power of two >= 16")
        if head_dim % group_size:
            raise ValueError(f"group_size={group_size} must divide head_dim={head_dim}")
        if residual < 0 or residual % group_size:
            raise ValueError(f"residual={residual} must be a non-negative multiple of group_size={group_size}")

    @staticmethod
    def expected_nbytes(batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                        bits: int = 2, group_size: int = 32, residual: int = 128, fp8: bool = False) -> int:
        """The bytes `allocate` holds, by arithmetic (keys + values)."""
        isz = torch.empty((), dtype=dtype).element_size()
        rows = batch * kv_heads
        slots = max_len // group_size * group_size
        ring = rows * (residual + group_size) * head_dim * isz
        if bits == 16:
            return 2 * (rows * slots * head_dim * isz + ring)
        codes = rows * slots * head_dim * bits // 8
        if fp8:
            return 2 * (codes + rows * 4 + ring)
        k_params = 2 * rows * (slots // group_size) * head_dim * isz
        v_params = 2 * rows * slots * (head_dim // group_size) * isz
        return 2 * codes + k_params + v_params + 2 * ring

    @classmethod
    def allocate(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, bits: int = 2, group_size: int = 32, residual: int = 128,
                 fp8: bool = False) -> KiviStore:
        """An empty store for `max_len` positions of `batch` rows and `kv_heads` heads."""
        cls.validate(head_dim, bits, group_size, residual, fp8)
        groups = max_len // group_size
        slots = groups * group_size

        def empty():
            return torch.empty(0, dtype=dtype, device=device)

        def ring():
            return torch.zeros(batch, kv_heads, residual + group_size, head_dim, dtype=dtype, device=device)

        if bits == 16:
            codes_shape, code_dtype = (batch, kv_heads, slots, head_dim), dtype
        elif fp8:
            codes_shape, code_dtype = (batch, kv_heads, slots, head_dim), torch.float8_e4m3fn
        else:
            codes_shape, code_dtype = (batch, kv_heads, slots, head_dim * bits // 8), torch.uint8

        def codes():
            return torch.zeros(codes_shape, dtype=code_dtype, device=device)

        if bits == 16:
            params = (empty(), empty(), empty(), empty())
        elif fp8:
            one = torch.ones(batch, kv_heads, dtype=torch.float32, device=device)
            params = (one, empty(), one.clone(), empty())
        else:
            # (scale 1, zero 0) so unwritten groups read as zeros.
            params = (torch.ones(batch, kv_heads, groups, head_dim, dtype=dtype, device=device),
                      torch.zeros(batch, kv_heads, groups, head_dim, dtype=dtype, device=device),
                      torch.ones(batch, kv_heads, groups, head_dim // group_size, group_size, dtype=dtype,
                                 device=device),
                      torch.zeros(batch, kv_heads, groups, head_dim // group_size, group_size, dtype=dtype,
                                  device=device))
        return cls(codes(), codes(), *params, ring(), ring(), bits, group_size, residual, fp8)


# ---------------------------------------------------------------------------------------------
# Reference quantizers (the spec); the Triton kernels below compute the same arithmetic.


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D] (values < 2^bits) -> uint8 [..., D * bits // 8], little end first."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    grouped = codes.to(torch.int32).unflatten(-1, (-1, per_byte)) << shifts
    return grouped.sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., D * bits // 8] -> int32 [..., D]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & levels(bits)).flatten(-2)


def quantize_asym_reference(x: torch.Tensor, dim: int, bits: int, dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization reducing over `dim` (kept, size 1).

    Returns (codes int32 like x, scale, zero in `dtype`). The codes are computed with the scale and
    zero as stored (rounded to `dtype`), so dequantization inverts them exactly up to scale / 2.
    """
    xf = x.float()
    low, high = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    scale = ((high - low) / levels(bits)).to(dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero range: exact, see docstring
    zero = low.to(dtype).float()
    codes = torch.floor((xf - zero) / scale + 0.5).clamp_(0, levels(bits)).to(torch.int32)
    return codes, scale.to(dtype), zero.to(dtype)


def quantize_keys_reference(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys per channel: x [..., G, D] (one group of G tokens) -> (packed [..., G, D*b/8], scale, zero [..., D])."""
    codes, scale, zero = quantize_asym_reference(x, -2, bits, x.dtype)
    return pack_codes(codes, bits), scale.squeeze(-2), zero.squeeze(-2)


def quantize_values_reference(x: torch.Tensor, bits: int, group_size: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values per token per group of G channels: x [..., D] -> (packed [..., D*b/8], scale, zero [..., D/G])."""
    codes, scale, zero = quantize_asym_reference(x.unflatten(-1, (-1, group_size)), -1, bits, x.dtype)
    return pack_codes(codes.flatten(-2), bits), scale.squeeze(-1), zero.squeeze(-1)


def round_e4m3_outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """x saturated to +-448 and rounded to the e4m3 value toward +inf (up) or -inf: float8_e4m3fn codes
    of a bound that stays a bound (a max rounded up, a min down). The step 2^(e - 3) near x comes from its
    exponent, as in `_round_e4m3_outward`, so the reference and the kernels store the same bytes."""
    xf = x.float().clamp(-FP8_MAX, FP8_MAX)
    step = torch.ldexp(torch.ones_like(xf), torch.frexp(xf).exponent.clamp(min=-5) - 4)  # 2^(max(e, -6) - 3)
    t = xf / step  # exact: a power of two
    return ((torch.ceil(t) if up else torch.floor(t)) * step).to(torch.float8_e4m3fn)


def quantize_fp8_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., D] / scale (broadcast), saturated to the e4m3 range -> float8_e4m3fn codes."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_scale_reference(x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per (row, head) fp8 scale amax / 448 over the first count[b] tokens of x [B, H, T, D] (1 if none)."""
    valid = torch.arange(x.shape[2], device=x.device) < count[:, None]  # [B, T]
    amax = torch.where(valid[:, None, :, None], x.float().abs(), 0.0).amax(dim=(2, 3))
    # A tensor divisor: CUDA divides by a Python scalar as a multiply by its fp32 reciprocal, one ulp
    # off amax / 448 (a constant input then no longer comes back exactly on the GPU).
    return torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))


# ---------------------------------------------------------------------------------------------
# Writing


def _rows(x: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """An int or [B] tensor of per-row positions as int32 [B] on `device`."""
    if isinstance(x, int):
        return torch.full((batch,), x, dtype=torch.int32, device=device)
    return x.to(device=device, dtype=torch.int32).expand(batch).contiguous()


def _write_args(store: KiviStore, k: torch.Tensor, v: torch.Tensor, start, lengths):
    b, h, t, d = k.shape
    if v.shape != k.shape or (b, h, d) != (store.k_ring.shape[0], store.k_ring.shape[1], store.head_dim):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit a store of rings "
                         f"{tuple(store.k_ring.shape)}")
    start = _rows(start, b, k.device)
    lengths = start + t if lengths is None else _rows(lengths, b, k.device)
    return start, lengths


def _update_fp8_scales(store: KiviStore, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
                       lengths: torch.Tensor) -> None:
    """A row's first write (start == 0) sets its per-head fp8 scales; later writes keep them."""
    count = lengths - start
    first = ((start == 0) & (count > 0))[:, None]
    store.k_scale.copy_(torch.where(first, fp8_scale_reference(k, count), store.k_scale))
    store.v_scale.copy_(torch.where(first, fp8_scale_reference(v, count), store.v_scale))


def store_write_reference(store: KiviStore, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor | int,
                          lengths: torch.Tensor | int | None = None) -> None:
    """Append k, v [B, H, T, D] to each row at positions start[b] .. lengths[b] - 1, in place.

    start: int or int [B], each row's length before the write. lengths: int or int [B], its length after
    (<= start + T; tokens t >= lengths[b] - start[b] of a row are padding); None: start + T.
    """
    start, lengths = _write_args(store, k, v, start, lengths)
    g, w = store.group_size, store.ring_size
    if store.fp8:
        _update_fp8_scales(store, k, v, start, lengths)
    q_before = quantized_length(start, g, store.residual)
    q_after = quantized_length(lengths, g, store.residual)
    for b, (s0, end, q0, q1) in enumerate(zip(*(x.tolist() for x in (start, lengths, q_before, q_after)))):
        for new, ring, codes, which in ((k[b], store.k_ring[b], store.k_codes[b], "k"),
                                        (v[b], store.v_ring[b], store.v_codes[b], "v")):
            if q1 > q0:
                # Tokens [q0, q1) leave the residual: the old ones come from the ring, the rest are new.
                old = ring[:, torch.arange(q0, min(s0, q1), device=k.device) % w]
                window = torch.cat([old, new[:, max(q0 - s0, 0):max(q1 - s0, 0)].to(ring.dtype)], dim=1)
                _flush_reference(store, b, which, window, q0, codes)
            keep = torch.arange(max(q1, s0), end, device=k.device)
            ring[:, keep % w] = new[:, keep - s0].to(ring.dtype)


def _flush_reference(store: KiviStore, b: int, which: str, window: torch.Tensor, q0: int,
                     codes: torch.Tensor) -> None:
    """Quantize the complete groups window [H, n*G, D] into positions q0 .. q0 + n*G - 1 of row b."""
    g, n = store.group_size, window.shape[1]
    if store.bits == 16:
        codes[:, q0:q0 + n] = window.to(codes.dtype)
    elif store.fp8:
        scale = (store.k_scale if which == "k" else store.v_scale)[b][:, None, None]
        codes[:, q0:q0 + n] = quantize_fp8_reference(window, scale)
    elif which == "k":
        packed, scale, zero = quantize_keys_reference(window.unflatten(1, (-1, g)), store.bits)
        codes[:, q0:q0 + n] = packed.flatten(1, 2)
        store.k_scale[b, :, q0 // g:(q0 + n) // g] = slot_major(scale, store.bits)
        store.k_zero[b, :, q0 // g:(q0 + n) // g] = slot_major(zero, store.bits)
    else:
        packed, scale, zero = quantize_values_reference(window, store.bits, g)
        codes[:, q0:q0 + n] = packed
        store.v_scale[b, :, q0 // g:(q0 + n) // g] = token_minor(scale, g)
        store.v_zero[b, :, q0 // g:(q0 + n) // g] = token_minor(zero, g)


def token_minor(params: torch.Tensor, group_size: int) -> torch.Tensor:
    """Value params [..., n*G, D/G] (per token) in the store's layout [..., n, D/G, G]."""
    return params.unflatten(-2, (-1, group_size)).transpose(-1, -2)


def token_major(params: torch.Tensor) -> torch.Tensor:
    """The store's value params [..., NG, D/G, G] as [..., NG*G, D/G] (one row per token)."""
    return params.transpose(-1, -2).flatten(-3, -2)


def key_param_slots(bits: int) -> int:
    """How many code slots the store's key params are grouped by (`slot_major`): int4's 2, so the decode
    kernel loads a slot's params contiguously, in the pairs its PTX takes them; 1 (channel order)
    otherwise. int2 slot-major measured slower on an H100 (B8 S64K 742 vs 281 us: per-token param loads;
    its kernel takes channel-order params as words of four, `_param_slot`)."""
    return 2 if bits == 4 else 1


def slot_major(params: torch.Tensor, bits: int) -> torch.Tensor:
    """Key params [..., D] in channel order in the store's order: with n = key_param_slots(bits), index
    I * D/n + j holds channel n * j + I."""
    return params.unflatten(-1, (-1, key_param_slots(bits))).transpose(-1, -2).flatten(-2)


def channel_major(params: torch.Tensor, bits: int) -> torch.Tensor:
    """The store's key params [..., D] (`slot_major`) back in channel order."""
    return params.unflatten(-1, (key_param_slots(bits), -1)).transpose(-1, -2).flatten(-2)


@triton.jit
def _key_param_index(d, D: tl.constexpr, BITS: tl.constexpr):
    """Where the store keeps the key param of channel d (`slot_major`)."""
    index = d
    if BITS == 4:
        index = d % 2 * (D // 2) + d // 2
    return index


@triton.jit
def _value_param_index(slot, group, G: tl.constexpr, NGD: tl.constexpr):
    """Index of the value param of token `slot` (a flat packed-store slot) and channel group `group` in the
    store's [.., NG, D / G, G] layout (`token_minor`: the G tokens of a token group contiguous)."""
    return (slot // G * NGD + group) * G + slot % G


@triton.jit
def _load_group(new_ptr, ring_ptr, pos, s0, new_row, ring_row, stride_t, W: tl.constexpr, D: tl.constexpr):
    """The G tokens at positions `pos` [G] as fp32 [G, D]: older than s0 from the ring, else new."""
    d = tl.arange(0, D)[None, :]
    old = pos[:, None] < s0
    x_old = tl.load(ring_ptr + ring_row + (pos[:, None] % W) * D + d, mask=old, other=0.0)
    x_new = tl.load(new_ptr + new_row + (pos[:, None] - s0) * stride_t + d, mask=~old, other=0.0)
    return tl.where(old, x_old.to(tl.float32), x_new.to(tl.float32))


@triton.jit
def _pack(codes, G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [G, D] -> [G, D*BITS/8] bytes (int32), little end first."""
    PB: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PB) * BITS
    return tl.sum(tl.reshape(codes, (G, D // PB, PB)) << shifts[None, None, :], axis=2)


@triton.jit
def _unpack(packed, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Inverse of `_pack`: bytes [N, D*BITS/8] -> fp32 codes [N, D]."""
    PB: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PB) * BITS
    codes = (packed.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (N, D)).to(tl.float32)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to the nearest DTYPE value (ties to even, as torch), kept in fp32.

    Why by hand for bf16: the interpreter's fp32 -> bf16 cast truncates; rounding the bits first makes
    the cast exact everywhere.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _quantize(x, low, high, BITS: tl.constexpr, DTYPE: tl.constexpr):
    """`quantize_asym_reference` on x with its min/max broadcast: (codes int32, scale, zero) in fp32
    as stored (rounded to DTYPE)."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    scale = _round_to((high - low) / LEVELS, DTYPE)
    scale = tl.where(scale > 0, scale, 1.0)
    zero = _round_to(low, DTYPE)
    codes = tl.floor((x - zero) / scale + 0.5)
    codes = tl.minimum(tl.maximum(codes, 0.0), LEVELS).to(tl.int32)
    return codes, scale, zero


@triton.jit
def _e4m3_exponent(y):
    """floor(log2 |y|), at least -6: e4m3 values near y are spaced 2^(e - 3) (3 mantissa bits; 2^-9 for
    subnormals below 2^-6). From the exponent bits, not log2 / exp2, which are approximate on the GPU."""
    return tl.maximum(((tl.abs(y).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)


@triton.jit
def _round_e4m3(y):
    """y (|y| <= 448) rounded to the nearest e4m3 value, ties to even (as torch), so the cast is exact.

    Why by hand: the interpreter's fp32 -> fp8 cast drops the carry when the mantissa rounds up
    (127.2 -> 64).
    """
    a = tl.abs(y)
    e = _e4m3_exponent(y)
    t = a * ((130 - e) << 23).to(tl.float32, bitcast=True)  # a / 2^(e - 3), exact
    r = tl.floor(t + 0.5)
    r = tl.where((r - t == 0.5) & (r % 2 == 1), r - 1.0, r) * ((124 + e) << 23).to(tl.float32, bitcast=True)
    return tl.where(y < 0, -r, r)


@triton.jit
def _round_e4m3_outward(y, UP: tl.constexpr):
    """`round_e4m3_outward`: y saturated to +-448, rounded to e4m3 toward +inf (UP) or -inf, in fp32
    (an e4m3 value, so the cast is exact)."""
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    e = _e4m3_exponent(y)
    t = y * ((130 - e) << 23).to(tl.float32, bitcast=True)  # y / 2^(e - 3), exact
    r = tl.ceil(t) if UP else tl.floor(t)
    return r * ((124 + e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _store_flush_kernel(new_ptr, ring_ptr, codes_ptr, scale_ptr, zero_ptr, start_ptr, len_ptr,
                        H, stride_b, stride_h, stride_t, NG,
                        R: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                        FP8: tl.constexpr, KEYS: tl.constexpr, DTYPE: tl.constexpr):
    """One program per (row, head, j): quantize the j-th group that leaves the residual in this write."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    s0 = tl.load(start_ptr + b)
    end = tl.load(len_ptr + b)
    q0 = tl.maximum(s0 - R, 0) // G * G
    q1 = tl.maximum(end - R, 0) // G * G
    first = q0 + tl.program_id(1) * G
    if first < q1:
        W: tl.constexpr = R + G
        pos = first + tl.arange(0, G)
        x = _load_group(new_ptr, ring_ptr, pos, s0, b * stride_b + (pid_bh % H) * stride_h,
                        pid_bh * W * D, stride_t, W, D)
        slot_row = pid_bh * NG * G + pos[:, None]  # [G, 1] token slots of the packed store
        if BITS == 16:
            tl.store(codes_ptr + slot_row * D + tl.arange(0, D)[None, :], x.to(DTYPE))
        elif FP8:
            y = _round_e4m3(tl.minimum(tl.maximum(x / tl.load(scale_ptr + pid_bh), -448.0), 448.0))
            tl.store(codes_ptr + slot_row * D + tl.arange(0, D)[None, :], y.to(tl.float8e4nv))
        else:
            DB: tl.constexpr = D * BITS // 8
            if KEYS:  # one (scale, zero) per channel over the G tokens
                codes, scale, zero = _quantize(x, tl.min(x, axis=0)[None, :], tl.max(x, axis=0)[None, :],
                                               BITS, DTYPE)
                param = (pid_bh * NG + first // G) * D + _key_param_index(tl.arange(0, D)[None, :], D, BITS)
            else:  # one (scale, zero) per token per group of G channels
                x3 = tl.reshape(x, (G, D // G, G))
                codes, scale, zero = _quantize(x3, tl.min(x3, axis=2)[:, :, None], tl.max(x3, axis=2)[:, :, None],
                                               BITS, DTYPE)
                codes = tl.reshape(codes, (G, D))
                param = _value_param_index(slot_row[:, :, None], tl.arange(0, D // G)[None, :, None], G, D // G)
            tl.store(scale_ptr + param, scale.to(DTYPE))
            tl.store(zero_ptr + param, zero.to(DTYPE))
            tl.store(codes_ptr + slot_row * DB + tl.arange(0, DB)[None, :], _pack(codes, G, D, BITS).to(tl.uint8))


@triton.jit
def _store_residual_kernel(new_ptr, ring_ptr, start_ptr, len_ptr, H, T, stride_b, stride_h, stride_t,
                           R: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program per (row, head, block of new tokens): copy those that stay residual into the ring."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    s0 = tl.load(start_ptr + b)
    end = tl.load(len_ptr + b)
    q1 = tl.maximum(end - R, 0) // G * G
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = s0 + t
    keep = ((pos >= q1) & (pos < end) & (t < T))[:, None]
    d = tl.arange(0, D)[None, :]
    x = tl.load(new_ptr + b * stride_b + (pid_bh % H) * stride_h + t[:, None] * stride_t + d, mask=keep)
    tl.store(ring_ptr + (pid_bh * (R + G) + pos[:, None] % (R + G)) * D + d, x.to(ring_ptr.dtype.element_ty),
             mask=keep)


@triton.jit
def _fp8_scale_kernel(new_ptr, scale_ptr, start_ptr, len_ptr, H, T, stride_b, stride_h, stride_t,
                      D: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program per (row, head): `_update_fp8_scales` in one launch. A row's first write (start 0)
    sets its scale to amax / 448 over the write's tokens (1 if they are all zero); later writes, every
    decode step, only read the row's start. div_rn: `/` is approximate on the GPU, and the scale must
    be the reference's to the bit."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    s0 = tl.load(start_ptr + b)
    count = tl.load(len_ptr + b) - s0
    if (s0 == 0) & (count > 0):
        d = tl.arange(0, D)[None, :]
        amax = tl.zeros([BLOCK_T, D], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            x = tl.load(new_ptr + b * stride_b + (pid % H) * stride_h + t[:, None] * stride_t + d,
                        mask=(t < count)[:, None], other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        top = tl.max(tl.max(amax, axis=1), axis=0)
        tl.store(scale_ptr + pid, tl.where(top > 0, tl.math.div_rn(top, 448.0), 1.0))


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def store_write_triton(store: KiviStore, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor | int,
                       lengths: torch.Tensor | int | None = None) -> None:
    """Triton version of `store_write_reference` (same arguments): flush kernel, then ring kernel.

    Two launches because a new token's ring slot can be the slot of an old token the flush still reads.
    """
    start, lengths = _write_args(store, k, v, start, lengths)
    b, h, t, d = k.shape
    if t == 0:
        return
    g, r = store.group_size, store.residual
    groups = store.k_codes.shape[2] // g
    for new, ring, codes, scale, zero, keys in (
            (k, store.k_ring, store.k_codes, store.k_scale, store.k_zero, True),
            (v, store.v_ring, store.v_codes, store.v_scale, store.v_zero, False)):
        if new.stride(-1) != 1:
            new = new.contiguous()
        strides = (new.stride(0), new.stride(1), new.stride(2))
        if store.fp8:  # before the flush, which quantizes with the scale
            _fp8_scale_kernel[(b * h,)](new, scale, start, lengths, h, t, *strides, D=d,
                                        BLOCK_T=min(32, triton.next_power_of_2(t)))
        # A write of T tokens completes at most ceil(T / G) groups (see `quantized_length`).
        _store_flush_kernel[(b * h, triton.cdiv(t, g))](
            new, ring, codes, scale, zero, start, lengths, h, *strides, groups,
            R=r, G=g, D=d, BITS=store.bits, FP8=store.fp8, KEYS=keys, DTYPE=TL_DTYPES[store.dtype])
        block_t = min(64, triton.next_power_of_2(t))
        _store_residual_kernel[(b * h, triton.cdiv(t, block_t))](
            new, ring, start, lengths, h, t, *strides, R=r, G=g, D=d, BLOCK_T=block_t)


def store_write(store: KiviStore, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor | int,
                lengths: torch.Tensor | int | None = None) -> None:
    """`store_write_triton` where Triton runs (CUDA, interpreter), `store_write_reference` elsewhere."""
    (store_write_triton if use_triton(k) else store_write_reference)(store, k, v, start, lengths)


# ---------------------------------------------------------------------------------------------
# Reading


def dequantize_reference(store: KiviStore, lengths: torch.Tensor | int, dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-precision K, V [B, H, S, D] with S = max(lengths); positions >= lengths[b] are zero."""
    b, h, _, d = store.k_ring.shape
    lengths = _rows(lengths, b, store.k_ring.device)
    dtype = dtype or store.dtype
    g, w = store.group_size, store.ring_size
    s = int(lengths.max())
    pos = torch.arange(s, device=lengths.device)
    qlen = quantized_length(lengths, g, store.residual)
    slots = min(s, store.k_codes.shape[2])
    out = []
    for which, codes, ring in (("k", store.k_codes, store.k_ring), ("v", store.v_codes, store.v_ring)):
        quant = torch.zeros(b, h, s, d, dtype=torch.float32, device=ring.device)
        quant[:, :, :slots] = _dequantize_codes(store, which, codes[:, :, :slots])
        res = ring[:, :, pos % w].float()
        x = torch.where((pos < qlen[:, None])[:, None, :, None], quant, res)
        out.append(torch.where((pos < lengths[:, None])[:, None, :, None], x, 0.0).to(dtype))
    return out[0], out[1]


def _dequantize_codes(store: KiviStore, which: str, codes: torch.Tensor) -> torch.Tensor:
    """codes [B, H, n, ...] of the first n positions -> fp32 [B, H, n, D]."""
    n, g = codes.shape[2], store.group_size
    if store.bits == 16:
        return codes.float()
    if store.fp8:
        return codes.float() * (store.k_scale if which == "k" else store.v_scale)[:, :, None, None]
    x = unpack_codes(codes, store.bits).float()
    if which == "k":
        idx = torch.arange(n, device=codes.device) // g
        scale, zero = (channel_major(p[:, :, idx], store.bits).float() for p in (store.k_scale, store.k_zero))
        return x * scale + zero
    scale = token_major(store.v_scale)[:, :, :n].float().repeat_interleave(g, dim=-1)
    return x * scale + token_major(store.v_zero)[:, :, :n].float().repeat_interleave(g, dim=-1)
