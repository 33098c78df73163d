"""Find attention sites and the cache each one reads.

A site is an attention (an SDPA call, or matmul -> [scale] -> [mask terms] -> softmax -> matmul
written by hand) whose key and value are read out of a KV cache [B, Hkv, S, D]:

    buffer.index_copy_(2, pos, new)                       # a cache buffer written in place (HF StaticCache),
    buffer[:, :, pos] = new                               # gpt-fast's index_put_,
    buffer[:, :, start:stop] = new                        # or a slice write; or a cache that grows:
    kv = torch.cat((past, new), dim=-2)                   # HF DynamicCache, nanoGPT's `present`
    kv = buffer[:, :, :L]                                 # optional: prefill reads the first L slots
    kv = kv[:, :, None].expand(B, Hkv, g, S, D).reshape(B, Hkv * g, S, D)   # GQA: HF repeat_kv,
    kv = kv.repeat_interleave(g, dim=1)                   # or repeat_interleave, or an MQA expand,
    out = scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=..., scale=..., enable_gqa=...)

Matching is structural (targets, argument positions, recorded shapes), never by names, and never
changes the graph: `prepare_site` materializes what a rewrite needs (write positions, one combined
mask) once the site will be rewritten. Each function returns what it matched or a reason string a
user can act on.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from kvfx.passes.cat_cache import CatCache, match_cat
from kvfx.passes.heads import baddbmm_arguments, is_baddbmm, is_bmm, merged_heads, split_heads
from kvfx.passes.fx_utils import (call_arguments, describe, example_tensor, full_slices, graph_position, is_add,
                                  is_function, is_getitem, is_matmul, is_method, is_passthrough, is_sdpa, is_softmax,
                                  output_values, same_shape, sdpa_arguments, shape_of, softmax_dim,
                                  transposed_last_two)

_SCALE_OPS = (operator.mul, operator.truediv, torch.mul, torch.div)
_CASTS = ("float", "to", "type_as")

# In-graph allocations that a cache buffer may come from (HF lazily allocates inside the prefill trace).
_ALLOCATIONS = (torch.zeros, torch.empty)

# A masked_fill / where fill at or below this is a mask (HF fills with finfo(dtype).min; fp16's is -65504).
_MASK_FILL = -65504.0


@dataclass
class KVRead:
    """How one attention operand (key or value) is read out of a cache."""

    buffer: fx.Node         # the cache: a graph input, an in-graph allocation, or (origin "cat") the
                            # concatenation (or fresh tensor) that the graph returns as the grown cache
    group: int              # query heads per KV head (1: MHA or SDPA's enable_gqa)
    kv_len: int | fx.Node   # leading slots attended (-1: the whole buffer; a node when symbolic)
    gqa: str                # "repeat_kv", "repeat_interleave", "expand", "enable_gqa", "broadcast" or "none"
    chain: list[fx.Node] = field(default_factory=list)  # nodes between buffer and attention
    origin: str = "input"   # "input", "allocated" or "cat"
    cat: CatCache | None = None


@dataclass
class CacheWrite:
    """An in-place write of `source` [B, Hkv, T, D] into a cache buffer along dim 2."""

    node: fx.Node           # index_copy_ or setitem (index_put_ / slice write); a roll's copy_
    source: fx.Node
    kind: str               # "index_copy_", "index_put_", "slice write" or "roll"
    pos: fx.Node | None     # positions [T]; None for a slice write until `prepare_site` makes them
    bounds: tuple | None = None  # (start, stop) of a slice write (a roll: the last slot): ints or nodes
    also: tuple = ()        # a roll's other nodes (its setitem, then the roll), erased with `node`


@dataclass
class MaskTerm:
    """One way a hand-written attention masks its scores."""

    node: fx.Node
    kind: str               # "add" (additive bias/mask), "keep" (bool, True = attend), "drop" (True = masked)
    heads: int | None = None  # a term of 3-D scores [B * H, T, S]: its leading dim unflattens to [B, H]
    factor: float = 1.0     # an additive term is scaled by this (baddbmm's beta)

    @property
    def plain(self) -> bool:
        """Usable as SDPA's additive mask as it is, with no new node."""
        return self.kind == "add" and self.heads is None and self.factor == 1.0


@dataclass
class Site:
    """One attention site, matched: everything a rewrite needs."""

    layer: int
    node: fx.Node           # the attention output, which kvfx::attend replaces
    kind: str               # "sdpa" or "manual" (matmul -> [scale] -> [mask] -> softmax -> matmul)
    interior: list[fx.Node]  # nodes between the operands and `node`, erased once dead
    query: fx.Node
    key: KVRead
    value: KVRead
    attn_mask: fx.Node | None
    is_causal: bool
    scale: float
    key_write: CacheWrite | None
    value_write: CacheWrite | None
    mask_terms: list[MaskTerm] = field(default_factory=list)  # manual: combined into attn_mask by prepare_site
    softcap: float = 0.0
    merged_output: bool = False

    @property
    def pattern(self) -> str:
        masked = self.attn_mask is not None or self.mask_terms
        mask = "causal" if self.is_causal else ("mask" if masked else "no mask")
        mask = f"softcap, {mask}" if self.softcap else mask
        if self.key.origin == "cat":
            cache = "cat cache" if self.key.cat.past is not None else "cache returned"
            return f"{self.kind}+{self.key.gqa}, {mask}, {cache}"
        origin = "input" if self.key.origin == "input" else "allocated in graph"
        write = self.key_write.kind if self.key_write else "no write"
        return f"{self.kind}+{self.key.gqa}, {mask}, cache {origin}, {write}"


def find_attention(graph: fx.Graph) -> list[fx.Node]:
    """SDPA calls and softmaxes (each softmax a candidate hand-written attention), in graph order."""
    return [n for n in graph.nodes if is_sdpa(n) or (is_softmax(n) and _scores_upstream(n.args[0])
                                                      and _values_downstream(n))]


def _is_product(node) -> bool:
    """A (batched) matmul: what scores and outputs of attention are made by (3-D bmm/baddbmm
    attention, as BLOOM writes it, is found here and then reported as not modelled)."""
    return is_matmul(node) or is_function(node, torch.bmm, torch.baddbmm) or is_method(node, "bmm", "baddbmm")


def _values_downstream(softmax: fx.Node) -> bool:
    node = softmax
    while len(node.users) == 1 and (is_passthrough(next(iter(node.users)))
                                    or is_method(next(iter(node.users)), "view", "reshape")):
        node = next(iter(node.users))
    return any(_is_product(u) and node in u.args[:2] for u in node.users)


def _scores_upstream(node, depth: int = 6) -> bool:
    """A softmax is a candidate attention if a matmul produces its input within a few ops and its
    output feeds a matmul (a router or classifier softmax over a linear layer is not)."""
    if _is_product(node):
        return True
    inputs = [a for a in getattr(node, "args", ()) if isinstance(a, fx.Node)]
    return depth > 0 and any(_scores_upstream(a, depth - 1) for a in inputs)


def _head_expansion(node: fx.Node, query_heads: int) -> tuple[fx.Node, int, str, list[fx.Node]] | str | None:
    """(KV tensor, group, name, chain) when `node` repeats KV heads up to the query heads; None if it does not."""
    if is_method(node, "reshape") and is_method(node.args[0], "expand"):  # HF repeat_kv
        expand = node.args[0]
        unsqueeze = expand.args[0]
        index = unsqueeze.args[1] if is_getitem(unsqueeze) else None  # x[:, :, None] (HF: x[:, :, None, :, :])
        ok = (isinstance(index, tuple) and 3 <= len(index) <= 5 and index[2] is None and full_slices(index, 2)
              and all(i == slice(None) or i is Ellipsis for i in index[3:]))
        expanded, reshaped = shape_of(expand), shape_of(node)
        if not ok or expanded is None or reshaped is None or len(expanded) != 5:
            return "key/value goes through an expand+reshape that is not HF repeat_kv"
        b, hkv, group, s, d = expanded
        if not isinstance(group, int) or not same_shape(reshaped, (b, hkv * group, s, d)):
            return f"repeat_kv reshape to {reshaped} does not merge the KV-head groups"
        return unsqueeze.args[0], group, "repeat_kv", [node, expand, unsqueeze]
    if is_method(node, "repeat_interleave") or is_function(node, torch.repeat_interleave):
        args = call_arguments(node, ("self", "repeats", "dim"))
        if not isinstance(args.get("repeats"), int) or args.get("dim") not in (1, -3):
            return "key/value goes through a repeat_interleave that does not repeat whole heads (dim 1, int repeats)"
        return args["self"], args["repeats"], "repeat_interleave", [node]
    if is_method(node, "expand"):  # multi-query attention: one KV head broadcast to every query head
        before, after = shape_of(node.args[0]), shape_of(node)
        if before is None or after is None or len(before) != 4 or before[1] != 1 or after[1] != query_heads \
                or not same_shape((before[0], before[2], before[3]), (after[0], after[2], after[3])):
            return "key/value goes through an expand that is not one KV head broadcast over the query heads"
        return node.args[0], query_heads, "expand", [node]
    return None


def match_kv_read(node: fx.Node, query_heads: int, enable_gqa: bool, outputs: list[Any] = ()) -> KVRead | str:
    """Walk from an attention key/value operand back to its cache."""
    chain: list[fx.Node] = []
    group, gqa = 1, "enable_gqa" if enable_gqa else "none"
    expansion = _head_expansion(node, query_heads)
    if isinstance(expansion, str):
        return expansion
    if expansion is not None:
        node, group, gqa, chain = expansion
    kv_len = -1
    if is_getitem(node) and isinstance(node.args[1], tuple):
        index = node.args[1]
        if len(index) != 4 or not full_slices(index, 2) or index[3] != slice(None):
            return f"key/value is indexed as {index}, kvfx models only a leading slice of the sequence"
        seq = index[2]
        # The stop may be symbolic (a prefill traced with a dynamic prompt length).
        if not (isinstance(seq, slice) and seq.start in (None, 0) and seq.step is None
                and (isinstance(seq.stop, fx.Node) or (isinstance(seq.stop, int) and seq.stop >= 0))):
            return f"key/value sequence slice {seq} is not a leading slice"
        chain.append(node)
        node, kv_len = node.args[0], seq.stop
    shape = shape_of(node)
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        return f"key/value does not come from a 4-D cache with a fixed head count (found {describe(node)})"
    cat = None
    if node.op == "placeholder":
        origin = "input"
    elif node.op == "call_function" and node.target in _ALLOCATIONS:
        origin = "allocated"
    else:
        cat = match_cat(node, outputs)
        if isinstance(cat, str):
            return cat
        if cat is None:
            return (f"key/value comes from {describe(node)}, not a cache buffer (a graph input or allocation "
                    f"written in place) nor a concatenation or tensor the graph returns")
        origin = "cat"
    hkv = shape[1]
    if gqa == "enable_gqa":
        group = query_heads // hkv
    elif gqa == "none" and hkv == 1 < query_heads:  # one KV head broadcast by SDPA / matmul (Falcon's MQA)
        group, gqa = query_heads, "broadcast"
    if hkv * group != query_heads:
        return f"{query_heads} query heads do not map onto {hkv} KV heads"
    if isinstance(kv_len, int) and isinstance(shape[2], int) and kv_len > shape[2]:
        return f"slice of {kv_len} slots exceeds the cache length {shape[2]}"
    return KVRead(node, group, kv_len, gqa, chain, origin, cat)


def match_cache_write(buffer: fx.Node, before: fx.Node, order: dict[fx.Node, int]) -> CacheWrite | str:
    """The single in-place write into `buffer` that precedes the attention read."""
    writes = [u for u in buffer.users if order[u] < order[before]
              and (is_method(u, "index_copy_") or (is_function(u, operator.setitem) and u.args[0] is buffer))]
    if not writes:
        rolled = _roll_write(buffer, before, order)
        if rolled is not None:
            return rolled
    if len(writes) != 1:
        return f"expected one cache write (index_copy_, index_put_ or slice write) before attention, found {len(writes)}"
    node = writes[0]
    if node.users:
        return "the result of the cache write is used; kvfx models a write for its side effect only"
    if is_method(node, "index_copy_"):
        args = call_arguments(node, ("self", "dim", "index", "source"))
        if args.get("dim") not in (2, -2):
            return f"cache write index_copy_ along dim {args.get('dim')}, kvfx models dim 2 (sequence)"
        return CacheWrite(node, args["source"], "index_copy_", args["index"])
    return _setitem_write(node)


def _setitem_write(node: fx.Node) -> CacheWrite | str:
    """`buffer[:, :, pos] = source` (pos a 1-D integer tensor) or `buffer[:, :, start:stop] = source`."""
    _, index, source = node.args
    index = index if isinstance(index, tuple) else (index,)
    if index[3:] not in ((), (slice(None),), (Ellipsis,)) or len(index) < 3 or not full_slices(index, 2):
        return f"cache write indexes the buffer as {index}; kvfx models writes along dim 2 only"
    source_shape, seq = shape_of(source), index[2]
    if source_shape is None or len(source_shape) != 4:
        return "the value written into the cache is not a 4-D tensor [B, Hkv, T, D]"
    if isinstance(seq, fx.Node):
        pos = example_tensor(seq)
        if pos is None or pos.dim() != 1 or pos.dtype not in (torch.int64, torch.int32):
            return "cache write index is not a 1-D integer position tensor"
        return CacheWrite(node, source, "index_put_", seq)
    if isinstance(seq, slice) and seq.step in (None, 1) and seq.stop is not None:
        start = 0 if seq.start is None else seq.start
        if all(isinstance(b, fx.Node) or (isinstance(b, int) and b >= 0) for b in (start, seq.stop)):
            return CacheWrite(node, source, "slice write", None, (start, seq.stop))
    return f"cache write slice {seq} is not start:stop with non-negative bounds"


def _roll_write(buffer: fx.Node, before: fx.Node, order: dict[fx.Node, int]) -> CacheWrite | None:
    """HF's full static sliding-window layer taking one token:

        rolled = buffer.roll(-1, dims=-2); rolled[:, :, torch.tensor([-1])] = source; buffer.copy_(rolled)

    every token moves one slot towards the front (the oldest leaves) and `source` takes the last slot."""
    copies = [u for u in buffer.users if order[u] < order[before] and is_method(u, "copy_") and u.args[0] is buffer]
    if len(copies) != 1 or copies[0].users or len(copies[0].args) != 2:
        return None
    copy, rolled = copies[0], copies[0].args[1]
    if not is_method(rolled, "roll") or rolled.args[0] is not buffer:
        return None
    args = call_arguments(rolled, ("self", "shifts", "dims"))
    if args.get("shifts") not in (-1, (-1,), [-1]) or args.get("dims") not in (2, -2, (2,), (-2,), [2], [-2]):
        return None
    sets = [u for u in rolled.users if u is not copy]
    if len(sets) != 1 or not is_function(sets[0], operator.setitem) or sets[0].args[0] is not rolled or sets[0].users:
        return None
    _, index, source = sets[0].args
    index = index if isinstance(index, tuple) else (index,)
    length, shape = shape_of(buffer), shape_of(source)
    if (len(index) != 3 or not full_slices(index, 2) or not _is_last_slot(index[2]) or shape is None
            or len(shape) != 4 or shape[2] != 1 or length is None or not isinstance(length[2], int)):
        return None
    return CacheWrite(copy, source, "roll", None, (length[2] - 1, length[2]), (sets[0], rolled))


def _is_last_slot(index: Any) -> bool:
    """`torch.tensor([-1])` (how HF indexes it) or `-1:`."""
    if isinstance(index, slice):
        return index.start == -1 and index.stop is None and index.step in (None, 1)
    return (isinstance(index, fx.Node) and is_function(index, torch.tensor) and len(index.args) == 1
            and list(index.args[0]) == [-1])


def same_positions(a: CacheWrite, b: CacheWrite) -> bool:
    """Both writes address the same positions (one position tensor, or equal slice bounds)."""
    return a.pos is b.pos if a.bounds is None else a.bounds == b.bounds


@dataclass
class AttentionForm:
    """What an attention computes, whichever way it was written."""

    kind: str
    node: fx.Node
    interior: list[fx.Node]
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: fx.Node | None
    is_causal: bool
    scale: float | None     # None: SDPA's default 1/sqrt(D)
    enable_gqa: bool
    mask_terms: list[MaskTerm] = field(default_factory=list)
    softcap: float = 0.0    # tanh(s / c) * c of the scaled scores, before the mask (0: none)
    merged_output: bool = False  # the output is [B * H, T, D] (bmm attention): flatten kvfx's [B, H, T, D]


def sdpa_form(sdpa: fx.Node) -> AttentionForm | str:
    args = sdpa_arguments(sdpa)
    if args["dropout_p"] not in (0, 0.0):
        return "attention has dropout; kvfx rewrites inference attention only"
    if args["attn_mask"] is not None and args["is_causal"]:
        return "attention has both attn_mask and is_causal"
    if not isinstance(args["is_causal"], bool) or not isinstance(args["scale"], (float, int, type(None))):
        return "is_causal or scale is not a constant"
    return AttentionForm("sdpa", sdpa, [], args["query"], args["key"], args["value"], args["attn_mask"],
                         args["is_causal"], args["scale"], bool(args["enable_gqa"]))


def manual_form(softmax: fx.Node) -> AttentionForm | str:
    """matmul(q, k^T) -> [* or / constant] -> [softcap] -> [mask terms] -> [casts] -> softmax(-1) -> [casts /
    dropout(p=0)] -> matmul(., v). Mask terms: `+ mask_or_bias`, `.masked_fill(cond, -inf)`,
    `torch.where(keep, s, -inf)`. Softcap: `tanh(s / c) * c`. Or the same over 3-D tensors, heads merged
    into the batch (passes/heads.py): bmm / baddbmm products, head views anywhere between them."""
    rank = len(shape_of(softmax) or ())
    if softmax_dim(softmax) not in (-1, rank - 1):
        return "softmax is not over the last dimension"
    node, after = softmax, []
    while len(node.users) == 1 and _keeps_probabilities(next(iter(node.users))):
        node = next(iter(node.users))
        after.append(node)
    interior = [*reversed(after), softmax]  # from the output back towards the scores
    users = list(node.users)
    if len(users) != 1 or not (is_matmul(users[0]) or is_bmm(users[0])) or users[0].args[0] is not node:
        return "softmax output does not feed one matmul with the values"
    out, value = users[0], users[0].args[1]
    merged = is_bmm(out)
    if merged:
        value_3d, value = value, merged_heads(value)
        if value is None:
            return "the values of a bmm attention are not a 4-D tensor [B, H, S, D] viewed as [B * H, S, D]"
        interior.append(value_3d)
    scores, terms, heads, terms_3d = softmax.args[0], [], [], []
    while True:
        shift = _row_max_shift(scores)
        if shift is not None:  # softmax(s - max(s)) = softmax(s): it subtracts the row max itself
            interior += [scores, *shift[1]]
            scores = shift[0]
            continue
        view = _head_view(scores)
        step = view if view is not None else _mask_step(scores)
        if isinstance(step, str):
            return step
        if step is None:
            break
        interior.append(scores)
        below, found = step
        if isinstance(found, MaskTerm):
            terms.append(found)
            if len(shape_of(scores) or ()) == 3:
                if len(shape_of(found.node) or ()) > 3:
                    return "a mask term of the 3-D attention scores has more than 3 dims"
                terms_3d.append(found)
        elif found is not None:
            heads.append(found)
        scores = below
    softcap = _softcap(scores)
    if softcap is not None:
        interior += softcap[2]
        scores, softcap = softcap[0], softcap[1]
    scale = 1.0
    if _is_scaling(scores):
        left, right = scores.args
        constant, scores_in = (right, left) if isinstance(right, (int, float)) else (left, right)
        if not isinstance(constant, (int, float)) or not isinstance(scores_in, fx.Node):
            return "attention scores are scaled by a non-constant"
        scale = 1.0 / constant if scores.target in (operator.truediv, torch.div) else float(constant)
        interior.append(scores)
        scores = scores_in
    product = _scores_product(scores)
    if isinstance(product, str):
        return product
    query, key, factor, bias, nodes = product
    interior += nodes
    if bias is not None:
        terms.append(bias)
        terms_3d.append(bias)
    q_heads = (shape_of(query) or (None, None))[1]
    # Ranks change along the chain only through head views, each checked against the query's [B, H]
    # below, so 3-D scores may feed a 4-D output (GPT-NeoX-Japanese) and 4-D scores a bmm.
    if (merged or is_baddbmm(scores) or is_bmm(scores)) and \
            not all(same_shape(shape_of(x)[:2], shape_of(query)[:2]) for x in (key, value)):
        return "the 3-D attention's q, k and v are not all [B, H, N, D] with the same B and H before the merge"
    if any(not same_shape((h,), (q_heads,)) for h in heads):
        return "a view of the 3-D attention scores splits B * H into other factors than the query's [B, H]"
    for term in terms_3d:
        term.heads = _term_heads(term, q_heads)
    return AttentionForm("bmm" if merged else "manual", out, interior, query, key, value, None, False,
                         scale * factor, False, terms, softcap or 0.0, merged)


def _keeps_probabilities(node: fx.Node) -> bool:
    """A cast, inference dropout, or a view between [B, H, T, S] and [B * H, T, S]."""
    return is_passthrough(node) or _head_view(node) is not None


def _head_view(node: fx.Node) -> tuple[fx.Node, Any] | None:
    """(x, H) for x [B * H, T, S] viewed as [B, H, T, S]; (x, None) for the reverse view; else None."""
    split = split_heads(node)
    if split is not None:
        return split
    merged = merged_heads(node)
    return None if merged is None else (merged, None)


def _row_max_shift(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(s, nodes) for `s - s.max(dim=-1, keepdim=True)[0]` (or .values, or amax), else None."""
    if not (is_function(node, operator.sub, torch.sub) and not node.kwargs and isinstance(node.args[0], fx.Node)):
        return None
    scores, row_max = node.args
    nodes = [row_max]
    if (is_getitem(row_max) and row_max.args[1] == 0) or (
            is_function(row_max, getattr) and row_max.args[1] == "values"):
        row_max = row_max.args[0]
        nodes.append(row_max)
    elif not is_method(row_max, "amax"):
        return None
    if not (is_method(row_max, "max", "amax") or is_function(row_max, torch.max, torch.amax)):
        return None
    args = call_arguments(row_max, ("self", "dim", "keepdim"))
    rank = len(shape_of(scores) or ())
    if args.get("self") is not scores or args.get("dim") not in (-1, rank - 1, [-1], (-1,)) or args.get("keepdim") is not True:
        return None
    if any(len(n.users) != 1 for n in nodes):
        return None
    return scores, nodes


def _term_heads(term: MaskTerm, heads) -> int | None:
    """A term added to 3-D scores [B * H, T, S] with a leading dim > 1 is per (batch row, head): it
    is unflattened to [B, H, ...]; a leading dim 1 (or fewer dims) broadcasts as it is."""
    shape = shape_of(term.node)
    return None if shape is None or len(shape) < 3 or shape[0] == 1 else heads


def _softcap(node: fx.Node) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """(s, c, nodes) for `tanh(s / c) * c` (Gemma-2's attention logit softcapping), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in (operator.mul, torch.mul)):
        return None
    tanh, cap = node.args if isinstance(node.args[1], (int, float)) else node.args[::-1]
    if not isinstance(cap, (int, float)) or cap <= 0 or not (is_function(tanh, torch.tanh) or is_method(tanh, "tanh")):
        return None
    divided = tanh.args[0]
    if not (is_function(divided, operator.truediv, torch.div) and divided.args[1] == cap
            and isinstance(divided.args[0], fx.Node) and not divided.kwargs):
        return None
    return divided.args[0], float(cap), [node, tanh, divided]


def _scores_product(node: fx.Node) -> tuple[fx.Node, fx.Node, float, MaskTerm | None, list[fx.Node]] | str:
    """(q, k, scale factor, bias term, nodes) of the product that makes the scores: matmul(q, k^T) over
    [B, H, T, D], or bmm / baddbmm over the same viewed as [B * H, T, D]."""
    if is_matmul(node):
        query, key_t = node.args
        key = transposed_last_two(key_t)
        if key is None:
            return "the scores matmul does not take k transposed over its last two dims"
        return query, key, 1.0, None, [node, key_t]
    if not (is_bmm(node) or is_baddbmm(node)):
        return f"softmax input has an op kvfx does not model: {describe(node)}"
    args = baddbmm_arguments(node) if is_baddbmm(node) else dict(batch1=node.args[0], batch2=node.args[1])
    query_3d, key_t = args["batch1"], args["batch2"]
    key_3d = transposed_last_two(key_t)
    query, key = merged_heads(query_3d), merged_heads(key_3d)
    if key_3d is None or query is None or key is None:
        return "the 3-D scores are not bmm(q, k^T) of 4-D q, k [B, H, N, D] viewed as [B * H, N, D]"
    nodes = [node, key_t, key_3d, query_3d]
    if not is_baddbmm(node):
        return query, key, 1.0, None, nodes
    beta, alpha = args["beta"], args["alpha"]
    if not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)) or not isinstance(args["input"], fx.Node):
        return "baddbmm of the attention scores has a non-constant beta or alpha, or no bias tensor"
    bias = MaskTerm(args["input"], "add", factor=float(beta)) if beta != 0 else None
    return query, key, float(alpha), bias, nodes


def _mask_step(node: fx.Node) -> tuple[fx.Node, MaskTerm | None] | str | None:
    """One mask term (or score cast) peeled off the scores: (the scores before it, the term)."""
    if is_method(node, "float", "type_as") or (is_method(node, "to") and _casts_dtype(node)):
        return node.args[0], None
    if is_add(node):
        left, right = node.args
        # The side that leads back to the scores matmul; else the left one (`scores + mask`), so that
        # the walk goes on and names the op it does not model.
        scores, mask = (right, left) if _leads_to_scores(right) and not _leads_to_scores(left) else (left, right)
        if not isinstance(mask, fx.Node) or shape_of(mask) is None:
            return "the scores are added to something that is not a mask tensor"
        return scores, MaskTerm(mask, "add")
    if is_method(node, "masked_fill") or is_function(node, torch.masked_fill):
        args = call_arguments(node, ("self", "mask", "value"))
        if not _is_mask_fill(args.get("value")) or not isinstance(args.get("mask"), fx.Node):
            return f"the scores are masked_fill-ed with {args.get('value')}, not -inf (kvfx models masking only)"
        return args["self"], MaskTerm(args["mask"], "drop")
    if is_function(node, torch.where) and len(node.args) == 3 and _leads_to_scores(node.args[1]):
        keep, scores, fill = node.args
        if not _is_mask_fill(_constant(fill)) or not isinstance(keep, fx.Node):
            return "the scores go through torch.where with a fill that is not -inf (kvfx models masking only)"
        return scores, MaskTerm(keep, "keep")
    return None


def _casts_dtype(node: fx.Node) -> bool:
    """x.to(dtype) (not .to(device) or .to(other_tensor))."""
    return all(isinstance(a, torch.dtype) for a in node.args[1:]) and set(node.kwargs) <= {"dtype"}


def _constant(value: Any) -> Any:
    """A number, or the number in a 0-d tensor the graph builds from a constant (torch.tensor / full)."""
    if isinstance(value, fx.Node) and is_function(value, torch.tensor, torch.full, torch.scalar_tensor):
        data = value.args[1] if value.target is torch.full else value.args[0] if value.args else None
        return data if isinstance(data, (int, float)) else None
    return value


def _is_mask_fill(value: Any) -> bool:
    return isinstance(value, (int, float)) and value <= _MASK_FILL


def _leads_to_scores(node: Any, depth: int = 6) -> bool:
    """`node` is the scores matmul, possibly through scaling, casts and mask terms."""
    for _ in range(depth):
        if is_matmul(node) or is_bmm(node) or is_baddbmm(node):
            return True
        if _head_view(node) is not None:
            node = node.args[0]
        elif _softcap(node) is not None:
            node = _softcap(node)[0]
        elif _is_scaling(node):
            node = next((a for a in node.args if isinstance(a, fx.Node)), None)
        elif is_add(node):
            return any(_leads_to_scores(a, depth - 1) for a in node.args)
        elif is_method(node, "masked_fill", *_CASTS) or is_function(node, torch.masked_fill):
            node = node.args[0]
        elif is_function(node, torch.where) and len(node.args) == 3:
            node = node.args[1]
        else:
            return False
    return False


def _is_scaling(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SCALE_OPS


def match_site(layer: int, node: fx.Node, graph: fx.Graph) -> Site | str:
    form = sdpa_form(node) if is_sdpa(node) else manual_form(node)
    if isinstance(form, str):
        return form
    q_shape = shape_of(form.query)
    if q_shape is None or len(q_shape) != 4 or not isinstance(q_shape[1], int) or not isinstance(q_shape[3], int):
        return "query is not a 4-D tensor [B, H, T, D] with a fixed head count and head dim"
    for term in form.mask_terms:
        if shape_of(term.node) is None or len(shape_of(term.node)) > 4:
            return f"a {term.kind} mask term of the scores is not a tensor that broadcasts to [B, H, T, S]"
    outputs = output_values(graph)
    reads = [match_kv_read(operand, q_shape[1], form.enable_gqa, outputs) for operand in (form.key, form.value)]
    for read in reads:
        if isinstance(read, str):
            return read
    key, value = reads
    if any(r.gqa == "broadcast" and not same_shape(shape_of(r.buffer)[:1], q_shape[:1]) for r in reads):
        return "a single KV head is broadcast over the batch too; kvfx models a cache with the query's batch size"
    if key.buffer is value.buffer or key.kv_len is not value.kv_len and key.kv_len != value.kv_len \
            or key.group != value.group or key.origin != value.origin:
        return "key and value are not two caches read the same way"
    key_write = value_write = None
    if key.origin != "cat":
        order = graph_position(graph)
        writes = [match_cache_write(read.buffer, form.node, order) for read in reads]
        key_write, value_write = (None if isinstance(w, str) else w for w in writes)
        if key.origin == "allocated":
            # A buffer allocated in the graph holds only what this graph wrote into it.
            for w in writes:
                if isinstance(w, str):
                    return w
    mask = form.attn_mask
    terms = form.mask_terms
    if len(terms) == 1 and terms[0].plain:  # a plain additive mask needs no new node
        mask, terms = terms[0].node, []
    scale = form.scale if form.scale is not None else 1.0 / math.sqrt(q_shape[-1])
    return Site(layer, form.node, form.kind, form.interior, form.query, key, value, mask,
                form.is_causal, float(scale), key_write, value_write, terms, form.softcap, form.merged_output)


def prepare_site(graph: fx.Graph, site: Site, positions: bool = True) -> None:
    """Materialize what the rewrite of a site reads: one mask node for several mask terms, and (when
    the writes move into a store) the positions [T] of slice writes (one node for both writes when
    their bounds agree)."""
    if site.mask_terms:
        with graph.inserting_before(site.node):
            site.attn_mask = _combined_mask(graph, site.mask_terms)
        site.mask_terms = []
    made: dict[tuple, fx.Node] = {}
    for write in (site.key_write, site.value_write) if positions else ():
        if write is not None and write.pos is None:
            key = tuple(id(b) if isinstance(b, fx.Node) else b for b in write.bounds)
            if key not in made:
                device = example_tensor(write.source).device
                with graph.inserting_before(write.node):
                    made[key] = graph.call_function(torch.arange, write.bounds, {"device": device})
            write.pos = made[key]


def _combined_mask(graph: fx.Graph, terms: list[MaskTerm]) -> fx.Node:
    """One SDPA-style mask equal to applying the terms: bool (True = attend) when all terms mask,
    else additive with -inf where a masking term drops the score."""
    keep = None
    for term in terms:
        if term.kind == "add":
            continue
        node = _term_value(graph, term)
        node = node if term.kind == "keep" else graph.call_function(operator.invert, (node,))
        keep = node if keep is None else graph.call_function(operator.and_, (keep, node))
    additive = None
    for term in terms:
        if term.kind == "add":
            node = _term_value(graph, term)
            additive = node if additive is None else graph.call_function(operator.add, (additive, node))
    if additive is None:
        return keep
    if keep is None:
        return additive
    return graph.call_function(torch.where, (keep, additive, float("-inf")))


def _term_value(graph: fx.Graph, term: MaskTerm) -> fx.Node:
    """The term as a tensor that broadcasts to [B, H, T, S]."""
    node = term.node
    if term.heads is not None:
        node = graph.call_method("unflatten", (node, 0, (-1, term.heads)))
    if term.factor != 1.0:
        node = graph.call_function(operator.mul, (node, term.factor))
    return node
