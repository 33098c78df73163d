"""The eviction step of a policy decode step (T = 1): Triton kernels beside their reference.

After `kvfx.kernels.slot_attention` has left its split partials (and, for scored policies, every
slot's logit), three launches (Quest: two, it has no select; one in its sparse layers with
`QUEST_SCAN_IN_SCORE`) do the rest of `decode_step`, with no host synchronisation and a fixed launch
count (CUDA-graph friendly). The first two run one program per (row, KV head, block of BLOCK_S
slots), so a pass over a 13K-slot budget is spread over the GPU instead of walked by one program per
(row, KV head) (the single fused kernel this replaces took 49 us of a 237 us H2O step at B8 S64K on the
H100, most of it in that serial walk):

1. `_slot_scan_kernel`: per block, how many slots are valid, the newest valid position and
   StreamingLLM's `sink` oldest valid positions (the block's partial statistics); H2O / SnapKV /
   PyramidKV add each slot's attention probability (summed over the g query heads, from the kernel's
   logits and the softmax normalizer recomputed from the split partials) to its score; slots the
   query can no longer see (mask) are emptied, as the reference does; Quest's blocks also get what
   the select pass writes (below), since a key that protects nothing needs no reduced statistics;
   Quest keeps this work (the emptied slots leave holes: the next free slot is not the fill count;
   and a full store, all C + 1 candidates valid, still gives up its oldest token, as the reference),
   its page-scoring kernel, which loads every slot's position anyway, can do it instead
   (`quest.QuestScan`, `QUEST_SCAN_IN_SCORE`: one read of the positions and one launch fewer, a faster
   step as measured, so on);
2. `_slot_select_kernel`: per block, the eviction key of every slot exactly as `eviction_key` defines
   it for a decode step (limit = C), from the reduced statistics: StreamingLLM protects its `sink`
   oldest valid positions and ranks by position, H2O protects its `recent` newest and SnapKV /
   PyramidKV their `window` newest and rank by score (pinned prompt tokens have score +inf); the
   block's lowest key (the last of equals) and its first free slot (not launched for Quest, which
   protects nothing and ranks by position: the scan wrote these);
3. `_slot_finish_kernel`, one program per (row, KV head): the attention output (the splits' partials
   and the new token, one softmax); the victim (when all C + 1 candidates are valid, the last of the
   lowest keys, the new token included); the write of the new token into the free slot (the
   victim's, else the first empty one), quantized per token with the store's `TokenCodec`, with its
   position and score; Quest's min/max of that page.

The reference is the torch body of `decode_step` (`kvfx.kernels.policies.decode_step_reference`);
tests/kernels/test_slot_decode.py checks the two agree step by step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvfx.kernels.decode_attention import LOG2E
from kvfx.kernels.int8 import _quantize_int8_row
from kvfx.kernels.kivi import TL_DTYPES, _pack, _quantize, _round_e4m3, _round_e4m3_outward, _round_to
from kvfx.kernels.slot_attention import _chain, _visible

SCORED = ("h2o", "snapkv", "pyramidkv")
BIG = tl.constexpr(2**31 - 1)  # int32 "no position"
MIN_BLOCK_S, MAX_BLOCKS = 512, 256  # `default_block_s`


@triton.jit
def _store_token(x, codes_ptr, params_ptr, slot, D: tl.constexpr, CODEC: tl.constexpr, BITS: tl.constexpr,
                 G: tl.constexpr, DTYPE: tl.constexpr):
    """Quantize one token x [1, D] (fp32, already in the store dtype's values) per `TokenCodec.quantize`
    and write its codes and params at flat slot index `slot`."""
    d = tl.arange(0, D)[None, :]
    if CODEC == "none":
        tl.store(codes_ptr + slot * D + d, x.to(DTYPE))
    elif CODEC == "int8":  # asymmetric per token: (scale, min), codes round((x - min) / scale)
        codes, scale, low = _quantize_int8_row(x)
        tl.store(codes_ptr + slot * D + d, codes.to(tl.uint8))
        tl.store(params_ptr + slot * 2 + tl.arange(0, 1), scale.to(DTYPE))
        tl.store(params_ptr + slot * 2 + 1 + tl.arange(0, 1), low.to(DTYPE))
    elif CODEC == "fp8":  # one scale per token: amax / 448 in the store dtype
        amax = tl.max(tl.abs(x), axis=1)
        scale = _round_to(tl.where(amax > 0, amax / 448.0, 1.0), DTYPE)
        y = _round_e4m3(tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0))
        tl.store(codes_ptr + slot * D + d, y.to(tl.float8e4nv))
        tl.store(params_ptr + slot + tl.arange(0, 1), scale.to(DTYPE))
    else:  # int4 / int2: (scale, zero) per group of G channels, codes bit-packed
        NG: tl.constexpr = D // G
        DB: tl.constexpr = D * BITS // 8
        x3 = tl.reshape(x, (1, NG, G))
        codes, scale, zero = _quantize(x3, tl.min(x3, axis=2)[:, :, None], tl.max(x3, axis=2)[:, :, None],
                                       BITS, DTYPE)
        packed = _pack(tl.reshape(codes, (1, D)), 1, D, BITS)
        tl.store(codes_ptr + slot * DB + tl.arange(0, DB)[None, :], packed.to(tl.uint8))
        prm = slot * (2 * NG) + 2 * tl.arange(0, NG)[None, :]
        tl.store(params_ptr + prm, tl.reshape(scale, (1, NG)).to(DTYPE))
        tl.store(params_ptr + prm + 1, tl.reshape(zero, (1, NG)).to(DTYPE))


@triton.jit
def _eviction_key(pos, valid, priority, kth, newest, RECENT, PROTECT: tl.constexpr, MEAN: tl.constexpr = False):
    """`eviction_key` of a decode step: +inf where protected (StreamingLLM: position <= the sink-th oldest
    `kth`; H2O / SnapKV: among the RECENT newest), -inf where not valid, else the priority (MEAN: H2O's
    "mean" score, the priority over the queries that have seen the token, positions pos .. newest)."""
    if MEAN:
        priority = priority / (newest - pos + 1).to(tl.float32)
    if PROTECT == "sink":
        protected = pos <= kth
    elif PROTECT == "recent":
        protected = pos > newest - RECENT
    else:
        protected = pos < -1  # nothing
    return tl.where(valid, tl.where(protected, float("inf"), priority), float("-inf"))


@triton.jit
def _new_token(new_pos_ptr, bias_ptr, row, BIAS_COLS, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr):
    """The new token's position, whether the query sees it, and the mask's bias there (scalars)."""
    at = tl.load(new_pos_ptr + tl.arange(0, 1)).to(tl.int32)
    seen, bias = _visible(at, at, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
    return tl.max(at, axis=0), tl.max(seen.to(tl.int32), axis=0) > 0, tl.max(bias, axis=0)


@triton.jit
def _new_logits(q_ptr, k_new_ptr, bh, rows, rmask, new_bias, qk_scale, GQ: tl.constexpr, D: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """The g query heads' base-2 logits of the new token [BLOCK_G]."""
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * GQ + rows[:, None]) * D + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    new = tl.sum(q * tl.load(k_new_ptr + bh * D + d).to(tl.float32)[None, :], axis=1) * qk_scale
    if HAS_BIAS:
        new += new_bias * 1.4426950408889634
    return new


@triton.jit
def _softmax_norm(m_ptr, l_ptr, bh, rows, rmask, new, NS, PART_M: tl.constexpr, NS_P: tl.constexpr):
    """(the running max, the sum of exp2) of each query head over the splits' partials and the new token.
    The NS (<= NS_P) splits in one tile: a loop over them (two dependent loads a split, in each of the
    scan's programs) made H2O's scan 19.4 us at B8 S64K (26 splits) on the H100, the tile about 14 us."""
    s = tl.arange(0, NS_P)
    part = (bh * NS + s[:, None]) * PART_M + rows[None, :]
    pmask = (s[:, None] < NS) & rmask[None, :]
    m = tl.load(m_ptr + part, mask=pmask, other=float("-inf"))
    top = tl.maximum(tl.max(m, axis=0), new)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.exp2(new - top) + tl.sum(tl.load(l_ptr + part, mask=pmask, other=0.0) * tl.exp2(m - top[None, :]),
                                        axis=0)
    return top, total


@triton.jit
def _combine_partials(m_ptr, l_ptr, acc_ptr, bh, rows, rmask, d, new, v_new, NS, PART_M: tl.constexpr,
                      NS_P: tl.constexpr, D: tl.constexpr):
    """The splits' partials and the new token (logits `new`, value v_new) in one softmax: the row max,
    the normalizer (1 where nothing is seen), the new token's weight and the unnormalized output."""
    top, total = _softmax_norm(m_ptr, l_ptr, bh, rows, rmask, new, NS, PART_M, NS_P)
    w_new = tl.exp2(new - top)
    acc = w_new[:, None] * v_new[None, :]
    for s in range(NS):
        part = (bh * NS + s) * PART_M + rows
        w = tl.exp2(tl.load(m_ptr + part, mask=rmask, other=float("-inf")) - top)
        acc += tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0) * w[:, None]
    return top, tl.where(total > 0, total, 1.0), w_new, acc


@triton.jit
def _reduce_stats(stats_ptr, bh, NB, new_pos, new_valid, NB_P: tl.constexpr, SINK: tl.constexpr,
                  SINK_BLOCK: tl.constexpr, PROTECT: tl.constexpr):
    """The candidates' statistics from the blocks' partials and the new token: how many are valid, the
    newest valid position, and (StreamingLLM) the SINK-th oldest valid position counted with
    multiplicity (BIG: fewer are valid; -1: SINK is 0)."""
    W: tl.constexpr = 2 + SINK
    blocks = tl.arange(0, NB_P)
    inside = blocks < NB
    at = stats_ptr + (bh * NB + blocks) * W
    n_valid = tl.sum(tl.load(at, mask=inside, other=0), axis=0) + new_valid.to(tl.int32)
    newest = tl.maximum(tl.max(tl.load(at + 1, mask=inside, other=-1), axis=0), tl.where(new_valid, new_pos, -1))
    kth = tl.full((), -1, tl.int32)
    if PROTECT == "sink" and SINK > 0:
        s = tl.arange(0, SINK_BLOCK)
        old = tl.load(at[:, None] + 2 + s[None, :], mask=inside[:, None] & (s < SINK)[None, :], other=BIG)
        new = tl.where(new_valid, new_pos, BIG)
        kth = tl.full((), BIG, tl.int32)
        taken = tl.zeros((), tl.int32)
        prev = tl.full((), -1, tl.int32)
        for _ in tl.static_range(SINK):  # the distinct values in ascending order, with their counts
            cur = tl.minimum(tl.min(tl.min(tl.where(old > prev, old, BIG), axis=1), axis=0),
                             tl.where(new > prev, new, BIG))
            count = tl.sum(tl.sum((old == cur).to(tl.int32), axis=1), axis=0) + (new == cur).to(tl.int32)
            kth = tl.where((taken < SINK) & (taken + count >= SINK), cur, kth)
            taken += count
            prev = cur
    return n_valid, newest, kth


@triton.jit
def _store_block_candidates(key, valid, c, inside, low_ptr, at_ptr, block, C):
    """Block `block` (of slots c) for the finish kernel: its lowest eviction key, the last slot holding it
    and its first free slot (C: none)."""
    key = tl.where(inside, key, float("inf"))
    low = tl.min(key, axis=0)
    one = tl.arange(0, 1)
    tl.store(low_ptr + block + one, tl.zeros((1,), tl.float32) + low)
    last = tl.max(tl.where(inside & (key == low), c, -1), axis=0)
    tl.store(at_ptr + block * 2 + one, tl.zeros((1,), tl.int32) + last)
    tl.store(at_ptr + block * 2 + 1 + one, tl.zeros((1,), tl.int32) + tl.min(tl.where(inside & ~valid, c, C), axis=0))


@triton.jit
def _store_block_stats(stat, valid, pos):
    """A block's first two statistics: how many of its slots are valid, and the newest valid position."""
    one = tl.arange(0, 1)
    tl.store(stat + one, tl.zeros((1,), tl.int32) + tl.sum(valid.to(tl.int32), axis=0))
    tl.store(stat + 1 + one, tl.zeros((1,), tl.int32) + tl.max(tl.where(valid, pos, -1), axis=0))


@triton.jit
def _scan_unprotected_block(pos, c, inside, new_pos, bias_ptr, row, block, slot_pos_ptr, score_ptr, stats_ptr,
                            low_ptr, at_ptr, C, BIAS_COLS, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr):
    """The scan of block `block` (slots c, positions pos; slot_pos_ptr, score_ptr: its (row, KV head)'s) of
    an unscored store whose eviction protects nothing (Quest): its statistics, its slots the query no
    longer sees emptied, and its victim candidates: the key (the position) needs no other block's
    statistics, so the select pass, a second read of every slot, is skipped. Emptied slots are invalid
    here as they are when the select reloads them. Quest's scoring kernel runs this for its pages too
    (`quest.QuestScan`), so its step has no scan launch."""
    valid, _ = _visible(pos, new_pos, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
    _store_block_stats(stats_ptr + block * 2, valid, pos)
    _store_block_candidates(_eviction_key(pos, valid, pos.to(tl.float32), 0, 0, 0, "none"), valid, c, inside,
                            low_ptr, at_ptr, block, C)
    gone = inside & ~valid
    tl.store(score_ptr + c, tl.zeros(c.shape, tl.float32), mask=gone)
    tl.store(slot_pos_ptr + c, tl.full(c.shape, -1, tl.int32), mask=gone & (pos >= 0))


@triton.jit
def _slot_scan_kernel(m_ptr, l_ptr, logit_ptr, q_ptr, k_new_ptr, new_pos_ptr, bias_ptr, slot_pos_ptr, score_ptr,
                      stats_ptr, low_ptr, at_ptr, C, NS, NB, HKV, BIAS_COLS, qk_scale, GQ: tl.constexpr,
                      BLOCK_G: tl.constexpr, PART_M: tl.constexpr, NS_P: tl.constexpr, D: tl.constexpr,
                      BLOCK_S: tl.constexpr, PROTECT: tl.constexpr, SINK: tl.constexpr, SCORED: tl.constexpr,
                      HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PDL: tl.constexpr):
    """Program (bh = (row, KV head), block): the block's statistics, its scores, its emptied slots; with
    nothing protected (Quest), also what the select pass would write (`_store_block_candidates`)."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    row = bh // HKV
    new_pos, new_valid, new_bias = _new_token(new_pos_ptr, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
    c = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    inside = c < C
    base = bh * C
    # Before the chain's wait, what the attention before this kernel does not write: positions, scores,
    # the new token's logits. After it, the logits, before any store (a load is not moved above a store
    # the compiler cannot tell apart from it, so the logits' DRAM round trip would follow the stores).
    pos = tl.load(slot_pos_ptr + base + c, mask=inside, other=-1)
    if SCORED:
        rows = tl.arange(0, BLOCK_G)
        rmask = rows < GQ
        old_score = tl.load(score_ptr + base + c, mask=inside, other=0.0)
        new = _new_logits(q_ptr, k_new_ptr, bh, rows, rmask, new_bias, qk_scale, GQ, D, HAS_BIAS)
    _chain(PDL)
    if SCORED:
        logits = tl.load(logit_ptr + (bh * GQ + rows[:, None]) * C + c[None, :],
                         mask=rmask[:, None] & inside[None, :], other=float("-inf"))
        top, total = _softmax_norm(m_ptr, l_ptr, bh, rows, rmask, new, NS, PART_M, NS_P)
    if PROTECT == "none":
        tl.static_assert(not SCORED)
        _scan_unprotected_block(pos, c, inside, new_pos, bias_ptr, row, bh * NB + blk, slot_pos_ptr + base,
                                score_ptr + base, stats_ptr, low_ptr, at_ptr, C, BIAS_COLS, HAS_BIAS, CAUSAL)
    else:
        valid, _ = _visible(pos, new_pos, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
        stat = stats_ptr + (bh * NB + blk) * (2 + SINK)
        _store_block_stats(stat, valid, pos)
        if PROTECT == "sink":
            x = tl.where(valid, pos, BIG)
            one = tl.arange(0, 1)
            for i in tl.static_range(SINK):  # the block's SINK oldest, ascending (one of equals at a time)
                a = tl.min(x, axis=0)
                tl.store(stat + 2 + i + one, tl.zeros((1,), tl.int32) + a)
                x = tl.where(c == tl.min(tl.where(x == a, c, C), axis=0), BIG, x)
        if SCORED:
            norm = tl.where(total > 0, total, 1.0)
            probs = tl.sum(tl.exp2(logits - top[:, None]) / norm[:, None], axis=0)
            tl.store(score_ptr + base + c, tl.where(valid, old_score + probs, 0.0), mask=inside)
        else:
            tl.store(score_ptr + base + c, tl.zeros((BLOCK_S,), tl.float32), mask=inside & ~valid)
        # (pos != -1: a prompt's held-back candidates, -2 - position, are emptied too; policies.py, 4.)
        tl.store(slot_pos_ptr + base + c, tl.full((BLOCK_S,), -1, tl.int32), mask=inside & ~valid & (pos != -1))


@triton.jit
def _slot_select_kernel(new_pos_ptr, bias_ptr, slot_pos_ptr, score_ptr, stats_ptr, low_ptr, at_ptr, C, NB, HKV,
                        BIAS_COLS, RECENT, NB_P: tl.constexpr, BLOCK_S: tl.constexpr, PROTECT: tl.constexpr,
                        SINK: tl.constexpr, SINK_BLOCK: tl.constexpr, SCORED: tl.constexpr, MEAN: tl.constexpr,
                        HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PDL: tl.constexpr):
    """Program (bh, block), after the scan: the block's lowest eviction key, the last slot holding it and
    the block's first free slot."""
    _chain(PDL)
    bh, blk = tl.program_id(0), tl.program_id(1)
    row = bh // HKV
    new_pos, new_valid, _ = _new_token(new_pos_ptr, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
    _, newest, kth = _reduce_stats(stats_ptr, bh, NB, new_pos, new_valid, NB_P, SINK, SINK_BLOCK, PROTECT)
    c = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    inside = c < C
    pos = tl.load(slot_pos_ptr + bh * C + c, mask=inside, other=-1)
    valid, _ = _visible(pos, new_pos, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
    if SCORED:
        priority = tl.load(score_ptr + bh * C + c, mask=inside, other=0.0)
    else:
        priority = pos.to(tl.float32)
    key = _eviction_key(pos, valid, priority, kth, newest, RECENT, PROTECT, MEAN)
    _store_block_candidates(key, valid, c, inside, low_ptr, at_ptr, bh * NB + blk, C)


@triton.jit
def _page_bound(x, UP: tl.constexpr, FP8: tl.constexpr, DTYPE: tl.constexpr):
    """A Quest page bound (fp32) as stored: DTYPE, or e4m3 rounded outward (`token_store._as_bound`)."""
    if FP8:  # (one return: the compiler unifies the types of every return statement)
        bound = _round_e4m3_outward(x, UP).to(tl.float8e4nv)
    else:
        bound = x.to(DTYPE)
    return bound


@triton.jit
def _slot_finish_kernel(m_ptr, l_ptr, acc_ptr, q_ptr, k_new_ptr, v_new_ptr, new_pos_ptr, bias_ptr,
                        k_codes, k_params, v_codes, v_params, slot_pos_ptr, score_ptr, page_min_ptr, page_max_ptr,
                        stats_ptr, low_ptr, at_ptr, out_ptr, C, NS, NB, HKV, BIAS_COLS, qk_scale, RECENT,
                        GQ: tl.constexpr, BLOCK_G: tl.constexpr, PART_M: tl.constexpr, NS_P: tl.constexpr,
                        D: tl.constexpr, NB_P: tl.constexpr, PROTECT: tl.constexpr, SINK: tl.constexpr,
                        SINK_BLOCK: tl.constexpr, SCORED: tl.constexpr, MEAN: tl.constexpr, CODEC: tl.constexpr,
                        BITS: tl.constexpr, G: tl.constexpr, DTYPE: tl.constexpr, PAGE: tl.constexpr, BLOCK_P: tl.constexpr,
                        BOUNDS_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PDL: tl.constexpr):
    """Program bh = (row, KV head): the output, the victim, the write of the new token."""
    bh = tl.program_id(0)
    row = bh // HKV
    rows = tl.arange(0, BLOCK_G)
    rmask = rows < GQ
    d = tl.arange(0, D)
    # ---- the output: the splits' partials and the new token, one softmax. With a select pass between
    # the attention and this kernel, the chain's wait in the select covers the partials, so they are
    # read before this kernel's own wait (which then covers the select's candidates only).
    new_pos, new_valid, new_bias = _new_token(new_pos_ptr, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
    new = _new_logits(q_ptr, k_new_ptr, bh, rows, rmask, new_bias, qk_scale, GQ, D, HAS_BIAS)
    k_new = tl.load(k_new_ptr + bh * D + d).to(tl.float32)
    v_new = tl.load(v_new_ptr + bh * D + d).to(tl.float32)
    if PROTECT == "none":  # (Quest, no select: with `QUEST_SCAN_IN_SCORE` this kernel follows the attention)
        _chain(PDL)
    top, norm, w_new, acc = _combine_partials(m_ptr, l_ptr, acc_ptr, bh, rows, rmask, d, new, v_new, NS, PART_M,
                                              NS_P, D)
    if PROTECT != "none":
        _chain(PDL)
    # ---- the victim: the last of the lowest keys over the blocks and the new token (candidate C)
    n_valid, newest, kth = _reduce_stats(stats_ptr, bh, NB, new_pos, new_valid, NB_P, SINK, SINK_BLOCK, PROTECT)
    blocks = tl.arange(0, NB_P)
    inside = blocks < NB
    lows = tl.load(low_ptr + bh * NB + blocks, mask=inside, other=float("inf"))
    low = tl.min(lows, axis=0)
    best = tl.max(tl.where(inside & (lows == low), tl.load(at_ptr + (bh * NB + blocks) * 2, mask=inside, other=-1), -1),
                  axis=0)
    first_free = tl.min(tl.load(at_ptr + (bh * NB + blocks) * 2 + 1, mask=inside, other=C), axis=0)
    if SCORED:
        new_score = tl.sum(tl.where(rmask, w_new / norm, 0.0), axis=0)
        new_priority = new_score
    else:
        new_score = tl.zeros((), tl.float32)
        new_priority = new_pos.to(tl.float32)
    new_key = _eviction_key(new_pos, new_valid, new_priority, kth, newest, RECENT, PROTECT, MEAN)
    best = tl.where(new_key <= low, C, best)
    full = n_valid > C
    free = tl.where(full & (best < C), best, tl.where(first_free < C, first_free, 0))
    keep_new = new_valid & ~(full & (best == C))
    # (The output is stored only now: the statistics' loads above then need not wait behind its store.)
    tl.store(out_ptr + (bh * GQ + rows[:, None]) * D + d[None, :], (acc / norm[:, None]).to(out_ptr.dtype.element_ty),
             mask=rmask[:, None])
    base = bh * C
    # ---- the new token into the free slot
    if keep_new:
        one = tl.arange(0, 1)
        k1 = _round_to(tl.reshape(k_new, (1, D)), DTYPE)
        v1 = _round_to(tl.reshape(v_new, (1, D)), DTYPE)
        _store_token(k1, k_codes, k_params, base + free, D, CODEC, BITS, G, DTYPE)
        _store_token(v1, v_codes, v_params, base + free, D, CODEC, BITS, G, DTYPE)
        tl.store(slot_pos_ptr + base + free + one, tl.full((1,), 0, tl.int32) + new_pos)
        tl.store(score_ptr + base + free + one, tl.full((1,), 0.0, tl.float32) + new_score)
        # ---- Quest: the free slot's page bounds widened to the new key (the key alone when no other
        # slot of the page holds a token), as `TokenStore.put`: bounds of the keys before quantization
        if PAGE > 0:
            page = free // PAGE
            j = tl.arange(0, BLOCK_P)
            held = tl.load(slot_pos_ptr + base + page * PAGE + j, mask=(j < PAGE) & (j != free % PAGE), other=-1)
            others = tl.max(held, axis=0) >= 0
            key = tl.reshape(k1, (D,))
            bound = (bh * tl.cdiv(C, PAGE) + page) * D + d
            page_low = tl.load(page_min_ptr + bound).to(tl.float32)
            page_high = tl.load(page_max_ptr + bound).to(tl.float32)
            tl.store(page_min_ptr + bound, _page_bound(tl.where(others, tl.minimum(page_low, key), key), False,
                                                       BOUNDS_FP8, DTYPE))
            tl.store(page_max_ptr + bound, _page_bound(tl.where(others, tl.maximum(page_high, key), key), True,
                                                       BOUNDS_FP8, DTYPE))


# Quest's scan in its page-scoring kernel (`quest.QuestScan`, session 14) instead of its own launch after
# the attention. On since session 18: on the H100 at B8 S64K (chained launches, policy_attention.json) the
# step took 221.4 / 201.2 / 205.8 us with it against 231.1 / 206.5 / 210.1 without (quest 1/8, with fp8
# bounds, int4 + quest; 64-page blocks), and 225.4 / 219.2 against 233.8 / 218.5 in the call before
# (32-page blocks). Session 16 had measured it slower (229.3 against 220.9 us, plain launches, one call).
QUEST_SCAN_IN_SCORE = True


def decode_step_triton(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, store,
                       attn_mask: torch.Tensor | None, is_causal: bool, scale: float, spec, layer: int,
                       block_s: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """`decode_step` in Triton launches (Quest's page choice; the slot attention; the scan (Quest's sparse
    layers: unless `QUEST_SCAN_IN_SCORE`), select (not Quest) and finish kernels): the output
    [B, Hq, 1, D] in q's dtype; the store is updated in place. block_s: slots per program of the scan and
    select passes (default `default_block_s`; with `QUEST_SCAN_IN_SCORE`, Quest's sparse layers: whole
    pages, block_s // page_size rounded down to a power of two and at least one, default
    `quest.SCORE_PAGES` pages); num_splits: the slot attention's split-K programs per (row, KV head)
    (default `default_slot_splits`)."""
    from kvfx.kernels.policies import QUEST_DENSE_LAYERS
    from kvfx.kernels.quest import SCORE_PAGES, QuestScan, quest_pages_triton
    from kvfx.kernels.slot_attention import chained_launch, pdl_launch, row_bias, slot_partials

    b, hq, _, d = q.shape
    hkv, c = store.slot_pos.shape[1], store.slot_pos.shape[2]
    gq = hq // hkv
    scored = spec.policy in SCORED
    quest = spec.policy == "quest" and layer >= QUEST_DENSE_LAYERS
    protect, recent = {"streaming": ("sink", 0), "h2o": ("recent", c // 2 if spec.recent is None else min(c, spec.recent)),
                       "snapkv": ("recent", min(c, spec.window)), "pyramidkv": ("recent", min(c, spec.window))
                       }.get(spec.policy, ("none", 0))
    sink = spec.sink if protect == "sink" else 0
    mean = spec.policy == "h2o" and spec.h2o_score == "mean"
    scan_in_score = quest and QUEST_SCAN_IN_SCORE
    if scan_in_score:  # the scoring kernel scans blocks of whole pages (C is a multiple of the page)
        block_pages = 1 << (max(1, block_s // spec.page_size).bit_length() - 1) if block_s else SCORE_PAGES
        block_s = block_pages * spec.page_size
    block_s = block_s or default_block_s(c)
    nb = triton.cdiv(c, block_s)
    stats = torch.empty(b * hkv, nb, 2 + sink, device=q.device, dtype=torch.int32)
    lows = torch.empty(b * hkv, nb, device=q.device, dtype=torch.float32)
    ats = torch.empty(b * hkv, nb, 2, device=q.device, dtype=torch.int32)
    out = torch.empty(b, hq, 1, d, device=q.device, dtype=q.dtype)
    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    bias = row_bias(attn_mask, b)
    pdl = chained_launch(q.device)  # every launch after the first waits on the one before it
    chain = dict(PDL=pdl, **pdl_launch(pdl))
    pages = quest_pages_triton(q, store, spec, QuestScan(pos, bias, is_causal, stats, lows, ats, block_pages)
                               if scan_in_score else None, chained=pdl) if quest else None
    parts = slot_partials(q, pos, store, attn_mask, is_causal, scale, pages, spec.page_size if quest else 0,
                          want_logits=scored, num_splits=num_splits, bias=bias, chained=pdl)
    bias_cols = bias.shape[-1] if bias is not None else 0
    mask = dict(HAS_BIAS=bias is not None, CAUSAL=is_causal)
    bias = bias if bias is not None else parts.m  # (a pointer the kernels do not read)
    ns, part_m = parts.m.shape[1], parts.m.shape[2]
    ns_p = triton.next_power_of_2(ns)
    sinks = dict(PROTECT=protect, SINK=sink)
    if not scan_in_score:
        _slot_scan_kernel[(b * hkv, nb)](
            parts.m, parts.l, parts.logits if parts.logits is not None else parts.m, q, k_new, pos, bias,
            store.slot_pos, store.score, stats, lows, ats, c, ns, nb, hkv, bias_cols, scale * LOG2E, GQ=gq,
            BLOCK_G=triton.next_power_of_2(gq), PART_M=part_m, NS_P=ns_p, D=d, BLOCK_S=block_s, SCORED=scored,
            **sinks, **mask, **chain, num_warps=4)
    nb_p = triton.next_power_of_2(nb)
    sink_block = triton.next_power_of_2(max(sink, 1))
    if protect != "none":  # (Quest: the scan wrote the blocks' candidates)
        _slot_select_kernel[(b * hkv, nb)](
            pos, bias, store.slot_pos, store.score, stats, lows, ats, c, nb, hkv, bias_cols, recent, NB_P=nb_p,
            BLOCK_S=block_s, SINK_BLOCK=sink_block, SCORED=scored, MEAN=mean, **sinks, **mask, **chain,
            num_warps=4)
    codec = store.codec
    page = spec.page_size if store.page_min.numel() else 0
    _slot_finish_kernel[(b * hkv,)](
        parts.m, parts.l, parts.acc, q, k_new, v_new, pos, bias, store.k_codes, store.k_params, store.v_codes,
        store.v_params, store.slot_pos, store.score, store.page_min, store.page_max, stats, lows, ats, out, c, ns, nb,
        hkv, bias_cols, scale * LOG2E, recent, GQ=gq, BLOCK_G=triton.next_power_of_2(gq), PART_M=part_m, NS_P=ns_p,
        D=d, NB_P=nb_p, SINK_BLOCK=sink_block, SCORED=scored, MEAN=mean, CODEC=codec.kv, BITS=codec.bits,
        G=codec.group_size if codec.kv in ("int4", "int2") else 1, DTYPE=TL_DTYPES[store.dtype], PAGE=page,
        BLOCK_P=triton.next_power_of_2(max(page, 1)), BOUNDS_FP8=store.page_min.dtype == torch.float8_e4m3fn,
        **sinks, **mask, **chain, num_warps=4)
    return out


def default_block_s(c: int) -> int:
    """Slots per program of the scan and select passes: 512 (a 13K-slot budget at B8, Hkv 8 is 1,664
    programs), more past 128K slots so the finish kernel reduces at most 256 blocks."""
    return max(MIN_BLOCK_S, triton.next_power_of_2(triton.cdiv(c, MAX_BLOCKS)))
