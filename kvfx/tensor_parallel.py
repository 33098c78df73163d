"""Head-sharded tensor parallelism for transformers' Llama (gpt-fast style), to run kvfx on several GPUs.

A rank's shard is a LlamaForCausalLM built from `shard_config`: 1/tp of the query heads, KV heads and
MLP width, the same hidden size and an explicit head_dim. Its q/k/v/gate/up projections are column
shards (rows of the full model's weights), its o_proj/down_proj row shards (columns), and a forward hook
all-reduces each o_proj/down_proj output: a functional collective, which dynamo traces into the graph
outside kvfx's attention sites. Embeddings, norms and lm_head are replicated. Each rank's StaticCache and
kvfx stores then hold that rank's KV heads only; nothing in kvfx crosses heads, so the rewrite is unchanged.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from kvfx.errors import KVFXError

COLUMN_SHARDED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output features split over ranks
ROW_SHARDED = ("o_proj", "down_proj")  # input features split: each rank's output is a partial sum


def shard_config(config, tp: int):
    """The config of one rank's shard of a Llama config (a copy; the full config is unchanged)."""
    sizes = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
             "intermediate_size": config.intermediate_size}
    for name, size in sizes.items():
        if size % tp:
            raise KVFXError(f"tensor parallelism: tp={tp} does not divide {name}={size}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise KVFXError("tensor parallelism: biased projections are not sharded here (the all-reduce would add "
                        "o_proj/down_proj biases tp times)")
    shard = copy.deepcopy(config)
    # head_dim first: its default is hidden_size // num_attention_heads, which the split would change.
    shard.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for name, size in sizes.items():
        setattr(shard, name, size // tp)
    return shard


def sharded_linears(model) -> dict[str, torch.nn.Linear]:
    """The model's column- and row-sharded projections by qualified name."""
    return {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in COLUMN_SHARDED + ROW_SHARDED}


@torch.no_grad()
def draw_shard_weights(model, seed: int, rank: int, std: float) -> None:
    """Redraw the sharded projections of a shard built from `seed` on every rank with a generator of
    seed + 1 + rank, so each rank holds different heads (as slices of a real checkpoint would) while
    the replicated weights, drawn from `seed`, stay equal on every rank. std: the config's
    initializer_range (HF's init of a Linear)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 1 + rank)
    for module in sharded_linears(model).values():  # one stream: layers and projections differ
        module.weight.normal_(0.0, std, generator=generator)


def all_reduce_row_shards(model, group=None) -> list:
    """Sum each o_proj/down_proj output over the ranks of `group` (default: the world); the hook handles."""
    group = group if group is not None else dist.group.WORLD

    def all_reduce(module, args, output):
        return funcol.all_reduce(output, "sum", group)

    return [m.register_forward_hook(all_reduce) for name, m in sharded_linears(model).items()
            if name.rsplit(".", 1)[-1] in ROW_SHARDED]
