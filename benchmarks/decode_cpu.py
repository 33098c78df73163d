"""Decode tokens/s of the embedded SmolLM2 on this CPU: eager, inductor, kvfx none, kvfx int8.

Each config decodes `--steps` tokens after a prompt of each `--contexts` length (random token ids:
decode speed does not depend on the text), through a transformers StaticCache, calling the model's
forward directly (no generate() overhead). Reports the median step time and tokens/s, and the ratio
to inductor in the same run; writes benchmarks/results/decode_cpu.json and decode_cpu.png.

example: python benchmarks/decode_cpu.py --contexts 512 2048 --steps 64
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import subprocess

import torch
from tqdm import tqdm
from transformers import StaticCache

from kvfx.decode import decode_steps
from kvfx.models import load_smollm2

RESULTS = pathlib.Path(__file__).parent / "results"
CONFIGS = {
    "eager": None,
    "inductor": dict(backend="inductor"),
    "kvfx none": dict(backend="kvfx", options={"kv": "none"}),
    "kvfx int8": dict(backend="kvfx", options={"kv": "int8"}),
}


def measure(model, eager_forward, compile_kwargs, context: int, steps: int) -> dict:
    torch._dynamo.reset()
    model.forward = eager_forward if compile_kwargs is None else torch.compile(eager_forward, **compile_kwargs)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache_len = context + steps  # the same for warm-up and measurement: a new length would recompile
    decode_steps(model, prompt, 4, cache=StaticCache(config=model.config, max_cache_len=cache_len))
    _, times = decode_steps(model, prompt, steps, cache=StaticCache(config=model.config, max_cache_len=cache_len))
    model.forward = eager_forward
    median = statistics.median(times)
    return {"context": context, "steps": steps, "median_step_ms": median * 1e3,
            "p10_step_ms": sorted(times)[len(times) // 10] * 1e3, "p90_step_ms": sorted(times)[9 * len(times) // 10] * 1e3,
            "tokens_per_s": 1.0 / median}


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(CONFIGS)
    for i, name in enumerate(CONFIGS):
        values = [next(r["tokens_per_s"] for r in rows if r["config"] == name and r["context"] == c) for c in contexts]
        ax.bar([j + i * width for j in range(len(contexts))], values, width, label=name)
    ax.set_xticks([j + width * (len(CONFIGS) - 1) / 2 for j in range(len(contexts))], [f"{c} tokens" for c in contexts])
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"SmolLM2-135M decode on CPU ({torch.get_num_threads()} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    model, _ = load_smollm2()
    eager_forward = model.forward
    rows = []
    jobs = [(c, name) for c in args.contexts for name in CONFIGS]
    for context, name in tqdm(jobs, desc="configs (each compiles once)"):
        rows.append({"config": name, **measure(model, eager_forward, CONFIGS[name], context, args.steps)})
    for row in rows:
        base = next(r for r in rows if r["config"] == "inductor" and r["context"] == row["context"])
        row["vs_inductor"] = row["tokens_per_s"] / base["tokens_per_s"]
        print(f"{row['context']:>6} {row['config']:<10} {row['tokens_per_s']:7.1f} tok/s  "
              f"{row['median_step_ms']:7.2f} ms/step  {row['vs_inductor']:.2f}x inductor")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"device": f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "model": "SmolLM2-135M-Instruct fp32 (GGUF Q4_1 dequantized), batch 1",
            "torch": torch.__version__, "commit": commit}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out / "decode_cpu.png")
    print(f"wrote {args.out / 'decode_cpu.json'} and decode_cpu.png")


if __name__ == "__main__":
    main()
