"""Functional forms of the cache writes, for export: every state tensor becomes input -> output.

The compile path writes caches in place (`kvfx::store_write`, `kvfx::kivi_write`, HF's
``index_copy_`` into an fp buffer); inductor writes back into the same memory. An exported graph
has no memory of its own between calls: it must take the cache as inputs and return the updated
cache as outputs, so that a runtime holds only those tensors between steps. `functionalize` turns
each in-place write on a state input into an out-of-place op whose results later nodes read, and
appends each state tensor's last version to the graph's outputs.

The ops registered here exist for export only (nothing on the compile path inserts them); their
PyTorch implementations are the in-place ops applied to copies, so they mean exactly what the
compile path computes.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import kvfx.kernels  # noqa: F401  (registers torch.ops.kvfx.*)
from kvfx.errors import KVFXError

_KIVI_STORE = ("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "k_ring", "v_ring")


@torch.library.custom_op("kvfx::store_update", mutates_args=())
def store_update(codes: torch.Tensor, qparams: torch.Tensor, pos: torch.Tensor, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvfx::store_write` returning the written copies of (codes, qparams) instead of writing in place."""
    codes, qparams = codes.clone(), qparams.clone()
    torch.ops.kvfx.store_write(codes, qparams, pos, x)
    return codes, qparams


@store_update.register_fake
def _(codes, qparams, pos, x):
    return torch.empty_like(codes), torch.empty_like(qparams)


@torch.library.custom_op("kvfx::kivi_update", mutates_args=())
def kivi_update(k_codes: torch.Tensor, v_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                v_scale: torch.Tensor, v_zero: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
                pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_len: int, bits: int, fp8: bool,
                group_size: int, residual: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor, torch.Tensor]:
    """`kvfx::kivi_write` returning the 8 written store tensors (copies) instead of writing in place."""
    store = [t.clone() for t in (k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring)]
    torch.ops.kvfx.kivi_write(*store, pos, k, v, max_len, bits, fp8, group_size, residual)
    return tuple(store)


@kivi_update.register_fake
def _(k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring, pos, k, v, max_len, bits, fp8,
      group_size, residual):
    return tuple(torch.empty_like(t) for t in (k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_ring, v_ring))


_TOKEN_STORE = ("k_codes", "k_params", "v_codes", "v_params", "slot_pos", "score", "page_min", "page_max")


@torch.library.custom_op("kvfx::policy_update", mutates_args=())
def policy_update(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
                  k_codes: torch.Tensor, k_params: torch.Tensor, v_codes: torch.Tensor, v_params: torch.Tensor,
                  slot_pos: torch.Tensor, score: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor,
                  attn_mask: torch.Tensor | None, is_causal: bool, scale: float, options: str, layer: int,
                  layers: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kvfx::policy_attend` returning (attention output, the 8 written store tensors (copies))."""
    store = [t.clone() for t in (k_codes, k_params, v_codes, v_params, slot_pos, score, page_min, page_max)]
    out = torch.ops.kvfx.policy_attend(q, k_new, v_new, pos, *store, attn_mask, is_causal, scale, options, layer,
                                       layers)
    return (out, *store)


@policy_update.register_fake
def _(q, k_new, v_new, pos, k_codes, k_params, v_codes, v_params, slot_pos, score, page_min, page_max, attn_mask,
      is_causal, scale, options, layer, layers):
    store = (k_codes, k_params, v_codes, v_params, slot_pos, score, page_min, page_max)
    return (q.new_empty((*q.shape[:-1], v_new.shape[-1])), *(torch.empty_like(t) for t in store))


# In-place op -> (functional op, index of its first mutated argument, how many, whether the op's result is
# used: then the functional op's output 0 replaces it and the store follows at 1..).
_FUNCTIONAL = {
    torch.ops.kvfx.store_write.default: (torch.ops.kvfx.store_update.default, 0, 2, False),
    torch.ops.kvfx.kivi_write.default: (torch.ops.kvfx.kivi_update.default, 0, len(_KIVI_STORE), False),
    torch.ops.kvfx.policy_attend.default: (torch.ops.kvfx.policy_update.default, 4, len(_TOKEN_STORE), True),
}


def functionalize(gm: fx.GraphModule, state: list[fx.Node]) -> None:
    """Rewrite in-place writes into the `state` placeholders as functional ops; return their last versions.

    The graph's outputs become (original outputs..., final value of each state tensor, in `state`
    order). A write kvfx does not model (anything but the writes above) into a state input
    raises, naming it: exporting it would silently drop the write.
    """
    graph = gm.graph
    current = {p: p for p in state}
    output = next(n for n in graph.nodes if n.op == "output")
    for node in list(graph.nodes):
        if node.op == "output":
            break
        if node.op == "placeholder":
            continue
        for p in state:  # later readers read the latest version
            if current[p] is not p and p in node.all_input_nodes:
                node.replace_input_with(p, current[p])
        written = _written_state(node, current)
        if not written:
            continue
        with graph.inserting_before(node):
            results, value = _functional_write(graph, node)
        for p, result in zip(written, results):
            current[p] = result
        if value is not None:
            node.replace_all_uses_with(value)
        if node.users:
            raise KVFXError(f"the result of the cache write {node.format_node()} is used; kvfx exports writes "
                            "made for their side effect only")
        graph.erase_node(node)
    output.args = (tuple(output.args[0]) + tuple(current[p] for p in state),)
    graph.lint()
    gm.recompile()


def _written_state(node: fx.Node, current: dict[fx.Node, fx.Node]) -> list[fx.Node]:
    """The state placeholders `node` writes in place ([] if none); raises for writes kvfx cannot export."""
    latest = {v: k for k, v in current.items()}
    if node.op == "call_function" and node.target in _FUNCTIONAL:
        _, first, count, _ = _FUNCTIONAL[node.target]
        return [latest[a] for a in node.args[first:first + count]]
    if node.op == "call_method" and node.target == "index_copy_" and node.args[0] in latest:
        return [latest[node.args[0]]]
    mutated = node.op == "call_method" and node.target.endswith("_") or node.target is operator.setitem
    if mutated and node.args and node.args[0] in latest:
        raise KVFXError(f"the graph writes the cache input {latest[node.args[0]].name} with {node.format_node()}; "
                        "kvfx exports index_copy_ and kvfx store writes only")
    return []


def _functional_write(graph: fx.Graph, node: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
    """The functional form of `node`: (the written state tensors, what replaces the node's own result)."""
    if node.op == "call_method":  # buffer.index_copy_(dim, index, source)
        return [graph.call_function(torch.index_copy, node.args, node.kwargs)], None
    target, _, count, returns = _FUNCTIONAL[node.target]
    update = graph.call_function(target, node.args, node.kwargs)
    items = [graph.call_function(operator.getitem, (update, i)) for i in range(count + returns)]
    return (items[1:], items[0]) if returns else (items, None)
