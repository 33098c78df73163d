"""Tensor parallelism (kvfx.tensor_parallel) is exact: on two gloo processes, a TP=2 tiny Llama computes
the logits of the one-process model whose weights are its shards concatenated, eagerly and under
backend kvfx (kv none and int8), and each rank's kvfx graphs rewrite their sites over that rank's heads.

The test launches this file under torchrun (`python -m torch.distributed.run --standalone`, a free port);
`check_rank` runs on every rank and fails the run with its assertion.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from kvfx.errors import KVFXError
from kvfx.models import tiny_config
from kvfx.tensor_parallel import COLUMN_SHARDED, ROW_SHARDED, all_reduce_row_shards, draw_shard_weights, shard_config

PROMPT, DECODE_STEPS = 9, 3


def decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a prefill of ids[:, :PROMPT] (every position) then DECODE_STEPS one-token steps fed
    ids[:, PROMPT:] (teacher forcing: both models see the same tokens), through a StaticCache; the
    cache comes back too, since kvfx.report counts only live caches."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=32)
    pos = torch.arange(PROMPT)
    with torch.no_grad():
        logits = [model(ids[:, :PROMPT], past_key_values=cache, cache_position=pos, position_ids=pos[None]).logits]
        for step in range(PROMPT, PROMPT + DECODE_STEPS):
            at = torch.tensor([step])
            logits.append(model(ids[:, step:step + 1], past_key_values=cache, cache_position=at,
                                position_ids=at[None]).logits)
    return torch.cat(logits, dim=1), cache


def unsharded(shard, full_config):
    """The one-process model of the ranks' shards: column shards' rows and row shards' columns
    concatenated in rank order; replicated weights checked equal on every rank."""
    from transformers import LlamaForCausalLM

    state = {}
    for name, tensor in shard.state_dict().items():
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        kind = name.rsplit(".", 2)[-2]  # "...self_attn.q_proj.weight" -> "q_proj"
        if kind in COLUMN_SHARDED or kind in ROW_SHARDED:
            state[name] = torch.cat(parts, dim=0 if kind in COLUMN_SHARDED else 1)
        else:
            assert all(torch.equal(p, tensor) for p in parts), f"{name} differs between ranks"
            state[name] = tensor
    full = LlamaForCausalLM._from_config(full_config, attn_implementation="sdpa").eval()
    full.load_state_dict(state)
    return full


def compiled(model, eager_forward, options):
    torch._dynamo.reset()  # also drops kvfx's reports, which are per options, not per model
    model.forward = torch.compile(eager_forward, backend="kvfx", options=options)
    return model


def check_rank() -> None:
    import kvfx
    from transformers import LlamaForCausalLM

    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    full_config = tiny_config("llama")  # 4 query / 2 KV heads, head dim 16, MLP 128
    torch.manual_seed(0)
    shard = LlamaForCausalLM._from_config(shard_config(full_config, tp), attn_implementation="sdpa").eval()
    draw_shard_weights(shard, seed=0, rank=dist.get_rank(), std=full_config.initializer_range)
    all_reduce_row_shards(shard)
    assert shard.model.layers[0].self_attn.k_proj.out_features == 16  # 1 of 2 KV heads
    full = unsharded(shard, full_config)
    ids = torch.randint(0, full_config.vocab_size, (1, PROMPT + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(1))
    # fp32: the row shards' partial sums are added in another order than the full matmul's, no more
    close = dict(rtol=1e-4, atol=1e-5)
    eager, full_cache = decode_logits(full, ids)
    full_fp_bytes = sum(t.numel() * t.element_size() for layer in full_cache.layers for t in (layer.keys, layer.values))
    torch.testing.assert_close(decode_logits(shard, ids)[0], eager, **close)

    # the references: kv none stores the fp cache (eager's logits and bytes); int8, the full model under kvfx
    full_int8, full_int8_cache = decode_logits(compiled(full, full.forward, {"kv": "int8"}), ids)
    full_int8_bytes = kvfx.report(full).kv_bytes  # while full_int8_cache lives: the report counts live caches
    assert 0 < full_int8_bytes < full_fp_bytes
    references = {"none": (eager, full_fp_bytes), "int8": (full_int8, full_int8_bytes)}
    shard_forward = shard.forward
    for kv, (expected, full_kv_bytes) in references.items():
        logits, cache = decode_logits(compiled(shard, shard_forward, {"kv": kv}), ids)
        report = kvfx.report(shard)
        assert report.found == report.rewritten == 4, str(report)  # 2 layers x (prefill, decode)
        torch.testing.assert_close(logits, expected, **close)
        # each rank's cache and store hold its heads: 1/tp of the full model's bytes
        assert (report.kv_bytes * tp, report.fp_kv_bytes * tp) == (full_kv_bytes, full_fp_bytes)
    dist.destroy_process_group()


@pytest.mark.heavy  # about 65 s on 2 cores, cold compile cache: 6 kvfx graphs per rank
def test_tp2_logits_equal_the_concatenated_model():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          __file__], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]


def test_shard_config_splits_heads_and_checks_divisibility():
    full = tiny_config("llama")
    shard = shard_config(full, 2)
    assert (shard.num_attention_heads, shard.num_key_value_heads, shard.intermediate_size, shard.head_dim,
            shard.hidden_size) == (2, 1, 64, 16, 64)
    assert full.num_attention_heads == 4  # a copy
    with pytest.raises(KVFXError, match="tp=4 does not divide num_key_value_heads=2"):
        shard_config(full, 4)


if __name__ == "__main__":
    check_rank()
