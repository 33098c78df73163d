"""Find attention sites and the cache each one reads.

A site is an SDPA call whose key and value come from KV-cache buffers [B, Hkv, S, D]:

    buffer.index_copy_(2, pos, new)                       # the cache write (HF StaticCache)
    kv = buffer[:, :, :L]                                 # optional: prefill reads the first L slots
    kv = kv[:, :, None].expand(B, Hkv, g, S, D)           # optional: HF repeat_kv (GQA) ...
    kv = kv.reshape(B, Hkv * g, S, D)                     # ... or SDPA's own enable_gqa=True
    out = scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=..., scale=...)

Matching is structural (targets, argument positions, recorded shapes), never by names. Each
function returns either what it matched or a reason string a user can act on.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from kvfx.passes.fx_utils import (describe, full_slices, graph_position, is_add, is_getitem, is_matmul,
                                  is_method, is_passthrough, is_sdpa, is_softmax, same_shape, sdpa_arguments,
                                  shape_of, softmax_dim, transposed_last_two)

_SCALE_OPS = (operator.mul, operator.truediv, torch.mul, torch.div)

# In-graph allocations that a cache buffer may come from (HF lazily allocates inside the prefill trace).
_ALLOCATIONS = (torch.zeros, torch.empty)


@dataclass
class KVRead:
    """How one SDPA operand (key or value) is read out of a cache buffer."""

    buffer: fx.Node
    group: int              # query heads per KV head (1: MHA or SDPA's enable_gqa)
    kv_len: int | fx.Node   # leading slots attended (-1: the whole buffer; a node when symbolic)
    gqa: str                # "repeat_kv", "enable_gqa" or "none"
    chain: list[fx.Node] = field(default_factory=list)  # nodes between buffer and SDPA


@dataclass
class CacheWrite:
    node: fx.Node           # buffer.index_copy_(2, pos, source)
    pos: fx.Node
    source: fx.Node


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

    @property
    def pattern(self) -> str:
        mask = "causal" if self.is_causal else ("mask" if self.attn_mask is not None else "no mask")
        origin = "input" if self.key.buffer.op == "placeholder" else "allocated in graph"
        write = "index_copy_" if self.key_write else "no write"
        return f"{self.kind}+{self.key.gqa}, {mask}, cache {origin}, {write}"


def find_attention(graph: fx.Graph) -> list[fx.Node]:
    """SDPA calls and softmaxes (each softmax a candidate hand-written attention), in graph order."""
    return [n for n in graph.nodes if is_sdpa(n) or (is_softmax(n) and _scores_upstream(n.args[0])
                                                      and _values_downstream(n))]


def _values_downstream(softmax: fx.Node) -> bool:
    node = softmax
    while len(node.users) == 1 and is_passthrough(next(iter(node.users))):
        node = next(iter(node.users))
    return any(is_matmul(u) and u.args[0] is node for u in node.users)


def _scores_upstream(node, depth: int = 6) -> bool:
    """A softmax is a candidate attention if a matmul produces its input within a few ops and its
    output feeds a matmul (a router or classifier softmax over a linear layer is not)."""
    for _ in range(depth):
        if is_matmul(node):
            return True
        inputs = [a for a in getattr(node, "args", ()) if isinstance(a, fx.Node)]
        if not inputs:
            return False
        node = inputs[0] if not is_matmul(inputs[-1]) else inputs[-1]
    return False


def match_kv_read(node: fx.Node, query_heads: int, enable_gqa: bool) -> KVRead | str:
    """Walk from an SDPA key/value operand back to its cache buffer."""
    chain: list[fx.Node] = []
    group, gqa = 1, "enable_gqa" if enable_gqa else "none"
    if is_method(node, "reshape") and is_method(node.args[0], "expand"):
        expand = node.args[0]
        unsqueeze = expand.args[0]
        ok = (is_getitem(unsqueeze) and isinstance(unsqueeze.args[1], tuple) and len(unsqueeze.args[1]) == 5
              and unsqueeze.args[1][2] is None and full_slices(unsqueeze.args[1][:2] + unsqueeze.args[1][3:], 4))
        expanded, reshaped = shape_of(expand), shape_of(node)
        if not ok or expanded is None or reshaped is None or len(expanded) != 5:
            return "key/value goes through an expand+reshape that is not HF repeat_kv"
        b, hkv, group, s, d = expanded
        if not isinstance(group, int) or not same_shape(reshaped, (b, hkv * group, s, d)):
            return f"repeat_kv reshape to {reshaped} does not merge the KV-head groups"
        chain += [node, expand, unsqueeze]
        node, gqa = unsqueeze.args[0], "repeat_kv"
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
        return f"key/value does not come from a 4-D cache buffer with a fixed head count (found {describe(node)})"
    if node.op != "placeholder" and not (node.op == "call_function" and node.target in _ALLOCATIONS):
        return f"key/value comes from {describe(node)}, not a cache buffer (graph input or allocation)"
    hkv = shape[1]
    if gqa == "enable_gqa":
        group = query_heads // hkv
    if hkv * group != query_heads:
        return f"{query_heads} query heads do not map onto {hkv} KV heads"
    if isinstance(kv_len, int) and isinstance(shape[2], int) and kv_len > shape[2]:
        return f"slice of {kv_len} slots exceeds the cache length {shape[2]}"
    return KVRead(node, group, kv_len, gqa, chain)


def match_cache_write(buffer: fx.Node, before: fx.Node, order: dict[fx.Node, int]) -> CacheWrite | str:
    """The single `buffer.index_copy_(2, pos, source)` that precedes the attention read."""
    writes = [u for u in buffer.users if is_method(u, "index_copy_") and order[u] < order[before]]
    if len(writes) != 1:
        return f"expected one index_copy_ into the cache before attention, found {len(writes)}"
    node = writes[0]
    args = dict(zip(("self", "dim", "index", "source"), node.args))
    args.update(node.kwargs)
    if args.get("dim") not in (2, -2):
        return f"cache write index_copy_ along dim {args.get('dim')}, kvfx models dim 2 (sequence)"
    if node.users:
        return "the result of the cache write is used; kvfx models a write for its side effect only"
    return CacheWrite(node, args["index"], args["source"])


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
    """matmul(q, k^T) -> [* or / constant] -> [+ mask] -> softmax(-1) -> [.to / dropout(p=0)] -> matmul(., v)."""
    if softmax_dim(softmax) not in (-1, 3):
        return "softmax is not over the last dimension"
    node, after = softmax, []
    while len(node.users) == 1 and is_passthrough(next(iter(node.users))):
        node = next(iter(node.users))
        after.append(node)
    interior = [*reversed(after), softmax]  # from the output back towards the scores
    users = list(node.users)
    if len(users) != 1 or not is_matmul(users[0]) or users[0].args[0] is not node:
        return "softmax output does not feed one matmul with the values"
    out, value = users[0], users[0].args[1]
    scores, mask, scale = softmax.args[0], None, 1.0
    if is_add(scores):
        interior.append(scores)
        left, right = scores.args
        scores, mask = (left, right) if _is_scores(left) else (right, left)
    if _is_scaling(scores):
        left, right = scores.args
        constant, scores_in = (right, left) if isinstance(right, (int, float)) else (left, right)
        if not isinstance(constant, (int, float)) or not isinstance(scores_in, fx.Node):
            return "attention scores are scaled by a non-constant"
        scale = 1.0 / constant if scores.target in (operator.truediv, torch.div) else float(constant)
        interior.append(scores)
        scores = scores_in
    if not is_matmul(scores):
        return f"softmax input has an op kvfx does not model: {describe(scores)}"
    query, key_t = scores.args
    key = transposed_last_two(key_t)
    if key is None:
        return "the scores matmul does not take k transposed over its last two dims"
    interior += [scores, key_t]
    if mask is not None and (not isinstance(mask, fx.Node) or shape_of(mask) is None):
        return "the scores are added to something that is not a mask tensor"
    return AttentionForm("manual", out, interior, query, key, value, mask, False, scale, False)


def _is_scaling(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SCALE_OPS


def _is_scores(node) -> bool:
    return is_matmul(node) or _is_scaling(node)


def match_site(layer: int, node: fx.Node, graph: fx.Graph) -> Site | str:
    form = sdpa_form(node) if is_sdpa(node) else manual_form(node)
    if isinstance(form, str):
        return form
    q_shape = shape_of(form.query)
    if q_shape is None or len(q_shape) != 4 or not isinstance(q_shape[1], int) or not isinstance(q_shape[3], int):
        return "query is not a 4-D tensor [B, H, T, D] with a fixed head count and head dim"
    reads = [match_kv_read(operand, q_shape[1], form.enable_gqa) for operand in (form.key, form.value)]
    for read in reads:
        if isinstance(read, str):
            return read
    key, value = reads
    if key.buffer is value.buffer or key.kv_len is not value.kv_len and key.kv_len != value.kv_len \
            or key.group != value.group:
        return "key and value are not two buffers read the same way"
    order = graph_position(graph)
    writes = [match_cache_write(read.buffer, form.node, order) for read in reads]
    key_write, value_write = (None if isinstance(w, str) else w for w in writes)
    if key.buffer.op != "placeholder":
        # A buffer allocated in the graph holds only what this graph wrote into it.
        for w in writes:
            if isinstance(w, str):
                return w
    scale = form.scale if form.scale is not None else 1.0 / math.sqrt(q_shape[-1])
    return Site(layer, form.node, form.kind, form.interior, form.query, key, value, form.attn_mask,
                form.is_causal, float(scale), key_write, value_write)
