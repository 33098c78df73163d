"""onnxruntime CPU decode tokens/s: kvfx's int4 ONNX export vs the same model exported without kvfx.

Both graphs come from `kvfx.export_onnx` (the baseline with rewrite=False: the model's own attention
over an fp cache, the cache still explicit inputs/outputs) and run in the same `OrtGenerator` loop:
a prompt of `--context` random tokens, then `--steps` greedy decode steps, each timed. Reports the
median step time, tokens/s, the cache bytes the loop holds between steps, and writes
benchmarks/results/onnx_decode.json.

Model: `--model random` is a random-weight Llama with SmolLM2-135M's attention shape (9 query / 3 KV
heads, head dim 64, hidden 576) and fewer layers; `--model smollm2` the embedded SmolLM2-135M.

example: python benchmarks/onnx_decode.py --context 2048 --steps 32 --threads 2
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np
import onnxruntime
import torch

import kvfx
from kvfx.lowering.ort_loop import OrtGenerator
from kvfx.models import load_smollm2, tiny_model

from common import RESULTS, environment, write_json


def load(name: str, layers: int):
    if name == "smollm2":
        return load_smollm2()[0]
    return tiny_model("llama", seed=0, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=4096,
                      max_position_embeddings=8192)


def measure(model, options, rewrite: bool, context: int, steps: int, threads: int, folder: pathlib.Path) -> dict:
    path = folder / f"{'kvfx' if rewrite else 'fp'}.onnx"
    start = time.perf_counter()
    kvfx.export_onnx(model, path, options, max_cache_len=context + steps, rewrite=rewrite)
    export_s = time.perf_counter() - start
    generator = OrtGenerator(path, threads=threads)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, context))
    stamps = []
    start = time.perf_counter()
    generator.generate(prompt, steps, on_token=lambda i: stamps.append(time.perf_counter()))
    prefill_s = stamps[0] - start
    step_times = np.diff(stamps)  # one graph run (a decode step) between consecutive tokens
    median = float(statistics.median(step_times))
    return {"export_s": export_s, "prefill_s": prefill_s, "median_step_ms": median * 1e3,
            "p10_step_ms": float(np.percentile(step_times, 10)) * 1e3,
            "p90_step_ms": float(np.percentile(step_times, 90)) * 1e3,
            "tokens_per_s": 1.0 / median, "cache_bytes": generator.cache_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("random", "smollm2"), default="random")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv", default="int4")
    parser.add_argument("--out", default=str(RESULTS / "onnx_decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model, args.layers)
    options = {"kv": args.kv}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rewrite in (("fp cache (no kvfx)", False), (f"kvfx {args.kv}", True)):
            rows[name] = measure(model, options, rewrite, args.context, args.steps, args.threads, pathlib.Path(tmp))
            print(name, {k: round(v, 3) for k, v in rows[name].items()})
    fp, ours = rows["fp cache (no kvfx)"], rows[f"kvfx {args.kv}"]
    config = model.config
    write_json(pathlib.Path(args.out), {
        "env": {**environment(), "onnxruntime": onnxruntime.__version__, "threads": args.threads,
                "load_average_1min": os.getloadavg()[0],
                "note": "shared 2-core CPU machine: timings are indicative only"},
        "model": args.model, "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads, "head_dim": config.hidden_size // config.num_attention_heads,
        "context": args.context, "steps": args.steps, "options": options, "results": rows,
        "speed_vs_fp": ours["tokens_per_s"] / fp["tokens_per_s"], "cache_vs_fp": ours["cache_bytes"] / fp["cache_bytes"],
    })


if __name__ == "__main__":
    main()
