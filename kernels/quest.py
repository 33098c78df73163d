"""Quest's page choice at a decode step in Triton, beside its reference `policies.quest_pages`.

Each KV head scores the pages of `page_size` slots by the bound sum_d max(q_d min_d, q_d max_d) summed
over its g query heads. Since min_d and max_d do not depend on the head, the sum over heads moves inside:
sum_d relu(Q)_d max_d + min(Q, 0)_d min_d with relu(Q) = sum_g relu(q_g) and min(Q, 0) likewise, one
multiply-add per bound element and no matmul (fp32; the reference's matmuls run in the bounds' dtype,
fp32 for fp8 bounds, so near-ties may rank differently on bf16). `_quest_score_kernel` spreads the pages
of a head over many programs (the bounds are 1/8 of the keys' bytes at P = 16, 1/16 with
`page_bounds="fp8"`) and also writes each page's newest position;
`_quest_select_kernel`, one program per head, finds the k-th largest score exactly (a bisection over the
scores' order-preserving integer keys in registers, at most 32 counting steps, fewer when a step lands
between the k-th and the (k+1)-th key), keeps the pages above it and the lowest-numbered ties, and
appends the newest token's page, as the reference does (scores max-pooled over `page_pool` neighbouring
pages first; pages without tokens rank below every live page; the newest page is never among the k;
the oldest page, the attention sink's, always is). The page list goes to the slot-attention kernel as
is (`slot_partials(..., page=P)`): no gathered K/V, no slot list.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvfx.kernels.slot_attention import _chain, pdl_launch
from kvfx.kernels.slot_decode import _new_token, _scan_unprotected_block

DEAD = tl.constexpr(-3.0e38)  # the score of a page without tokens (as the reference)
# The scoring kernel's launch, from benchmarks/results/quest_pages.json (H100, B8 S64K, 4097 pages a head):
# 64 pages and 2 warps a program score bf16 bounds in 65.8 us (2.3 TB/s) and fp8 bounds in 44.2 us, against
# 69.7 us and 61.3 us at the former 32 pages and 4 warps; no other launch of the sweep beat it by over 1%.
# With the step's scan in it (`QuestScan`), 2 warps also beat 4 (policy_attention.py, the same machine:
# 220.8 / 198.5 / 202.3 us a step against 221.5 / 201.0 / 204.9 for quest 1/8, fp8 bounds, int4 + quest).
SCORE_PAGES, SCORE_WARPS = 64, 2
QUEST_MAX_PAGES = 1 << 16  # pages per head the selection counts (16-bit packed counts); the store refuses more
# The selection holds a head's pages in registers: 8 warps up to 8192 pages, then more. Session 9 measured
# 8 warps best at 4096 pages (16 a thread; 4 and 16 warps slower), but a tile of 8192 (4097 pages, as
# policy_attention.py's store of S + 1 slots has: 8208 slots padded, one page over 4096) gets 32 a thread:
# twice the compares per count, and 3 spills in the sm_90 build (7,264 instructions against 4,536 at 16
# warps, Triton 3.9). Timed there in session 18 (quest_pages.json, H100): 8 warps 21.6 us, 16 warps 23.4,
# 32 warps 27.2, 4 warps 57.1 (17.2 us at 8 warps on the first 4096 pages): 8 warps stay.
SELECT_PAGES_PER_THREAD = 32
# Pages past the largest power of two below a head's page count go to a tail tile when there are at most
# this many (one warp's: its count is a warp reduction, no shared memory): 4097 pages are 4096 + 1, not
# 8192 with 4095 of padding. 0 turns the tail off (benchmarks/quest_pages.py compares both). Compiled for
# sm_90 at 8 warps (Triton 3.9 on CPU, static): 4,184 instructions for 4096 + 1 against 7,448 for the
# padded 8192 and 3,984 for 4096 alone (a tail of 1 is one register a thread: its counts need no shuffle).
# Timed in session 19 (H100, quest_pages.json): 17.4 us against 22.0 padded, as fast as 4096 pages alone;
# the Quest 1/8 step 226.8 -> 215.1 us, 201.7 -> 188.2 with fp8 bounds (policy_attention.json, two A/B rounds).
# (Those runs had the tail's newest / oldest page beside two more block reductions, tl.max / tl.min next
# to tl.argmax / tl.argmin, 4,216 instructions; one reduction with its index now gives both, untimed.)
SELECT_TAIL_PAGES = 32


@triton.jit
def _quest_score_kernel(q_ptr, min_ptr, max_ptr, slot_pos_ptr, page_score_ptr, newest_ptr, new_pos_ptr, bias_ptr,
                        score_ptr, stats_ptr, low_ptr, at_ptr, NP, C, NB, HKV, BIAS_COLS, GQ: tl.constexpr,
                        BLOCK_G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, PAGE_BLOCK: tl.constexpr,
                        BLOCK_P: tl.constexpr, SCAN: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                        PDL: tl.constexpr = False):
    """Program (bh, block of BLOCK_P pages): each page's bound (DEAD without tokens) and newest position;
    SCAN: also the decode step's scan of the block's slots (`QuestScan`), from the positions loaded here.
    PDL: `slot_attention._chain`."""
    _chain(PDL)
    bh, blk = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * GQ + rows[:, None]) * D + d[None, :], mask=(rows < GQ)[:, None], other=0.0)
    q = q.to(tl.float32)
    q_pos = tl.sum(tl.maximum(q, 0.0), axis=0)
    q_neg = tl.sum(tl.minimum(q, 0.0), axis=0)
    p = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = p < NP
    bound = (bh * NP + p[:, None]) * D + d[None, :]
    low = tl.load(min_ptr + bound, mask=inside[:, None], other=0.0).to(tl.float32)
    high = tl.load(max_ptr + bound, mask=inside[:, None], other=0.0).to(tl.float32)
    score = tl.sum(high * q_pos[None, :] + low * q_neg[None, :], axis=1)
    j = tl.arange(0, PAGE_BLOCK)
    slot = p[:, None] * PAGE + j[None, :]
    held_mask = inside[:, None] & (j < PAGE)[None, :]
    held = tl.load(slot_pos_ptr + bh * C + slot, mask=held_mask, other=-1)
    newest = tl.max(held, axis=1)
    tl.store(page_score_ptr + bh * NP + p, tl.where(newest >= 0, score, DEAD), mask=inside)
    tl.store(newest_ptr + bh * NP + p, newest, mask=inside)
    if SCAN:  # (after the newest positions: the scan empties the slots the query no longer sees)
        row = bh // HKV
        new_pos, _, _ = _new_token(new_pos_ptr, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
        N: tl.constexpr = BLOCK_P * PAGE_BLOCK
        _scan_unprotected_block(tl.reshape(held, (N,)), tl.reshape(slot, (N,)), tl.reshape(held_mask, (N,)), new_pos,
                                bias_ptr, row, bh * NB + blk, slot_pos_ptr + bh * C, score_ptr + bh * C, stats_ptr,
                                low_ptr, at_ptr, C, BIAS_COLS, HAS_BIAS, CAUSAL)


@triton.jit
def _order_key(score):
    """fp32 -> int32 with the same order (non-NaN): the bits, negatives' magnitude bits flipped."""
    bits = score.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _count_at_least(key, tail_key, t, TAIL: tl.constexpr):
    """#(key >= t) over the main tile and, TAIL > 0, the tail: one block-wide reduction (a warp REDUX, then
    the warps' partials), plus a warp's for a tail of at most 32 keys."""
    n = tl.sum((key >= t).to(tl.int32), axis=0)
    if TAIL > 0:
        n += tl.sum((tail_key >= t).to(tl.int32), axis=0)
    return n


@triton.jit
def _kth_key_by_bits(key, tail_key, K, N_KEYS: tl.constexpr, TAIL: tl.constexpr):
    """The K-th largest of the N_KEYS keys (the main tile's and the tail's) by bisection on its bits, from
    the sign down: `lo` is the largest value known to have >= K keys at or above it (n_lo of them); the
    candidate lo + 2^bit becomes `lo` when it still has >= K keys at or above it, else it bounds the
    search from above (n_hi keys at or above it).
    Two ways out: after bit 0, lo is the K-th key and n_hi = #(key > lo); or, as soon as n_lo == K, the
    keys >= lo are exactly the K best whatever the lower bits (no tie to break), and the remaining steps
    are skipped (`if` on a block-uniform value: no reduction). With distinct scores that happens once
    2^bit drops below the gap between the K-th and (K+1)-th keys; ties run all 32 steps.
    Returns (kth, ties_wanted): the pages with a key above kth, then the first ties_wanted of its ties."""
    lo = tl.full((), -2147483648, tl.int32)
    n_lo = tl.full((), N_KEYS, tl.int32)  # #(key >= lo): every key at first
    n_hi = tl.full((), 0, tl.int32)  # #(key >= the candidate last rejected): none above 2^31 - 1 at first
    for bit in tl.static_range(31, -1, -1):
        if n_lo != K:
            cand = lo ^ (tl.full((), 1, tl.int32) << bit)  # lo + 2^bit (lo's lower bits are clear), no overflow
            n = _count_at_least(key, tail_key, cand, TAIL)
            lo = tl.where(n >= K, cand, lo)
            n_lo = tl.where(n >= K, n, n_lo)
            n_hi = tl.where(n >= K, n_hi, n)
    exact = n_lo == K  # (lo > -2^31 then: n_lo started at N_KEYS > K)
    return tl.where(exact, lo - 1, lo), tl.where(exact, 0, K - n_hi)


@triton.jit
def _page_scores(score_ptr, newest_ptr, NP, i, POOL: tl.constexpr):
    """The scores of pages i (-inf past NP), each live page's the best within POOL // 2 pages of it
    (`page_pool`, the reference's max-pooling; neighbours are loaded again, L1 hits), and their newest
    positions (-2 past NP)."""
    score = tl.load(score_ptr + i, mask=i < NP, other=float("-inf"))
    held = tl.load(newest_ptr + i, mask=i < NP, other=-2)
    if POOL > 1:
        pooled = score
        for off in tl.static_range(1, POOL // 2 + 1):
            pooled = tl.maximum(pooled, tl.load(score_ptr + i - off, mask=(i >= off) & (i < NP + off),
                                                other=float("-inf")))
            pooled = tl.maximum(pooled, tl.load(score_ptr + i + off, mask=i + off < NP, other=float("-inf")))
        score = tl.where(held >= 0, pooled, score)
    return score, held


@triton.jit
def _page_keys(score, i, newest, oldest):
    """Order keys of pages i: the oldest page's above every score, the newest's and padding below."""
    return _order_key(tl.where(i == newest, float("-inf"), tl.where(i == oldest, float("inf"), score)))


@triton.jit
def _place_pages(key, i, kth, ties_wanted, before, out, NP):
    """Store the chosen pages of the tile i (above kth, then the first ties_wanted ties overall) at their
    ranks, after `before` (the packed counts of the tiles before it); returns the packed counts so far.
    Running counts of the pages above kth and of its ties are packed in one int32 (16 bits each: NP <
    2^16), so one scan places each page; ties past the wanted number are dropped, so pages come out in
    ascending order."""
    above = key > kth
    tie = (key == kth) & (i < NP)
    rank = before + tl.cumsum(above.to(tl.int32) + (tie.to(tl.int32) << 16), axis=0)  # inclusive counts, packed
    n_above = rank & 0xFFFF
    n_tie = (rank >> 16) & 0xFFFF
    pick = above | (tie & (n_tie <= ties_wanted))
    tl.store(out + n_above + tl.minimum(n_tie, ties_wanted) - 1, i, mask=pick)
    return tl.max(rank, axis=0)  # (both counts only grow: the last is the largest)


@triton.jit
def _quest_select_kernel(score_ptr, newest_ptr, pages_ptr, NP, K, MAIN: tl.constexpr, TAIL: tl.constexpr,
                         POOL: tl.constexpr, PDL: tl.constexpr = False):
    """Program bh: pages[bh] = the K best pages (ascending page number; the oldest page counts as the
    best), then the newest token's page. A live page ranks as the best score within POOL // 2 pages of it
    (`_page_scores`).

    The pages sit in registers: a main tile of MAIN (a power of two) and, TAIL > 0, a tail of the TAIL
    pages after it (`select_tiles`: NP = 4097, a store of S + 1 slots at S = 64K, gets 4096 + 1, not a
    padded 8192 tile). The K-th largest key is found by bisection (`_kth_key_by_bits`). A step is one
    count over the tiles, so its cost is the latency of one block-wide reduction (warp REDUX, shared
    memory, two barriers) and the steps are serial.

    Timed alone on an H100 in session 9 (64 heads, NP 4096, K 512; not kept as JSON, and the step's
    profile in policy_attention.json gave 19.7 us against the former 20.9): 8.9 us with normal scores,
    11.2 us when the K-th key has ties (all 32 steps: e.g. fewer live pages than K), against 13.6 us for
    the former kernel (32 steps always, newest page by two reductions, scores loaded after them, output
    in chunks of 1024 with two scans and two sums each). A radix select (r bits a step: 2^r - 1
    independent counts, 32 / r steps) was slower: r = 2 13.8 us, r = 4 22.7 us; with 16 keys a thread the
    compares, not the reductions, then dominate. 4 or 16 warps were slower than 8. Session 18
    (benchmarks/results/quest_pages.json, B8 S64K, 8 x 8 heads, K 512): 17.2 us at 4096 pages, 21.6 us at
    4097 in one padded tile of 8192 (16 warps 23.4 us, 32 warps 27.2 us); session 19: 17.4 us at 4097 as
    4096 + a tail of 1 (22.0 padded in the same run). A bisection with both ends
    snapped to keys (a tuple reduction a step, ending on ties too: 12.8 steps a head against 28.0) was
    slower at 4097 pages (26.4 us at 8 warps, 23.2 us at 16) and barely faster at 4096 (16.4 us), so it
    was removed. PDL: `slot_attention._chain`.
    """
    _chain(PDL)
    bh = tl.program_id(0)
    i = tl.arange(0, MAIN)
    # The loads first: the scores arrive while the newest page's reduction runs.
    score, held = _page_scores(score_ptr + bh * NP, newest_ptr + bh * NP, NP, i, POOL)
    # The newest page (the first of the newest position) ranks last; the oldest (the attention sink's: the
    # first of the lowest newest position among live pages) first, so it is one of the K.
    newest_pos, newest = tl.max(held, axis=0, return_indices=True, return_indices_tie_break_left=True)
    oldest_pos, oldest = tl.min(tl.where(held >= 0, held, 2147483647), axis=0, return_indices=True,
                                return_indices_tie_break_left=True)
    if TAIL > 0:  # a tail page wins only over a strictly worse main one (ties go to the lower page)
        it = MAIN + tl.arange(0, TAIL)
        tail_score, tail_held = _page_scores(score_ptr + bh * NP, newest_ptr + bh * NP, NP, it, POOL)
        tail_newest_pos, tail_newest = tl.max(tail_held, axis=0, return_indices=True,
                                              return_indices_tie_break_left=True)
        tail_oldest_pos, tail_oldest = tl.min(tl.where(tail_held >= 0, tail_held, 2147483647), axis=0,
                                              return_indices=True, return_indices_tie_break_left=True)
        newest = tl.where(tail_newest_pos > newest_pos, MAIN + tail_newest, newest)
        oldest = tl.where(tail_oldest_pos < oldest_pos, MAIN + tail_oldest, oldest)
        tail_key = _page_keys(tail_score, it, newest, oldest)
    key = _page_keys(score, i, newest, oldest)
    if TAIL == 0:
        tail_key = key  # (unused: no tail to count)
    kth, ties_wanted = _kth_key_by_bits(key, tail_key, K, MAIN + TAIL, TAIL)
    out = pages_ptr + bh * (K + 1)
    placed = _place_pages(key, i, kth, ties_wanted, 0, out, NP)
    if TAIL > 0:
        _place_pages(tail_key, it, kth, ties_wanted, placed, out, NP)
    tl.store(out + K + tl.arange(0, 1), tl.zeros((1,), tl.int32) + newest)


class QuestScan(NamedTuple):
    """The decode step's scan (`slot_decode._scan_unprotected_block`) for `quest_pages_triton` to run in
    its scoring kernel, which loads every slot's position anyway: blocks of `block_pages` pages (a power
    of two), the step's new position, mask and buffers for the finish kernel."""

    pos: torch.Tensor  # [1] the new token's position
    bias: torch.Tensor | None  # the mask by logical position (`slot_attention.row_bias`)
    causal: bool
    stats: torch.Tensor  # [B * Hkv, NB, 2] int32
    lows: torch.Tensor  # [B * Hkv, NB] fp32
    ats: torch.Tensor  # [B * Hkv, NB, 2] int32
    block_pages: int


def quest_pages_triton(q: torch.Tensor, store, spec, scan: QuestScan | None = None, chained: bool = False
                       ) -> torch.Tensor:
    """The pages [B, Hkv, k + 1] (int32) a decode step with queries q [B, Hq, 1, D] reads: the oldest page
    and the k - 1 best by the bound (ascending), then the newest token's page (`policies.quest_pages`
    gives the same set). With `scan`, the scoring kernel also does the step's scan of the store. chained:
    a policy step's launch (`slot_attention.chained_launch`)."""
    if store.page_min.shape[2] >= QUEST_MAX_PAGES:  # (`TokenFormat.allocate` refuses such a store up front)
        raise ValueError(f"Quest's page selection counts pages in 16 bits: {store.page_min.shape[2]} pages per head")
    scores, newest = quest_page_scores(q, store, spec, scan, chained)
    return quest_select(scores, newest, q.shape[0], spec.pages_read(store.slot_pos.shape[2]), spec.page_pool, chained)


def quest_page_scores(q: torch.Tensor, store, spec, scan: QuestScan | None = None, chained: bool = False,
                      block_pages: int | None = None, num_warps: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`_quest_score_kernel`: each page's bound and newest position, [B * Hkv, pages] fp32 and int32 (DEAD
    and -1 for a page without tokens). block_pages and num_warps (default SCORE_PAGES, or the scan's block,
    and SCORE_WARPS): the launch, which benchmarks/quest_pages.py sweeps."""
    b, hq, _, d = q.shape
    hkv, c = store.slot_pos.shape[1], store.slot_pos.shape[2]
    gq = hq // hkv
    n_pages = store.page_min.shape[2]
    scores = torch.empty(b * hkv, n_pages, device=q.device, dtype=torch.float32)
    newest = torch.empty(b * hkv, n_pages, device=q.device, dtype=torch.int32)
    block_p = scan.block_pages if scan else block_pages or SCORE_PAGES
    nb = triton.cdiv(n_pages, block_p)
    bias = scan.bias if scan else None
    unused = scores  # (a pointer for the scan's arguments when there is none)
    _quest_score_kernel[(b * hkv, nb)](
        q.reshape(b * hq, d).contiguous(), store.page_min, store.page_max, store.slot_pos, scores, newest,
        scan.pos if scan else unused, bias if bias is not None else unused, store.score if scan else unused,
        *((scan.stats, scan.lows, scan.ats) if scan else (unused,) * 3), n_pages, c, nb, hkv,
        bias.shape[-1] if bias is not None else 0, GQ=gq, BLOCK_G=triton.next_power_of_2(gq), D=d,
        PAGE=spec.page_size, PAGE_BLOCK=triton.next_power_of_2(spec.page_size), BLOCK_P=block_p, SCAN=scan is not None,
        HAS_BIAS=bias is not None, CAUSAL=bool(scan and scan.causal), PDL=chained, num_warps=num_warps or SCORE_WARPS)
    return scores, newest


def quest_select(scores: torch.Tensor, newest: torch.Tensor, batch: int, k: int, page_pool: int, chained: bool = False,
                 num_warps: int | None = None) -> torch.Tensor:
    """`_quest_select_kernel` over `quest_page_scores`' output: the pages [B, Hkv, k + 1]. num_warps
    (default `select_warps`): the launch, which benchmarks/quest_pages.py compares."""
    heads, n_pages = scores.shape
    pages = torch.empty(batch, heads // batch, k + 1, device=scores.device, dtype=torch.int32)
    main, tail = select_tiles(n_pages)
    _quest_select_kernel[(heads,)](scores, newest, pages, n_pages, k, MAIN=main, TAIL=tail, POOL=page_pool, PDL=chained,
                                   num_warps=num_warps or select_warps(n_pages), **pdl_launch(chained))
    return pages


def select_tiles(n_pages: int) -> tuple[int, int]:
    """The selection's register tiles (MAIN, TAIL): a power of two, and the pages past it in a tail of at
    most SELECT_TAIL_PAGES (a power of two; 0: none), else one padded power-of-two tile."""
    main = triton.next_power_of_2(n_pages)
    rest = n_pages - main // 2
    if main != n_pages and rest <= SELECT_TAIL_PAGES:
        return main // 2, triton.next_power_of_2(rest)
    return main, 0


def select_warps(n_pages: int) -> int:
    """The selection's default warps: SELECT_PAGES_PER_THREAD of the main tile a thread, 8 at least."""
    return min(32, max(8, select_tiles(n_pages)[0] // (32 * SELECT_PAGES_PER_THREAD)))
