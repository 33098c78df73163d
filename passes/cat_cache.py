"""Caches that grow by concatenation: HF DynamicCache and nanoGPT-style `present`.

    kv = torch.cat((past, new), dim=-2)    # or `new` itself when this graph starts the cache
    out = attention(q, kv, ...)
    return ..., kv                          # the caller keeps kv as the next call's past

kv="none" rewrites only the attention (over kv, as the model computed it: lossless).

kv="int8": the graph stops building kv. It gets four more inputs, the views of the first S slots
(S = kv's length) of a `kvfx.cat_store.CatStore` the runtime finds by the identity of `past`; it
writes `new` at slots [S - T, S) with kvfx::store_write, attends over the store with kvfx::attend,
and returns, where kv was, a one-element stride-0 tensor of kv's shape, which the runtime turns
into a freed placeholder registered to the store (what the caller passes back as the next past).
A sliding window (HF's DynamicSlidingWindowLayer) returns `kv[:, :, -keep:]` instead: the placeholder
has that shape, and the store drops its older tokens before the next call (`CatStore.keep_last`).
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from kvfx.kernels.attention import mask_on_store
from kvfx.kernels.token_store import TokenFormat
from kvfx.passes.fx_utils import (append_inputs, call_arguments, describe, example_tensor, full_slices, is_cat,
                                  is_function, is_metadata_read, output_values, shape_of, size_recipe)


# The cache length a policy's store is sized for on a growing cache: its integer budget bounds the capacity.
UNBOUNDED = 1 << 62


@dataclass
class CatCache:
    """What a site's key (or value) cache grows by in this graph."""

    node: fx.Node             # the grown cache: torch.cat((past, new), dim=-2), or `new` itself
    past: fx.Node | None      # the cache passed in; None when this graph starts it (prefill)
    new: fx.Node              # this call's K (or V) [B, H, T, D]
    returned: bool            # the graph returns `node` (the caller keeps it whole) ...
    crop: fx.Node | None = None  # ... or its last `keep` tokens, node[:, :, -keep:] (HF's sliding window)
    keep: int | None = None

    @property
    def kept(self) -> fx.Node | None:
        """What the caller keeps of the grown cache (the graph output), if the graph returns it."""
        return self.node if self.returned else self.crop


def match_cat(node: fx.Node, outputs: list) -> CatCache | str | None:
    """The cache growth that `node` (an attention's key/value source) is, a reason, or None when
    `node` is no cache at all."""
    if is_cat(node):
        args = call_arguments(node, ("tensors", "dim"))
        tensors, dim = args.get("tensors"), args.get("dim", 0)
        if not isinstance(tensors, (tuple, list)) or len(tensors) != 2 or dim not in (-2, 2):
            return "the cache concatenation is not (past, new) along the sequence dim (-2)"
        past, new = tensors
        if _empty(past):
            past = None
        elif past.op != "placeholder":
            return (f"the past of the cache concatenation is computed in the graph ({describe(past)}), "
                    f"not a cache passed in")
        shape = shape_of(new)
        if shape is None or len(shape) != 4:
            return "the new keys/values concatenated to the cache are not a 4-D tensor [B, H, T, D]"
        return CatCache(node, past, new, node in outputs, *_crop(node, outputs))
    if node in outputs:
        return CatCache(node, None, node, True)
    return None


def _crop(node: fx.Node, outputs: list) -> tuple[fx.Node | None, int | None]:
    """The returned `node[:, :, -keep:]` (HF's DynamicSlidingWindowLayer keeps the last W - 1 tokens) and
    `keep`, or (None, None)."""
    for user in node.users:
        if user in outputs and is_function(user, operator.getitem) and user.args[0] is node:
            index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
            seq = index[2] if len(index) >= 3 else None
            if (len(index) in (3, 4) and full_slices(index[:2], 2) and index[3:] in ((), (slice(None),))
                    and isinstance(seq, slice) and isinstance(seq.start, int) and seq.start < 0
                    and seq.stop is None and seq.step in (None, 1)):
                return user, -seq.start
    return None, None


def _empty(node: fx.Node) -> bool:
    """An empty 1-D tensor: how HF's DynamicLayer starts (torch.tensor([]) concatenated with the prompt's K)."""
    value = example_tensor(node)
    return value is not None and value.dim() == 1 and value.shape[0] == 0


@dataclass
class CatSlot:
    """One site whose concatenated cache lives in a `CatStore`, as the runtime must provide it."""

    layer: int
    dtype: torch.dtype
    device: torch.device
    shape: list[Callable]               # [B, Hkv, S, D] of the grown cache, from the call's arguments
    key_past_input: int | None          # graph-input index of the past placeholders (None: no past)
    value_past_input: int | None
    key_output: int                     # output index where the graph returned the grown cache
    value_output: int
    examples: tuple = ()                # fake example values of the store-view inputs (dynamo's symbols)
    keep: int | None = None             # the caller keeps the last `keep` tokens (a sliding window), else all
    kind: str = "int8"                  # "int8": CatStore views; "kivi", "grown": a GrowingStore's tensors, "policy":
                                        # a TokenStore's (its budget's capacity), each then a length carrier [S]
    margin: int = 0                     # a sliding window's KIVI store: sized for S + margin (G) positions, and
                                        # the store position of the cache's first token (an int64 [1]) after the carrier


def unquantizable(site, placeholders: list[fx.Node], output: fx.Node, fmt) -> str:
    """Why a concatenated cache cannot move into a `CatStore` ("" if it can)."""
    kind = store_kind(fmt)
    if kind == "grown" and site.key.cat.crop is not None:
        what = "Quest's pages are runs of positions" if fmt.spec.policy == "quest" else \
            f"budget={fmt.spec.budget!r} is a share of a length the window bounds: use an integer budget"
        return f"a {fmt.name} store does not follow a sliding window's crop of the concatenated cache ({what})"
    reason = fmt.unsupported(shape_of(site.key.cat.new)[-1])
    if reason:
        return reason
    outputs = output_values(output.graph)
    if site.key.cat.keep != site.value.cat.keep:
        return "the key and value caches keep different numbers of their last tokens"
    for name, read in (("key", site.key), ("value", site.value)):
        cat = read.cat
        if read.kv_len != -1:
            return f"the concatenated {name} cache is sliced before attention"
        if cat.kept is None or outputs.count(cat.kept) != 1:
            return (f"the concatenated {name} cache is not returned, whole or as its last tokens (a sliding "
                    f"window); kvfx quantizes a concatenation only when the caller keeps it")
        allowed = {output, site.node, *site.interior, *read.chain[-1:], *([cat.crop] if cat.crop else [])}
        others = [u for u in cat.node.users if u not in allowed and not is_metadata_read(u)]
        if cat.past is not None:
            others += [u for u in cat.past.users if u is not cat.node and not is_metadata_read(u)]
        if cat.node is cat.new:  # no past: `new` itself is the cache, also used to build nothing else
            others = [u for u in others if u is not cat.node]
        if others:
            return f"the {name} cache is also read by {describe(others[0])} outside attention"
        recipes = [size_recipe(s, placeholders) for s in shape_of(cat.node)]
        reason = next((r for r in recipes if isinstance(r, str)), "")
        if reason:
            return f"the {name} cache's size cannot be read from the call: {reason}"
    return ""


def store_kind(fmt) -> str:
    """How a format holds a concatenated cache: "int8" (a CatStore), "kivi" (a GrowingStore of a KiviStore, by
    position), "grown" (a GrowingStore of a TokenStore sized by the cache length: Quest's pages, or an evicting
    policy's share of the length), "policy" (an evicting policy's TokenStore of its integer budget's capacity)."""
    from kvfx.kernels.formats import KiviFormat

    if isinstance(fmt, TokenFormat):
        return "policy" if isinstance(fmt.spec.budget, int) and fmt.spec.policy != "quest" else "grown"
    return "kivi" if isinstance(fmt, KiviFormat) else "int8"


def add_cat_store(graph: fx.Graph, site, placeholders: list[fx.Node], output: fx.Node, fmt,
                  layers: int) -> tuple[CatSlot, list, fx.Node, fx.Node | int, object]:
    """New inputs for the site's store, the positions [T] of this call's tokens, and placeholders
    returned in place of the grown K/V. int8: the inputs are views of the store's first S slots, and
    the two writes go before the attention. KIVI formats, Quest and a policy's fractional budget: the inputs
    are a store for S positions (`GrowingStore`) and a carrier of the length S (a uint8 tensor [S], never
    read). An evicting policy (integer budget): its `TokenStore`, whose capacity the budget fixes, and the
    carrier. A KIVI store under a
    sliding window: a store for S + G positions, the carrier, and the store position of the cache's first token.
    Returns the slot, the store nodes, the positions, the store's width and the site as it attends over the
    store; the caller rewrites the attention over them (the KIVI and policy ops write), then calls `drop_cats`."""
    from kvfx.cat_store import seq_major_store

    key, value = site.key.cat, site.value.cat
    example = example_tensor(key.node)
    kind = store_kind(fmt)
    margin = fmt.group_size if kind == "kivi" and key.keep is not None else 0
    b, h, s, d = example.shape
    with example.fake_mode:
        if kind == "int8":
            examples = seq_major_store(fmt, example.shape, example.dtype, example.device).tensors()
        else:
            cache_len = UNBOUNDED if kind == "policy" else s + margin
            fake = fmt.allocate((b, h, cache_len, d), example.dtype, example.device, site.layer, layers)
            examples = (*fake.tensors(), torch.empty(s, dtype=torch.uint8, device=example.device))
            if margin:
                examples += (torch.zeros(1, dtype=torch.int64, device=example.device),)
    names = [*fmt.tensor_names, *(["length"] if kind != "int8" else []), *(["offset"] if margin else [])]
    inputs = append_inputs(graph, [f"kvfx_cat{site.layer}_{name}" for name in names], examples)
    store = inputs[:len(fmt.tensor_names)]
    # The grown cache's length S, read off an input that carries it (the store view's dim 2, or the
    # carrier's dim 0) and not off `past`: the runtime's placeholder for it is fakeified afresh by
    # AOTAutograd, with symbols that no guard can name.
    carrier, dim = (store[0], 2) if kind == "int8" else (inputs[len(store)], 0)
    with graph.inserting_before(site.node):
        length = _size(graph, carrier, dim, s)
        new = _size(graph, key.new, 2, shape_of(key.new)[2])
        start = length - new if isinstance(length, int) and isinstance(new, int) else \
            graph.call_function(operator.sub, (length, new))
        pos = graph.call_function(torch.arange, (start, length), {"device": example.device})
        width, attending = length, site
        if margin:  # store position = cache position + offset, in a store of S + G positions
            offset = inputs[-1]
            pos = graph.call_function(operator.add, (pos, offset))
            width = s + margin if isinstance(s, int) else graph.call_function(operator.add, (length, margin))
            attending = _window_site(graph, site, length, offset, width)
        if kind == "int8":
            k_codes, k_qparams, v_codes, v_qparams = store
            for codes, qparams, cat in ((k_codes, k_qparams, key), (v_codes, v_qparams, value)):
                graph.call_function(torch.ops.kvfx.store_write.default, (codes, qparams, pos, cat.new))
    outputs = output_values(graph)
    indices = [outputs.index(cat.kept) for cat in (key, value)]
    with graph.inserting_before(output):
        sizes = [_size(graph, key.new, d, s) for d, s in enumerate(example.shape) if d != 2]
        kept = _size(graph, carrier, dim, s)
        if key.keep is not None:  # what the caller keeps: the last `keep` tokens
            kept = min(kept, key.keep) if isinstance(kept, int) else \
                graph.call_function(torch.sym_min, (kept, key.keep))
        sizes.insert(2, kept)
        for i, cat in zip(indices, (key, value)):
            # One element, stride 0: the runtime frees it and hands it to the caller as the grown cache.
            outputs[i] = graph.call_function(torch.empty_strided, (tuple(sizes), (0, 0, 0, 0)),
                                             {"dtype": example.dtype, "device": example.device})
    output.args = (tuple(outputs),)
    index = {p: i for i, p in enumerate(placeholders)}
    slot = CatSlot(site.layer, example.dtype, example.device, [size_recipe(s, placeholders) for s in example.shape],
                   index.get(key.past), index.get(value.past), *indices, tuple(examples), key.keep, kind, margin)
    return slot, store, pos, width, attending


def _window_site(graph: fx.Graph, site, length, offset: fx.Node, width) -> object:
    """The site as it attends over a sliding window's KIVI store of `width` positions, where the grown cache's
    `length` tokens (the columns of the model's mask) sit from position `offset` on (`mask_on_store`)."""
    if site.attn_mask is None and site.is_causal:
        return site  # the call starts the cache (SDPA's is_causal with T < S is no HF cache): offset 0, T == S
    mask = graph.call_function(mask_on_store, (site.attn_mask, offset, length, width))
    return dataclasses.replace(site, attn_mask=mask)


def drop_cats(graph: fx.Graph, site) -> None:
    """Erase the concatenations the rewrite left without users (but reads of their sizes that nothing uses:
    repeat_kv's `.shape`, whose expand the rewrite erased; a past still read would stay an fp input)."""
    for cat in (site.key.cat, site.value.cat):
        if cat.crop is not None and not cat.crop.users:
            graph.erase_node(cat.crop)
        for user in list(cat.node.users):
            if is_metadata_read(user):
                _erase_if_unused(graph, user)
        if cat.node is not cat.new and not cat.node.users:
            graph.erase_node(cat.node)


def _erase_if_unused(graph: fx.Graph, node: fx.Node) -> bool:
    """Erase `node` if nothing uses it or what is computed from it (pure calls only); whether it went."""
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    if all([_erase_if_unused(graph, user) for user in list(node.users)]):
        graph.erase_node(node)
        return True
    return False


def _size(graph: fx.Graph, node: fx.Node, dim: int, value) -> int | fx.Node:
    """A size as a graph argument: the int, or `node.size(dim)` when symbolic."""
    return value if isinstance(value, int) else graph.call_method("size", (node, dim))
