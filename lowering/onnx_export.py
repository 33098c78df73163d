"""`kvfx.export_onnx`: one ONNX graph per model that a runtime drives for prefill and decode.

    step(input_ids [B, T] int64, past_len [] int64, *cache) -> (logits [B, T, V], *new_cache)

T is a dynamic axis: the same graph runs the prompt (T = prompt length, past_len = 0) and each
decode step (T = 1, past_len = tokens so far). `cache` is kvfx's compressed store of every
rewritten attention site (e.g. int4: packed codes, scales, zeros, residual rings), or the model's fp
buffers where kv="none" or a site was left unchanged; the graph returns them updated, so a runtime
holds only those tensors between steps (`kvfx.lowering.ort_loop`). Their names, shapes, dtypes and
initial fill values are in the model's metadata ("kvfx.cache").

Pipeline: capture the step with dynamo (lowering/capture.py) -> the compile path's passes rewrite it
(kvfx.passes.rewrite, unchanged) -> in-place cache writes become functional (lowering/functional.py)
-> torch.onnx.export(dynamo=True) with the kvfx ops translated by lowering/onnx_ops.py.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import nn

from kvfx.config import KVConfig
from kvfx.errors import KVFXError
from kvfx.lowering.capture import CapturedStep, Placeholder, capture_step
from kvfx.lowering.functional import functionalize
from kvfx.lowering.ort_loop import METADATA_KEY
from kvfx.passes.rewrite import GraphPlan, rewrite_graph

# The lowest opset each format's translation needs: every attention is an ONNX Attention node (23).
FORMAT_OPSETS = {"none": 23, "int8": 23, "int4": 23, "int2": 23}
MAX_OPSET = 23  # onnxscript 0.7's newest opset module
EXPORTED_POLICIES = ("streaming",)


@dataclass(frozen=True)
class CacheTensor:
    """One tensor of the state a runtime keeps between steps."""

    name: str
    shape: tuple[int, ...]
    dtype: str        # numpy dtype name
    fill: float       # every element's value before the first step


def export_onnx(model: nn.Module, path: str | os.PathLike, options: Mapping[str, Any] | KVConfig | None = None,
                max_cache_len: int = 256, batch_size: int = 1, opset: int = MAX_OPSET,
                rewrite: bool = True, optimize: bool = True) -> list[CacheTensor]:
    """Export `model` (a HF causal LM) with kvfx's cache `options` to the ONNX file `path`.

    rewrite=False exports the same step without kvfx (the model's own attention over an fp cache),
    the baseline a benchmark compares with. optimize=False skips onnxscript's graph optimizer (its
    fusion rewriter took over 10 minutes on SmolLM2's 30-layer int4 graph on a 2-core CPU; onnxruntime
    optimizes the graph again when it loads it). Returns the cache tensors (also in the file's metadata).
    """
    config = KVConfig.from_options(options)
    _check_opset(config.kv, opset)
    _check_policy(config)
    _require_onnx()
    if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise KVFXError(f"export_onnx needs batch_size >= 1 and max_cache_len >= 2, got {batch_size}, {max_cache_len}")
    step = capture_step(model.eval(), batch_size, max_cache_len)
    original = [n for n in step.gm.graph.nodes if n.op == "placeholder"]
    plan = rewrite_graph(step.gm, config, 0) if rewrite else GraphPlan()
    _warn_unrewritten(plan, config)
    cache, roles = _cache_inputs(step, original, plan, config)
    functionalize(step.gm, [node for node, _ in cache])
    module = _ExportedStep(step, roles).eval()
    inputs = _example_inputs(step, cache)
    names = [tensor.name for _, tensor in cache]
    tokens = torch.export.Dim("tokens", min=1, max=max_cache_len)
    program = torch.onnx.export(
        module, inputs, dynamo=True, opset_version=opset, custom_translation_table=_table(),
        input_names=["input_ids", "past_len", *names], output_names=["logits", *(f"new.{n}" for n in names)],
        dynamic_shapes=(({1: tokens}, None, *(None for _ in names)),),  # one tuple: forward(*args)
        optimize=optimize, report=False)
    program.model.metadata_props[METADATA_KEY] = json.dumps([asdict(t) for _, t in cache])
    program.save(os.fspath(path), external_data=False)
    return [t for _, t in cache]


def _check_opset(kv: str, opset: int) -> None:
    if kv not in FORMAT_OPSETS:
        raise KVFXError(f"kvfx has no ONNX lowering for kv={kv!r}; formats with one: "
                        f"{', '.join(repr(f) for f in FORMAT_OPSETS)}")
    need = FORMAT_OPSETS[kv]
    if not isinstance(opset, int) or opset < need:
        raise KVFXError(f"ONNX export of kv={kv!r} needs opset >= {need} (ONNX Attention); got opset={opset!r}")
    if opset > MAX_OPSET:
        raise KVFXError(f"opset={opset} is newer than this exporter writes; use {need} <= opset <= {MAX_OPSET}")


def _check_policy(config: KVConfig) -> None:
    """Eviction policies with an export: StreamingLLM with a token-count budget (lowering/onnx_ops.py)."""
    if config.policy == "none":
        return
    if config.policy not in EXPORTED_POLICIES:
        raise KVFXError(f"kvfx has no ONNX lowering for policy={config.policy!r}; policies with one: "
                        f"{', '.join(repr(p) for p in EXPORTED_POLICIES)}")
    if isinstance(config.budget, float):
        raise KVFXError(f"kvfx's ONNX export of policy={config.policy!r} needs a token-count budget (an int); "
                        f"got budget={config.budget!r}")


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise KVFXError(f"kvfx.export_onnx needs {err.name}: pip install kvfx[onnx]") from err


def _table() -> dict:
    from kvfx.lowering.onnx_ops import translation_table

    return translation_table()


def _warn_unrewritten(plan: GraphPlan, config: KVConfig) -> None:
    for site in plan.sites:
        if not site.rewritten:
            warnings.warn(f"kvfx export: attention site {site.layer} ({site.pattern}) is exported unchanged, its "
                          f"cache kept in the model dtype instead of kv={config.kv!r}: {site.reason}", stacklevel=3)


def _cache_inputs(step: CapturedStep, original: list, plan: GraphPlan, config: KVConfig):
    """The graph's cache inputs, in order: each layer's fp buffers that the graph still reads, then each
    rewritten site's store tensors. Unread fp buffers leave the graph. Returns ([(node, CacheTensor)],
    the role of every remaining placeholder)."""
    graph = step.gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    roles = {node: step.placeholders[i] for i, node in enumerate(original)}
    cache = []
    dtype = _numpy_dtype(step.kv_dtype)
    for node in original:
        role = roles[node].role
        if role[0] != "input" or role[1] < 2:
            continue
        if not node.users:
            graph.erase_node(node)
            continue
        index = role[1] - 2
        name = f"layer{index // 2}.{'key' if index % 2 == 0 else 'value'}"
        cache.append((node, CacheTensor(name, step.kv_shape, dtype, 0.0)))
    store_nodes = placeholders[len(original):]
    fmt = config.format
    for slot in plan.slots:
        tensors = fmt.allocate(step.kv_shape, slot.dtype, torch.device("cpu"), slot.layer, step.layers).tensors()
        for name, tensor in zip(fmt.tensor_names, tensors):
            node = store_nodes.pop(0)
            cache.append((node, CacheTensor(f"layer{slot.layer}.{name}", tuple(tensor.shape),
                                            _numpy_dtype(tensor.dtype), _fill(tensor))))
    order = [node for node, _ in cache]
    final_roles = []
    for node in (n for n in graph.nodes if n.op == "placeholder"):
        final_roles.append(Placeholder(("arg", 2 + order.index(node))) if node in order else
                           Placeholder(("arg", roles[node].role[1])) if roles[node].role[0] == "input" else
                           roles[node])
    return cache, final_roles


def _fill(tensor: torch.Tensor) -> float:
    """The one value an empty store tensor is filled with (formats allocate constant tensors)."""
    if tensor.numel() == 0:
        return 0.0
    first = tensor.flatten()[0]
    if not torch.equal(tensor, torch.full_like(tensor, first.item())):
        raise KVFXError("a kvfx store is allocated with non-constant content; the export cannot describe it")
    return float(first)


def _numpy_dtype(dtype: torch.dtype) -> str:
    names = {torch.float32: "float32", torch.float16: "float16", torch.uint8: "uint8", torch.int32: "int32",
             torch.int64: "int64"}
    if dtype not in names:
        raise KVFXError(f"kvfx ONNX export supports caches in {', '.join(map(str, names))}; got {dtype}")
    return names[dtype]


def _example_inputs(step: CapturedStep, cache) -> tuple:
    batch = step.kv_shape[0]
    tensors = [torch.full(t.shape, t.fill, dtype=getattr(torch, t.dtype)) for _, t in cache]
    return (torch.zeros(batch, 2, dtype=torch.long), torch.tensor(0), *tensors)


class _ExportedStep(nn.Module):
    """The rewritten graph as a module: the model's weights as its own tensors (ONNX initializers),
    the step's inputs and cache as arguments."""

    def __init__(self, step: CapturedStep, roles: list[Placeholder]):
        super().__init__()
        self.gm = step.gm
        self.roles = roles
        self.attr = {}
        for name, tensor in step.params.items():
            attr = re.sub(r"\W", "_", name)
            self.attr[name] = attr
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(attr, tensor)
            else:
                self.register_buffer(attr, tensor)

    def forward(self, *args: torch.Tensor):
        feed = []
        for placeholder in self.roles:
            kind, *where = placeholder.role
            if kind == "arg":
                feed.append(args[where[0]])
            elif kind == "size":
                feed.append(args[where[0]].shape[where[1]])
            else:
                feed.append(getattr(self, self.attr[where[0]]))
        return tuple(self.gm(*feed))
