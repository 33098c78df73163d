"""Decode attention over a `KiviStore`: one query token per row, GQA, quantized + residual KV.

Each row b attends over its lengths[b] cached tokens (the current token included: the write comes
first): positions [0, qlen) are dequantized from the packed store in registers, [qlen, lengths[b])
come from the full-precision ring, and one softmax covers both (`kvfx.kernels.kivi` for the layout).

Triton (flash-decoding): `_decode_attention_kernel` runs one program per (row, KV head, split). The
g = Hq / Hkv query heads of a KV head are packed into the M dimension of `tl.dot` (padded to 16, the
smallest M it takes), so the KV of a head is read once for all of them. Splits 0..NS-1 share the
quantized tokens of the row in tiles of BLOCK_N (a multiple of G), split NS reads the residual ring.
Each writes a partial (running max, sum of exp, unnormalized output); `_decode_combine_kernel`
merges them exactly (rescaling by exp(m_i - max_i m_i)). The dot operands are fp32 under the
interpreter (its bf16 `tl.dot` is wrong) and the query's dtype on the GPU, which is what the
reference does too (dequantized K, V in the model dtype, then fp32 softmax).

The int formats (int8 / int4 / int2) take `_decode_int_kernel`, same grid and partials, which steps
one group of G tokens at a time and never reshapes a tile: a dot over channels does not care about
their order, so code slot I of every packed byte (channels I + PB * j) is used as it lies in the
loaded [G, D / PB] byte tile, against the matching channels of q for the keys and into a separate
accumulator (stored at those channels at the end) for the values. int4 / int2 codes of bf16 / fp16
stores become 16-bit floats by PTX, two per instruction (`_dequantize_codes`); int8 and the
interpreter take the exponent bits in fp32 (`_code_slot`). int4 / int2 key params of bf16 / fp16
stores are loaded as words of 8 // bits values, and one warp per program keeps the softmax free of
cross-warp reductions. On the H100 at B=8, S=64K this is 2.1x / 1.8x faster than SDPA for int4 / int2
(session 7; the fp32 path was 1.3x / 1.6x) and 1.25x for int8 (the generic tile kernel: 0.9x); what
limits it is instructions per code (the dequantize, addresses, operand moves), not memory.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvfx.kernels.kivi import (TL_DTYPES, KiviStore, _key_param_index, _unpack, _value_param_index,
                               dequantize_reference, use_triton)

HEAD_DIMS = (64, 128)
# One warp per program for the int kernel: no cross-warp reductions in the softmax, and each thread
# holds several tokens of a channel in the dot operand, so it converts a key parameter once for them.
INT_NUM_WARPS = 1
# Groups of G tokens the int kernel folds per step (block_n = this * G).
INT_GROUPS_PER_STEP = 1
# How the int kernel expands the per-token value params (0 gather, 1 select, 2 reshape), by how its
# codes are dequantized. PTX (int4 / int2 into bf16 / fp16): 2 (session 7, H100, int4, one warp,
# default splits: B8 S64K 324 us vs 504 (1) and 496 (0); B44 S32K with a mask bias, as the compile
# path runs it, 904 us vs 1607 (1) and 1303 (0)). fp32 arithmetic (int8, the interpreter): 1, the
# fastest in every row of session 6's sweep (decode_attention.json: 3 formats x 4 shapes).
INT_VMODE_PTX = 2
INT_VMODE_FP32 = 1
LOG2E = 1.4426950408889634
# Most splits of the generic kernel's default launch (`default_num_splits`).
MAX_SPLITS = 64
# Most split partials the combine kernel merges per load (one tile of [COMBINE_SPLITS, D] fp32, 64
# registers a thread at 8 warps).
COMBINE_SPLITS = 128


def decode_attention_reference(q: torch.Tensor, store: KiviStore, lengths: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """softmax(q K^T * scale) V over each row's first lengths[b] >= 1 tokens, in fp32.

    q [B, Hq, 1, D] with Hq a multiple of the store's Hkv (query head h uses KV head h // g, as
    HF's repeat_kv); lengths int [B]. Returns [B, Hq, 1, D] in q's dtype.
    """
    b, hq, _, d = q.shape
    keys, values = dequantize_reference(store, lengths, q.dtype)  # [B, Hkv, S, D]
    hkv = keys.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float().reshape(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,bhsd->bhgs", qf, keys.float()) * scale
    valid = torch.arange(keys.shape[2], device=q.device) < lengths.to(q.device)[:, None]  # [B, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgs,bhsd->bhgd", scores.softmax(-1), values.float())
    return out.reshape(b, hq, 1, d).to(q.dtype)


@triton.jit
def _softmax_weights(s, m_i, l_i):
    """Fold scores s [M, N] (base 2, -inf = masked) into the running (m, l): returns (m, l, p, alpha)
    with p the tile's unnormalized weights and alpha the factor for the accumulators. A row that has
    seen only masked scores keeps m = -inf (no NaN from -inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), p, alpha


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT: tl.constexpr):
    """Fold scores s [M, N] (base 2, -inf = masked) and values v [N, D] into the running (m, l, acc)."""
    m_i, l_i, p, alpha = _softmax_weights(s, m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT))
    return m_i, l_i, acc


@triton.jit
def _mask_bias(bias_ptr, row, pos, hi, BIAS_COLS):
    """The additive mask of batch row `row` at positions pos, in base 2 (-inf at or past hi <= BIAS_COLS).
    bias [B, BIAS_COLS] fp32, natural-log units as the model gave it."""
    return tl.load(bias_ptr + row * BIAS_COLS + pos, mask=pos < hi, other=float("-inf")) * 1.4426950408889634


@triton.jit
def _fold_unwritten(bias_ptr, row, lo, hi, BIAS_COLS, m_i, l_i, BLOCK_T: tl.constexpr):
    """Fold positions lo .. hi - 1, which hold no token (keys and values zero, as in the model's zeroed
    cache, so each logit is the mask's bias there), into (m, l). Returns (m, l, alpha), alpha the
    factor for the accumulators. Fully masked tiles (the usual case: a causal mask) cost one read."""
    m_0 = m_i
    for t0 in range(lo, hi, BLOCK_T):
        b2 = _mask_bias(bias_ptr, row, t0 + tl.arange(0, BLOCK_T), hi, BIAS_COLS)
        if tl.max(b2, axis=0) > float("-inf"):
            m_i, l_i, p, alpha = _softmax_weights(tl.broadcast_to(b2[None, :], (m_i.shape[0], BLOCK_T)), m_i, l_i)
    return m_i, l_i, tl.where(m_i == float("-inf"), 1.0, tl.exp2(m_0 - m_i))


@triton.jit
def _residual_attention(q_dot, k_ring, v_ring, bh, qlen, length, m_i, l_i, acc, bias_ptr, row, BIAS_COLS,
                        R: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr,
                        BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Fold the full-precision residual, positions qlen .. length - 1 at ring slot pos % (R + G), into
    the running (m, l, acc) of the query rows q_dot [M, D], under the row's mask bias."""
    d = tl.arange(0, D)[None, :]
    for start in range(qlen, length, BLOCK_R):
        pos = start + tl.arange(0, BLOCK_R)
        valid = pos < length
        ring = (bh * (R + G) + pos[:, None] % (R + G)) * D + d
        k = tl.load(k_ring + ring, mask=valid[:, None], other=0.0)
        s = tl.dot(q_dot, tl.trans(k.to(DOT)))
        if HAS_BIAS:
            s += _mask_bias(bias_ptr, row, pos, BIAS_COLS, BIAS_COLS)[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        v = tl.load(v_ring + ring, mask=valid[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT)
    return m_i, l_i, acc


@triton.jit
def _unwritten_share(length, BIAS_COLS, split, NS):
    """Split `split` of NS's share [lo, hi) of the unwritten positions length .. BIAS_COLS - 1."""
    per = tl.cdiv(tl.maximum(BIAS_COLS - length, 0), NS)
    lo = length + split * per
    return lo, tl.minimum(lo + per, BIAS_COLS)


@triton.jit
def _program_row(len_ptr, H, R: tl.constexpr, G: tl.constexpr):
    """A decode program's (row b * H + KV head, split, batch row b, the row's length, its quantized length
    qlen = G * floor(max(length - R, 0) / G)): grid (B * H, NS + 1)."""
    bh = tl.program_id(0).to(tl.int64)
    row = bh // H
    length = tl.load(len_ptr + row)
    return bh, tl.program_id(1), row, length, tl.maximum(length - R, 0) // G * G


@triton.jit
def _load_quantized_tile(codes_ptr, scale_ptr, zero_ptr, bh, start, qlen, NG,
                         KEYS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                         FP8: tl.constexpr, BLOCK_N: tl.constexpr):
    """Packed-store tokens start .. start + BLOCK_N - 1 of head `bh` as fp32 [BLOCK_N, D] (fp8: unscaled).

    `start` is a multiple of BLOCK_N (so of G); tokens at or past qlen read as zeros (masked by the caller).
    """
    pos = start + tl.arange(0, BLOCK_N)
    valid = (pos < qlen)[:, None]
    slot = bh * NG * G + pos[:, None]
    if BITS == 16 or FP8:
        x = tl.load(codes_ptr + slot * D + tl.arange(0, D)[None, :], mask=valid, other=0.0).to(tl.float32)
    else:
        DB: tl.constexpr = D * BITS // 8
        codes = _unpack(tl.load(codes_ptr + slot * DB + tl.arange(0, DB)[None, :], mask=valid, other=0),
                        BLOCK_N, D, BITS)
        if KEYS:  # (scale, zero) per channel per group of G tokens: [TG, D] for the TG groups of the tile
            TG: tl.constexpr = BLOCK_N // G
            grp = start // G + tl.arange(0, TG)[:, None]
            param = (bh * NG + grp) * D + _key_param_index(tl.arange(0, D)[None, :], D, BITS)
            scale = tl.load(scale_ptr + param, mask=grp * G < qlen, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + param, mask=grp * G < qlen, other=0.0).to(tl.float32)
            x = tl.reshape(tl.reshape(codes, (TG, G, D)) * scale[:, None, :] + zero[:, None, :], (BLOCK_N, D))
        else:  # (scale, zero) per token per group of G channels: [BLOCK_N, D // G]
            param = _value_param_index(slot, tl.arange(0, D // G)[None, :], G, D // G)
            scale = tl.load(scale_ptr + param, mask=valid, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + param, mask=valid, other=0.0).to(tl.float32)
            x = tl.reshape(tl.reshape(codes, (BLOCK_N, D // G, G)) * scale[:, :, None] + zero[:, :, None],
                           (BLOCK_N, D))
    return x


@triton.jit
def _decode_attention_kernel(q_ptr, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring,
                             len_ptr, bias_ptr, m_ptr, l_ptr, acc_ptr, qk_scale, H, NG, NS, BIAS_COLS,
                             GQ: tl.constexpr, R: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                             BITS: tl.constexpr, FP8: tl.constexpr, DOT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program (row b * H + KV head, split): partial attention of the GQ query heads of that KV head.

    With a mask (HAS_BIAS: bias [B, BIAS_COLS], additive, by position) every position < BIAS_COLS is
    attended under it: the written ones from the store, the unwritten ones past the row's length as
    zero keys and values (split i < NS takes a share of those, `_fold_unwritten`)."""
    bh, split, row, length, qlen = _program_row(len_ptr, H, R, G)
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)[None, :]
    # q [B, Hq, D]: query head h * GQ + m of row b is row (b * H + h) * GQ + m; qk_scale has log2(e) in.
    q = tl.load(q_ptr + (bh * GQ + rows[:, None]) * D + d, mask=rows[:, None] < GQ, other=0.0).to(tl.float32)
    q = q * qk_scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if split < NS:  # a share of the packed store
        tiles = tl.cdiv(qlen, BLOCK_N)
        per_split = tl.cdiv(tiles, NS)
        if FP8:  # the per-head key scale folds into q, the value scale into the output
            q = q * tl.load(k_scale + bh)
        q_dot = q.to(DOT)
        for tile in range(split * per_split, tl.minimum(split * per_split + per_split, tiles)):
            start = tile * BLOCK_N
            k = _load_quantized_tile(k_codes, k_scale, k_zero, bh, start, qlen, NG,
                                     True, G, D, BITS, FP8, BLOCK_N)
            pos = start + tl.arange(0, BLOCK_N)
            s = tl.dot(q_dot, tl.trans(k.to(DOT)))
            if HAS_BIAS:
                s += _mask_bias(bias_ptr, row, pos, BIAS_COLS, BIAS_COLS)[None, :]
            s = tl.where((pos < qlen)[None, :], s, float("-inf"))
            v = _load_quantized_tile(v_codes, v_scale, v_zero, bh, start, qlen, NG,
                                     False, G, D, BITS, FP8, BLOCK_N)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT)
        if FP8:
            acc = acc * tl.load(v_scale + bh)
        if HAS_BIAS:
            lo, hi = _unwritten_share(length, BIAS_COLS, split, NS)
            m_i, l_i, alpha = _fold_unwritten(bias_ptr, row, lo, hi, BIAS_COLS, m_i, l_i, BLOCK_T)
            acc = acc * alpha[:, None]
    else:  # the full-precision residual, positions qlen .. length - 1 at ring slot pos % (R + G)
        q_dot = q.to(DOT)
        m_i, l_i, acc = _residual_attention(q_dot, k_ring, v_ring, bh, qlen, length, m_i, l_i, acc, bias_ptr, row,
                                            BIAS_COLS, R, G, D, DOT, BLOCK_R, HAS_BIAS)
    # partials [B * H, NS + 1, GQ(, D)]
    part = (bh * (NS + 1) + split) * GQ + rows
    tl.store(m_ptr + part, m_i, mask=rows < GQ)
    tl.store(l_ptr + part, l_i, mask=rows < GQ)
    tl.store(acc_ptr + part[:, None] * D + d, acc, mask=rows[:, None] < GQ)


@triton.jit
def _code_slot(xb, I: tl.constexpr, BITS: tl.constexpr):
    """Code slot I of every byte as exact fp32, in the layout of the bytes (no reshape).

    xb = byte | 0x4B000000 (int32), so a masked slot read as fp32 is 2^23 + code * 2^(I * BITS) (the
    code sits in the mantissa): one LOP3 with one immediate, then one exact FMA, instead of a shift,
    a mask and an I2F (quarter rate).
    """
    if BITS == 8:
        c = xb.to(tl.float32, bitcast=True) - 8388608.0
    else:
        f = (xb & (0x4B000000 | (((1 << BITS) - 1) << (I * BITS)))).to(tl.float32, bitcast=True)
        c = f * (1.0 / (1 << (I * BITS))) - 8388608.0 / (1 << (I * BITS))
    return c


@triton.jit
def _load_bytes(ptr, BITS: tl.constexpr, DOT: tl.constexpr, mask=None):
    """Packed code bytes for `_dequantize_codes`: as loaded (uint8) where it takes the PTX path, else
    byte | 0x4B000000 (int32, for `_code_slot`); where `mask` is false, codes 0."""
    if mask is None:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=mask, other=0)
    if not _uses_ptx(BITS, DOT):
        x = x.to(tl.int32) | 0x4B000000
    return x


@triton.constexpr_function
def _uses_ptx(bits, dot):
    """Whether `_dequantize_codes` runs its PTX (int4 / int2 codes into bf16 / fp16 on the GPU); the
    interpreter (DOT fp32) and int8 take exact fp32 arithmetic."""
    return bits < 8 and dot in (tl.bfloat16, tl.float16)


@triton.constexpr_function
def _dequantize_ptx(slot, bits, dot):
    """PTX for code slot `slot` of 4 bytes ($2) times scales ($3, $4) plus zeros ($5, $6), two 16-bit
    floats per register, into $0, $1 (see `_dequantize_codes`)."""
    kind = "bf16x2" if dot == tl.bfloat16 else "f16x2"
    # M = 2^mant (128.0 / 1024.0): its mantissa's mant bits take the code. A slot whose bits lie within
    # them is masked in place (M + code * 2^low) and the first FMA scales by 2^-low (exact, no shift:
    # int2 slots 0-2 in bf16, every int2 and int4 slot in fp16); a higher slot is shifted down first.
    mant, bias, ebits = (7, 127, 0x80) if dot == tl.bfloat16 else (10, 15, 0x400)
    low = slot * bits if slot * bits + bits <= mant else 0
    one, negm = (bias - low) * ebits, 0x8000 | (bias + mant - low) * ebits  # 2^-low, -M * 2^-low
    magic = (bias + mant) * ebits
    mask = ((1 << bits) - 1) << low
    shift = f"shr.b32 t0, t0, {slot * bits}; shr.b32 t1, t1, {slot * bits}; " if slot and not low else ""
    return ("{ .reg .b32 t0, t1, z, one, m, negm; mov.b32 z, 0; "
            f"mov.b32 one, {one * 0x10001}; mov.b32 m, {magic * 0x10001}; mov.b32 negm, {negm * 0x10001}; "
            "prmt.b32 t0, $2, z, 0x4140; prmt.b32 t1, $2, z, 0x4342; " + shift +
            f"lop3.b32 t0, t0, {mask * 0x10001}, m, 0xEA; lop3.b32 t1, t1, {mask * 0x10001}, m, 0xEA; "
            f"fma.rn.{kind} t0, t0, one, negm; fma.rn.{kind} t1, t1, one, negm; "
            f"fma.rn.{kind} $0, t0, $3, $5; fma.rn.{kind} $1, t1, $4, $6; }}")


@triton.constexpr_function
def _param_dtype(bits, dot):
    """The dtype `_dequantize_codes` takes its scale and zero in: DOT on the PTX path, else fp32."""
    return dot if _uses_ptx(bits, dot) else tl.float32


@triton.jit
def _dequantize_codes(xb, scale, zero, I: tl.constexpr, BITS: tl.constexpr, DOT: tl.constexpr):
    """Code slot I of the bytes xb (`_load_bytes`) times scale plus zero, in DOT, in the bytes' layout.

    The interpreter (DOT fp32) and int8: `_code_slot` in exact fp32 arithmetic, rounded once to DOT.
    int4 / int2 into bf16 / fp16 on the GPU: PTX on 4 code bytes at a time, two values an instruction:
    PRMT spreads two bytes into the halves of a word, a shift brings slot I down, one LOP3 masks the
    codes into the mantissas of the magic M (128.0 in bf16, 1024.0 in fp16: M + code exactly), one FMA
    takes M away (exact) and one computes code * scale + zero, rounded once to DOT as the fp32 path
    is. About 2.5 instructions a code where the fp32 path issues about 7 (PRMT, LOP3, FADD/FFMA, FFMA,
    F2FP and moves). scale, zero: in `_param_dtype`, broadcastable to xb's shape.
    """
    if not _uses_ptx(BITS, DOT):
        x = (_code_slot(xb, I, BITS) * scale + zero).to(DOT)
    else:
        ASM: tl.constexpr = _dequantize_ptx(I, BITS, DOT)
        args = [xb, tl.broadcast_to(scale, xb.shape), tl.broadcast_to(zero, xb.shape)]
        if DOT == tl.bfloat16:  # (inline_asm_elementwise does not unwrap a constexpr dtype)
            x = tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r", args, dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            x = tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r", args, dtype=tl.float16, is_pure=True, pack=4)
    return x


@triton.jit
def _param_slot(w, I: tl.constexpr, PW: tl.constexpr, OUT: tl.constexpr = tl.float32):
    """Half-word I of the integer words w holding packed 16-bit params (PW 1: bf16, 2: fp16), as OUT."""
    h = ((w >> (16 * I)) & 0xFFFF).to(tl.int32)
    if PW == 2:
        x = h.to(tl.int16).to(tl.float16, bitcast=True).to(OUT)
    elif OUT == tl.float32:
        x = (h << 16).to(tl.float32, bitcast=True)
    else:
        x = h.to(tl.int16).to(tl.bfloat16, bitcast=True).to(OUT)
    return x


@triton.jit
def _group_rows(x, G: tl.constexpr):
    """x [TG, C] (one row per group of G tokens) as [TG * G, C]; TG 1: as is (it broadcasts)."""
    TG: tl.constexpr = x.shape[0]
    if TG > 1:
        x = tl.reshape(tl.broadcast_to(x[:, None, :], (TG, G, x.shape[1])), (TG * G, x.shape[1]))
    return x


@triton.jit
def _key_slot_dot(s, q_i, kb, k_scale, k_zero, kp, kw_s, kw_z, pmask, I: tl.constexpr, PB: tl.constexpr,
                  BITS: tl.constexpr, DOT: tl.constexpr, PW: tl.constexpr, G: tl.constexpr, STRIDE: tl.constexpr):
    """s [M, N] += q_i . k_i^T over the channels I + PB * j of N = TG * G keys (j < D / PB).

    The key params are per group of G tokens, [TG, D / PB] (pmask: the groups that exist). PW = 0:
    loaded from kp + I * STRIDE (int4's slot-major store, `kivi.slot_major`: STRIDE D / PB, a slot's
    params contiguous; channel order: 1, strided); else kw_s, kw_z hold them as words of PB 16-bit
    values (channels PB * j .. PB * j + PB - 1), loaded once for all slots.
    """
    OUT: tl.constexpr = _param_dtype(BITS, DOT)
    if PW == 0:
        scale = tl.load(k_scale + kp + I * STRIDE, mask=pmask, other=0.0).to(OUT)
        zero = tl.load(k_zero + kp + I * STRIDE, mask=pmask, other=0.0).to(OUT)
    else:
        scale = _param_slot(kw_s, I, PW, OUT)
        zero = _param_slot(kw_z, I, PW, OUT)
    k = _dequantize_codes(kb, _group_rows(scale, G), _group_rows(zero, G), I, BITS, DOT)
    return tl.dot(q_i, tl.trans(k), s)


@triton.jit
def _value_slot_dot(acc, p, vb, vs, vz, I: tl.constexpr, BITS: tl.constexpr, DOT: tl.constexpr,
                    VMODE: tl.constexpr):
    """acc [M, D / PB] (channels I + PB * j) += p . v_i, v_i = codes * vs + vz (`_value_params`)."""
    if VMODE == 2 and not _uses_ptx(BITS, DOT):  # vs, vz [N, D / G]: column j is channel group j // (G / PB)
        c = _code_slot(vb, I, BITS)
        NGD: tl.constexpr = vs.shape[1]
        v = tl.reshape(tl.reshape(c, (c.shape[0], NGD, c.shape[1] // NGD)) * vs[:, :, None] + vz[:, :, None],
                       c.shape).to(DOT)
    else:
        if VMODE == 2:
            vs = _spread_groups(vs, vb.shape[1])
            vz = _spread_groups(vz, vb.shape[1])
        v = _dequantize_codes(vb, vs, vz, I, BITS, DOT)
    return tl.dot(p, v, acc)


@triton.jit
def _spread_groups(x, DB: tl.constexpr):
    """x [N, D / G] (one value per channel group) as [N, DB]: column j takes group j // (DB / (D / G))."""
    N: tl.constexpr = x.shape[0]
    NGD: tl.constexpr = x.shape[1]
    return tl.reshape(tl.broadcast_to(x[:, :, None], (N, NGD, DB // NGD)), (N, DB))


@triton.jit
def _value_params(v_scale, v_zero, slot, live, jb, G: tl.constexpr, D: tl.constexpr, PB: tl.constexpr,
                  VMODE: tl.constexpr, OUT: tl.constexpr = tl.float32):
    """Per-token value (scale, zero) of the N tokens `slot` expanded to [N, D / PB]: column j (channel
    I + PB * j of any slot I < PB) belongs to channel group j // (G / PB). Tokens not `live`: 0, 0.
    In OUT (`_param_dtype`)."""
    GP: tl.constexpr = G // PB
    NGD: tl.constexpr = D // G
    N: tl.constexpr = slot.shape[0]
    lm = live[:, None]
    if VMODE == 2:  # [N, D / G], broadcast over the columns of each group by a reshape
        idx = _value_param_index(slot[:, None], tl.arange(0, NGD)[None, :], G, NGD)
        vs = tl.load(v_scale + idx, mask=lm, other=0.0).to(OUT)
        vz = tl.load(v_zero + idx, mask=lm, other=0.0).to(OUT)
    elif VMODE == 0:  # gather: the duplicates are L1 hits
        idx = _value_param_index(slot[:, None], (jb // GP)[None, :], G, NGD)
        vs = tl.load(v_scale + idx, mask=lm, other=0.0).to(OUT)
        vz = tl.load(v_zero + idx, mask=lm, other=0.0).to(OUT)
    else:  # one [N] vector per channel group, selected per column
        jg = (jb // GP)[None, :]
        first = _value_param_index(slot, 0, G, NGD)  # channel group gd of these tokens: first + gd * G
        vs = tl.broadcast_to(tl.load(v_scale + first, mask=live, other=0.0).to(OUT)[:, None], (N, D // PB))
        vz = tl.broadcast_to(tl.load(v_zero + first, mask=live, other=0.0).to(OUT)[:, None], (N, D // PB))
        for gd in tl.static_range(1, NGD):
            vs = tl.where(jg == gd, tl.load(v_scale + first + gd * G, mask=live, other=0.0).to(OUT)[:, None], vs)
            vz = tl.where(jg == gd, tl.load(v_zero + first + gd * G, mask=live, other=0.0).to(OUT)[:, None], vz)
    return vs, vz


@triton.jit
def _load_q_slot(qrow, rmask, jb, qk_scale, I: tl.constexpr, PB: tl.constexpr, DOT: tl.constexpr):
    return (tl.load(qrow + jb[None, :] * PB + I, mask=rmask, other=0.0).to(tl.float32) * qk_scale).to(DOT)


@triton.jit
def _decode_int_kernel(q_ptr, k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring,
                       len_ptr, bias_ptr, m_ptr, l_ptr, acc_ptr, qk_scale, H, NG, NS, BIAS_COLS,
                       GQ: tl.constexpr, R: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                       BITS: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, VMODE: tl.constexpr, PW: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_T: tl.constexpr):
    """`_decode_attention_kernel` for the int formats, TG = BLOCK_N / G groups of G tokens per step,
    without reshapes of the code tiles.

    The dot over channels is order-free, so code slot I of every byte (channels I + PB * j, j < D / PB)
    is a [BLOCK_N, D / PB] tile in the layout of the loaded bytes: keys take PB dots against the
    matching channels of q, values PB dots into PB accumulators that the end stores at their channels.
    Groups are whole (qlen is a multiple of G) and a split's share is a multiple of TG groups, so only
    a split's last step can hold groups past its share (masked); with TG 1 the loop needs no masks but
    the model's (HAS_BIAS, as in `_decode_attention_kernel`).
    """
    bh, split, row, length, qlen = _program_row(len_ptr, H, R, G)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows[:, None] < GQ
    qrow = q_ptr + (bh * GQ + rows[:, None]) * D  # q [B, Hq, D]; qk_scale has log2(e) in
    part = (bh * (NS + 1) + split) * GQ + rows  # partials [B * H, NS + 1, GQ(, D)]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if split < NS:
        PB: tl.constexpr = 8 // BITS
        DB: tl.constexpr = D // PB
        TG: tl.constexpr = BLOCK_N // G
        jb = tl.arange(0, DB)
        n = tl.arange(0, BLOCK_N)
        tg = tl.arange(0, TG)
        q0 = _load_q_slot(qrow, rmask, jb, qk_scale, 0, PB, DOT)
        q1 = q0
        q2 = q0
        q3 = q0
        if PB > 1:
            q1 = _load_q_slot(qrow, rmask, jb, qk_scale, 1, PB, DOT)
        if PB > 2:
            q2 = _load_q_slot(qrow, rmask, jb, qk_scale, 2, PB, DOT)
            q3 = _load_q_slot(qrow, rmask, jb, qk_scale, 3, PB, DOT)
        acc0 = tl.zeros([BLOCK_M, DB], tl.float32)
        acc1 = tl.zeros([BLOCK_M, DB], tl.float32)
        acc2 = tl.zeros([BLOCK_M, DB], tl.float32)
        acc3 = tl.zeros([BLOCK_M, DB], tl.float32)
        groups = qlen // G
        per_split = tl.cdiv(tl.cdiv(groups, NS), TG) * TG
        last = tl.minimum(split * per_split + per_split, groups)
        for grp in range(split * per_split, last, TG):
            live = grp * G + n < last * G  # [BLOCK_N] tokens of this split's share
            pmask = (grp + tg < last)[:, None]  # [TG, 1] groups of this split's share
            slot = (bh * NG + grp) * G + n  # [BLOCK_N] token slots of the packed store
            if TG == 1:  # whole groups: no masks
                kb = _load_bytes(k_codes + slot[:, None] * DB + jb[None, :], BITS, DOT)
                vb = _load_bytes(v_codes + slot[:, None] * DB + jb[None, :], BITS, DOT)
            else:
                kb = _load_bytes(k_codes + slot[:, None] * DB + jb[None, :], BITS, DOT, live[:, None])
                vb = _load_bytes(v_codes + slot[:, None] * DB + jb[None, :], BITS, DOT, live[:, None])
            # [TG, DB] key params of code slot 0 (channels PB * j): int4's are stored slot-major (`kivi.slot_major`).
            # Spelled out rather than through `_key_param_index`: its % and // hide the contiguous rows from
            # Triton's layout analysis (static sm_90 loop of int4: 1,576 instructions vs 1,133).
            if BITS == 4:
                KS: tl.constexpr = DB
                kp = (bh * NG + grp + tg[:, None]) * D + jb[None, :]
            else:
                KS: tl.constexpr = 1
                kp = (bh * NG + grp + tg[:, None]) * D + jb[None, :] * PB
            if PW == 0:
                kw_s = kp
                kw_z = kp
            else:  # k_scale, k_zero come as words of PB params: word j = channels PB * j ..
                kw = (bh * NG + grp + tg[:, None]) * DB + jb[None, :]
                kw_s = tl.load(k_scale + kw, mask=pmask, other=0)
                kw_z = tl.load(k_zero + kw, mask=pmask, other=0)
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            s = _key_slot_dot(s, q0, kb, k_scale, k_zero, kp, kw_s, kw_z, pmask, 0, PB, BITS, DOT, PW, G, KS)
            if PB > 1:
                s = _key_slot_dot(s, q1, kb, k_scale, k_zero, kp, kw_s, kw_z, pmask, 1, PB, BITS, DOT, PW, G, KS)
            if PB > 2:
                s = _key_slot_dot(s, q2, kb, k_scale, k_zero, kp, kw_s, kw_z, pmask, 2, PB, BITS, DOT, PW, G, KS)
                s = _key_slot_dot(s, q3, kb, k_scale, k_zero, kp, kw_s, kw_z, pmask, 3, PB, BITS, DOT, PW, G, KS)
            if HAS_BIAS:
                s += _mask_bias(bias_ptr, row, grp * G + n, BIAS_COLS, BIAS_COLS)[None, :]
            if TG > 1:
                s = tl.where(live[None, :], s, float("-inf"))
            m_i, l_i, p, alpha = _softmax_weights(s, m_i, l_i)
            p = p.to(DOT)
            vs, vz = _value_params(v_scale, v_zero, slot, live, jb, G, D, PB, VMODE, _param_dtype(BITS, DOT))
            acc0 = _value_slot_dot(acc0 * alpha[:, None], p, vb, vs, vz, 0, BITS, DOT, VMODE)
            if PB > 1:
                acc1 = _value_slot_dot(acc1 * alpha[:, None], p, vb, vs, vz, 1, BITS, DOT, VMODE)
            if PB > 2:
                acc2 = _value_slot_dot(acc2 * alpha[:, None], p, vb, vs, vz, 2, BITS, DOT, VMODE)
                acc3 = _value_slot_dot(acc3 * alpha[:, None], p, vb, vs, vz, 3, BITS, DOT, VMODE)
        if HAS_BIAS:
            lo, hi = _unwritten_share(length, BIAS_COLS, split, NS)
            m_i, l_i, alpha = _fold_unwritten(bias_ptr, row, lo, hi, BIAS_COLS, m_i, l_i, BLOCK_T)
            acc0 = acc0 * alpha[:, None]
            acc1 = acc1 * alpha[:, None]
            acc2 = acc2 * alpha[:, None]
            acc3 = acc3 * alpha[:, None]
        out = acc_ptr + part[:, None] * D + jb[None, :] * PB
        tl.store(out, acc0, mask=rmask)
        if PB > 1:
            tl.store(out + 1, acc1, mask=rmask)
        if PB > 2:
            tl.store(out + 2, acc2, mask=rmask)
            tl.store(out + 3, acc3, mask=rmask)
    else:  # the full-precision residual, positions qlen .. length - 1 at ring slot pos % (R + G)
        d = tl.arange(0, D)[None, :]
        q_dot = (tl.load(qrow + d, mask=rmask, other=0.0).to(tl.float32) * qk_scale).to(DOT)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        m_i, l_i, acc = _residual_attention(q_dot, k_ring, v_ring, bh, qlen, length, m_i, l_i, acc, bias_ptr, row,
                                            BIAS_COLS, R, G, D, DOT, BLOCK_R, HAS_BIAS)
        tl.store(acc_ptr + part[:, None] * D + d, acc, mask=rmask)
    tl.store(m_ptr + part, m_i, mask=rows < GQ)
    tl.store(l_ptr + part, l_i, mask=rows < GQ)


@triton.jit
def _decode_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, NP, GQ: tl.constexpr, ROWS: tl.constexpr,
                           D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program per (row, query head): merge its NP partials exactly, out = sum_i w_i acc_i / sum_i w_i l_i
    with w_i = exp2(m_i - max m). Partials [B * Hkv, NP, ROWS(, D)], query head h of a KV head in row h
    (ROWS >= GQ). Empty splits have m = -inf, l = 0, acc = 0."""
    pid = tl.program_id(0).to(tl.int64)  # = b * Hq + hq; its partials are those of KV head pid // GQ, row pid % GQ
    base = (pid // GQ) * NP * ROWS + pid % GQ
    d = tl.arange(0, D)
    m_run = float("-inf")
    l_run = 0.0
    acc_run = tl.zeros([D], tl.float32)
    for s0 in range(0, NP, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        inside = splits < NP
        m = tl.load(m_ptr + base + splits * ROWS, mask=inside, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every split so far empty
        w = tl.exp2(m - m_safe)
        alpha = tl.exp2(m_run - m_safe)
        l_run = l_run * alpha + tl.sum(w * tl.load(l_ptr + base + splits * ROWS, mask=inside, other=0.0), axis=0)
        acc = tl.load(acc_ptr + (base + splits[:, None] * ROWS) * D + d[None, :], mask=inside[:, None], other=0.0)
        acc_run = acc_run * alpha + tl.sum(w[:, None] * acc, axis=0)
        m_run = m_new
    out = acc_run / tl.where(l_run > 0, l_run, 1.0)  # length 0: zeros
    tl.store(out_ptr + pid * D + d, out.to(out_ptr.dtype.element_ty))


def combine_partials(part_m: torch.Tensor, part_l: torch.Tensor, part_acc: torch.Tensor, b: int, hq: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Merge split-K partials part_m, part_l [B * Hkv, NP, ROWS], part_acc [B * Hkv, NP, ROWS, D] (rows past
    the g = Hq / Hkv query heads of a KV head are ignored) into the attention output [B, Hq, 1, D]."""
    bh, n_part, rows, d = part_acc.shape
    out = torch.empty(b, hq, 1, d, device=part_acc.device, dtype=dtype)
    # All partials of a query head in one tile where they fit: the merge is a chain of dependent loads,
    # so at small grids (B1 S4K: 33 partials) its latency, not its bytes, is what the step waits for.
    block_s = min(COMBINE_SPLITS, triton.next_power_of_2(n_part))
    _decode_combine_kernel[(b * hq,)](part_m, part_l, part_acc, out, n_part, GQ=hq * b // bh, ROWS=rows, D=d,
                                      BLOCK_S=block_s, num_warps=max(4, block_s // 16))
    return out


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, for launch sizing; 2 elsewhere (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def default_num_splits(batch_heads: int, store: KiviStore, device: torch.device) -> int:
    """Splits of the generic kernel (4 warps a program): about 16 programs per SM, at least 2 tiles of 64
    tokens per split, at most MAX_SPLITS. H100 (decode_attention.json, session 9): B8 S64K fp8 393.6 us
    at 36 splits vs 481.5 at the 9 that 4 programs per SM gave, none 718 vs 731; B1 S64K fp8 70.7 us at 66
    splits vs 79.3 at 264; B1 S4K keeps its 32 (the tile cap)."""
    programs = triton.cdiv(16 * sm_count(device), batch_heads)
    return max(1, min(programs, triton.cdiv(store.k_codes.shape[2], 128), MAX_SPLITS))


def base_splits(batch_heads: int, store: KiviStore, device: torch.device) -> int:
    """About 4 programs per SM, at least 2 tiles of 64 tokens a split: the generic kernel's default before
    session 9, kept as the unit the int kernel's cap and the benchmark sweeps' split factors multiply."""
    return max(1, min(triton.cdiv(4 * sm_count(device), batch_heads), triton.cdiv(store.k_codes.shape[2], 128)))


def int_num_splits(batch_heads: int, store: KiviStore, device: torch.device) -> int:
    """Splits for the int kernel (one warp per program): about 16 groups of G tokens per split, but at
    least 4 programs per SM where that leaves 4 groups a split, and at most 8x `base_splits`.
    H100 (benchmarks/results/decode_attention.json, `sweep`): B8 S64K 72 splits; B8 S16K 32; B1 S16K 66
    (28.3 us vs 33.5 at the 32 that 16 groups a split gave); B1 S4K 32 (19.2 us vs 29.7 at 8)."""
    groups = store.k_codes.shape[2] // store.group_size
    want = max(triton.cdiv(4 * sm_count(device), batch_heads), triton.cdiv(groups, 16))  # 4 programs per SM
    return max(1, min(want, triton.cdiv(groups, 4), 8 * base_splits(batch_heads, store, device)))


def decode_attention_triton(q: torch.Tensor, store: KiviStore, lengths: torch.Tensor, scale: float | None = None,
                            num_splits: int | None = None, block_n: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None, vmode: int | None = None,
                            key_words: bool = True, int_kernel: bool = True, bias: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Triton version of `decode_attention_reference` (same arguments and result).

    bias: the model's mask for the query, additive fp32 [B, N] by position (-inf = masked). With it the
    query attends positions [0, N) under the mask instead of [0, lengths[b]): written ones from the
    store, unwritten ones (>= lengths[b]) as zero keys and values, as a zeroed fp cache would give
    (`kvfx::kivi_attend`'s semantics). Positions >= N are not attended.

    num_splits: programs per (row, KV head) over the packed store (default `default_num_splits`,
    `int_num_splits` for the int kernel);
    num_warps: default 4, `INT_NUM_WARPS` for the int kernel;
    block_n: tokens per step, a power of two and a multiple of the group size (default max(G, 64);
    the int kernel `_decode_int_kernel`: INT_GROUPS_PER_STEP * G). int_kernel=False runs the int
    formats through the generic tile kernel instead (kept for comparison). vmode: how the int kernel
    expands the value parameters (0 gather, 1 select, 2 reshape; default INT_VMODE_PTX or INT_VMODE_FP32
    by the path); key_words: load int2 key params of bf16 / fp16 stores as words of 4 values.
    num_stages: Triton's software pipelining depth (None: Triton's default).
    Raises ValueError for a head dim other than 64 or 128 (callers fall back to the reference).
    """
    b, hq, t, d = q.shape
    hkv = store.k_ring.shape[1]
    if d not in HEAD_DIMS:
        raise ValueError(f"decode_attention_triton: head_dim={d}, the kernel supports {HEAD_DIMS}")
    if t != 1 or hq % hkv or store.k_ring.shape[0] != b or store.head_dim != d:
        raise ValueError(f"q {tuple(q.shape)} does not fit a store of rings {tuple(store.k_ring.shape)} "
                         "(need one query token, Hq a multiple of Hkv, same B and D)")
    g = store.group_size
    int_path = int_kernel and store.bits < 16 and not store.fp8
    block_n = block_n or (INT_GROUPS_PER_STEP * g if int_path else max(g, 64))
    if block_n % g or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two and a multiple of group_size={g}")
    gq = hq // hkv
    ns = num_splits or (int_num_splits if int_path else default_num_splits)(b * hkv, store, q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    part_m = torch.empty(b * hkv, ns + 1, gq, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(b * hkv, ns + 1, gq, d, device=q.device, dtype=torch.float32)
    interpreted = not q.is_cuda
    dot = tl.float32 if interpreted else TL_DTYPES[q.dtype]  # the interpreter's bf16 tl.dot is wrong
    args = (q.reshape(b, hq, d).contiguous(), store.k_codes, store.v_codes, store.k_scale, store.k_zero,
            store.v_scale, store.v_zero, store.k_ring, store.v_ring, lengths,
            part_m if bias is None else bias.contiguous(), part_m, part_l, part_acc,
            scale * LOG2E, hkv, store.k_codes.shape[2] // g, ns, 0 if bias is None else bias.shape[-1])
    if num_warps is None:
        num_warps = INT_NUM_WARPS if int_path else 4
    launch = dict(GQ=gq, R=store.residual, G=g, D=d, BITS=store.bits, DOT=dot,
                  BLOCK_M=max(16, triton.next_power_of_2(gq)), BLOCK_R=32, num_warps=num_warps,
                  HAS_BIAS=bias is not None, BLOCK_T=256)
    if num_stages is not None:
        launch["num_stages"] = num_stages
    if int_path:
        # int2's key params as words of 4 16-bit values (one vector load per word for all 4 code slots);
        # int4's are stored slot-major and load per slot
        pw = {torch.bfloat16: 1, torch.float16: 2}.get(store.dtype, 0) if store.bits == 2 and key_words else 0
        if pw:
            args = args[:3] + (store.k_scale.view(torch.int64), store.k_zero.view(torch.int64)) + args[5:]
        if vmode is None:
            vmode = INT_VMODE_PTX if _uses_ptx(store.bits, dot) else INT_VMODE_FP32
        _decode_int_kernel[(b * hkv, ns + 1)](*args, BLOCK_N=block_n, VMODE=vmode, PW=pw, **launch)
    else:
        _decode_attention_kernel[(b * hkv, ns + 1)](*args, FP8=store.fp8, BLOCK_N=block_n, **launch)
    return combine_partials(part_m, part_l, part_acc, b, hq, q.dtype)


def decode_attention(q: torch.Tensor, store: KiviStore, lengths: torch.Tensor, scale: float | None = None
                     ) -> torch.Tensor:
    """`decode_attention_triton` where Triton runs (CUDA, interpreter), the reference elsewhere."""
    return (decode_attention_triton if use_triton(q) else decode_attention_reference)(q, store, lengths, scale)
