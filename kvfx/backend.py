"""The ``kvfx`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point).

    dynamo FX graph -> passes (match + rewrite attention/cache sites into kvfx ops)
                    -> inductor (everything else) -> runtime wrapper (hands each call its stores)
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from kvfx.config import KVConfig
from kvfx.errors import KVFXError
from kvfx.passes.fx_utils import written_placeholders
from kvfx.passes.rewrite import rewrite_graph
from kvfx.reporting import clear_sessions, session_for
from kvfx.runtime import FreedKVBuffer, cat_store_examples, make_runner


def kvfx_backend(gm: fx.GraphModule, example_inputs: list[Any], options: Any = None) -> Callable:
    config = KVConfig.from_options(options)  # bad options fail here, before any tensor is touched
    session = session_for(config)
    gm = _private_copy(gm)
    plan = rewrite_graph(gm, config, graph_index=len(session.graphs))
    session.add_graph(plan.sites)
    skipped = [s for s in plan.sites if not s.rewritten]
    if config.strict and skipped:
        s = skipped[0]
        raise KVFXError(f"kvfx strict mode: attention site {s.layer} of graph {s.graph} was not rewritten: {s.reason}")
    examples = [_plain(x) for x in example_inputs]
    fmt = config.format
    # The store inputs the rewrite appended: their fake example values, whose sizes are expressions of
    # the cache buffer's (symbolic) sizes. Real tensors here would be re-fakeified with fresh sizes, and
    # duck sizing would tie a store dim to any graph size of equal value (a prompt of 16 tokens with a
    # head dim of 16), an assumption a later call breaks.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    appended = placeholders[len(examples):len(placeholders) - len(cat_store_examples(plan))]
    examples += [n.meta["example_value"] for n in appended]
    examples += cat_store_examples(plan)
    from torch._inductor.compile_fx import compile_fx

    patches = None
    if config.cudagraphs and _decode_graph(gm):
        # Cudagraph trees skip a graph that writes a non-static input. The inputs written are kvfx's
        # stores and the model's cache tensors (HF: kv="none" keys/values, cumulative_length), all
        # living as long as their cache: static, so replays keep their addresses, and a new cache
        # (new addresses) re-records.
        for node in {*appended, *written_placeholders(gm.graph)}:
            node.meta["tensor_dict"] = {**node.meta.get("tensor_dict", {}), "_dynamo_static_input_type": "unguarded"}
        patches = {"triton.cudagraphs": True}
    compiled = compile_fx(gm, examples, config_patches=patches)
    return make_runner(compiled, plan, session, fmt)


ATTENTION_OPS = ("attend", "kivi_attend", "policy_attend")


def _decode_graph(gm: fx.GraphModule) -> bool:
    """Whether the graph is a decode step on CUDA: kvfx attention sites, each of one query token."""
    queries = [n.args[0].meta.get("example_value") for n in gm.graph.nodes if n.op == "call_function"
               and getattr(n.target, "namespace", None) == "kvfx" and n.target._opname in ATTENTION_OPS]
    return bool(queries) and all(q is not None and q.is_cuda and q.dim() == 4 and q.shape[2] == 1 for q in queries)


def _private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of dynamo's graph to rewrite: dynamo reads its own graph again after the backend returns."""
    graph = fx.Graph()
    nodes: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, nodes))
    for old, new in nodes.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    return copy


def _plain(x: Any) -> Any:
    """Inductor sees freed buffers as the plain (unread) tensors they are."""
    if isinstance(x, FreedKVBuffer):
        with torch._C.DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor)
    return x


# torch._dynamo.reset() drops every compiled graph and calls the backend's reset: drop the reports too.
kvfx_backend.reset = clear_sessions
