"""Rewrite matched attention sites into `torch.ops.kvfx.*` ops.

kv="none": the SDPA (and HF's repeat_kv copies) becomes one `kvfx::attend` over the model's own
cache buffers; the cache writes stay as they are.

kv="int8": the cache buffers stop being read or written by the graph. Each site gets four new
graph inputs (the `KVStore` tensors, appended after the existing inputs); its `index_copy_`
writes become `kvfx::store_write` and its SDPA becomes `kvfx::attend` over the store. A buffer the
graph allocated itself (HF allocates the static cache inside the prefill trace) is replaced by an
empty tensor: the runtime hands the caller a freed placeholder of the right shape instead
(`kvfx.runtime`). The `GraphPlan` says which inputs and outputs those are.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from kvfx.config import KVConfig, KVConfigError
from kvfx.kernels.formats import Int8Format, KiviFormat
from kvfx.kernels.policies import EVICTING
from kvfx.kernels.token_store import TokenFormat, dropped_positions
from kvfx.passes.fx_utils import (append_inputs, describe, example_tensor, graph_position, is_metadata_read, is_method,
                                  is_sdpa)
from kvfx.passes import cat_cache
from kvfx.passes.match import Site, find_attention, match_site, prepare_site, same_positions
from kvfx.reporting import SiteReport


@dataclass
class StoreSlot:
    """One rewritten site's quantized store, as the runtime must provide or collect it."""

    layer: int
    dtype: torch.dtype                # the model's fp buffers' dtype
    key_input: int | None = None      # graph-input index of the fp key/value buffers (store passed in) ...
    value_input: int | None = None
    key_output: int | None = None     # ... or output index of those the graph allocated itself (the
    value_output: int | None = None   # graph then allocates the store too and returns it)
    store_output: int | None = None   # output index of the first of the store's tensors
    store_tensors: int = 4            # how many tensors the format's store has


@dataclass
class GraphPlan:
    sites: list[SiteReport] = field(default_factory=list)
    slots: list[StoreSlot] = field(default_factory=list)
    raw_read_inputs: list[int] = field(default_factory=list)  # inputs the graph still reads as fp tensors
    full_window_inputs: list[int] = field(default_factory=list)  # of those, buffers HF rolls: full (every slot written)
    fp_cache_inputs: list[tuple[int, int]] = field(default_factory=list)   # kv="none": (key, value) input
    fp_cache_outputs: list[tuple[int, int]] = field(default_factory=list)  # indices of the model's buffers
    outputs: int = 0                  # how many outputs dynamo expects (store outputs come after)
    layers: int = 0                   # attention sites in the graph (PyramidKV budgets by depth)
    cat_slots: list[cat_cache.CatSlot] = field(default_factory=list)  # concatenated caches held in CatStores


def rewrite_graph(gm: fx.GraphModule, config: KVConfig, graph_index: int) -> GraphPlan:
    graph = gm.graph
    plan = GraphPlan()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    attention = find_attention(graph)
    plan.layers = len(attention)
    cat_sites = []  # rewritten last: their store inputs must follow every static site's
    for layer, node in enumerate(attention):
        site = match_site(layer, node, graph)
        if isinstance(site, str):
            kind = "sdpa" if is_sdpa(node) else "manual"
            plan.sites.append(SiteReport(graph_index, layer, kind, False, site, "unchanged"))
            continue
        if config.format is None:
            prepare_site(graph, site, positions=False)
            _rewrite_attention(graph, site, site.key.buffer, site.value.buffer, None, None)
            _record_fp_cache(plan, site, placeholders, output)
            plan.sites.append(SiteReport(graph_index, layer, site.pattern, True, "", "model dtype"))
            continue
        cat = site.key.origin == "cat"
        reason = _head_dims_differ(site) or (cat_cache.unquantizable(site, placeholders, output, config.format) if cat
                                             else _quantizable(site, output, config.format))
        if reason:
            plan.sites.append(SiteReport(graph_index, layer, site.pattern, False, reason, "unchanged"))
            plan.full_window_inputs += [placeholders.index(read.buffer) for read, write in
                                        ((site.key, site.key_write), (site.value, site.value_write))
                                        if write is not None and write.kind == "roll" and read.buffer in placeholders]
            continue
        plan.sites.append(SiteReport(graph_index, layer, site.pattern, True, "", config.format.name))
        if cat:
            cat_sites.append(site)
            continue
        prepare_site(graph, site)
        plan.slots.append(_rewrite_quantized(graph, site, placeholders, output, config, plan.layers))
    for site in cat_sites:
        plan.cat_slots.append(_rewrite_cat_quantized(graph, site, placeholders, output, config, plan.layers))
    graph.lint()
    gm.recompile()
    plan.outputs = len(output.args[0]) - sum(s.store_tensors for s in plan.slots if s.store_output is not None)
    plan.raw_read_inputs = [i for i, p in enumerate(placeholders) if _is_cache_shaped(p)
                            and any(not is_metadata_read(u) for u in p.users)]
    return plan


def _is_cache_shaped(node: fx.Node) -> bool:
    value = example_tensor(node)
    return value is not None and value.dim() == 4 and value.is_floating_point()


def _record_fp_cache(plan: GraphPlan, site: Site, placeholders: list[fx.Node], output: fx.Node) -> None:
    key, value = site.key.buffer, site.value.buffer
    outputs = list(output.args[0])
    if key in placeholders and value in placeholders:
        plan.fp_cache_inputs.append((placeholders.index(key), placeholders.index(value)))
    elif key in outputs and value in outputs:
        plan.fp_cache_outputs.append((outputs.index(key), outputs.index(value)))


def _head_dims_differ(site: Site) -> str:
    """Why the site's keys and values cannot share one store layout ("" if they can)."""
    dims = [example_tensor(read.buffer).shape[-1] for read in (site.key, site.value)]
    if dims[0] != dims[1]:
        return (f"keys and values have different head dims ({dims[0]} and {dims[1]}); a kvfx store holds one "
                f"head dim for both")
    return ""


def _quantizable(site: Site, output: fx.Node, fmt) -> str:
    """Why the site's fp buffers cannot be replaced by a store ("" if they can)."""
    reason = fmt.unsupported(example_tensor(site.key.buffer).shape[-1])
    if reason:
        return reason
    if site.key_write and site.value_write and not same_positions(site.key_write, site.value_write) \
            and isinstance(fmt, (KiviFormat, TokenFormat)):
        return f"keys and values are written at different positions; a {fmt.name} store writes both together"
    rolls = isinstance(fmt, Int8Format) or (isinstance(fmt, TokenFormat) and fmt.spec.policy in EVICTING)
    for name, read, write in (("key", site.key, site.key_write), ("value", site.value, site.value_write)):
        if write is not None and write.kind == "roll" and not rolls:
            if isinstance(fmt, TokenFormat):
                why, then = "its pages are runs of positions", "a policy's store cannot go on in fp: kvfx raises"
            else:
                why = "a KIVI store keeps tokens at their positions, in groups of group_size and a residual ring"
                then = "left in fp (a cache quantized by an earlier graph is read back)"
            return (f"the {name} cache is rolled (HF's full static sliding-window layer: every token moves one "
                    f"slot); kvfx rolls kv='int8' stores, whose per-token codes move with their tokens, and an "
                    f"evicting policy's (its tokens' positions move), not {fmt.name} ({why}): {then}")
        if write is None and any(is_method(u, "copy_") and u.args[0] is read.buffer for u in read.buffer.users):
            return (f"the {name} cache is overwritten whole (copy_; HF's static sliding-window layer taking several "
                    f"tokens past its window), a write kvfx does not model: left in fp (an int8 cache quantized by an "
                    f"earlier graph is read back)")
        if write is None:
            return f"no write into the {name} cache in this graph that kvfx models; kvfx must see every write to quantize it"
        allowed = {write.node, *write.also, output, site.node, *site.interior, *read.chain[-1:]}
        others = [u for u in read.buffer.users if u not in allowed]
        if others:
            return f"the {name} cache is also read by {describe(others[0])} outside attention"
    return ""


def _rewrite_attention(graph: fx.Graph, site: Site, key: fx.Node, value: fx.Node,
                       key_qparams: fx.Node | None, value_qparams: fx.Node | None) -> None:
    with graph.inserting_before(site.node):
        attend = graph.call_function(torch.ops.kvfx.attend.default, (
            site.query, key, value, key_qparams, value_qparams, site.attn_mask,
            site.key.kv_len, site.is_causal, site.scale) + ((site.softcap,) if site.softcap else ()))
    _replace_attention(graph, site, attend)


def _replace_attention(graph: fx.Graph, site: Site, attend: fx.Node) -> None:
    """`attend` takes the attention output's place; what only fed it goes."""
    attend.meta = dict(site.node.meta)
    if site.merged_output:  # bmm attention: [B, H, T, D] back to the model's [B * H, T, D]
        query, value = example_tensor(site.query), example_tensor(site.value.buffer)
        with query.fake_mode:
            attend.meta["example_value"] = query.new_empty((*query.shape[:-1], value.shape[-1]))
        with graph.inserting_after(attend):
            attend = graph.call_method("flatten", (attend, 0, 1))
        attend.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(attend)
    graph.erase_node(site.node)
    # Each list runs from the attention output back towards the cache buffer.
    for nodes in (site.interior, site.key.chain, site.value.chain):
        for node in nodes:
            if not node.users:
                graph.erase_node(node)


def _rewrite_quantized(graph: fx.Graph, site: Site, placeholders: list[fx.Node], output: fx.Node,
                       config: KVConfig, layers: int) -> StoreSlot:
    fmt = config.format
    buffer = example_tensor(site.key.buffer)
    _check_pages(config, buffer.shape[2])
    kivi = isinstance(fmt, KiviFormat)
    size = _buffer_size(graph, site.key.buffer) if kivi or site.key.buffer.op != "placeholder" else None
    slot = StoreSlot(site.layer, buffer.dtype, store_tensors=len(fmt.tensor_names))
    if site.key.buffer.op == "placeholder":
        store = _store_inputs(graph, site, buffer, fmt, layers)
        slot.key_input = placeholders.index(site.key.buffer)
        slot.value_input = placeholders.index(site.value.buffer)
    else:
        store = _store_allocation(graph, site, size, buffer, config, layers)
        outputs = list(output.args[0])
        # The graph allocated the fp buffers only to hand them back: it now returns the store too,
        # and in the buffers' place a one-element stride-0 tensor of their shape, from which the
        # runtime makes the freed placeholders the caller gets.
        slot.key_output, slot.value_output = outputs.index(site.key.buffer), outputs.index(site.value.buffer)
        slot.store_output = len(outputs)
        output.args = (tuple(outputs) + tuple(store),)
        for read in (site.key, site.value):
            read.buffer.target, read.buffer.args = torch.empty_strided, (size, (0,) * len(size))
    writes = (site.key_write, site.value_write)
    if kivi:
        _rewrite_kivi(graph, site, store, fmt, size[2], _written(site), writes)
        return slot
    if isinstance(fmt, TokenFormat):
        if site.key_write.kind == "roll":  # every token one position down, the oldest gone (a free slot)
            slot_pos = store[fmt.tensor_names.index("slot_pos")]
            with graph.inserting_before(site.node):
                graph.call_method("copy_", (slot_pos, graph.call_function(dropped_positions, (slot_pos, 1))))
        _rewrite_policy(graph, site, store, config.to_json(), layers, _written(site), writes)
        return slot
    k_codes, k_qparams, v_codes, v_qparams = store
    for write, codes, qparams in ((site.key_write, k_codes, k_qparams), (site.value_write, v_codes, v_qparams)):
        with graph.inserting_before(write.node):
            if write.kind == "roll":  # HF's roll, on the codes and (scale, zero) of each token
                for tensor in (codes, qparams):
                    graph.call_method("copy_", (tensor, graph.call_method("roll", (tensor, -1, 2))))
            graph.call_function(torch.ops.kvfx.store_write.default, (codes, qparams, write.pos, write.source))
    _erase_writes(graph, writes)
    _rewrite_attention(graph, site, k_codes, v_codes, k_qparams, v_qparams)
    return slot


def _rewrite_cat_quantized(graph: fx.Graph, site: Site, placeholders: list[fx.Node], output: fx.Node,
                           config: KVConfig, layers: int) -> cat_cache.CatSlot:
    """A concatenated cache (DynamicCache, nanoGPT present) moves into a CatStore, or under a policy into
    a TokenStore of the budget's capacity (passes/cat_cache.py)."""
    prepare_site(graph, site)
    slot, store, pos, width, attending = cat_cache.add_cat_store(graph, site, placeholders, output, config.format,
                                                                 layers)
    new = (pos, site.key.cat.new, site.value.cat.new)
    if slot.kind in ("policy", "grown"):
        _rewrite_policy(graph, site, store, config.to_json(), layers, new)
    elif slot.kind == "kivi":
        _rewrite_kivi(graph, attending, store, config.format, width, new)
    else:
        k_codes, k_qparams, v_codes, v_qparams = store
        _rewrite_attention(graph, site, k_codes, v_codes, k_qparams, v_qparams)
    cat_cache.drop_cats(graph, site)
    return slot


def _written(site: Site) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(positions, new keys, new values) of a site's two cache writes."""
    return site.key_write.pos, site.key_write.source, site.value_write.source


def _rewrite_kivi(graph: fx.Graph, site: Site, store: list[fx.Node], fmt: KiviFormat, width,
                  new: tuple[fx.Node, fx.Node, fx.Node], writes: tuple = ()) -> None:
    """One kvfx::kivi_write of the new tokens `new` = (pos, k_new, v_new), in place of the cache `writes`
    (at the later one; with none, a concatenation's, before the attention), kvfx::kivi_attend for the SDPA."""
    pos, k_new, v_new = new
    writes = sorted(writes, key=lambda w: graph_position(graph)[w.node])
    constants = (fmt.bits, fmt.fp8, fmt.group_size, fmt.residual)
    with graph.inserting_before(writes[-1].node if writes else site.node):
        graph.call_function(torch.ops.kvfx.kivi_write.default, (*store, pos, k_new, v_new, width, *constants))
    _erase_writes(graph, writes)
    with graph.inserting_before(site.node):
        attend = graph.call_function(torch.ops.kvfx.kivi_attend.default, (
            site.query, k_new, v_new, pos, *store, site.attn_mask, site.key.kv_len, width, site.is_causal,
            site.scale, *constants) + ((site.softcap,) if site.softcap else ()))
    _replace_attention(graph, site, attend)


def _check_pages(config: KVConfig, cache_len) -> None:
    """Quest cannot read more pages than a cache has."""
    if config.policy != "quest" or not isinstance(config.pages, int) or not isinstance(cache_len, int):
        return
    pages = -(-cache_len // config.page_size)
    if config.pages > pages:
        raise KVConfigError(f"kvfx option 'pages'={config.pages} exceeds the {pages} pages of {config.page_size} "
                            f"tokens in this model's KV cache of {cache_len} slots; valid: pages <= {pages}, or a "
                            "fraction of the pages (e.g. 0.125)")


def _rewrite_policy(graph: fx.Graph, site: Site, store: list[fx.Node], options: str, layers: int,
                    new: tuple[fx.Node, fx.Node, fx.Node], writes: tuple = ()) -> None:
    """The cache `writes` (none for a concatenation) and the SDPA become one kvfx::policy_attend of the new
    tokens `new` = (pos, k_new, v_new) (attend, then keep or evict)."""
    pos, k_new, v_new = new
    with graph.inserting_before(site.node):
        attend = graph.call_function(torch.ops.kvfx.policy_attend.default, (
            site.query, k_new, v_new, pos, *store, site.attn_mask, site.is_causal, site.scale, options,
            site.layer, layers) + ((site.softcap,) if site.softcap else ()))
    _erase_writes(graph, writes)
    _replace_attention(graph, site, attend)


def _erase_writes(graph: fx.Graph, writes) -> None:
    """Erase the cache writes a store's op replaced (a roll's copy_, then its setitem and roll)."""
    for write in writes:
        for node in (write.node, *write.also):
            graph.erase_node(node)


def _buffer_size(graph: fx.Graph, buffer: fx.Node) -> tuple:
    """The fp buffer's [B, Hkv, S, D] as graph arguments: ints, or nodes for symbolic sizes."""
    if buffer.op != "placeholder":  # an allocation: its size arguments
        args = buffer.args
        return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)
    size = []
    for dim, value in enumerate(example_tensor(buffer).shape):
        if isinstance(value, int):
            size.append(value)
        else:
            with graph.inserting_after(buffer):
                size.append(graph.call_method("size", (buffer, dim)))
    return tuple(size)


def _store_inputs(graph: fx.Graph, site: Site, buffer: torch.Tensor, fmt, layers: int) -> list[fx.Node]:
    """New graph inputs for the store of a cache the model passes in (one per store tensor)."""
    # Example values from dynamo's fake mode, shaped like the buffer (symbolic sizes included):
    # AOTAutograd would otherwise give the new inputs fresh sizes that no guard can name.
    with buffer.fake_mode:
        examples = fmt.allocate(buffer.shape, buffer.dtype, buffer.device, site.layer, layers).tensors()
    return append_inputs(graph, [f"kvfx_layer{site.layer}_{name}" for name in fmt.tensor_names], examples)


def _store_allocation(graph: fx.Graph, site: Site, size: tuple, buffer: torch.Tensor,
                      config: KVConfig, layers: int) -> list[fx.Node]:
    """kvfx::store_alloc in place of the fp buffers the graph allocated, sized like them (so a
    symbolic cache length stays symbolic)."""
    anchor = max((site.key.buffer, site.value.buffer), key=lambda n: graph_position(graph)[n])
    with graph.inserting_after(anchor):
        alloc = graph.call_function(torch.ops.kvfx.store_alloc.default, (
            list(size), buffer.dtype, buffer.device, config.to_json(), site.layer, layers))
    store, last = [], alloc
    for i in range(len(config.format.tensor_names)):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (alloc, i))
        store.append(last)
    return store
