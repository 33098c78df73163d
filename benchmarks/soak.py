"""Long-generation soak on the real SmolLM2: thousands of greedy tokens per row through a kvfx cache.

For each config, eight chat prompts (left-padded batch) generate `--new-tokens` greedy tokens through
`torch.compile(..., backend="kvfx")` and a static cache. Every `--every` steps the script records the
KV bytes kvfx holds (`kvfx.report`, measured from tensor storages) and the memory in use (below),
and it checks every step's logits for NaN / inf. At the end, per row: the share of distinct 4-grams
among the last 1024 tokens and the shortest period the last 256 tokens repeat with (0 = no loop), so a
repetition loop that the full-precision cache does not show stands out. Writes soak.json with the
first 200 tokens of each row as text.

On the GPU (`--device cuda`) the model runs in bf16 and the memory sampled is the GPU memory torch
holds; `--cudagraphs` replays the decode steps as CUDA graphs.

example: python benchmarks/soak.py --new-tokens 4096 --configs fp int4 int4+h2o
         python benchmarks/soak.py --configs int4+h2o --budget 1024     (H2O keeping 1024 tokens)
         python benchmarks/soak.py --device cuda --cudagraphs --new-tokens 4096
         python benchmarks/soak.py --new-tokens 64 --batch 2 --out /tmp/soak      (a smoke run)
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, StaticCache

from common import RESULTS, environment, write_json
import kvfx
from kvfx.decode import CACHE_KWARG
from kvfx.models import load_smollm2

CONFIGS = {
    "fp": {"kv": "none"},  # lossless (eager's tokens): the reference
    "int4": {"kv": "int4"},
    "int4+h2o": {"kv": "int4", "policy": "h2o", "budget": 512},
}
QUESTIONS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe the history of the printing press and its effects on Europe.",
    "Write a detailed guide to growing tomatoes in a small garden.",
    "Explain how the immune system fights a viral infection.",
    "Tell the story of a young inventor who builds a flying machine.",
    "Describe a journey along a great river from its source to the sea.",
    "Explain how a compiler turns source code into a running program.",
]


class Watch(LogitsProcessor):
    """Leaves the logits as they are: checks each step's for NaN / inf and samples the memory every
    `every` steps."""

    def __init__(self, model, every: int, bar):
        self.model, self.every, self.bar = model, every, bar
        self.steps, self.nonfinite, self.samples, self.times = 0, 0, [], []

    def __call__(self, input_ids, scores):
        self.steps += 1
        self.times.append(time.perf_counter())
        # NaN or +inf anywhere, or a row with no finite logit (-inf alone is a processor's mask: min_new_tokens)
        self.nonfinite += int(bool(scores.isnan().any() or scores.isposinf().any() or (~scores.isfinite()).all(-1).any()))
        if self.steps % self.every == 0 or self.steps == 1:
            self.samples.append({"step": self.steps, "kv_bytes": kvfx.report(self.model).kv_bytes,
                                 **memory_mib(scores.device)})
        self.bar.update(1)
        return scores


def memory_mib(device: torch.device) -> dict:
    """The GPU memory torch holds (allocated tensors) on CUDA, else the process's resident memory."""
    if device.type == "cuda":
        return {"cuda_allocated_mib": torch.cuda.memory_allocated(device) / 2**20}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return {"rss_mib": int(line.split()[1]) / 1024}
    return {"rss_mib": float("nan")}


def loop_period(tokens: list[int], tail: int = 256, longest: int = 64) -> int:
    """The shortest period p <= `longest` with which the last `tail` tokens repeat exactly (0: none)."""
    end = tokens[-tail:]
    for p in range(1, longest + 1):
        if len(end) > p and all(end[i] == end[i - p] for i in range(p, len(end))):
            return p
    return 0


def distinct_4grams(tokens: list[int], tail: int = 1024) -> float:
    end = tokens[-tail:]
    grams = [tuple(end[i:i + 4]) for i in range(len(end) - 3)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def soak(model, eager_forward, tokenizer, name: str, batch: int, new_tokens: int, every: int,
         cudagraphs: bool = False, budget: int | None = None) -> dict:
    torch._dynamo.reset()
    options = {**CONFIGS[name], **({"cudagraphs": True} if cudagraphs else {})}
    if budget is not None and "policy" in options:
        options["budget"] = budget
    model.forward = torch.compile(eager_forward, backend="kvfx", options=options)
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS[:batch]]
    tokenizer.padding_side = "left"
    enc = tokenizer(chats, return_tensors="pt", padding=True).to(model.device)
    cache = StaticCache(config=model.config, max_cache_len=enc.input_ids.shape[1] + new_tokens)
    with tqdm(total=new_tokens, desc=name, unit="tok") as bar:
        watch = Watch(model, every, bar)
        start = time.perf_counter()
        out = model.generate(**enc, **{CACHE_KWARG: cache}, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, logits_processor=[watch], pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
    model.forward = eager_forward
    rows = out[:, enc.input_ids.shape[1]:].tolist()
    late = [s for s in watch.samples if s["step"] >= new_tokens // 4]
    memory = "cuda_allocated_mib" if model.device.type == "cuda" else "rss_mib"
    return {"config": name, "options": options, "batch": batch, "new_tokens": new_tokens,
            "seconds": seconds, "tokens_per_s": batch * (len(watch.times) - 1) / (watch.times[-1] - watch.times[0]),
            "steps_with_nan_or_inf": watch.nonfinite, "memory": watch.samples,
            "kv_bytes_flat_after_warmup": len({s["kv_bytes"] for s in late}) <= 1,
            "memory_growth_after_warmup_mib": late[-1][memory] - late[0][memory] if late else None,
            "rows": [{"distinct_4grams_last_1024": distinct_4grams(r), "loop_period_last_256": loop_period(r),
                      "first_200_tokens": tokenizer.decode(r[:200])} for r in rows]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example:" + __doc__.split("example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--new-tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, choices=range(1, len(QUESTIONS) + 1), metavar="1..8")
    parser.add_argument("--every", type=int, default=256, help="steps between memory samples (256)")
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    parser.add_argument("--cudagraphs", action="store_true", help="decode steps as CUDA graphs (cuda)")
    parser.add_argument("--budget", type=int, help="tokens the policy config keeps (default 512)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for soak.json")
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget {args.budget}: the tokens H2O keeps must be a positive count")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tokenizer = load_smollm2(dtype)
    model.to(args.device)
    eager_forward = model.forward
    results = []
    for name in args.configs:
        results.append(soak(model, eager_forward, tokenizer, name, args.batch, args.new_tokens, args.every,
                            args.cudagraphs, args.budget))
        r = results[-1]
        tqdm.write(f"{name}: {r['tokens_per_s']:.1f} tok/s, NaN/inf steps {r['steps_with_nan_or_inf']}, KV flat "
                   f"{r['kv_bytes_flat_after_warmup']}, loops {[x['loop_period_last_256'] for x in r['rows']]}")
        write_json(args.out / "soak.json", {"benchmark": "soak", "environment": environment(),
                                            "model": f"SmolLM2-135M-Instruct ({str(dtype).split('.')[1]})",
                                            "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
