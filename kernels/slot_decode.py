"""The fused eviction step of a policy decode step (T = 1): Triton kernel beside its reference.

After `kvfx.kernels.slot_attention` has left its split partials (and, for scored policies, every
slot's logit), `_slot_decode_kernel` does the rest of `decode_step` in one program per (row, KV head),
with no host synchronisation and a fixed launch count (CUDA-graph friendly):

1. combine the splits with the new token (the attention output);
2. H2O / SnapKV / PyramidKV: add each slot's attention probability (summed over the g query heads,
   from the kernel's logits) to its score; the new token's score is its own probability;
3. the eviction key of every candidate (C slots + the new token) exactly as `eviction_key` defines it
   for a decode step (limit = C): StreamingLLM protects its `sink` oldest valid positions (kept as a
   small sorted list in registers over one pass) and ranks by position, H2O protects its `recent`
   newest and SnapKV/PyramidKV their `window` newest and rank by score (pinned prompt tokens have score
   +inf), Quest protects nothing and ranks by position;
4. the victim: when all C + 1 candidates are valid, the last of the lowest keys; slots the query can
   no longer see (mask) are emptied, as the reference does;
5. the write of the new token into the free slot (the victim's, else the first empty one), quantized
   per token with the store's `TokenCodec`, with its position and score; Quest's min/max of that page.

The reference is the torch body of `decode_step` (`kvfx.kernels.policies.decode_step_reference`);
tests/kernels/test_slot_decode.py checks the two agree step by step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvfx.kernels.decode_attention import LOG2E
from kvfx.kernels.int8 import _quantize_int8_row
from kvfx.kernels.kivi import TL_DTYPES, _pack, _quantize, _round_e4m3, _round_to
from kvfx.kernels.slot_attention import _load_tokens, _visible

SCORED = ("h2o", "snapkv", "pyramidkv")
BIG = tl.constexpr(2**31 - 1)  # int32 "no position"


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
def _eviction_key(pos, valid, priority, kth, newest, RECENT, PROTECT: tl.constexpr):
    """`eviction_key` of a decode step: +inf where protected (StreamingLLM: position <= the sink-th oldest
    `kth`; H2O / SnapKV: among the RECENT newest), -inf where not valid, else the priority."""
    if PROTECT == "sink":
        protected = pos <= kth
    elif PROTECT == "recent":
        protected = pos > newest - RECENT
    else:
        protected = pos < -1  # nothing
    return tl.where(valid, tl.where(protected, float("inf"), priority), float("-inf"))


@triton.jit
def _slot_decode_kernel(m_ptr, l_ptr, acc_ptr, logit_ptr, q_ptr, k_new_ptr, v_new_ptr, new_pos_ptr, bias_ptr,
                        k_codes, k_params, v_codes, v_params, slot_pos_ptr, score_ptr, page_min_ptr, page_max_ptr,
                        out_ptr, C, NS, HKV, BIAS_COLS, qk_scale, RECENT,
                        GQ: tl.constexpr, BLOCK_G: tl.constexpr, PART_M: tl.constexpr, D: tl.constexpr,
                        BLOCK_C: tl.constexpr, PROTECT: tl.constexpr, SINK: tl.constexpr, SINK_BLOCK: tl.constexpr,
                        SCORED: tl.constexpr, CODEC: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                        DTYPE: tl.constexpr, PAGE: tl.constexpr, BLOCK_P: tl.constexpr, HAS_BIAS: tl.constexpr,
                        CAUSAL: tl.constexpr):
    """Program bh = (row, KV head): combine, score, choose the victim, write the new token."""
    bh = tl.program_id(0)
    row = bh // HKV
    rows = tl.arange(0, BLOCK_G)
    rmask = rows < GQ
    d = tl.arange(0, D)
    # ---- 1. the output: the splits' partials and the new token, one softmax
    q = tl.load(q_ptr + (bh * GQ + rows[:, None]) * D + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    k_new = tl.load(k_new_ptr + bh * D + d).to(tl.float32)
    v_new = tl.load(v_new_ptr + bh * D + d).to(tl.float32)
    new_pos = tl.load(new_pos_ptr + rows * 0).to(tl.int32)  # [BLOCK_G], all the same
    new_seen, new_bias = _visible(new_pos, new_pos, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
    new = tl.sum(q * k_new[None, :], axis=1) * qk_scale
    if HAS_BIAS:
        new += new_bias * 1.4426950408889634
    top = new
    for s in range(NS):
        top = tl.maximum(top, tl.load(m_ptr + (bh * NS + s) * PART_M + rows, mask=rmask, other=float("-inf")))
    top = tl.where(top == float("-inf"), 0.0, top)
    w_new = tl.exp2(new - top)
    total = w_new
    acc = w_new[:, None] * v_new[None, :]
    for s in range(NS):
        part = (bh * NS + s) * PART_M + rows
        w = tl.exp2(tl.load(m_ptr + part, mask=rmask, other=float("-inf")) - top)
        total += tl.load(l_ptr + part, mask=rmask, other=0.0) * w
        acc += tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0) * w[:, None]
    norm = tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + (bh * GQ + rows[:, None]) * D + d[None, :], (acc / norm[:, None]).to(out_ptr.dtype.element_ty),
             mask=rmask[:, None])
    p_new = tl.sum(tl.where(rmask, w_new / norm, 0.0), axis=0)
    new_pos = tl.max(new_pos, axis=0)
    new_valid = tl.max(new_seen.to(tl.int32), axis=0) > 0
    base = bh * C
    # ---- 2. one pass: how many candidates are valid, the newest one, StreamingLLM's oldest SINK
    n_valid = new_valid.to(tl.int32)
    newest = tl.where(new_valid, new_pos, -1)
    kk = tl.arange(0, SINK_BLOCK)
    oldest = tl.full((SINK_BLOCK,), BIG, tl.int32)  # ascending; BIG: none yet
    if PROTECT == "sink":
        oldest = tl.where((kk == 0) & new_valid, new_pos, oldest)
    if PROTECT != "none":
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            pos = tl.load(slot_pos_ptr + base + c, mask=c < C, other=-1)
            valid, _ = _visible(pos, new_pos, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
            n_valid += tl.sum(valid.to(tl.int32), axis=0)
            newest = tl.maximum(newest, tl.max(tl.where(valid, pos, -1), axis=0))
            if PROTECT == "sink":
                x = tl.where(valid, pos, BIG)
                if tl.min(x, axis=0) < tl.max(tl.where(kk < SINK, oldest, -1), axis=0):
                    merged = tl.full((SINK_BLOCK,), BIG, tl.int32)
                    for i in tl.static_range(SINK):  # the SINK smallest of the list and the block, in order
                        a = tl.min(x, axis=0)
                        r = tl.min(oldest, axis=0)
                        merged = tl.where(kk == i, tl.minimum(a, r), merged)
                        from_x = a <= r
                        xi = tl.min(tl.where(x == a, c, C), axis=0)
                        x = tl.where(from_x & (c == xi), BIG, x)
                        ri = tl.min(tl.where(oldest == r, kk, SINK_BLOCK), axis=0)
                        oldest = tl.where(~from_x & (kk == ri), BIG, oldest)
                    oldest = merged
    kth = tl.max(tl.where(kk < SINK, oldest, -1), axis=0)  # the SINK-th oldest (BIG: fewer valid; -1: SINK 0)
    # ---- 3. scores, keys, the lowest key (the last of equals), emptied slots
    best_key = tl.full((), float("inf"), tl.float32)
    best = C
    first_free = C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        inside = c < C
        pos = tl.load(slot_pos_ptr + base + c, mask=inside, other=-1)
        valid, _ = _visible(pos, new_pos, bias_ptr, row, BIAS_COLS, HAS_BIAS, CAUSAL)
        if PROTECT == "none":
            n_valid += tl.sum(valid.to(tl.int32), axis=0)
        if SCORED:
            logits = tl.load(logit_ptr + (bh * GQ + rows[:, None]) * C + c[None, :],
                             mask=rmask[:, None] & inside[None, :], other=float("-inf"))
            probs = tl.sum(tl.exp2(logits - top[:, None]) / norm[:, None], axis=0)
            priority = tl.load(score_ptr + base + c, mask=inside, other=0.0) + probs
            tl.store(score_ptr + base + c, tl.where(valid, priority, 0.0), mask=inside)
        else:
            priority = pos.to(tl.float32)
            tl.store(score_ptr + base + c, tl.zeros((BLOCK_C,), tl.float32), mask=inside & ~valid)
        tl.store(slot_pos_ptr + base + c, tl.full((BLOCK_C,), -1, tl.int32), mask=inside & ~valid & (pos >= 0))
        key = tl.where(inside, _eviction_key(pos, valid, priority, kth, newest, RECENT, PROTECT), float("inf"))
        low = tl.min(key, axis=0)
        at = tl.max(tl.where(inside & (key == low), c, -1), axis=0)
        better = low <= best_key
        best = tl.where(better, at, best)
        best_key = tl.where(better, low, best_key)
        first_free = tl.minimum(first_free, tl.min(tl.where(inside & ~valid, c, C), axis=0))
    # the new token, candidate C
    if SCORED:
        new_score = p_new
        new_priority = p_new
    else:
        new_score = tl.zeros((), tl.float32)
        new_priority = new_pos.to(tl.float32)
    new_key = _eviction_key(new_pos, new_valid, new_priority, kth, newest, RECENT, PROTECT)
    best = tl.where(new_key <= best_key, C, best)
    full = n_valid > C
    free = tl.where(full & (best < C), best, tl.where(first_free < C, first_free, 0))
    keep_new = new_valid & ~(full & (best == C))
    tl.debug_barrier()  # the scans' stores land before the free slot is written and its page is read
    # ---- 4. the new token into the free slot
    if keep_new:
        one = tl.arange(0, 1)
        k1 = _round_to(tl.reshape(k_new, (1, D)), DTYPE)
        v1 = _round_to(tl.reshape(v_new, (1, D)), DTYPE)
        _store_token(k1, k_codes, k_params, base + free, D, CODEC, BITS, G, DTYPE)
        _store_token(v1, v_codes, v_params, base + free, D, CODEC, BITS, G, DTYPE)
        tl.store(slot_pos_ptr + base + free + one, tl.full((1,), 0, tl.int32) + new_pos)
        tl.store(score_ptr + base + free + one, tl.full((1,), 0.0, tl.float32) + new_score)
    # ---- 5. Quest: min / max of the live keys of the free slot's page (as `TokenStore.put`)
    if PAGE > 0:
        tl.debug_barrier()
        page = free // PAGE
        j = tl.arange(0, BLOCK_P)
        slots = page * PAGE + j
        live = (j < PAGE) & (tl.load(slot_pos_ptr + base + slots, mask=j < PAGE, other=-1) >= 0)
        keys = _load_tokens(k_codes, k_params, base + slots, live, BLOCK_P, D, CODEC, BITS, G)
        low = tl.min(tl.where(live[:, None], keys, float("inf")), axis=0)
        high = tl.max(tl.where(live[:, None], keys, float("-inf")), axis=0)
        bound = (bh * tl.cdiv(C, PAGE) + page) * D + d
        tl.store(page_min_ptr + bound, tl.where(low == float("inf"), 0.0, low).to(DTYPE))
        tl.store(page_max_ptr + bound, tl.where(high == float("-inf"), 0.0, high).to(DTYPE))


def decode_step_triton(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, store,
                       attn_mask: torch.Tensor | None, is_causal: bool, scale: float, spec, layer: int,
                       block_c: int = 2048) -> torch.Tensor:
    """`decode_step` in Triton launches (Quest's page choice, the slot attention, this kernel): the
    output [B, Hq, 1, D] in q's dtype; the store is updated in place."""
    from kvfx.kernels.policies import QUEST_DENSE_LAYERS
    from kvfx.kernels.quest import quest_pages_triton
    from kvfx.kernels.slot_attention import slot_partials

    b, hq, _, d = q.shape
    hkv, c = store.slot_pos.shape[1], store.slot_pos.shape[2]
    gq = hq // hkv
    scored = spec.policy in SCORED
    pages = quest_pages_triton(q, store, spec) if spec.policy == "quest" and layer >= QUEST_DENSE_LAYERS else None
    parts = slot_partials(q, pos, store, attn_mask, is_causal, scale, pages, spec.page_size if pages is not None else 0,
                          want_logits=scored)
    protect, recent = {"streaming": ("sink", 0), "h2o": ("recent", c // 2 if spec.recent is None else min(c, spec.recent)),
                       "snapkv": ("recent", min(c, spec.window)), "pyramidkv": ("recent", min(c, spec.window))
                       }.get(spec.policy, ("none", 0))
    sink = spec.sink if protect == "sink" else 0
    out = torch.empty(b, hq, 1, d, device=q.device, dtype=q.dtype)
    codec = store.codec
    page = spec.page_size if store.page_min.numel() else 0
    _slot_decode_kernel[(b * hkv,)](
        parts.m, parts.l, parts.acc, parts.logits if parts.logits is not None else parts.m, q.contiguous(),
        k_new.contiguous(), v_new.contiguous(), pos, parts.bias if parts.bias is not None else parts.m,
        store.k_codes, store.k_params, store.v_codes, store.v_params, store.slot_pos, store.score,
        store.page_min, store.page_max, out, c, parts.m.shape[1], hkv,
        parts.bias.shape[-1] if parts.bias is not None else 0, scale * LOG2E, recent,
        GQ=gq, BLOCK_G=triton.next_power_of_2(gq), PART_M=parts.m.shape[2], D=d, BLOCK_C=block_c, PROTECT=protect,
        SINK=sink, SINK_BLOCK=triton.next_power_of_2(max(sink, 1)), SCORED=scored, CODEC=codec.kv, BITS=codec.bits,
        G=codec.group_size if codec.kv in ("int4", "int2") else 1, DTYPE=TL_DTYPES[store.dtype], PAGE=page,
        BLOCK_P=triton.next_power_of_2(max(page, 1)), HAS_BIAS=parts.bias is not None, CAUSAL=is_causal, num_warps=8)
    return out
