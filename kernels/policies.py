"""Which tokens a cache keeps and reads: StreamingLLM, H2O, SnapKV, PyramidKV, Quest (reference).

Every policy runs on a `TokenStore` (`kvfx.kernels.token_store`): C slots per (row, KV head), each
holding one token (its codes in the `kv` format, its logical position in `slot_pos`, -1 = empty,
and its accumulated attention in `score`). One call of `policy_attend_reference` is one attention
site's work for T new tokens at positions `pos`:

1. attend: the T queries attend over the kept slots (dequantized) and the T new tokens (full
   precision), one softmax; the model's mask is read at each candidate's logical position, so a
   padding, sliding-window or ALiBi mask means what it meant on the full cache.
2. score: H2O adds each candidate's attention probability (summed over the g query heads of the KV
   head and the T queries); SnapKV/PyramidKV, on a multi-token call (the prompt), score candidates by
   the attention of the last `window` queries, pooled over 7 neighbours (max or avg).
3. keep: per (row, KV head) the candidates ranked by priority, with the tokens the policy promises
   protected (StreamingLLM: the first `sink` and the newest; H2O: the `recent` newest; SnapKV: the
   observation window). A prompt (T > 1) keeps the row's budget; a decode step keeps up to the
   store's capacity. Kept slots stay where they are; kept new tokens fill the free slots in order
   (evicted slots are reused). SnapKV/PyramidKV pin the prompt tokens they chose (as in the papers,
   which never evict them) and keep `window` extra slots for generated tokens, which are evicted
   among themselves by accumulated attention (H2O's rule) once those slots are full.
4. hold back: a prompt call also fills the store's free slots with its next-ranked candidates,
   *provisional* (`slot_pos` = -2 - position): a decode step neither sees nor scores them and empties
   them, so a prompt in one call decodes exactly as without them; the next call of a prompt sent in
   chunks attends to them and ranks them again beside its own tokens. A chunk's own window (SnapKV) or
   queries (H2O) then choose among everything the memory could hold, not only what the last chunk
   kept: with the capacity for the whole prompt, a chunked prompt keeps what one call keeps.

Quest keeps everything (capacity = the cache length) and reads less: at a decode step each KV head
scores the pages of `page_size` slots by sum_d max(q_d min_d, q_d max_d) (its g query heads summed)
and attends only the top `pages` pages plus the page of the newest token; the first two layers stay dense (paper).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import torch
import torch.nn.functional as F

from kvfx.kernels.attention import BLOCK_ELEMENTS, mask_4d, softcapped

POLICIES = ("none", "streaming", "h2o", "snapkv", "pyramidkv", "quest")
EVICTING = ("streaming", "h2o", "snapkv", "pyramidkv")
QUEST_DENSE_LAYERS = 2  # Quest keeps the first two layers dense
QUERY_CHUNK = 512      # queries per step of the reference at most (fewer: `attention.BLOCK_ELEMENTS`)


@dataclass(frozen=True)
class PolicySpec:
    """The policy options of a `KVConfig` (parsed from its JSON, which is how the ops receive them)."""

    kv: str
    group_size: int
    policy: str
    budget: int | float | None
    sink: int
    recent: int | None
    h2o_score: str
    window: int
    pooling: str
    pool_kernel: int
    beta: float
    page_size: int
    pages: int | float
    page_pool: int
    page_bounds: str

    @staticmethod
    @lru_cache(maxsize=64)
    def parse(options: str) -> "PolicySpec":
        fields = json.loads(options)
        return PolicySpec(**{k: fields[k] for k in PolicySpec.__dataclass_fields__})

    def share(self, layer: int, layers: int) -> float:
        """This layer's budget over the mean budget: 1, or PyramidKV's linear pyramid (bottom layer
        2 - 1/beta, top layer 1/beta; the layers' budgets sum to layers x budget)."""
        if self.policy != "pyramidkv" or layers < 2:
            return 1.0
        top, bottom = 1 / self.beta, 2 - 1 / self.beta
        return round(bottom - (bottom - top) * layer / (layers - 1), 9)  # round: ceil(100 * 0.05) is 5

    def capacity(self, cache_len, layer: int, layers: int):
        """Slots per (row, KV head): the budget (a fraction applies to the cache length here, which
        bounds the prompt plus the tokens it generates) for eviction policies, else the cache length.
        `cache_len` may be a SymInt."""
        if self.policy == "quest":  # whole pages
            return (cache_len + self.page_size - 1) // self.page_size * self.page_size
        if self.policy not in EVICTING:
            return cache_len
        share = self.share(layer, layers)
        # SnapKV/PyramidKV pin the prompt tokens they chose: `window` more slots hold the newest
        # generated tokens (evicted by their accumulated attention once those slots are full).
        ring = self.window if self.policy in ("snapkv", "pyramidkv") else 0
        if isinstance(self.budget, int):
            return torch.sym_min(cache_len, max(1, math.ceil(self.budget * share)) + ring)
        frac = Fraction(self.budget * share).limit_denominator(1 << 20)
        kept = torch.sym_max(1, (cache_len * frac.numerator + frac.denominator - 1) // frac.denominator)
        return torch.sym_min(cache_len, kept + ring) if ring else kept

    def pages_read(self, capacity: int) -> int:
        """Quest: how many pages a decode step reads besides the newest one, the oldest (sink) page
        included (a fraction applies to the cache's pages)."""
        total = -(-capacity // self.page_size)
        k = self.pages if isinstance(self.pages, int) else math.ceil(self.pages * total)
        return max(0, min(k, total - 1))  # the newest page is read besides these

    def prompt_keep(self, lengths: torch.Tensor, layer: int, layers: int) -> torch.Tensor:
        """Tokens a row keeps of a prompt of `lengths` [B] tokens (the budget, per row)."""
        share = self.share(layer, layers)
        if isinstance(self.budget, int):
            return torch.full_like(lengths, max(1, math.ceil(self.budget * share)))
        return torch.ceil(lengths.double() * (self.budget * share)).long().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Attention over the kept slots and the new tokens


def candidate_bias(attn_mask: torch.Tensor | None, is_causal: bool, positions: torch.Tensor, pos: torch.Tensor,
                   group: int) -> torch.Tensor:
    """Additive bias [B, Hkv, g, T, N] of T queries at `pos` [T] over N candidates at logical
    `positions` [B, Hkv, N] (-1: empty slot). The model's mask is read at the candidates' positions.
    (Each case is one `torch.where` over the result: on a long prompt chunk the bias is the largest
    tensor of the call, so every extra pass over it costs as much as reading the KV.)"""
    b, hkv, n = positions.shape
    t = pos.shape[0]
    live = (positions >= 0)[:, :, None, None, :]
    if attn_mask is None:
        visible = live & (positions[:, :, None, None, :] <= pos.view(1, 1, 1, t, 1).to(positions.dtype)) \
            if is_causal else live
        return torch.where(visible, 0.0, float("-inf"))
    attn_mask = mask_4d(attn_mask)
    cols, per_head = attn_mask.shape[-1], attn_mask.shape[1] > 1
    # [B|1, Hq|1, T|1, cols] -> [B, Hkv, g|1, T, cols] (views), read at the candidates' positions.
    g = group if per_head else 1
    mask = attn_mask.expand(b, hkv * group if per_head else 1, t, cols).reshape(b, -1, g, t, cols)
    mask = mask.expand(b, hkv, g, t, cols)
    index = positions.long().clamp(0, cols - 1)[:, :, None, None, :].expand(b, hkv, g, t, n)
    picked = mask.gather(-1, index)
    inside = live & (positions < cols)[:, :, None, None, :]
    if picked.dtype == torch.bool:
        return torch.where(picked & inside, 0.0, float("-inf"))
    return torch.where(inside, picked.float(), float("-inf"))


def tokens_seen(attn_mask: torch.Tensor | None, pos: torch.Tensor, batch: int) -> torch.Tensor:
    """Tokens [B] the newest query at pos[-1] sees so far in each row: every position up to it, or those
    the model's mask shows it (left padding and windows left out; the most over the mask's heads). The
    prompt length a fractional budget is taken of, whether the prompt came in one call or in chunks
    (counting the chunk's candidates instead would keep the budget of what the last chunk kept)."""
    if attn_mask is None:
        return (pos[-1] + 1).to(torch.long).expand(batch)
    row = mask_4d(attn_mask)[:, :, -1]  # [B|1, H|1, cols]
    visible = row if row.dtype == torch.bool else row > float("-inf")
    upto = torch.arange(row.shape[-1], device=row.device) <= pos[-1]
    return (visible & upto).sum(-1).amax(-1).expand(batch)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row that sees nothing gets zeros (as SDPA gives), not NaN."""
    probs = torch.softmax(scores, dim=-1)
    return probs.masked_fill(scores.amax(-1, keepdim=True) == float("-inf"), 0.0)


def quest_pages(q: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, slot_pos: torch.Tensor,
                spec: PolicySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages [B, Hkv, k + 1] a decode step with queries q [B, Hkv, g, D] reads: the oldest page (the
    attention sink's), then the k - 1 others with the highest bound sum_d max(q_d min_d, q_d max_d) (the
    g query heads summed; a live page's bound max-pooled over `page_pool` neighbouring pages), then the
    newest token's page; and whether each holds tokens [B, Hkv, k + 1].

    The sink page is one of the k, not read besides them (the same page count). Published Quest ranks
    it with the others; on SmolLM2 the bound ranks it near the bottom in some heads that hold most of
    their attention on it (and read the passkey), whose softmax then spreads over filler and digits
    are misread (1K/2K passkey at 1/8 of the pages: 2/6 -> 5/6)."""
    b, hkv, c = slot_pos.shape
    # sum_d max(q_d min_d, q_d max_d) = relu(q) . max + min(q, 0) . min: two small matmuls.
    # In the bounds' dtype (no fp32 copy of them: the bound only ranks pages); fp8 bounds need a copy anyway,
    # in fp32 as the scoring kernel's (at bf16 the coarse fp8 bounds tie pages the kernel tells apart).
    dtype = torch.float32 if page_min.dtype == torch.float8_e4m3fn else page_min.dtype
    qd, low, high = q.to(dtype), page_min.to(dtype), page_max.to(dtype)
    scores = (qd.clamp(min=0) @ high.transpose(-1, -2)).float() + (qd.clamp(max=0) @ low.transpose(-1, -2)).float()
    held = slot_pos.view(b, hkv, -1, spec.page_size).amax(-1)  # each page's newest position (-1: no tokens)
    ranked, newest = quest_page_ranking(scores.sum(2), held, spec.page_pool)
    # Ties (pooled neighbours share a score) go to the lowest page numbers, as in `_quest_select_kernel`.
    best = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :spec.pages_read(c)]
    chosen = torch.cat([best, newest], -1)
    return chosen, (held >= 0).gather(-1, chosen)


def quest_page_ranking(scores: torch.Tensor, held: torch.Tensor, page_pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The score [..., NP] each page is ranked by, from its bound `scores` and newest position `held`
    (-1: no tokens), and the newest page [..., 1] (the first of the highest position). A live page ranks
    as its best neighbour within page_pool // 2 (live pages only); pages without tokens rank below every
    live page (-3.0e38) but above the newest one (-inf), which is added last: pages_read <= NP - 1 then
    never picks it twice; the oldest live page (the first of the lowest position) ranks first (+inf) when
    it is not the newest. `_quest_select_kernel` orders pages by the same values."""
    live = held >= 0
    scores = scores.masked_fill(~live, -3.0e38)
    if page_pool > 1:
        pooled = F.max_pool1d(scores.flatten(0, -2)[:, None], page_pool, stride=1, padding=page_pool // 2)
        scores = pooled.view_as(scores).masked_fill(~live, -3.0e38)
    newest = held.argmax(-1, keepdim=True)
    oldest = held.masked_fill(~live, torch.iinfo(held.dtype).max).argmin(-1, keepdim=True)
    return scores.scatter(-1, oldest, float("inf")).scatter(-1, newest, float("-inf")), newest


def _page_slots(pages: torch.Tensor, read: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot indices [B, Hkv, n * P] of pages [B, Hkv, n], and whether each slot is read."""
    slots = (pages[..., None] * page_size + torch.arange(page_size, device=pages.device)).flatten(-2)
    return slots, read.repeat_interleave(page_size, dim=-1)


def quest_page_bias(q: torch.Tensor, store, spec: PolicySpec) -> torch.Tensor:
    """-inf on the slots [B, Hkv, C] outside each KV head's chosen pages (queries q [B, Hkv, g, D])."""
    pages, read = quest_pages(q, store.page_min, store.page_max, store.slot_pos, spec)
    slots, read = _page_slots(pages, read, spec.page_size)
    keep = torch.zeros_like(store.slot_pos, dtype=torch.bool).scatter(-1, slots, read)
    return torch.zeros(keep.shape, device=q.device).masked_fill(~keep, float("-inf"))


def _query_rows(b: int, hkv: int, g: int, n: int) -> int:
    """Queries a chunk: QUERY_CHUNK, fewer when the chunk's scores [B, Hkv, g, rows, N] would pass
    `BLOCK_ELEMENTS` (2^28, 1 GiB of fp32), so that a prompt's transient memory does not grow with the
    batch (session 18: at 8K and B32 on the H100, 512 queries' scores, 17 GiB a tensor, ran out of
    memory where the decode fits)."""
    return min(QUERY_CHUNK, max(1, BLOCK_ELEMENTS // (b * hkv * g * n)))


def attend_candidates(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias_fn, obs_window: int,
                      scale: float, want_column_sums: bool, softcap: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """softmax(softcap(q k^T scale) + bias) v over candidates, in fp32, in chunks of `_query_rows` queries
    (softcap c > 0: tanh(s / c) * c, Gemma-2's; 0: none).

    q [B, Hkv, g, T, D]; keys, values [B, Hkv, N, D] (any float dtype); bias_fn(t0, t1) gives the bias of
    queries t0..t1-1. Returns (out [B, Hkv, g, T, D] fp32, column sums of the probabilities over all
    queries and the g heads [B, Hkv, N] or None, the same over the last `obs_window` queries or None).
    """
    b, hkv, g, t, _ = q.shape
    keys, values = keys.float(), values.float()
    rows = _query_rows(b, hkv, g, keys.shape[2])
    outs, colsum, obs = [], None, None
    for t0 in range(0, t, rows):
        t1 = min(t, t0 + rows)
        scores = softcapped((q[:, :, :, t0:t1].float() @ keys.transpose(-1, -2).unsqueeze(2)) * scale, softcap)
        probs = _softmax(scores + bias_fn(t0, t1))
        outs.append(probs @ values.unsqueeze(2))
        if want_column_sums:
            part = probs.sum((2, 3))
            colsum = part if colsum is None else colsum + part
        if obs_window and t1 > t - obs_window:
            part = probs[:, :, :, max(t - obs_window - t0, 0):].sum((2, 3))
            obs = part if obs is None else obs + part
    return torch.cat(outs, dim=3), colsum, obs


def attend_prompt(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias_fn, obs_window: int, scale: float,
                  want_column_sums: bool, softcap: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`attend_candidates` for a prompt, as `kvfx::policy_attend` runs it: the output by
    `F.scaled_dot_product_attention` in the keys' dtype (no fp32 copies, no probabilities written out),
    chunked alike; SnapKV / PyramidKV's observation sums from the last `obs_window` queries alone, as the
    reference computes them. Column sums over every query (H2O) need every probability, and SDPA has no
    softcap: the reference.
    The output equals the reference's to the dtype's rounding (tested); a query that sees no candidate
    gets zeros, as there."""
    if want_column_sums or softcap:
        return attend_candidates(q, keys, values, bias_fn, obs_window, scale, want_column_sums, softcap)
    b, hkv, g, t, d = q.shape
    n = keys.shape[2]
    rows = _query_rows(b, hkv, g, n)
    outs = []
    # Each KV head's group of g query heads as the heads of one batch entry: the keys and the mask broadcast
    # over the group (stride 0), so neither is copied g times.
    group_keys, group_values = (x.reshape(b * hkv, 1, n, x.shape[-1]).expand(b * hkv, g, n, x.shape[-1])
                                for x in (keys, values))
    for t0 in range(0, t, rows):
        t1 = min(t, t0 + rows)
        bias = bias_fn(t0, t1)  # [B, Hkv, g or 1, rows, N]
        out = F.scaled_dot_product_attention(q[:, :, :, t0:t1].reshape(b * hkv, g, t1 - t0, d).to(keys.dtype),
                                             group_keys, group_values, scale=scale,
                                             attn_mask=bias.to(keys.dtype).reshape(b * hkv, -1, t1 - t0, n))
        sees = (bias > float("-inf")).any(-1, keepdim=True)  # (whatever a backend makes of a row of -inf)
        outs.append(out.view(b, hkv, g, t1 - t0, -1).float().masked_fill(~sees, 0.0))
    obs, keys32 = None, keys.float() if obs_window else None
    for t0 in range(t - obs_window, t, rows):  # the window's probabilities in fp32, as the reference's
        t1 = min(t, t0 + rows)
        scores = (q[:, :, :, t0:t1].float() @ keys32.transpose(-1, -2).unsqueeze(2)) * scale + bias_fn(t0, t1)
        part = _softmax(scores).sum((2, 3))
        obs = part if obs is None else obs + part
    return torch.cat(outs, dim=3), None, obs


# ---------------------------------------------------------------------------------------------
# Which candidates stay


def _ranks(key: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of each entry along the last dim, highest key first (ties: lower `tie`, else lower index, first)."""
    if tie is None:
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    else:
        by_tie = torch.sort(tie, dim=-1, stable=True).indices
        order = by_tie.gather(-1, torch.sort(key.gather(-1, by_tie), dim=-1, descending=True, stable=True).indices)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))


def _pool(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, pooling: str, kernel: int
          ) -> torch.Tensor:
    """SnapKV's smoothing: pool the scores of neighbouring tokens (neighbours by position, an odd
    `kernel` of them centred on each)."""
    order = torch.where(valid, positions, torch.iinfo(positions.dtype).max).argsort(dim=-1)
    ordered = scores.gather(-1, order).masked_fill(~valid.gather(-1, order), 0.0)
    flat = ordered.flatten(0, 1).unsqueeze(1)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(flat, kernel, stride=1, padding=kernel // 2).view_as(ordered)
    return torch.empty_like(pooled).scatter_(-1, order, pooled)


def eviction_key(spec: PolicySpec, positions: torch.Tensor, valid: torch.Tensor, score: torch.Tensor,
                 limit: torch.Tensor) -> torch.Tensor:
    """Per candidate [B, Hkv, N] how much it deserves to stay: +inf for the tokens the policy promises
    to keep, -inf for invalid ones, else its priority (position for StreamingLLM, score otherwise).
    `limit` [B]: the row's budget for this call (H2O's default recent window is half of it)."""
    pos = torch.where(valid, positions.float(), math.nan)  # exact below 2^24 positions
    newest = torch.where(valid, pos, -math.inf).amax(-1, keepdim=True)
    limit = limit.view(-1, 1, 1)
    if spec.policy == "streaming":
        k = min(spec.sink, pos.shape[-1])
        oldest = torch.where(valid, pos, math.inf).topk(k, dim=-1, largest=False).values[..., -1:] if k else -math.inf
        protected, priority = pos <= oldest, pos
    elif spec.policy == "h2o":
        recent = limit // 2 if spec.recent is None else torch.clamp(limit, max=spec.recent)
        # "mean": per query that has seen the token (positions pos .. newest), not the raw sum
        protected, priority = pos > newest - recent, score / (newest - pos + 1) if spec.h2o_score == "mean" else score
    elif spec.policy in ("snapkv", "pyramidkv"):
        protected, priority = pos > newest - torch.clamp(limit, max=spec.window), score
    else:  # quest / none: nothing is evicted (the capacity is the cache length)
        protected, priority = torch.zeros_like(valid), pos
    return torch.where(protected, math.inf, priority).masked_fill(~valid, -math.inf)


def choose_kept(spec: PolicySpec, positions: torch.Tensor, valid: torch.Tensor, score: torch.Tensor,
                limit: torch.Tensor, hold: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the candidates [B, Hkv, N] stay: the highest `eviction_key`, up to `limit` [B] per row
    (never an invalid one; ties: the earlier candidate stays); and which are held back provisionally, the
    next ranks up to `hold` in all (a prompt call's free slots; 0: none). A prompt call (hold > 0) breaks
    ties by position instead, the earlier one staying: its old candidates come in slot order, and SnapKV's
    max pooling makes plateaus of equal scores, so a prompt in chunks then keeps what one call keeps."""
    key = eviction_key(spec, positions, valid, score, limit)
    rank = _ranks(key, positions if hold else None)
    kept = valid & (rank < limit.view(-1, 1, 1))
    return kept, valid & ~kept & (rank < hold)


def place(kept_old: torch.Tensor, kept_new: torch.Tensor, held_new: torch.Tensor | None = None) -> torch.Tensor:
    """Source candidate of every slot after the write [B, Hkv, C] (-1: the slot is left empty).

    Kept slots keep their place; kept new tokens (in order), then the `held_new` ones (provisional,
    in order), fill the free slots (in order)."""
    c = kept_old.shape[-1]
    free_rank = torch.cumsum(~kept_old, -1) - 1
    tier = (~kept_new).to(torch.uint8) * 2  # 0 kept, 1 held back, 2 dropped
    if held_new is not None:
        tier = tier - held_new.to(torch.uint8)
    new_order = torch.sort(tier, dim=-1, stable=True).indices  # kept new ones first, then the held ones
    n_new = (tier < 2).sum(-1, keepdim=True)
    from_new = c + new_order.gather(-1, free_rank.clamp(0, new_order.shape[-1] - 1))
    slot = torch.arange(c, device=kept_old.device).expand_as(kept_old)
    return torch.where(kept_old, slot, torch.where(free_rank < n_new, from_new, -1))


# ---------------------------------------------------------------------------------------------
# One site's call


def policy_attend_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, store,
                            attn_mask: torch.Tensor | None, is_causal: bool, scale: float, spec: PolicySpec,
                            layer: int, layers: int, attend=attend_candidates, softcap: float = 0.0) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over `store` (a `TokenStore`) and the new k_new, v_new [B, Hkv, T, D]
    at positions pos [T], then the write of the new tokens under the policy (see the module docstring).
    attend: `attend_candidates` (the definition) or `attend_prompt` (the op's prompt path); softcap as there."""
    b, hq, t, d = q.shape
    hkv, c = store.slot_pos.shape[1], store.slot_pos.shape[2]
    group = hq // hkv
    new_pos = pos.view(1, 1, t).expand(b, hkv, t).to(store.slot_pos.dtype)
    # The old candidates: the slots up to the last one any row holds (a prompt's first call: none). Slots
    # fill from the front, so a prompt's chunk attends over the tokens so far, not the store's capacity.
    occupied = store.slot_pos != -1
    n_old = int(torch.where(occupied, torch.arange(1, c + 1, device=store.slot_pos.device), 0).max())
    old_k, old_v = store.dequantize(n_old)
    dtype = torch.promote_types(old_k.dtype, k_new.dtype)
    keys = torch.cat([old_k.to(dtype), k_new.to(dtype)], 2)
    values = torch.cat([old_v.to(dtype), v_new.to(dtype)], 2)
    old_pos = store.slot_pos[:, :, :n_old]
    if t > 1:  # a prompt call also sees the candidates the last one held back (module docstring, 4.)
        old_pos = torch.where(old_pos < -1, -2 - old_pos, old_pos)
    positions = torch.cat([old_pos, new_pos], 2)
    extra = None
    if spec.policy == "quest" and t == 1 and layer >= QUEST_DENSE_LAYERS and n_old:
        extra = F.pad(quest_page_bias(q.view(b, hkv, group, d), store, spec)[..., :n_old], (0, t))[:, :, None, None]

    def mask_bias(t0, t1):
        return candidate_bias(attn_mask if attn_mask is None else attn_mask[..., t0:t1, :], is_causal,
                              positions, pos[t0:t1], group)

    def bias_fn(t0, t1):
        return mask_bias(t0, t1) if extra is None else mask_bias(t0, t1) + extra

    scored = spec.policy in ("snapkv", "pyramidkv")
    obs_window = min(spec.window, t) if scored and t > 1 else 0
    # (On a prompt SnapKV / PyramidKV score by the observation window alone: no column sums.)
    out, colsum, obs = attend(q.view(b, hkv, group, t, d), keys, values, bias_fn, obs_window, scale,
                              want_column_sums=spec.policy in ("h2o", "snapkv", "pyramidkv") and not obs_window,
                              softcap=softcap)
    # Candidates the newest query can still see (not padding, not outside a sliding window).
    valid = (positions >= 0) & (mask_bias(t - 1, t)[:, :, :, 0] > float("-inf")).any(2)
    score = torch.cat([store.score[:, :, :n_old], torch.zeros_like(new_pos, dtype=store.score.dtype)], 2)
    if colsum is not None:
        score = score + colsum
    if obs is not None:  # SnapKV on a prompt: the observation window's pooled attention decides
        # Only the tokens before the window are pooled, as in SnapKV's code (the window is kept anyway):
        # pooled with them, its large attention to itself would also keep the pool_kernel // 2 tokens before it.
        before = positions <= pos[-1].to(positions.dtype) - obs_window
        score = _pool(obs, positions, valid & before, spec.pooling, spec.pool_kernel)
    limit = torch.full((b,), c, device=q.device)
    prompt = t > 1 and spec.policy in EVICTING
    if prompt:
        limit = torch.minimum(limit, spec.prompt_keep(tokens_seen(attn_mask, pos, b), layer, layers))
    kept, held = choose_kept(spec, positions, valid, score, limit, hold=c if prompt else 0)
    if obs is not None:  # the prompt tokens SnapKV chose stay for good (score +inf: never evicted)
        score = score.masked_fill(kept, math.inf)
    stay = F.pad((kept | held)[:, :, :n_old], (0, c - n_old), value=False)
    source = place(stay, kept[:, :, n_old:], held[:, :, n_old:])
    store.write(source, k_new, v_new, torch.where(held, -2 - positions, positions), score)
    return out.reshape(b, hq, t, d).to(q.dtype)


def _scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [B, H, g, D] . keys [B, H, N, D] -> fp32 [B, H, g, N], accumulated in fp32 without an fp32
    copy of the keys (bmm with out_dtype on CUDA)."""
    b, h, g, d = q.shape
    a, k = q.reshape(b * h, g, d), keys.reshape(b * h, -1, d).transpose(1, 2)
    if keys.is_cuda and keys.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.bmm(a.to(keys.dtype), k, out_dtype=torch.float32).view(b, h, g, -1)
        except (TypeError, RuntimeError):  # a torch without bmm(out_dtype=): fp32 scores of bf16 products
            return torch.bmm(a.to(keys.dtype), k).float().view(b, h, g, -1)
    return torch.bmm(a.float(), k.float()).view(b, h, g, -1)


def decode_step(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, store,
                attn_mask: torch.Tensor | None, is_causal: bool, scale: float, spec: PolicySpec,
                layer: int, softcap: float = 0.0) -> torch.Tensor:
    """`policy_attend_reference` for one new token, without its copies: the store is read once (Quest:
    only the chosen pages), the new token is attended beside it, and the write touches one slot.
    Same result as the general path (tested); no host synchronisation. Triton launches
    (`kvfx.kernels.slot_decode`) where they apply (not to a softcap), else `decode_step_reference`."""
    from kvfx.kernels.kivi import use_triton
    from kvfx.kernels.slot_attention import supported
    from kvfx.kernels.slot_decode import decode_step_triton

    if not softcap and use_triton(q) and supported(store, q, attn_mask):
        return decode_step_triton(q, k_new, v_new, pos, store, attn_mask, is_causal, scale, spec, layer)
    return decode_step_reference(q, k_new, v_new, pos, store, attn_mask, is_causal, scale, spec, layer, softcap)


def decode_step_reference(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, store,
                          attn_mask: torch.Tensor | None, is_causal: bool, scale: float, spec: PolicySpec,
                          layer: int, softcap: float = 0.0) -> torch.Tensor:
    """`decode_step` in torch ops (the spec of the fused Triton step; any mask, any head dim, a softcap)."""
    b, hq, _, d = q.shape
    hkv, c = store.slot_pos.shape[1], store.slot_pos.shape[2]
    group = hq // hkv
    qg = q.view(b, hkv, group, d)
    new_pos = pos.view(1, 1, 1).expand(b, hkv, 1).to(store.slot_pos.dtype)
    positions = torch.cat([store.slot_pos, new_pos], -1)
    bias = candidate_bias(attn_mask, is_causal, positions, pos, group)[:, :, :, 0].expand(b, hkv, group, -1)  # [B, Hkv, g, C + 1]
    valid = (bias > float("-inf")).any(2)
    scored = spec.policy in ("h2o", "snapkv", "pyramidkv")  # (Quest's reads are not scored)
    pages = quest_pages(qg, store.page_min, store.page_max, store.slot_pos, spec) \
        if spec.policy == "quest" and layer >= QUEST_DENSE_LAYERS else None
    out, slot_probs, new_probs = _decode_attention_torch(qg, k_new, v_new, store, bias, pages, scale, spec, softcap)
    score = store.score + slot_probs if scored else store.score
    new_score = new_probs if scored else torch.zeros_like(score[..., :1])
    key = eviction_key(spec, positions, valid, torch.cat([score, new_score], -1), torch.full((b,), c, device=q.device))
    # At most one valid candidate leaves: the last of the lowest keys, when all C + 1 are valid.
    victim = c - key.flip(-1).argmin(-1, keepdim=True)
    full = valid.sum(-1, keepdim=True) > c
    kept = valid & ~(full & (torch.arange(c + 1, device=q.device) == victim))
    kept_old, keep_new = kept[..., :c], kept[..., c:]
    store.slot_pos.copy_(store.slot_pos.masked_fill(~kept_old, -1))
    store.score.copy_(score.masked_fill(~kept_old, 0.0))
    store.put(torch.argmax((~kept_old).to(torch.uint8), -1, keepdim=True), keep_new, k_new, v_new, new_pos, new_score)
    return out.reshape(b, hq, 1, d).to(q.dtype)


def _decode_attention_torch(qg: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, store, bias: torch.Tensor,
                            pages, scale: float, spec: PolicySpec, softcap: float = 0.0):
    """The attention of `decode_step` in torch ops: (out, slot probabilities and new-token probability
    summed over each KV head's query heads)."""
    b, hkv, group, d = qg.shape
    c = store.slot_pos.shape[-1]
    keys, values = store.dequantize()
    read_bias, read_keys, read_values = bias[..., :c], keys, values
    if pages is not None:
        slots, read = _page_slots(*pages, spec.page_size)
        index = slots[..., None].expand(*slots.shape, d)
        read_keys, read_values = keys.gather(2, index), values.gather(2, index)
        read_bias = bias.gather(-1, slots[:, :, None].expand(b, hkv, group, -1)).masked_fill(~read[:, :, None], float("-inf"))
    logits = torch.cat([_scores(qg, read_keys), (qg.float() * k_new.view(b, hkv, 1, d).float()).sum(-1, keepdim=True)], -1)
    probs = _softmax(softcapped(logits * scale, softcap) + torch.cat([read_bias, bias[..., c:]], -1))
    # P V in the cache dtype (as flash attention does): no fp32 copy of the values.
    out = (probs[..., :-1].to(read_values.dtype) @ read_values).float() + probs[..., -1:] * v_new.view(b, hkv, 1, d).float()
    return out, (probs[..., :-1].sum(2) if pages is None else None), probs[..., -1:].sum(2)
