"""End-to-end decode on a Llama-3-8B-shaped model (random bf16 weights): inductor vs kvfx formats.

The model is transformers' LlamaForCausalLM at the Llama-3-8B shape (32 layers, hidden 4096, 32/8
heads, head dim 128, vocab 128256) with random weights built on the device, decoding through a
StaticCache with `model.forward` compiled by `torch.compile` (backend "inductor", or "kvfx" with
the config's options). For each config and batch: prefill a random prompt of `--context` tokens,
then time `--steps` one-token decode steps (CUDA-synchronized wall time per step, median), the
first call's time (compilation included), peak GPU memory, and the KV bytes held
(`kvfx.report(...).kv_bytes`; the fp cache for inductor). Writes e2e.json and e2e.png.

example: python benchmarks/e2e.py --context 8192 --batch 1 4 --configs inductor kvfx-none kvfx-int4
         python benchmarks/e2e.py --tiny --device cpu        (a smoke run of the script itself)
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from common import RESULTS, environment, plot_speedups, write_json
import kvfx

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=4096)
CONFIGS = {
    "inductor": dict(backend="inductor"),
    "kvfx-none": dict(backend="kvfx", options={"kv": "none"}),
    "kvfx-int8": dict(backend="kvfx", options={"kv": "int8"}),
    "kvfx-int4": dict(backend="kvfx", options={"kv": "int4"}),
    "kvfx-h2o-20%": dict(backend="kvfx", options={"policy": "h2o", "budget": 0.2}),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_config(model, eager_forward, name: str, batch: int, context: int, steps: int, device: str) -> dict:
    torch._dynamo.reset()
    model.forward = torch.compile(eager_forward, **CONFIGS[name])
    row = dict(config=name, batch=batch, context=context)
    gen = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device=device, generator=gen)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 2)
        start = time.perf_counter()
        logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:]
        sync(device)
        row["prefill_first_s"] = time.perf_counter() - start  # compilation included
        times = []
        for i in range(steps + 1):
            token = logits.argmax(-1)
            pos = torch.full((batch, 1), context + i, device=device)
            sync(device)
            start = time.perf_counter()
            logits = model(token, past_key_values=cache, position_ids=pos, use_cache=True).logits
            sync(device)
            times.append(time.perf_counter() - start)
        row["decode_first_s"] = times[0]  # the decode graph's compilation
        row["median_step_ms"] = statistics.median(times[1:]) * 1e3
        row["tokens_per_s"] = batch / (row["median_step_ms"] / 1e3)
        if name.startswith("kvfx"):
            rep = kvfx.report(model.forward)
            row["kv_bytes"], row["fp_kv_bytes"] = rep.kv_bytes, rep.fp_kv_bytes
        else:
            row["kv_bytes"] = row["fp_kv_bytes"] = sum(t.numel() * t.element_size() for l in cache.layers
                                                       for t in (l.keys, l.values))
        if device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del cache, logits
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as exc:  # noqa: BLE001  (recorded, the sweep goes on)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    model.forward = eager_forward
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example:" + __doc__.split("example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[8192])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps (median reported)")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (32)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke test of the script)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for e2e.json / e2e.png")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("e2e: no CUDA GPU here; run it on the GPU machine, or --tiny --device cpu", file=sys.stderr)
        return 2
    shape = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with torch.device(args.device):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=dtype).eval()
    eager_forward = model.forward
    rows = []
    plan = [(c, b, n) for n in args.context for b in args.batch for c in args.configs]
    for name, batch, context in tqdm(plan, desc="e2e", unit="run"):
        row = run_config(model, eager_forward, name, batch, context, args.steps, args.device)
        rows.append(row)
        tqdm.write(f"{name:<14} B{batch:<3} ctx {context:<6} " + (
            f"{row['median_step_ms']:8.2f} ms/step {row['tokens_per_s']:8.1f} tok/s  first prefill "
            f"{row['prefill_first_s']:.1f}s  KV {row['kv_bytes'] / 2**30:.2f} GiB" if "error" not in row else row["error"]))
        for r in rows:  # ratios so far; the JSON is rewritten after every run (a long sweep may be cut off)
            base = next((x for x in rows if x["config"] == "inductor" and x["batch"] == r["batch"]
                         and x["context"] == r["context"] and "tokens_per_s" in x), None)
            if base and "tokens_per_s" in r:
                r["speedup_vs_inductor"] = r["tokens_per_s"] / base["tokens_per_s"]
        write_json(args.out / "e2e.json", {"benchmark": "e2e", "environment": environment(), "model": shape,
                                           "dtype": str(dtype), "steps": args.steps, "rows": rows})
    plot_speedups(args.out / "e2e.png", [r for r in rows if "tokens_per_s" in r], "context", "batch", "config",
                  "tokens_per_s", f"decode tokens/s, Llama-3-8B shape ({environment()['device']})", "tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
