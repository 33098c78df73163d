"""Small structural helpers over dynamo FX graphs (torch IR, not aten)."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """SDPA's arguments by name, whatever mix of positional and keyword the trace used."""
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def is_method(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def is_getitem(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem


def shape_of(node: Any) -> tuple | None:
    """The shape dynamo recorded for a node (ints, or SymInts for dynamic sizes), or None."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def same_shape(a: tuple, b: tuple) -> bool:
    """Equal sizes, symbolic ones included, decided without adding guards."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def example_tensor(node: fx.Node) -> torch.Tensor | None:
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else None


def describe(node: fx.Node) -> str:
    """A short name of what a node does, for reasons shown to users."""
    if node.op in ("call_method", "call_module"):
        return f"{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def full_slices(index: Any, count: int) -> bool:
    return all(isinstance(s, slice) and s == slice(None) for s in index[:count])


def graph_position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}
