"""Capture one generation step of a HF causal LM as a dynamo graph whose cache is explicit inputs.

`StepModule.forward(input_ids, past_len, *kv)` is a prefill (T prompt tokens, past_len 0) or a
decode step (T = 1) over a HF `StaticCache` whose per-layer key/value buffers [B, Hkv, S, D] are the
`kv` arguments and whose length is `past_len` (a 0-d int64 tensor): nothing the step depends on lives
in Python state, so the captured graph can be exported and driven by a runtime. The sequence length
T stays symbolic (one graph serves prefill and decode).

The graph is dynamo's torch-IR graph, the same kind the kvfx backend rewrites, so the export reuses
`kvfx.passes` unchanged. Its placeholders are classified by what the caller passes for them
(`Placeholder.role`): the step's own inputs, a size of one of them, or a model parameter/buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from kvfx.errors import KVFXError


class StepModule(nn.Module):
    """One forward step of `model` over a static cache held in the arguments (see module docstring)."""

    def __init__(self, model: nn.Module, cache: Any):
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, input_ids: torch.Tensor, past_len: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = kv[2 * i], kv[2 * i + 1]
            # Each layer advances its own length in place (HF StaticLayer.update): give each a copy,
            # and point them back at the input afterwards so that the graph returns only the logits.
            layer.cumulative_length = past_len.clone()
        logits = self.model(input_ids, past_key_values=self.cache, use_cache=True).logits
        for layer in self.cache.layers:
            layer.cumulative_length = past_len
        return logits


@dataclass(frozen=True)
class Placeholder:
    """What the caller passes for one graph input: ("input", argument index), ("size", argument
    index, dim) for a symbolic size, or ("param", qualified name) for a model parameter or buffer."""

    role: tuple


@dataclass
class CapturedStep:
    gm: fx.GraphModule
    placeholders: list[Placeholder]
    params: dict[str, torch.Tensor]   # qualified name -> the model's tensor
    kv_shape: tuple[int, int, int, int]
    kv_dtype: torch.dtype
    layers: int


def static_cache(model: nn.Module, batch_size: int, max_cache_len: int):
    """A HF StaticCache with its buffers allocated (zeros), and the buffers' shape."""
    from transformers import StaticCache

    config = model.config
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(model.parameters()).dtype
    probe = torch.zeros(batch_size, heads, 1, head_dim, dtype=dtype)
    for layer in cache.layers:
        layer.lazy_initialization(probe, probe)
    return cache, (batch_size, heads, max_cache_len, head_dim), dtype


def capture_step(model: nn.Module, batch_size: int, max_cache_len: int) -> CapturedStep:
    """Trace `StepModule` with dynamo (fullgraph, symbolic T) and classify the graph's inputs."""
    cache, kv_shape, dtype = static_cache(model, batch_size, max_cache_len)
    step = StepModule(model, cache)
    tokens = min(4, max_cache_len)  # > 1, so dynamo does not specialize the length to 0/1
    input_ids = torch.zeros(batch_size, tokens, dtype=torch.long)
    torch._dynamo.mark_dynamic(input_ids, 1)
    kv = [torch.zeros(kv_shape, dtype=dtype) for _ in range(2 * len(cache.layers))]
    captured: list[tuple[fx.GraphModule, list]] = []

    def record(gm: fx.GraphModule, example_inputs: list) -> Any:
        captured.append((gm, list(example_inputs)))
        return gm.forward

    args = (input_ids, torch.tensor(0), *kv)
    try:
        with torch.no_grad():
            torch.compile(step, backend=record, fullgraph=True)(*args)
    except Exception as err:  # dynamo's own message says where the trace broke
        raise KVFXError(f"kvfx could not capture the model's step as one graph for export: {err}") from err
    finally:
        torch._dynamo.reset_code(StepModule.forward.__code__)  # later captures start fresh
    gm, examples = captured[-1]
    named = {id(t): name for name, t in (*model.named_parameters(), *model.named_buffers())}
    params, roles = {}, []
    for node, example in zip([n for n in gm.graph.nodes if n.op == "placeholder"], examples):
        role = _role(node, example, args, named)
        if role[0] == "param":
            params[role[1]] = example
        roles.append(Placeholder(role))
    return CapturedStep(gm, roles, params, kv_shape, dtype, len(cache.layers))


def _role(node: fx.Node, example: Any, args: tuple, named: dict[int, str]) -> tuple:
    for i, arg in enumerate(args):
        if example is arg:
            return ("input", i)
    if id(example) in named:
        return ("param", named[id(example)])
    source = getattr(node, "_dynamo_source", None)
    # A symbolic size: dynamo names its origin, e.g. TensorPropertySource(LocalSource('input_ids'), SIZE, 1).
    base = getattr(getattr(source, "base", None), "local_name", None)
    if isinstance(example, (int, torch.SymInt)) and base == "input_ids" and getattr(source, "idx", None) is not None:
        return ("size", 0, source.idx)
    raise KVFXError(f"graph input {node.name} is neither a step input nor a model parameter; kvfx cannot "
                    "export a graph that reads other Python state")
