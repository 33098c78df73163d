"""HF's default DynamicCache against a static cache under kvfx, on the real SmolLM2 (CPU, fp32).

For each config, one chat prompt generates `--new-tokens` greedy tokens three ways: eagerly (no kvfx),
through kvfx with a static cache (`cache_implementation="static"`), and through kvfx with HF's
DynamicCache (what `generate` uses by default). Records how many new tokens equal eager's, whether the
two kvfx runs give the same tokens, the sites rewritten, and for the DynamicCache the bytes kvfx holds
for its keys and values (measured from the storages: the model's placeholders hold none) against the
bytes of the same cache in fp32. Writes dynamic_cache.json.

example: python benchmarks/dynamic_cache.py                          (int8, int4, int4 + h2o 64)
         python benchmarks/dynamic_cache.py --configs int4 --new-tokens 16 --out /tmp/dyn
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import time

import torch
from transformers import DynamicCache

from common import RESULTS, environment, write_json
import kvfx
from kvfx.models import load_smollm2
from kvfx.runtime import held_bytes

CONFIGS = {
    "int8": {"kv": "int8"},
    "int4": {"kv": "int4"},
    "int4+h2o": {"kv": "int4", "policy": "h2o", "budget": 64},  # an integer budget: the same store on either cache
    # A fraction: a share of max_cache_len on a static cache, of the length as it grows on a DynamicCache (not
    # the same cache: the tokens may differ)
    "int4+h2o-0.2": {"kv": "int4", "policy": "h2o", "budget": 0.2},
}
QUESTION = "Explain in three sentences why the sky is blue."


def run(model, ids: torch.Tensor, options: dict, cache: str, new_tokens: int) -> tuple[torch.Tensor, dict]:
    """One kvfx generation with a "static" or "dynamic" cache: its tokens and its row."""
    torch._dynamo.reset()  # each config compiles afresh (dynamo's recompile limit is per function)
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options=options)
    past = DynamicCache(config=model.config) if cache == "dynamic" else None
    start = time.time()
    tokens = compiled.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               past_key_values=past, cache_implementation="static" if past is None else None)
    report = kvfx.report(compiled)
    row = dict(options=options, cache=cache, seconds_with_compile=round(time.time() - start, 1),
               sites_rewritten=report.rewritten, sites_found=report.found)
    if past is not None:
        tensors = [t for layer in past.layers for t in (layer.keys, layer.values)]
        row.update(kv_bytes_held=held_bytes(tensors), fp32_cache_bytes=sum(t.numel() * 4 for t in tensors),
                   cache_tokens=tensors[0].shape[2])
    return tokens, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="example:" + __doc__.split("example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    eager = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    rows = []
    for name in args.configs:
        runs = {}
        for cache in ("static", "dynamic"):
            runs[cache], row = run(model, ids, CONFIGS[name], cache, args.new_tokens)
            row.update(config=name, new_tokens_equal_to_eager=int((runs[cache] == eager)[0, ids.shape[1]:].sum()),
                       new_tokens=args.new_tokens)
            rows.append(row)
            print(row, flush=True)
        rows[-1]["same_tokens_as_static"] = bool(torch.equal(runs["static"], runs["dynamic"]))
    write_json(pathlib.Path(args.out) / "dynamic_cache.json",
               dict(meta=dict(environment(), device=f"cpu, {torch.get_num_threads()} threads",
                              model="SmolLM2-135M-Instruct (embedded GGUF), fp32", prompt_tokens=ids.shape[1]),
                    rows=rows))


if __name__ == "__main__":
    main()
