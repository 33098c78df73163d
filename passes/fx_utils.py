"""Small structural helpers over dynamo FX graphs (torch IR, not aten)."""
from __future__ import annotations

import operator
from typing import Any, Callable

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


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def is_metadata_read(node: Any) -> bool:
    """A read of a tensor's sizes, not its data (dynamo records `.shape` as size())."""
    return is_method(node, "size", "numel", "dim", "stride") or is_function(node, torch.numel)


def is_getitem(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem


VIEW_METHODS = ("view", "reshape", "select", "narrow", "transpose", "permute", "unsqueeze", "squeeze", "expand",
                "flatten", "unflatten", "__getitem__")


def written_placeholders(graph: fx.Graph) -> list[fx.Node]:
    """The graph inputs written in place (through views): by a `..._` method or function, a slice
    assignment, or an op whose schema writes an argument. HF's caches are such inputs (the keys and
    values a StaticCache `index_copy_`s into, its per-layer `cumulative_length.add_`)."""
    written = []
    for node in graph.nodes:
        if node.op not in ("call_method", "call_function"):
            continue
        schema = getattr(node.target, "_schema", None)
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if schema is not None:
            args = call_arguments(node, tuple(a.name for a in schema.arguments))
            targets = [args.get(a.name) for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        elif node.target is operator.setitem or (name.endswith("_") and not name.startswith("_")):
            targets = node.args[:1]
        else:
            continue
        for base in targets:
            while isinstance(base, fx.Node) and (is_getitem(base) or is_method(base, *VIEW_METHODS)):
                base = base.args[0]
            if isinstance(base, fx.Node) and base.op == "placeholder" and base not in written:
                written.append(base)
    return written


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


_SOFTMAX = (F.softmax, torch.softmax)
_MATMUL = (torch.matmul, operator.matmul)
_ADD = (operator.add, torch.add)


def is_softmax(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _SOFTMAX) or is_method(node, "softmax")


def softmax_dim(node: fx.Node) -> Any:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)


def is_matmul(node: Any) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in _MATMUL)
                                          or is_method(node, "matmul"))


def is_add(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ADD and not node.kwargs


def is_passthrough(node: fx.Node) -> bool:
    """Ops between a softmax and the value matmul that do not change the probabilities' meaning:
    a dtype cast, or inference dropout (p = 0 or training=False)."""
    if is_method(node, "to", "type_as", "type", "float", "half", "bfloat16"):
        return True
    if node.op == "call_function" and node.target is F.dropout:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return p == 0 or training is False
    return False


def transposed_last_two(node: Any) -> fx.Node | None:
    """x for x.transpose(-1, -2) (or its last two dims by number) of a 3-D or 4-D x, else None."""
    if is_method(node, "transpose") or (isinstance(node, fx.Node) and node.target is torch.transpose):
        rank = len(shape_of(node.args[0]) or ())
        dims = {d % rank for d in node.args[1:3] if isinstance(d, int)} if rank in (3, 4) else set()
        if dims == {rank - 2, rank - 1}:
            return node.args[0]
    return None


def is_function(node: Any, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_cat(node: Any) -> bool:
    return is_function(node, torch.cat, torch.concat, torch.concatenate)


def call_arguments(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """A call's arguments by name (positional ones named in order), for ops with no schema to read."""
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def output_values(graph: fx.Graph) -> list[Any]:
    """What the graph returns, flattened one level (dynamo returns a tuple)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = output.args[0]
    return list(values) if isinstance(values, (tuple, list)) else [values]


def size_recipe(size: Any, placeholders: list[fx.Node]) -> Callable[[tuple], int] | str:
    """A function of the graph's call arguments giving a size that dynamo recorded (an int, or a
    SymInt whose symbols are sizes of the inputs or SymInt inputs), or the reason there is none."""
    if isinstance(size, int):
        return lambda args: size
    expr = size.node.expr
    sources: dict[Any, tuple[int, int | None]] = {}
    for i, node in enumerate(placeholders):
        value = node.meta.get("example_value")
        dims = [(None, value)] if isinstance(value, torch.SymInt) else (
            list(enumerate(value.shape)) if isinstance(value, torch.Tensor) else [])
        for dim, s in dims:
            if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                sources.setdefault(s.node.expr, (i, dim))
    missing = [s for s in expr.free_symbols if s not in sources]
    if missing:
        return f"size {expr} depends on {missing[0]}, which no graph input carries"
    import sympy

    def evaluate(args: tuple) -> int:
        values = {s: sympy.Integer(int(args[i] if dim is None else args[i].shape[dim]))
                  for s, (i, dim) in ((s, sources[s]) for s in expr.free_symbols)}
        return int(expr.xreplace(values))

    return evaluate


def append_inputs(graph: fx.Graph, names: list[str], examples) -> list[fx.Node]:
    """New graph inputs after the last one, named `names`, with fake `examples` as their values."""
    last = next(n for n in reversed(graph.nodes) if n.op == "placeholder")
    nodes = []
    for name, example in zip(names, examples):
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        last._dynamo_source = None  # AOTAutograd wants one on every input of a dynamo graph
        last.meta["example_value"] = example
        nodes.append(last)
    return nodes
