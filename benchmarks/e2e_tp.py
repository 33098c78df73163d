"""End-to-end decode with tensor parallelism (heads sharded over tp GPUs): inductor vs kvfx formats.

e2e.py's benchmark (Llama-3-8B shape, random bf16 weights, StaticCache, chunked prefill, timed decode
steps, the same configs and options) with the model split over the processes of a torchrun launch,
gpt-fast style (kvfx.tensor_parallel): each rank builds its shard directly, 1/tp of the query heads, KV
heads and MLP width (replicated embeddings, norms and lm_head from seed 0 on every rank; its projections
from seed 1 + rank); the all-reduces after o_proj and down_proj are functional collectives inside each
rank's compiled graph, and each rank's StaticCache and kvfx stores hold its own KV heads. tp is the world
size (NCCL on CUDA, one GPU per rank; gloo on the CPU); it must divide the KV heads (8). Each rank times
its own steps; a row has e2e.py's fields from the slowest rank (median step, first calls, per-GPU peak
memory), tp, and the KV bytes summed over the ranks (kv_bytes, fp_kv_bytes) and per rank
(kv_bytes_per_rank). Rank 0 prints progress and writes e2e_tp.json and e2e_tp.png.

example: torchrun --nproc-per-node 2 benchmarks/e2e_tp.py --context 8192 --batch 1 4 --configs inductor kvfx-none kvfx-int4
         cd benchmarks; python -P -m torch.distributed.run --nproc-per-node 2 e2e_tp.py --context 32768 --batch 8 --configs kvfx-int4+cg --out /tmp/r
         torchrun --nproc-per-node 2 benchmarks/e2e_tp.py --tiny --device cpu --batch 1 --context 256 --steps 2   (a smoke run on gloo)
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig

from e2e import build_model, build_parser, model_shape, run_config, sweep
from kvfx.errors import KVFXError
from kvfx.tensor_parallel import all_reduce_row_shards, draw_shard_weights, shard_config

TIMES = ("median_step_ms", "prefill_first_s", "decode_first_s", "peak_gib")  # the slowest rank's counts


def merge(rows: list[dict]) -> dict:
    """One row from every rank's row of the same run (rank order)."""
    row = dict(rows[0], tp=len(rows))
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        return {**{k: row[k] for k in ("config", "batch", "context", "tp")}, "error": errors[0]}
    row.update({key: max(r[key] for r in rows) for key in TIMES if key in row})
    row["tokens_per_s"] = row["batch"] / (row["median_step_ms"] / 1e3)
    row["kv_bytes_per_rank"] = [r["kv_bytes"] for r in rows]
    row["kv_bytes"], row["fp_kv_bytes"] = sum(r["kv_bytes"] for r in rows), sum(r["fp_kv_bytes"] for r in rows)
    return row


def main(argv=None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("e2e_tp: launch one process per GPU with torchrun, e.g. "
              "torchrun --nproc-per-node 2 e2e_tp.py ... (see --help)", file=sys.stderr)
        return 2
    tp, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    shape = model_shape(args)
    config = LlamaConfig(**shape)
    try:
        shard = shard_config(config, tp)
    except KVFXError as exc:
        print(f"e2e_tp: world size {tp}: {exc}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        if torch.cuda.device_count() <= local_rank:
            print(f"e2e_tp: local rank {local_rank} has no GPU ({torch.cuda.device_count()} here); "
                  "run it on the GPU machine with --nproc-per-node <= GPUs, or --tiny --device cpu", file=sys.stderr)
            return 2
        torch.cuda.set_device(local_rank)  # "cuda" below (model, cache, prompt, syncs) is this rank's GPU
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(shard, args.device, dtype)
    draw_shard_weights(model, seed=0, rank=rank, std=config.initializer_range)
    all_reduce_row_shards(model)
    eager_forward = model.forward

    def run(name: str, batch: int, context: int) -> dict:
        row = run_config(model, eager_forward, name, batch, context, args.steps, args.device, args.prefill_chunk,
                         args.profile, args.fill)
        rows = [None] * tp
        dist.all_gather_object(rows, row)  # every rank merges: all take the same out-of-memory skips
        return merge(rows)

    sweep(args, run, "e2e_tp", shape, dtype, f"Llama-3-8B shape, TP={tp}", header={"tp": tp}, output=rank == 0)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
