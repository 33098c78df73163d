"""Quest's page choice at a decode step in Triton, beside its reference `policies.quest_pages`.

Each KV head scores the pages of `page_size` slots by the bound sum_d max(q_d min_d, q_d max_d) summed
over its g query heads. Since min_d and max_d do not depend on the head, the sum over heads moves inside:
sum_d relu(Q)_d max_d + min(Q, 0)_d min_d with relu(Q) = sum_g relu(q_g) and min(Q, 0) likewise, one
multiply-add per bound element and no matmul (fp32; the reference's matmuls run in the bounds' dtype,
so near-ties may rank differently on bf16). `_quest_score_kernel` spreads the pages of a head over many
programs (the bounds are 1/8 of the keys' bytes at P = 16) and also writes each page's newest position;
`_quest_select_kernel`, one program per head, finds the k-th largest score exactly (a bitwise search
over the scores' order-preserving integer keys, 32 counting steps in registers), keeps the pages above
it and the lowest-numbered ties, and appends the newest token's page, as the reference does (pages
without tokens rank below every live page; the newest page is never among the k). The page list goes
to the slot-attention kernel as is (`slot_partials(..., page=P)`): no gathered K/V, no slot list.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DEAD = tl.constexpr(-3.0e38)  # the score of a page without tokens (as the reference)
SCORE_PAGES = 32  # pages per program of the scoring kernel
SELECT_CHUNK = 1024  # pages per step of the selection kernel's output loop


@triton.jit
def _quest_score_kernel(q_ptr, min_ptr, max_ptr, slot_pos_ptr, score_ptr, newest_ptr, NP, C,
                        GQ: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                        PAGE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (bh, block of BLOCK_P pages): each page's bound (DEAD without tokens) and newest position."""
    bh = tl.program_id(0)
    rows = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * GQ + rows[:, None]) * D + d[None, :], mask=(rows < GQ)[:, None], other=0.0)
    q = q.to(tl.float32)
    q_pos = tl.sum(tl.maximum(q, 0.0), axis=0)
    q_neg = tl.sum(tl.minimum(q, 0.0), axis=0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    inside = p < NP
    bound = (bh * NP + p[:, None]) * D + d[None, :]
    low = tl.load(min_ptr + bound, mask=inside[:, None], other=0.0).to(tl.float32)
    high = tl.load(max_ptr + bound, mask=inside[:, None], other=0.0).to(tl.float32)
    score = tl.sum(high * q_pos[None, :] + low * q_neg[None, :], axis=1)
    j = tl.arange(0, PAGE_BLOCK)
    held = tl.load(slot_pos_ptr + bh * C + p[:, None] * PAGE + j[None, :], mask=inside[:, None] & (j < PAGE)[None, :],
                   other=-1)
    newest = tl.max(held, axis=1)
    tl.store(score_ptr + bh * NP + p, tl.where(newest >= 0, score, DEAD), mask=inside)
    tl.store(newest_ptr + bh * NP + p, newest, mask=inside)


@triton.jit
def _order_key(score):
    """fp32 -> int32 with the same order (non-NaN): the bits, negatives' magnitude bits flipped."""
    bits = score.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _page_keys(score_ptr, bh, i, NP, newest):
    """Order keys of pages i; the newest page and pages past NP rank last (key of -inf)."""
    score = tl.load(score_ptr + bh * NP + i, mask=i < NP, other=float("-inf"))
    return _order_key(tl.where(i == newest, float("-inf"), score))


@triton.jit
def _quest_select_kernel(score_ptr, newest_ptr, pages_ptr, NP, K, NP_BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Program bh: pages[bh] = the K best pages (ascending page number), then the newest token's page."""
    bh = tl.program_id(0)
    i = tl.arange(0, NP_BLOCK)
    held = tl.load(newest_ptr + bh * NP + i, mask=i < NP, other=-2)
    newest = tl.min(tl.where(held == tl.max(held, axis=0), i, NP_BLOCK), axis=0)  # the first page of the max
    key = _page_keys(score_ptr, bh, i, NP, newest)
    # The K-th largest key: the largest t with #(key >= t) >= K, built bit by bit from the sign down.
    kth = tl.where(tl.sum((key >= 0).to(tl.int32), axis=0) >= K, 0, -2147483648)
    for bit in tl.static_range(30, -1, -1):
        cand = kth + (1 << bit)
        kth = tl.where(tl.sum((key >= cand).to(tl.int32), axis=0) >= K, cand, kth)
    ties_wanted = K - tl.sum((key > kth).to(tl.int32), axis=0)
    out = bh * (K + 1)
    chosen = 0
    ties = 0
    for c0 in range(0, NP, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        chunk = _page_keys(score_ptr, bh, c, NP, newest)
        tie = (chunk == kth) & (c < NP)
        pick = (c < NP) & ((chunk > kth) | (tie & (ties + tl.cumsum(tie.to(tl.int32), axis=0) <= ties_wanted)))
        tl.store(pages_ptr + out + chosen + tl.cumsum(pick.to(tl.int32), axis=0) - 1, c, mask=pick)
        chosen += tl.sum(pick.to(tl.int32), axis=0)
        ties += tl.sum(tie.to(tl.int32), axis=0)
    tl.store(pages_ptr + out + K + tl.arange(0, 1), tl.zeros((1,), tl.int32) + newest)


def quest_pages_triton(q: torch.Tensor, store, spec) -> torch.Tensor:
    """The pages [B, Hkv, k + 1] (int32) a decode step with queries q [B, Hq, 1, D] reads: the k best by
    the bound (ascending), then the newest token's page (`policies.quest_pages` gives the same set)."""
    b, hq, _, d = q.shape
    hkv, c = store.slot_pos.shape[1], store.slot_pos.shape[2]
    gq = hq // hkv
    n_pages = store.page_min.shape[2]
    k = spec.pages_read(c)
    scores = torch.empty(b * hkv, n_pages, device=q.device, dtype=torch.float32)
    newest = torch.empty(b * hkv, n_pages, device=q.device, dtype=torch.int32)
    _quest_score_kernel[(b * hkv, triton.cdiv(n_pages, SCORE_PAGES))](
        q.reshape(b * hq, d).contiguous(), store.page_min, store.page_max, store.slot_pos, scores, newest, n_pages, c,
        GQ=gq, BLOCK_G=triton.next_power_of_2(gq), D=d, PAGE=spec.page_size,
        PAGE_BLOCK=triton.next_power_of_2(spec.page_size), BLOCK_P=SCORE_PAGES, num_warps=4)
    pages = torch.empty(b, hkv, k + 1, device=q.device, dtype=torch.int32)
    np_block = triton.next_power_of_2(n_pages)
    _quest_select_kernel[(b * hkv,)](scores, newest, pages, n_pages, k, NP_BLOCK=np_block,
                                     CHUNK=min(SELECT_CHUNK, np_block), num_warps=8)
    return pages
