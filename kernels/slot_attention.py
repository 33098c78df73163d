"""Decode attention over a policy's `TokenStore` slots: Triton split-K kernel beside its reference.

One query token per row. Each program takes one (row, KV head) and a contiguous share of the slots
to read (all C slots, Quest's chosen slots as a list, or Quest's chosen pages), loads the g query
heads of the KV head as the M dimension of `tl.dot` (padded to 16), and folds tiles of BLOCK_N slots
into a running (max, sum of exp, unnormalized output), as flash-decoding does. A slot counts when its
position is >= 0 (and, causal, <= the query's); the model's mask enters as an additive bias per
logical position of the row (read at each slot's position). With `want_logits` the kernel also
writes each slot's logit, from which H2O's attention scores are taken once the softmax normalizer is
known (no second pass over the KV bytes). Every `TokenCodec` is dequantized in registers: "none",
"int8" (per-token scale and zero), "fp8" (one scale per token) as [N, D] tiles (`_load_tokens`);
"int4"/"int2" (bit-packed, per-token (scale, zero) per group of G channels) where the codes lie, as
`kvfx.kernels.decode_attention`'s int kernel does: a dot over channels does not care about their
order, so code slot I of every byte (channels I + PB * j, PB = 8 // bits) is used in the layout of
the loaded [N, D / PB] bytes, against the query's channels I + PB * j for the keys (PB dots summed)
and into an accumulator of its own for the values (stored at those channels, so the partials are
laid out as for the other codecs). Codes become floats by PTX on the GPU (`_dequantize_codes`: two
per instruction, params in the store's 16-bit dtype; in the interpreter through fp32 exponent bits), the
per-token params are loaded as [N, D / G] and broadcast over each group's G / PB byte columns (the
same for every code slot, since G is a multiple of PB), and bf16/fp16 params are read as one int32
word per (scale, zero) pair. Compiled for sm_90 (per tile of 64 slots, D 128, int4): no unpack or
reshape of the code tile, 40% of the shared-memory round trips of the unpack-and-reshape version
and 30% fewer instructions (int2: 45%). On the H100 (B8 S64K, Hq 32, Hkv 8, one decode step of
int4 + H2O at 20%): 265 us, was 418 us; bf16 H2O takes 259 us. With the PTX (session 7) the slot
attention alone takes 166 us for int4 + H2O, 179 us for bf16 H2O; with the pipelined `STORE_LAUNCH`
(session 12) 93 us for int4 + H2O, and the whole int4 + H2O step 119 us (5.77x SDPA).

The partials and the new token are combined by `combine_reference` here (torch, the spec) or, on the
decode path, inside the finish kernel of `kvfx.kernels.slot_decode`. The reference of the
whole attention is `kvfx.kernels.policies._decode_attention_torch`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvfx.kernels.decode_attention import (HEAD_DIMS, LOG2E, _dequantize_codes, _load_bytes, _load_q_slot,
                                           _param_dtype, _param_slot, _spread_groups,
                                           _softmax_weights, _value_slot_dot, combine_partials, sm_count)
from kvfx.kernels.kivi import TL_DTYPES, _unpack

CODECS = ("none", "int8", "int4", "int2", "fp8")
# Launch over a cache addressed by position (`attend_positions`), from the H100 sweeps
# (benchmarks/results/decode_attention.json, rows "kvfx-attend-*-positional"; slot_sweep.json): tiles
# of 128 slots, 4 warps, and splits of about SPLIT_SLOTS slots (`default_slot_splits`). At B8 S64K the
# positional kernel took 731 us at 36 splits of 1820 slots against 1105 us at the previous default (64
# slots a tile, 9 splits). (A store's launch: `STORE_LAUNCH` below.) Over a positional bf16 cache
# fewer, longer splits are: 4096 slots, 2 programs per SM (session 9, B8 S16K: 192.9 us at that
# default's 5 splits vs 205.2 at 32; B8 S64K 16 vs 33 splits 709.6 vs 725.9; B32 S4K 2 vs 8 194.4 vs
# 205.0). int8 codes cost more instructions a slot and want the programs: 2 per SM read 261 us at B8
# S16K against 185-201 at 4-9 splits, so int8 keeps 4 per SM with splits of ~2048 slots (201.4 us
# there, 674.8 at B8 S64K).
SLOT_BLOCK_N = 128
SLOT_NUM_WARPS = 4
SPLIT_SLOTS, MIN_PROGRAMS_PER_SM = 512, 4
POSITIONAL_SPLITS = {"none": (4096, 2), "int8": (2048, 4)}  # codec -> (slots a split, least programs per SM)


class StoreLaunch(NamedTuple):
    """How `slot_partials` launches over a store of one codec (`STORE_LAUNCH`)."""

    block_n: int  # slots a tile
    num_warps: int
    num_stages: int  # Triton's software pipelining depth
    skip_dead: bool  # branch around the loads of a tile without live slots (then not pipelined)
    split_slots: int  # about this many slots a split (`default_slot_splits`)


# Over a store's slots, by codec. The 4-warp launch with the dead-tile branch (the positional default)
# left the compressed codecs latency-bound: on the H100 (benchmarks/results/slot_sweep_store.json,
# session 12: B8 S64K, an H2O store at 20% = 13,108 slots, logits kept) int4 took 165 us, int2 158 and
# fp8 168, about the bf16 store's 178 us on 2-3x fewer bytes, because the branch keeps Triton from
# pipelining the tile loads. Without it, one warp a program, 32-slot tiles, 3 stages and ~1024-slot
# splits: int4 93 us, int2 82, fp8 124 (B1: int4 24.4 vs 33.8, fp8 30.0 vs 33.3). bf16 gains less (it is
# at the read rate already): 168.5 vs 178.1 at B8, 32.0 vs 34.8 at B1, at 512-slot splits. int8 is best
# at 4 warps without the branch: 149.3 vs 181.6 at B8, 34.2 vs 36.5 at B1. A store's slots are live
# once it holds its budget, so the branch rarely skips anything there (a tile without live slots is
# still read under its mask, which loads nothing, and gives -inf logits). bf16 then splits at ~2048
# slots (session 13, policy_attention.json, B8 S64K: the 4-per-SM floor, 9 splits): the finish kernel
# merges the splits' partials in a loop (13.5 -> 5.0 us) and the attention gains too (164.3 -> 160.7 us):
# h2o 20% step 205.0 -> 193.2 us, streaming 191.3 -> 177.3 us.
STORE_LAUNCH = {"none": StoreLaunch(32, 1, 3, False, 2048),
                "int8": StoreLaunch(128, 4, 3, False, SPLIT_SLOTS),
                **{codec: StoreLaunch(32, 1, 3, False, 1024) for codec in ("int4", "int2", "fp8")}}


@triton.jit
def _load_tokens(codes_ptr, params_ptr, slot, live, N: tl.constexpr, D: tl.constexpr, CODEC: tl.constexpr,
                 BITS: tl.constexpr, G: tl.constexpr):
    """The tokens of flat slot indices `slot` [N] (row-head-slot) dequantized to fp32 [N, D] as
    `TokenCodec.dequantize` does; slots not `live` read as zeros."""
    if CODEC == "int4" or CODEC == "int2":  # bit-packed codes, (scale, zero) per token per G channels
        DB: tl.constexpr = D * BITS // 8
        NG: tl.constexpr = D // G
        packed = tl.load(codes_ptr + slot[:, None] * DB + tl.arange(0, DB)[None, :], mask=live[:, None], other=0)
        x = tl.reshape(_unpack(packed, N, D, BITS), (N, NG, G))
        prm = slot[:, None] * (2 * NG) + 2 * tl.arange(0, NG)[None, :]  # params interleave (scale, zero)
        scale = tl.load(params_ptr + prm, mask=live[:, None], other=0.0).to(tl.float32)
        zero = tl.load(params_ptr + prm + 1, mask=live[:, None], other=0.0).to(tl.float32)
        x = tl.reshape(x * scale[:, :, None] + zero[:, :, None], (N, D))
    else:
        x = tl.load(codes_ptr + slot[:, None] * D + tl.arange(0, D)[None, :], mask=live[:, None],
                    other=0.0).to(tl.float32)
        if CODEC == "int8":  # per-token (scale, zero)
            x = x * tl.load(params_ptr + slot * 2, mask=live, other=0.0).to(tl.float32)[:, None] \
                + tl.load(params_ptr + slot * 2 + 1, mask=live, other=0.0).to(tl.float32)[:, None]
        elif CODEC == "fp8":  # one scale per token
            x = x * tl.load(params_ptr + slot, mask=live, other=0.0).to(tl.float32)[:, None]
    return x


@triton.jit
def _token_params(params_ptr, slot, live, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, PW: tl.constexpr,
                  DOT: tl.constexpr):
    """int4/int2: the per-token (scale, zero) of the slots `slot` [N] for the columns of their code bytes,
    [N, D / PB] (PB = 8 // BITS): column j holds channels PB * j .. PB * j + PB - 1, all of group
    j // (G / PB) (G is a multiple of PB), so one expansion serves every code slot of the byte. Loaded
    as [N, D / G] and broadcast over each group's G / PB columns (a broadcast and a reshape: registers
    only, so just the small tile moves to the dot's layout, where a gather of [N, D / PB] would move
    the whole tile through shared memory). The params interleave (scale, zero) per group; with PW 1 / 2
    params_ptr holds each pair as one int32 word of bf16 / fp16 values (one load for both). Slots not
    `live`: 0, 0. In `_param_dtype` (DOT on the PTX path of `_dequantize_codes`, else fp32)."""
    NG: tl.constexpr = D // G
    OUT: tl.constexpr = _param_dtype(BITS, DOT)
    grp = slot[:, None] * NG + tl.arange(0, NG)[None, :]
    if PW == 0:
        scale = tl.load(params_ptr + 2 * grp, mask=live[:, None], other=0.0).to(OUT)
        zero = tl.load(params_ptr + 2 * grp + 1, mask=live[:, None], other=0.0).to(OUT)
    else:
        word = tl.load(params_ptr + grp, mask=live[:, None], other=0)
        scale = _param_slot(word, 0, PW, OUT)
        zero = _param_slot(word, 1, PW, OUT)
    return _spread_groups(scale, D * BITS // 8), _spread_groups(zero, D * BITS // 8)


@triton.jit
def _key_logits(q0, q1, q2, q3, codes_ptr, params_ptr, slot, live, jb, D: tl.constexpr, CODEC: tl.constexpr,
                BITS: tl.constexpr, G: tl.constexpr, PW: tl.constexpr, DOT: tl.constexpr):
    """Logits [BLOCK_M, N] of the query slices q_I (channels I + PB * j of the scaled queries) against
    the keys of `slot` [N]. int4/int2: the sum over code slots I of q_I . k_I^T, k_I = code slot I of
    the loaded bytes [N, D / PB] dequantized where it lies (no unpack, no reshape)."""
    if CODEC != "int4" and CODEC != "int2":
        k = _load_tokens(codes_ptr, params_ptr, slot, live, slot.shape[0], D, CODEC, BITS, G)
        s = tl.dot(q0, tl.trans(k.to(DOT)))
    else:
        PB: tl.constexpr = 8 // BITS
        kb = _load_bytes(codes_ptr + slot[:, None] * (D // PB) + jb[None, :], BITS, DOT, live[:, None])
        scale, zero = _token_params(params_ptr, slot, live, D, BITS, G, PW, DOT)
        s = tl.dot(q0, tl.trans(_dequantize_codes(kb, scale, zero, 0, BITS, DOT)))
        if PB > 1:
            s = tl.dot(q1, tl.trans(_dequantize_codes(kb, scale, zero, 1, BITS, DOT)), s)
        if PB > 2:
            s = tl.dot(q2, tl.trans(_dequantize_codes(kb, scale, zero, 2, BITS, DOT)), s)
            s = tl.dot(q3, tl.trans(_dequantize_codes(kb, scale, zero, 3, BITS, DOT)), s)
    return s


@triton.jit
def _fold_values(acc0, acc1, acc2, acc3, alpha, p, codes_ptr, params_ptr, slot, live, jb, D: tl.constexpr,
                 CODEC: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, PW: tl.constexpr, DOT: tl.constexpr):
    """The accumulators acc_I [BLOCK_M, D / PB] (channels I + PB * j) rescaled by alpha, plus p [BLOCK_M, N]
    (in DOT) times the values of `slot` at those channels (int4/int2: code slot I of the bytes)."""
    if CODEC != "int4" and CODEC != "int2":
        v = _load_tokens(codes_ptr, params_ptr, slot, live, slot.shape[0], D, CODEC, BITS, G)
        acc0 = tl.dot(p, v.to(DOT), acc0 * alpha[:, None])
    else:
        PB: tl.constexpr = 8 // BITS
        vb = _load_bytes(codes_ptr + slot[:, None] * (D // PB) + jb[None, :], BITS, DOT, live[:, None])
        scale, zero = _token_params(params_ptr, slot, live, D, BITS, G, PW, DOT)
        acc0 = _value_slot_dot(acc0 * alpha[:, None], p, vb, scale, zero, 0, BITS, DOT, 0)
        if PB > 1:
            acc1 = _value_slot_dot(acc1 * alpha[:, None], p, vb, scale, zero, 1, BITS, DOT, 0)
        if PB > 2:
            acc2 = _value_slot_dot(acc2 * alpha[:, None], p, vb, scale, zero, 2, BITS, DOT, 0)
            acc3 = _value_slot_dot(acc3 * alpha[:, None], p, vb, scale, zero, 3, BITS, DOT, 0)
    return acc0, acc1, acc2, acc3


@triton.jit
def _fold_tile(q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3, k_ptr, kp_ptr, v_ptr, vp_ptr, slot, live, bias, jb,
               D: tl.constexpr, CODEC: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, PW: tl.constexpr,
               DOT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One tile of flat slots `slot` [N] folded into the running (m_i, l_i, acc_I): the tile's base-2
    logits (-inf where not `live`) and the updated state."""
    s = _key_logits(q0, q1, q2, q3, k_ptr, kp_ptr, slot, live, jb, D, CODEC, BITS, G, PW, DOT)
    if HAS_BIAS:  # the row's additive mask at each slot's position (base 2)
        s += bias[None, :] * 1.4426950408889634
    s = tl.where(live[None, :], s, float("-inf"))
    m_i, l_i, p, alpha = _softmax_weights(s, m_i, l_i)
    acc0, acc1, acc2, acc3 = _fold_values(acc0, acc1, acc2, acc3, alpha, p.to(DOT), v_ptr, vp_ptr, slot, live, jb,
                                          D, CODEC, BITS, G, PW, DOT)
    return s, m_i, l_i, acc0, acc1, acc2, acc3


# Programmatic dependent launch for a policy step's kernels (`chained_launch`). On since session 16: with the
# loads ahead of each wait, B8 S64K on the H100 h2o 20% 191.7 -> 185.2 us, int4 + h2o 118.6 -> 111.8, quest
# 1/8 no change (229.3 -> 230.7); same outputs and kept sets (see docs/ARCHITECTURE.md).
CHAINED_LAUNCH = True


def chained_launch(device: torch.device) -> bool:
    """Whether a policy decode step's kernels chain by programmatic dependent launch on `device`
    (NVIDIA Hopper and later, a triton with `gdc_wait`): each launches while the kernel before it drains and
    waits in `_chain` for that kernel's results, so the launch gap between them is hidden."""
    return (CHAINED_LAUNCH and device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait"))


def pdl_launch(chained: bool) -> dict:
    """The launch option that makes a kernel wait on the one before it programmatically (`_chain`)."""
    return {"launch_pdl": True} if chained else {}


@triton.jit
def _chain(PDL: tl.constexpr):
    """PDL: wait until the kernel before this one has finished and its writes are visible (a no-op for a
    kernel launched without launch_pdl), then let the next one launch. A chained kernel calls it before
    its first load or store, so it reads and writes nothing its predecessors still touch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _visible(pos, new_pos, bias_ptr, row, BIAS_COLS, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr):
    """Whether the query at new_pos sees logical positions `pos` (>= 0), and the mask's additive bias
    there (natural log units; 0 without a mask)."""
    seen = pos >= 0
    bias = tl.zeros(pos.shape, tl.float32)
    if HAS_BIAS:
        inside = seen & (pos < BIAS_COLS)
        bias = tl.load(bias_ptr + row * BIAS_COLS + pos, mask=inside, other=float("-inf"))
        seen = inside & (bias > float("-inf"))
    elif CAUSAL:
        seen = seen & (pos <= new_pos)
    return seen, bias


@triton.jit
def _slot_attention_kernel(q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, pos_ptr, idx_ptr, bias_ptr, new_pos_ptr,
                           m_ptr, l_ptr, acc_ptr, logit_ptr, C, N, NS, HKV, BIAS_COLS, qk_scale,
                           GQ: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           CODEC: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, INDEX: tl.constexpr,
                           PAGE: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                           LOGITS: tl.constexpr, DOT: tl.constexpr, PW: tl.constexpr = 0,
                           POSITIONAL: tl.constexpr = False, SKIP_DEAD: tl.constexpr = True,
                           PDL: tl.constexpr = False):
    """Program (bh, split): slots n in its share of [0, N), base-2 logits. INDEX "slots": slot
    idx[bh, n]; "pages": slot idx[bh, n // PAGE] * PAGE + n % PAGE; else slot n. POSITIONAL: the slot
    is the position (a cache addressed by position, `attend_positions`), no slot_pos is read. With
    SKIP_DEAD a tile the mask hides entirely (left padding, past a static cache's written length,
    outside a sliding window, empty slots) is skipped by a branch; without it (a store's launch,
    `STORE_LAUNCH`) such a tile's loads are all masked off, and the loads outside a branch are what
    Triton pipelines. int4/int2 (PB = 8 // BITS codes a byte)
    hold the query and the output as PB slices, slice I = channels I + PB * j (j < D / PB): the layout
    of code slot I in the loaded bytes. The other codecs have BITS = 8, so PB = 1: one slice, all
    channels in order. PDL: `_chain`."""
    _chain(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    PB: tl.constexpr = 8 // BITS
    rows = tl.arange(0, BLOCK_M)
    jb = tl.arange(0, D // PB)
    rmask = rows < GQ
    qrow = q_ptr + (bh * GQ + rows[:, None]) * D
    q0 = _load_q_slot(qrow, rmask[:, None], jb, qk_scale, 0, PB, DOT)
    q1 = q0
    q2 = q0
    q3 = q0
    if PB > 1:
        q1 = _load_q_slot(qrow, rmask[:, None], jb, qk_scale, 1, PB, DOT)
    if PB > 2:
        q2 = _load_q_slot(qrow, rmask[:, None], jb, qk_scale, 2, PB, DOT)
        q3 = _load_q_slot(qrow, rmask[:, None], jb, qk_scale, 3, PB, DOT)
    new_pos = tl.load(new_pos_ptr)
    per_split = tl.cdiv(tl.cdiv(N, NS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, N)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, D // PB), tl.float32)
    acc1 = tl.zeros((BLOCK_M, D // PB), tl.float32)
    acc2 = tl.zeros((BLOCK_M, D // PB), tl.float32)
    acc3 = tl.zeros((BLOCK_M, D // PB), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        inside = n < end
        if INDEX == "slots":
            slot = tl.load(idx_ptr + bh * N + n, mask=inside, other=0)
        elif INDEX == "pages":
            slot = tl.load(idx_ptr + bh * (N // PAGE) + n // PAGE, mask=inside, other=0) * PAGE + n % PAGE
        else:
            slot = n
        if POSITIONAL:
            pos = tl.where(inside, slot, -1)
        else:
            pos = tl.load(pos_ptr + bh * C + slot, mask=inside, other=-1)
        live, bias = _visible(pos, new_pos, bias_ptr, bh // HKV, BIAS_COLS, HAS_BIAS, CAUSAL)
        s = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
        if SKIP_DEAD:
            if tl.max(live.to(tl.int32), axis=0) > 0:
                s, m_i, l_i, acc0, acc1, acc2, acc3 = _fold_tile(
                    q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3, k_ptr, kp_ptr, v_ptr, vp_ptr, bh * C + slot,
                    live, bias, jb, D, CODEC, BITS, G, PW, DOT, HAS_BIAS)
        else:
            s, m_i, l_i, acc0, acc1, acc2, acc3 = _fold_tile(
                q0, q1, q2, q3, m_i, l_i, acc0, acc1, acc2, acc3, k_ptr, kp_ptr, v_ptr, vp_ptr, bh * C + slot,
                live, bias, jb, D, CODEC, BITS, G, PW, DOT, HAS_BIAS)
        if LOGITS:
            tl.store(logit_ptr + (bh * GQ + rows[:, None]) * C + slot[None, :], s,
                     mask=rmask[:, None] & inside[None, :])
    out = (bh * NS + split) * BLOCK_M + rows
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    acc_out = acc_ptr + out[:, None] * D + jb[None, :] * PB  # channel I + PB * j of slice I
    tl.store(acc_out, acc0)
    if PB > 1:
        tl.store(acc_out + 1, acc1)
    if PB > 2:
        tl.store(acc_out + 2, acc2)
        tl.store(acc_out + 3, acc3)


def supported(store, q: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """Whether the Triton decode path takes this call (else the torch path of `decode_step` does)."""
    return store.codec.kv in CODECS and q.shape[-1] in HEAD_DIMS and q.shape[2] == 1 and row_mask(attn_mask)


def row_mask(attn_mask: torch.Tensor | None) -> bool:
    """Whether the mask is one a decode kernel takes: none, or one row per batch row shared by the heads."""
    return attn_mask is None or (attn_mask.dim() == 4 and attn_mask.shape[1] == 1)


def row_bias(attn_mask: torch.Tensor | None, b: int, cols: int | None = None,
             device: torch.device | None = None) -> torch.Tensor | None:
    """The mask of one query [B|1, 1, 1, S'] as an additive fp32 bias [B, S'] by logical position;
    with `cols`, exactly [B, cols] (a mask of one column broadcasts; no mask: zeros on `device`)."""
    if attn_mask is None:
        return None if cols is None else torch.zeros(b, cols, device=device)
    row = attn_mask[:, 0, -1]
    if cols is not None:
        row = row.expand(-1, cols) if row.shape[-1] == 1 else row[:, :cols]
    row = row.expand(b, -1)
    if row.dtype == torch.bool:
        return torch.zeros(row.shape, device=row.device).masked_fill(~row, float("-inf")).contiguous()
    return row.float().contiguous()


@dataclass
class Partials:
    """What `slot_partials` leaves for the combine: per (row-head, split, query row) the running max
    m and sum l of exp2(logit - m), the unnormalized output acc; the base-2 logits [B, Hkv, g, C] of
    every slot read (when asked for); the row bias [B, S'] (None without a mask)."""

    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor
    logits: torch.Tensor | None
    bias: torch.Tensor | None


def default_slot_splits(q: torch.Tensor, hkv: int, n: int, block_n: int, positional: str | None = None,
                        split_slots: int = SPLIT_SLOTS) -> int:
    """Splits of a pass over n slots: at least MIN_PROGRAMS_PER_SM programs per SM, or splits of about
    `split_slots` slots where that gives more (positional: the codec's POSITIONAL_SPLITS); at most 16
    programs per SM and one tile per split."""
    split_slots, per_sm = POSITIONAL_SPLITS[positional] if positional else (split_slots, MIN_PROGRAMS_PER_SM)
    sms = sm_count(q.device)
    rows = q.shape[0] * hkv
    want = max(triton.cdiv(per_sm * sms, rows), triton.cdiv(n, split_slots))
    return max(1, min(want, triton.cdiv(16 * sms, rows), triton.cdiv(n, block_n)))


def _split_buffers(q: torch.Tensor, hkv: int, n: int, num_splits: int | None, block_n: int,
                   positional: str | None = None, split_slots: int = SPLIT_SLOTS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partials (m, l [B * Hkv, NS, BLOCK_M], acc [.., D]) of a split-K pass over n slots in
    `num_splits` splits (None: `default_slot_splits`)."""
    b, hq, _, d = q.shape
    ns = num_splits or default_slot_splits(q, hkv, n, block_n, positional, split_slots)
    block_m = max(16, triton.next_power_of_2(hq // hkv))
    part_m = torch.empty(b * hkv, ns, block_m, device=q.device, dtype=torch.float32)
    return part_m, torch.empty_like(part_m), torch.empty(b * hkv, ns, block_m, d, device=q.device, dtype=torch.float32)


def slot_partials(q: torch.Tensor, pos: torch.Tensor, store, attn_mask: torch.Tensor | None, is_causal: bool,
                  scale: float, index: torch.Tensor | None = None, page: int = 0, want_logits: bool = False,
                  num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, skip_dead: bool | None = None,
                  bias: torch.Tensor | None = None, chained: bool = False) -> Partials:
    """Launch `_slot_attention_kernel` for queries q [B, Hq, 1, D] at position pos [1] over the store's
    slots: all of them, the slot list `index` [B, Hkv, N] (page 0), or the pages `index` [B, Hkv, n]
    of `page` slots each. num_splits (default `default_slot_splits`), block_n (slots per tile),
    num_warps, num_stages and skip_dead (see `StoreLaunch`) set the launch; None: the codec's
    `STORE_LAUNCH`. bias: attn_mask as `row_bias` made it, when the caller has it already. chained: a
    policy step's launch (`chained_launch`): the next kernel may launch as this one drains, and with
    pages this one launches as the page selection drains."""
    b, hq, _, d = q.shape
    hkv, c = store.slot_pos.shape[1], store.slot_pos.shape[2]
    gq = hq // hkv
    n = c if index is None else index.shape[-1] * max(page, 1)
    launch = STORE_LAUNCH[store.codec.kv]
    block_n = block_n or launch.block_n
    num_warps = num_warps or launch.num_warps
    num_stages = num_stages or launch.num_stages
    skip_dead = launch.skip_dead if skip_dead is None else skip_dead
    part_m, part_l, part_acc = _split_buffers(q, hkv, n, num_splits, block_n, split_slots=launch.split_slots)
    ns, block_m = part_m.shape[1:]
    logits = torch.empty(b, hkv, gq, c, device=q.device, dtype=torch.float32) if want_logits else None
    bias = bias if bias is not None else row_bias(attn_mask, b)
    interpreted = not q.is_cuda
    dot = tl.float32 if interpreted else TL_DTYPES[store.dtype]  # the interpreter's bf16 tl.dot is wrong
    codec = store.codec
    params = (store.k_params, store.v_params)
    # int4/int2 params of a bf16 / fp16 store as int32 words of a (scale, zero) pair: one gather for both
    pw = {torch.bfloat16: 1, torch.float16: 2}.get(store.dtype, 0) if codec.kv in ("int4", "int2") else 0
    if pw:
        params = tuple(t.view(torch.int32) for t in params)
    _slot_attention_kernel[(b * hkv, ns)](
        q.reshape(b * hq, d).contiguous(), store.k_codes, store.v_codes, *params,
        store.slot_pos, index.contiguous() if index is not None else store.slot_pos,
        bias if bias is not None else part_m, pos, part_m, part_l, part_acc,
        logits if logits is not None else part_m, c, n, ns, hkv, bias.shape[-1] if bias is not None else 0,
        scale * LOG2E, GQ=gq, D=d, BLOCK_M=block_m, BLOCK_N=block_n, CODEC=codec.kv, BITS=codec.bits,
        G=codec.group_size if codec.kv in ("int4", "int2") else 1,
        INDEX="none" if index is None else ("pages" if page else "slots"), PAGE=max(page, 1),
        HAS_BIAS=bias is not None, CAUSAL=is_causal, LOGITS=want_logits, DOT=dot, PW=pw, SKIP_DEAD=skip_dead,
        PDL=chained, num_warps=num_warps, num_stages=num_stages, **pdl_launch(chained and page > 0))
    return Partials(part_m, part_l, part_acc, logits, bias)


def combine_reference(parts: Partials, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      pos: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Merge the splits' partials with the new token k_new, v_new [B, Hkv, 1, D] at pos [1] (in torch):
    (out [B, Hq, 1, D] fp32, slot probabilities summed over each KV head's g query heads [B, Hkv, C]
    when the logits were kept, the new token's probability summed the same way [B, Hkv, 1])."""
    b, hq, _, d = q.shape
    hkv = k_new.shape[1]
    gq = hq // hkv
    ns = parts.m.shape[1]
    qg = q.view(b, hkv, gq, d).float()
    new = (qg * k_new.view(b, hkv, 1, d).float()).sum(-1) * (scale * LOG2E)  # [B, Hkv, g], base 2
    if parts.bias is not None:
        new = new + parts.bias.gather(1, pos.view(1, 1).expand(b, 1).long()).view(b, 1, 1) * LOG2E
    m = parts.m[:, :, :gq].view(b, hkv, ns, gq)
    top = torch.maximum(m.amax(2), new)
    top = torch.where(top == float("-inf"), 0.0, top)
    w = torch.exp2(m - top[:, :, None])  # [B, Hkv, NS, g]
    w_new = torch.exp2(new - top)
    total = (parts.l[:, :, :gq].view(b, hkv, ns, gq) * w).sum(2) + w_new
    acc = (parts.acc[:, :, :gq].view(b, hkv, ns, gq, d) * w[..., None]).sum(2) \
        + w_new[..., None] * v_new.view(b, hkv, 1, d).float()
    norm = torch.where(total > 0, total, 1.0)
    out = (acc / norm[..., None]).reshape(b, hq, 1, d)
    p_new = (w_new / norm).sum(-1, keepdim=True)
    probs = None
    if parts.logits is not None:  # (every slot was read)
        probs = (torch.exp2(parts.logits - top[..., None]) / norm[..., None]).sum(2)
    return out, probs, p_new


def slot_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, store,
                   attn_mask: torch.Tensor | None, is_causal: bool, scale: float, index: torch.Tensor | None = None,
                   page: int = 0, want_logits: bool = False, **launch
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Attention of one query token q [B, Hq, 1, D] over the store's slots (or `index`, see
    `slot_partials`, which takes the `launch` options) and the new token k_new, v_new [B, Hkv, 1, D] at
    position pos [1]: the kernel's partials merged by `combine_reference` (what it returns)."""
    parts = slot_partials(q, pos, store, attn_mask, is_causal, scale, index, page, want_logits, **launch)
    return combine_reference(parts, q, k_new, v_new, pos, scale)


def _positional(t: torch.Tensor, slots: int) -> bool:
    """Whether t [B, H, S', W] lies as the rows of a contiguous [B, H, slots, W] (a [:, :, :L] slice does)."""
    b, h, _, w = t.shape
    return t.stride(3) == 1 and t.stride(2) == w and t.stride(1) == slots * w and (b == 1 or t.stride(0) == h * slots * w)


def attend_positions_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_qparams: torch.Tensor | None,
                               v_qparams: torch.Tensor | None, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
    """Whether `attend_positions` takes this `kvfx::attend` call (one query token, a row mask, a cache
    laid out by position with head dim 64 or 128, both or neither of K and V quantized; else the
    reference does)."""
    d = q.shape[-1]
    slots = k.stride(1) // max(d, 1)
    return (q.shape[2] == 1 and d in HEAD_DIMS and k.shape[-1] == d and v.shape[-1] == d and not is_causal
            and q.shape[1] % k.shape[1] == 0 and row_mask(attn_mask)
            and (k_qparams is None) == (v_qparams is None)
            and all(_positional(t, slots) for t in (k, v, k_qparams, v_qparams) if t is not None))


def attend_positions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_qparams: torch.Tensor | None,
                     v_qparams: torch.Tensor | None, attn_mask: torch.Tensor | None, kv_len: int, scale: float,
                     num_splits: int | None = None, block_n: int = SLOT_BLOCK_N,
                     num_warps: int = SLOT_NUM_WARPS, num_stages: int | None = None) -> torch.Tensor:
    """`kvfx::attend` for one query token q [B, Hq, 1, D] over a cache addressed by position: k, v
    [B, Hkv, S, D] in the model dtype, or uint8 codes with per-token (scale, zero) qparams [B, Hkv, S, 2].
    Attends the first kv_len positions (-1: all S) under the row mask; tiles the mask hides entirely
    (past the written length of a static cache, left padding, outside a sliding window) are never read.
    Precondition: `attend_positions_supported`. Returns [B, Hq, 1, D] in q's dtype.
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    n = k.shape[2] if kv_len < 0 else min(kv_len, k.shape[2])
    gq = hq // hkv
    codec = "none" if k_qparams is None else "int8"
    part_m, part_l, part_acc = _split_buffers(q, hkv, n, num_splits, block_n, positional=codec)
    ns, block_m = part_m.shape[1:]
    bias = row_bias(attn_mask, b, n) if attn_mask is not None else None
    dot = tl.float32 if not q.is_cuda else TL_DTYPES[q.dtype]  # the interpreter's bf16 tl.dot is wrong
    params = (k_qparams, v_qparams) if k_qparams is not None else (part_m, part_m)
    _slot_attention_kernel[(b * hkv, ns)](
        q.reshape(b * hq, d).contiguous(), k, v, *params, part_m, part_m, bias if bias is not None else part_m,
        part_m, part_m, part_l, part_acc, part_m, k.stride(1) // d, n, ns, hkv,
        bias.shape[-1] if bias is not None else 0, scale * LOG2E, GQ=gq, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        CODEC=codec, BITS=8, G=1, INDEX="none", PAGE=1,
        HAS_BIAS=bias is not None, CAUSAL=False, LOGITS=False, DOT=dot, POSITIONAL=True, num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}))
    return combine_partials(part_m, part_l, part_acc, b, hq, q.dtype)
