"""End-to-end decode on a Llama-3-8B-shaped model (random bf16 weights): inductor vs kvfx formats.

The model is transformers' LlamaForCausalLM at the Llama-3-8B shape (32 layers, hidden 4096, 32/8
heads, head dim 128, vocab 128256) with random weights built on the device, decoding through a
StaticCache with `model.forward` compiled by `torch.compile` (backend "inductor", or "kvfx" with
the config's options). For each config and batch: prefill a random prompt of `--context` tokens
in chunks of `--prefill-chunk` (the last position's logits only; `--fill random`: the first chunk, then
random K/V written into the cache up to the context, for decode sweeps), then time `--steps` one-token decode
steps (CUDA-synchronized wall time per step, median), the first calls' times (compilation included),
peak GPU memory, and the KV bytes held (`kvfx.report(...).kv_bytes`; the fp cache for inductor; the
cache's own tensors for "transformers-quanto-int4/2": transformers' QuantizedCache with the
optimum-quanto backend at kvfx's group size and residual, run eagerly as transformers runs it).
Batches are swept in the order given; a config that runs out of memory skips its larger batches, so
the largest batch that ran is its max batch. `--profile` adds the GPU kernels of one decode step
(torch.profiler, device time per kernel family). Writes e2e.json and e2e.png (tokens/s vs batch).

example: python benchmarks/e2e.py --context 8192 --batch 1 4 --configs inductor kvfx-none kvfx-int4
         python benchmarks/e2e.py --context 32768 --batch 1 8 16 32 --configs inductor kvfx-int4 --out /tmp/r
         python benchmarks/e2e.py --context 32768 --batch 16 32 48 --configs kvfx-int4+cg --fill random
         python benchmarks/e2e.py --tiny --device cpu        (a smoke run of the script itself)
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from common import RESULTS, environment, kernel_profile, plot_speedups, write_json
import kvfx
from kvfx.decode import prefill
from kvfx.kernels.formats import KVStore
from kvfx.kernels.kivi import KiviStore, store_write
from kvfx.kernels.policies import attend_prompt, policy_attend_reference
from kvfx.kernels.token_store import TokenFormat, TokenStore
from kvfx.runtime import store_of

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1024, max_position_embeddings=4096)
CONFIGS = {
    "inductor": dict(backend="inductor"),
    "kvfx-none": dict(backend="kvfx", options={"kv": "none"}),
    "kvfx-int8": dict(backend="kvfx", options={"kv": "int8"}),
    "kvfx-int4": dict(backend="kvfx", options={"kv": "int4"}),
    "kvfx-int2": dict(backend="kvfx", options={"kv": "int2"}),
    "kvfx-fp8": dict(backend="kvfx", options={"kv": "fp8"}),
    "kvfx-h2o-20%": dict(backend="kvfx", options={"policy": "h2o", "budget": 0.2}),
    "kvfx-int4-snapkv-20%": dict(backend="kvfx", options={"kv": "int4", "policy": "snapkv", "budget": 0.2}),
    "kvfx-quest-1/8": dict(backend="kvfx", options={"policy": "quest", "pages": 0.125}),
}
# "+cg": decode steps replayed as CUDA graphs (inductor: mode="reduce-overhead"; kvfx: cudagraphs=True).
CONFIGS.update({f"{name}+cg": dict(backend="inductor", mode="reduce-overhead") if name == "inductor" else
                dict(backend="kvfx", options={**c["options"], "cudagraphs": True}) for name, c in list(CONFIGS.items())})
# transformers' QuantizedCache (optimum-quanto backend) with kvfx's default grouping (32) and residual (128),
# run eagerly as transformers runs it: it grows like a DynamicCache, so a compiled step would recompile.
CONFIGS.update({f"transformers-quanto-int{bits}": dict(quanto_bits=bits) for bits in (4, 2)})


def make_cache(name: str, config: LlamaConfig, max_cache_len: int):
    spec = CONFIGS[name]
    if "quanto_bits" in spec:
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=config, nbits=spec["quanto_bits"], q_group_size=32,
                              residual_length=128)
    return StaticCache(config=config, max_cache_len=max_cache_len)


def cache_bytes(cache) -> int:
    """Bytes the cache object holds itself: the storages of every tensor its layers keep, looking into
    tensor subclasses (quanto's packed tensors) through their inner tensors."""
    def held(t) -> int:
        if hasattr(t, "__tensor_flatten__"):
            return sum(held(getattr(t, inner)) for inner in t.__tensor_flatten__()[0])
        return t.untyped_storage().nbytes()

    return sum(held(v) for layer in cache.layers for v in vars(layer).values() if isinstance(v, torch.Tensor))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fill_random(cache, start: int, stop: int, chunk: int, generator: torch.Generator, options: str | None = None
                ) -> None:
    """Positions start .. stop - 1 of every layer get random K and V (standard normal, the model dtype)
    through the cache's own write path, as a prefill of those positions would leave it, minus the model's
    compute: the fp buffers (inductor, kv="none"), kvfx's int8 or KIVI store (its quantize-and-store), or a
    policy's store (its own prompt path: attention of random queries over the kept tokens, the policy's
    selection and write; `options` is the config's JSON). A decode step reads and computes the same
    whatever the values are. The layer's count of written tokens (HF's `cumulative_length`, where its
    next write goes) moves to `stop`."""
    layers = len(cache.layers)
    for index, layer in enumerate(cache.layers):
        store = store_of(layer.keys)
        b, h, _, d = (store.k_ring if isinstance(store, KiviStore) else layer.keys).shape
        dtype = store.dtype if store is not None else layer.keys.dtype
        for at in range(start, stop, chunk):
            k, v, q = (torch.randn(b, h, min(chunk, stop - at), d, generator=generator, device=generator.device,
                                   dtype=dtype) for _ in range(3))
            if store is None:
                layer.keys[:, :, at:at + k.shape[2]] = k
                layer.values[:, :, at:at + k.shape[2]] = v
            elif isinstance(store, KiviStore):
                store_write(store, k, v, at)
            elif isinstance(store, KVStore):  # int8: quantize and write per token, as a prefill does
                pos = torch.arange(at, at + k.shape[2], device=k.device)
                torch.ops.kvfx.store_write(store.k_codes, store.k_qparams, pos, k)
                torch.ops.kvfx.store_write(store.v_codes, store.v_qparams, pos, v)
            elif isinstance(store, TokenStore):
                pos = torch.arange(at, at + k.shape[2], device=k.device)
                policy_attend_reference(q, k, v, pos, store, None, True, d ** -0.5, TokenFormat(options).spec,
                                        index, layers, attend=attend_prompt)
            else:
                raise SystemExit(f"e2e: --fill random writes fp buffers, KIVI and policy stores, not "
                                 f"{type(store).__name__}")
        if hasattr(layer, "cumulative_length"):  # HF writes the next token there, and kvfx reads that far
            layer.cumulative_length.fill_(stop)


@torch.no_grad()
def run_config(model, eager_forward, name: str, batch: int, context: int, steps: int, device: str,
               chunk: int = 2048, profile: bool = False, fill: str = "prefill") -> dict:
    torch._dynamo.reset()
    counters.clear()
    quanto = "quanto_bits" in CONFIGS[name]
    model.forward = eager_forward if quanto else torch.compile(eager_forward, **CONFIGS[name])
    row = dict(config=name, batch=batch, context=context, fill=fill)
    if quanto and fill == "random":
        return dict(row, error="--fill random: transformers' QuantizedCache has no write path to fill; use --fill prefill")
    gen = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device=device, generator=gen)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    phase = "prefill"  # where an out-of-memory happened: prefill, fill or decode
    try:
        cache = make_cache(name, model.config, context + steps + 8)  # + the profiled steps
        start = time.perf_counter()
        if fill == "random":  # the first chunk through the model (compiles, allocates), the rest written
            logits = prefill(model, prompt[:, :min(chunk, context)], cache, chunk)[:, None]
            options = kvfx.KVConfig(**CONFIGS[name]["options"]).to_json() if "options" in CONFIGS[name] else None
            phase = "fill"
            fill_random(cache, min(chunk, context), context, chunk, gen, options)
        else:
            logits = prefill(model, prompt, cache, chunk)[:, None]
        sync(device)
        row["prefill_first_s"] = time.perf_counter() - start  # compilation included
        times = []
        phase = "decode"
        for i in range(steps + 1):
            token = logits.argmax(-1)
            at = torch.tensor([context + i], device=device)
            sync(device)
            start = time.perf_counter()
            logits = model(token, past_key_values=cache, cache_position=at, position_ids=at.expand(batch, 1),
                           use_cache=True).logits
            sync(device)
            times.append(time.perf_counter() - start)
        row["decode_first_s"] = times[0]  # the decode graph's compilation
        row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]  # graphs "+cg" could not graph
        row["median_step_ms"] = statistics.median(times[1:]) * 1e3
        row["tokens_per_s"] = batch / (row["median_step_ms"] / 1e3)
        if profile and device == "cuda":  # 3 more steps at the next positions
            at = iter(torch.arange(context + steps + 1, context + steps + 4, device=device).view(-1, 1))
            row["profile"] = kernel_profile(lambda: model(token, past_key_values=cache, cache_position=(p := next(at)).view(1),
                                                          position_ids=p.expand(batch, 1), use_cache=True))
        if name.startswith("kvfx"):
            rep = kvfx.report(model.forward)
            row["kv_bytes"], row["fp_kv_bytes"] = rep.kv_bytes, rep.fp_kv_bytes
        else:  # the fp cache (inductor), or QuantizedCache's packed tensors + full-precision residual
            row["kv_bytes"] = cache_bytes(cache)
            row["fp_kv_bytes"] = (2 * model.config.num_hidden_layers * batch * model.config.num_key_value_heads
                                  * (context + steps + 8) * model.config.head_dim * torch.finfo(model.dtype).bits // 8)
        if device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del cache, logits
    except torch.OutOfMemoryError:
        row["error"] = f"out of memory ({phase})"
    except Exception as exc:  # noqa: BLE001  (recorded, the sweep goes on)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        traceback.print_exc()
    model.forward = eager_forward
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def build_parser(doc: str) -> argparse.ArgumentParser:
    """The sweep's options (e2e.py and e2e_tp.py); doc: the script's docstring (description, examples)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog="example:" + doc.split("example:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[8192])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps (median reported)")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill call (2048)")
    parser.add_argument("--profile", action="store_true", help="record the GPU kernels of a decode step")
    parser.add_argument("--fill", choices=("prefill", "random"), default="prefill",
                        help="prefill: the whole prompt through the model (default); random: its first chunk, "
                             "then random K/V written into the cache (its fp buffers, or kvfx's KIVI stores, "
                             "through the store kernel, or a policy's store through its prompt path) up to the "
                             "context: a decode-only sweep at a fraction of the prefill's cost")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (32)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke test of the script)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for the JSON and PNG results")
    return parser


def model_shape(args) -> dict:
    shape = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    return shape


def build_model(config: LlamaConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights drawn on the device from seed 0."""
    with torch.device(device):
        torch.manual_seed(0)
        return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def sweep(args, run, name: str, shape: dict, dtype: torch.dtype, label: str, header: dict | None = None,
          output: bool = True) -> list[dict]:
    """run(config, batch, context) -> row for every config, batch and context of args, with ratios to
    inductor, into <args.out>/<name>.json (rewritten after each row) and <name>.png. A config that ran out
    of memory skips its larger batches. output=False: run the same plan, print and write nothing."""
    rows = []
    plan = [(c, b, n) for n in args.context for b in args.batch for c in args.configs]
    out_of_memory = set()
    for config, batch, context in tqdm(plan, desc=name, unit="run", disable=not output):
        if (config, context) in out_of_memory:
            continue
        row = run(config, batch, context)
        if "out of memory" in row.get("error", ""):
            out_of_memory.add((config, context))
        rows.append(row)
        if not output:
            continue
        tqdm.write(f"{config:<22} B{batch:<3} ctx {context:<6} " + (
            f"{row['median_step_ms']:8.2f} ms/step {row['tokens_per_s']:8.1f} tok/s  first prefill "
            f"{row['prefill_first_s']:.1f}s  KV {row['kv_bytes'] / 2**30:.2f} GiB" if "error" not in row else row["error"]))
        for r in rows:  # ratios to the best inductor config of the same shape, and to inductor's best anywhere
            same = [x["tokens_per_s"] for x in rows if x["config"].startswith("inductor") and "tokens_per_s" in x
                    and (x["batch"], x["context"]) == (r["batch"], r["context"])]
            best = [x["tokens_per_s"] for x in rows if x["config"].startswith("inductor") and "tokens_per_s" in x
                    and x["context"] == r["context"]]
            if same and "tokens_per_s" in r:
                r["speedup_vs_inductor"] = r["tokens_per_s"] / max(same)
            if best and "tokens_per_s" in r:
                r["vs_inductor_best_any_batch"] = r["tokens_per_s"] / max(best)
        max_batch = {f"{r['config']} @ {r['context']}": max(x["batch"] for x in rows if "tokens_per_s" in x
                                                              and (x["config"], x["context"]) == (r["config"], r["context"]))
                     for r in rows if "tokens_per_s" in r}
        write_json(args.out / f"{name}.json", {"benchmark": name, "environment": environment(), "model": shape,
                                               **(header or {}), "dtype": str(dtype), "steps": args.steps,
                                               "rows": rows, "max_batch_that_ran": max_batch})
    if output:
        plot_speedups(args.out / f"{name}.png", [r for r in rows if "tokens_per_s" in r], "context", "batch", "config",
                      "tokens_per_s", f"decode tokens/s, {label} ({environment()['device']})", "tokens/s")
    return rows


def main(argv=None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("e2e: no CUDA GPU here; run it on the GPU machine, or --tiny --device cpu", file=sys.stderr)
        return 2
    shape = model_shape(args)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(LlamaConfig(**shape), args.device, dtype)
    eager_forward = model.forward
    sweep(args, lambda config, batch, context: run_config(model, eager_forward, config, batch, context, args.steps,
                                                          args.device, args.prefill_chunk, args.profile,
                                                          args.fill),
          "e2e", shape, dtype, "Llama-3-8B shape")
    return 0


if __name__ == "__main__":
    sys.exit(main())
