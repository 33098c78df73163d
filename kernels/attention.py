"""Attention over a KV cache with grouped-query heads, without materializing repeat_kv copies.

The `g = Hq / Hkv` query heads that share a KV head are folded into the query-length dimension:
q [B, Hq, T, D] -> [B, Hkv, g*T, D], so one SDPA call reads each KV head once. Head h uses KV head
h // g, which is exactly HF's repeat_kv (expand + reshape) order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Query rows per attention call are bounded so that B * Hq * rows * S (the folded mask, and the scores
# where they are written out) stays under this many elements: a long prompt on a large batch (32K
# tokens at batch 32 in chunks of 2048) otherwise materializes a mask of tens of GB.
BLOCK_ELEMENTS = 1 << 28


def mask_4d(attn_mask: torch.Tensor) -> torch.Tensor:
    """An SDPA mask as [B|1, H|1, T|1, S] (a view): SDPA broadcasts a mask of fewer dims from the left."""
    return attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def mask_on_store(attn_mask: torch.Tensor | None, offset: torch.Tensor, length: int, width: int) -> torch.Tensor:
    """A mask over `width` store positions where a cache of `length` tokens, the columns of `attn_mask` (a
    mask of one column broadcasts), sits from position `offset` (int64 [1]) on: column p - offset at position
    p, hidden outside [offset, offset + length) (a sliding window's KIVI store keeps older tokens there, in
    whole groups). No mask: that range alone, one row [1, 1, 1, width] (the decode kernels take it as a bias)."""
    column = torch.arange(width, device=offset.device) - offset
    inside = ((column >= 0) & (column < length)).view(1, 1, 1, width)
    if attn_mask is None:
        return inside
    attn_mask = attn_mask.expand(*attn_mask.shape[:-1], length)
    picked = attn_mask.index_select(-1, column.clamp(0, length - 1))
    return picked & inside if picked.dtype == torch.bool else torch.where(inside, picked, float("-inf"))


def fold_mask(attn_mask: torch.Tensor | None, is_causal: bool, q_len: int, kv_len: int,
              kv_heads: int, group: int, device: torch.device) -> torch.Tensor | None:
    """The mask of an SDPA call over [B, Hq, T, S] rewritten for folded queries [B, Hkv, g*T, S]."""
    if is_causal:
        # SDPA's is_causal is top-left aligned: query i sees keys 0..i.
        attn_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return None
    attn_mask = mask_4d(attn_mask)
    attn_mask = attn_mask.expand(*attn_mask.shape[:2], q_len, kv_len)  # a row shared by the queries, too
    b, h = attn_mask.shape[:2]
    if h == 1:
        attn_mask = attn_mask.unsqueeze(2).expand(b, 1, group, *attn_mask.shape[2:])
        return attn_mask.reshape(b, 1, group * attn_mask.shape[-2], attn_mask.shape[-1])
    # One mask (or bias) per query head: heads h*g .. h*g+g-1 belong to KV head h.
    attn_mask = attn_mask.expand(b, kv_heads * group, *attn_mask.shape[2:])
    return attn_mask.reshape(b, kv_heads, group * attn_mask.shape[-2], attn_mask.shape[-1])


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                     kv_len: int, is_causal: bool, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """softmax(softcap(q k^T * scale) + mask) v for GQA.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; only the first `kv_len` positions are attended (-1: all S);
    attn_mask broadcasts to [B, Hq or 1, T, kv_len] (bool: True = attend, or additive); softcap c > 0
    caps the scaled scores as tanh(s / c) * c before the mask (Gemma-2), 0 leaves them. Returns
    [B, Hq, T, Dv].
    """
    if kv_len >= 0:
        k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    b, hq, t, d = q.shape
    rows = max(1, BLOCK_ELEMENTS // max(1, b * hq * k.shape[2]))
    if t > rows:  # blocks of query rows (each row's attention is independent of the others')
        return torch.cat([attend_reference(q[:, :, i:i + rows], k, v, mask_rows(attn_mask, is_causal, i, rows, t, k),
                                           -1, False, scale, softcap) for i in range(0, t, rows)], dim=2)
    hkv = k.shape[1]
    group = hq // hkv
    mask = fold_mask(attn_mask, is_causal, t, k.shape[2], hkv, group, q.device)
    q = q.reshape(b, hkv, group * t, d)
    if softcap > 0:  # SDPA has no softcap: the scores written out
        scores = softcapped(q @ k.transpose(-1, -2) * scale, softcap)
        out = (masked_softmax(scores, mask) @ v.to(scores.dtype)).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, t, v.shape[-1])


def visible_prompt_keys(attn_mask: torch.Tensor | None, kv_len: int, queries: int, is_causal: bool,
                        slots: int) -> tuple[torch.Tensor | None, int]:
    """(mask, kv_len) of a prompt's attention over `slots` keys trimmed to the keys its mask lets some
    query see: a chunk written into a static cache sees nothing past its own end, and the scores of the
    cache's unwritten tail are never computed. Exact (the keys dropped get zero weight); one host
    sync, so prompts only (a decode step, or a call with kv_len given, is returned as it is)."""
    if kv_len >= 0 or queries == 1 or is_causal or attn_mask is None:
        return attn_mask, kv_len
    kv_len = visible_prefix(attn_mask, slots)
    return (attn_mask[..., :kv_len] if kv_len >= 0 else attn_mask), kv_len


def visible_prefix(attn_mask: torch.Tensor, slots: int) -> int:
    """1 + the last of `slots` key positions the mask lets any query see (-1: every key, or none)."""
    cols = attn_mask.shape[-1]
    if cols == 1:
        return -1  # one column broadcast over every key
    seen = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
    last = int((seen.reshape(-1, cols).any(0) * torch.arange(1, cols + 1, device=seen.device)).max())
    return min(slots, last) if last else -1  # (no key seen at all: left as it is)


def mask_rows(attn_mask: torch.Tensor | None, is_causal: bool, start: int, rows: int, t: int,
              k: torch.Tensor) -> torch.Tensor | None:
    """The mask of query rows start .. start + rows - 1 of an attention over t queries and keys k."""
    if is_causal:  # top-left aligned: query i sees keys 0..i
        n = min(rows, t - start)
        return torch.ones(n, k.shape[2], dtype=torch.bool, device=k.device).tril(start)
    if attn_mask is None or attn_mask.dim() < 2 or attn_mask.shape[-2] != t:
        return attn_mask  # None, or the same for every query row
    return attn_mask[..., start:start + rows, :]


def softcapped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """tanh(s / c) * c (c > 0; c = 0: the scores as they are)."""
    return torch.tanh(scores / softcap) * softcap if softcap > 0 else scores


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim after the (folded) mask; a row that sees no key gets zeros, as SDPA
    gives (HF's left-padding rows), not NaN."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)
    return torch.softmax(scores, dim=-1).masked_fill(scores.amax(-1, keepdim=True) == float("-inf"), 0.0)


def attend_int8_cpu(q: torch.Tensor, k_codes: torch.Tensor, k_qparams: torch.Tensor, v_codes: torch.Tensor,
                    v_qparams: torch.Tensor, attn_mask: torch.Tensor | None, kv_len: int, is_causal: bool,
                    scale: float, softcap: float = 0.0) -> torch.Tensor:
    """`attend_reference` over dequantized int8 K/V, without materializing the dequantized cache.

    With k = c * s + z per token (codes c, scale s, zero z): q.k = s * (q.c) + z * sum(q), and
    sum_t p_t v_t = (p * s_v) @ c_v + sum_t p_t z_v,t. The codes are read once (converted in the
    matmul's operand) instead of being dequantized into a second fp copy of the cache.
    """
    if kv_len >= 0:
        k_codes, k_qparams, v_codes, v_qparams = (t[:, :, :kv_len] for t in (k_codes, k_qparams, v_codes, v_qparams))
    b, hq, t, d = q.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    group = hq // hkv
    qf = q.reshape(b, hkv, group * t, d).float()
    k_scale, k_zero = k_qparams[..., 0].float().unsqueeze(2), k_qparams[..., 1].float().unsqueeze(2)
    scores = (qf @ k_codes.float().transpose(-1, -2)) * k_scale + qf.sum(-1, keepdim=True) * k_zero
    scores = softcapped(scores * scale, softcap)
    probs = masked_softmax(scores, fold_mask(attn_mask, is_causal, t, s, hkv, group, q.device))
    v_scale, v_zero = v_qparams[..., 0].float().unsqueeze(2), v_qparams[..., 1].float().unsqueeze(-1)
    out = (probs * v_scale) @ v_codes.float() + probs @ v_zero
    return out.to(q.dtype).reshape(b, hq, t, v_codes.shape[-1])
