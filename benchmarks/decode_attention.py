"""Decode attention on the GPU: kvfx over a KIVI store (none, fp8, int8, int4, int2) vs SDPA.

One query token per row, Hq=32, Hkv=8, D=128, bf16, every row holding S tokens. Baselines:
`F.scaled_dot_product_attention(enable_gqa=True)` with the FLASH and CUDNN backends (the best that
runs is "best SDPA"; a backend that errors is recorded and skipped) and HF's eager path (repeat_kv
expand + reshape, then SDPA). kvfx formats use KIVI's defaults for int (G=32, R=128) and G=32, R=0
for fp8 and none; each is timed over a small sweep of launch configs (tile, warps, splits; for int:
warps, tokens per step, splits, value-parameter expansion, pipelining depth: `INT_SWEEP`) and the best
is reported with its config, beside `default_us` (the default launch, what the compile path runs) and
`sweep` (every config's time). The int formats
also get a "kvfx-<format>-generic" row: the generic tile kernel (the one none and fp8 use), the int
formats' previous kernel, at one config, for a before/after within the same run. "kvfx-attend-none-positional"
and "kvfx-attend-int8-positional" time what the compile path runs for kv="none" / "int8" (`kvfx::attend`:
the slot kernel in positional mode over the model's own cache), swept over tile, warps and splits, with
the default launch's time beside the best (`default_us`). Every time is the GPU time of a CUDA-graph replay with a cold L2,
median over the reps (p20/p80 beside it), see `common.cuda_time_us`.

GB/s = bytes read / time, bytes from explicit formulas (`sdpa_bytes`, `kvfx_bytes`): K and V as
stored (codes, scales and zeros, residual ring) plus q and the output; the split-K partials
(a few KB) are not counted. Each run first measures the GPU's device-to-device copy bandwidth
(`common.copy_bandwidth_gb_s`, read + write bytes, in the payload's "copy_bandwidth"), and every timed
row's `copy_fraction` is its GB/s over that (the issue's target: >= 75% on the quantized formats at
B8 S64K). A read-only kernel can pass 1: on an H100 SDPA reads at about 1.25x the copy rate.

Every kvfx row also gets `bytes_ratio_vs_sdpa` = sdpa_bytes / its bytes: the speedup over best SDPA the
format would reach if it read its bytes at the GB/s of the best SDPA row of the same shape (the ceiling
that equal bandwidth gives; above it, a format reads faster than SDPA does). At G=32 with bf16 scales and
zeros a format reads bits/8 + 4/32 bytes per K/V element against bf16's 2: int8 1.125 B (~1.78x), int4
0.625 B (3.2x), int2 0.375 B (~5.3x), fp8 ~1 B (~2x), less the residual ring's bf16 tokens, which weigh
most at short S.

Also times quantize-and-store of one decode token for 32 layers (32 `store_write` calls of
[B, 8, 1, 128], CUDA graph and eager) against 32 decode-attention calls.

example: python benchmarks/decode_attention.py --quick
         python benchmarks/decode_attention.py --batch 8 --seq 65536 --out /tmp/results
         python benchmarks/decode_attention.py --batch 8 --seq 65536 --formats int4 int2
         python benchmarks/decode_attention.py --batch 1 8 --seq 4096 65536 --formats int4 --no-sweep
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import (RESULTS, copy_bandwidth_gb_s, cuda_time_us, environment, kernel_profile, plot_speedups,
                    time_or_error, write_json)
from kvfx.kernels.decode_attention import base_splits, decode_attention_triton
from kvfx.kernels.int8 import quantize_int8_reference
from kvfx.kernels.kivi import KiviStore, quantized_length, store_write
from kvfx.kernels.slot_attention import attend_positions, default_slot_splits

HQ, HKV, D, GROUP, RESIDUAL = 32, 8, 128, 32, 128
DTYPE = torch.bfloat16
DEVICE = "cuda"
FORMATS = {  # name -> KiviStore.allocate keywords
    "none": dict(bits=16, residual=0),
    "fp8": dict(bits=8, fp8=True, residual=0),
    "int8": dict(bits=8, residual=RESIDUAL),
    "int4": dict(bits=4, residual=RESIDUAL),
    "int2": dict(bits=2, residual=RESIDUAL),
}
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def sdpa_bytes(b: int, s: int) -> int:
    isz = DTYPE.itemsize
    return 2 * b * HKV * s * D * isz + 2 * b * HQ * D * isz


def kvfx_bytes(name: str, b: int, s: int) -> int:
    """Bytes one decode-attention call reads from a store of that format holding s tokens per row."""
    cfg = FORMATS[name]
    isz = DTYPE.itemsize
    qlen = int(quantized_length(torch.tensor(s), GROUP, cfg["residual"]))
    residual = 2 * (s - qlen) * D * isz
    if cfg["bits"] == 16:
        quant = 2 * qlen * D * isz
    elif cfg.get("fp8"):
        quant = 2 * qlen * D + 2 * 4
    else:
        codes = 2 * qlen * D * cfg["bits"] // 8
        quant = codes + 2 * (qlen // GROUP) * D * isz + 2 * qlen * (D // GROUP) * isz
    return b * HKV * (quant + residual) + 2 * b * HQ * D * isz


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """HF's repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n, S, D] by expand + reshape (a copy)."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


INT_FORMATS = ("int8", "int4", "int2")
# The int formats' previous kernel (the generic tile kernel that none and fp8 use) at its best config of
# the earlier sweep, timed beside the int kernel as "kvfx-<format>-generic" for a before/after in one run.
GENERIC_INT_CONFIG = dict(block_n=64, num_warps=4, split_factor=2, int_kernel=False)


# The int kernel's launch sweep: (warps, tokens per step, value-param mode), with Triton's default
# pipelining and, for the first two, num_stages 2 and 4. Chosen from sm_90 SASS compiled on CPU (loop
# instructions per token, no local-memory spills); split factors do not recompile.
INT_SWEEP = {
    "int8": [(1, 32, 1), (2, 32, 1), (2, 64, 1), (4, 128, 1), (1, 64, 1)],
    "int4": [(1, 32, 1), (2, 64, 1), (1, 32, 2), (2, 32, 1), (4, 64, 1), (4, 128, 1), (2, 128, 1)],
    "int2": [(1, 32, 1), (2, 64, 1), (1, 32, 2), (1, 64, 1), (2, 128, 2), (4, 128, 1)],
}


def launch_configs(name: str, quick: bool, sweep: bool = True) -> list[dict]:
    """decode_attention_triton keyword sweeps (split_factor multiplies `base_splits`, so the sweeps stay
    comparable across runs whatever the default launch); sweep=False: only the default launch ({})."""
    if not sweep:
        return [{}]
    if name in INT_FORMATS:  # block_n = tokens per step (a multiple of G); vmode = value-param expansion
        if quick:
            return [dict(num_warps=1, block_n=GROUP, split_factor=4, vmode=1)]
        sweep = INT_SWEEP[name]
        return [dict(num_warps=w, block_n=bn, split_factor=f, vmode=vm, **({"num_stages": st} if st else {}))
                for i, (w, bn, vm) in enumerate(sweep) for st in ((None, 2, 4) if i < 2 else (None,))
                for f in (1, 2, 4, 8)]
    if quick:
        return [dict(block_n=64, num_warps=4, split_factor=1)]
    return [dict(block_n=bn, num_warps=w, split_factor=f) for bn in (64, 128) for w in (4, 8) for f in (1, 2, 4, 8)]


def bench_shape(b: int, s: int, configs, reps: int, copy_gb_s: float, quick: bool = False, formats=FORMATS,
                positional: bool = True, profile: bool = False, sweep: bool = True) -> list[dict]:
    """configs: format name -> list of launch configs (`launch_configs`); copy_gb_s: the measured copy
    bandwidth (`derived_fields`); formats: the KIVI-store formats to time (FORMATS); positional: also the
    `bench_positional` rows; profile: each format's row also gets the GPU time by kernel of its default
    launch (`kernel_profile`); sweep=False: the positional rows at their default launch only (the KIVI
    formats' launches come from `configs`)."""
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(b, HQ, 1, D, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(b, HKV, s, D, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(b, HKV, s, D, device=DEVICE, dtype=DTYPE, generator=gen)
    base = dict(batch=b, seq=s)
    for name, backend in SDPA_BACKENDS.items():
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        rows.append(dict(base, impl=f"sdpa-{name}", bytes=sdpa_bytes(b, s), **time_or_error(sdpa, reps)))
    rows.append(dict(base, impl="hf-repeat_kv-sdpa", bytes=sdpa_bytes(b, s), **time_or_error(
        lambda: F.scaled_dot_product_attention(q, repeat_kv(k, HQ // HKV), repeat_kv(v, HQ // HKV)), reps)))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).float()
    if positional:
        rows += bench_positional(q, k, v, want, base, quick, reps, sweep)
    lengths = torch.full((b,), s, dtype=torch.int32, device=DEVICE)
    for name, cfg in formats.items():
        try:
            store = KiviStore.allocate(b, HKV, s, D, DTYPE, DEVICE, group_size=GROUP, **cfg)
            store_write(store, k, v, 0, lengths)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(dict(base, impl=f"kvfx-{name}", error="out of memory (store)"))
            continue
        got = decode_attention_triton(q, store, lengths).float()
        variants = [(f"kvfx-{name}", configs(name))]
        if name in INT_FORMATS and variants[0][1] != [{}]:
            variants.append((f"kvfx-{name}-generic", [GENERIC_INT_CONFIG]))
        for impl, launches in variants:
            best, best_kwargs, tried = None, None, []
            for c in launches:
                kwargs = {k: v for k, v in c.items() if k != "split_factor"}
                if "split_factor" in c:  # else the default launch's split count
                    kwargs["num_splits"] = c["split_factor"] * base_splits(b * HKV, store, q.device)
                result = time_or_error(lambda: decode_attention_triton(q, store, lengths, **kwargs), reps)
                tried.append(dict(kwargs, us=result.get("median_us")))
                if "median_us" in result and (best is None or result["median_us"] < best["median_us"]):
                    best, best_kwargs = dict(result, config=dict(c, **kwargs) or "default"), kwargs
            if best is not None and impl == f"kvfx-{name}":  # what the compile path runs: the default launch
                default = best if best_kwargs == {} else \
                    time_or_error(lambda: decode_attention_triton(q, store, lengths), reps)
                best = dict(best, default_us=default.get("median_us"), sweep=tried)
            err = (decode_attention_triton(q, store, lengths, **best_kwargs).float() - want).abs().max().item() \
                if best else None
            rows.append(dict(base, impl=impl, bytes=kvfx_bytes(name, b, s), max_abs_err_vs_sdpa=err,
                             max_abs_err_default_config=(got - want).abs().max().item(),
                             **(best or {"error": "no config ran"})))
            if profile and impl == f"kvfx-{name}":
                rows[-1]["profile"] = kernel_profile(lambda: decode_attention_triton(q, store, lengths))
        del store
        torch.cuda.empty_cache()
    return derived_fields(rows, copy_gb_s)


def derived_fields(rows: list[dict], copy_gb_s: float) -> list[dict]:
    """Adds to one shape's rows what follows from bytes and times: gb_per_s, speedup_vs_best_sdpa,
    copy_fraction (gb_per_s / copy_gb_s) on timed rows, and bytes_ratio_vs_sdpa on kvfx rows (the
    speedup at SDPA's bandwidth, see the module docstring), which needs no time."""
    timed = [r["median_us"] for r in rows if r["impl"].startswith("sdpa-") and "median_us" in r]
    best_sdpa = min(timed) if timed else None
    for r in rows:
        if r["impl"].startswith("kvfx-") and "bytes" in r:
            r["bytes_ratio_vs_sdpa"] = sdpa_bytes(r["batch"], r["seq"]) / r["bytes"]
        if "median_us" in r:
            r["gb_per_s"] = r["bytes"] / r["median_us"] / 1e3
            r["copy_fraction"] = r["gb_per_s"] / copy_gb_s
            r["speedup_vs_best_sdpa"] = best_sdpa / r["median_us"] if best_sdpa else None
    return rows


def bench_positional(q, k, v, want, base: dict, quick: bool, reps: int, sweep: bool = True) -> list[dict]:
    """What `kvfx::attend` runs for a decode step of kv="none" / "int8" in the compile path: the slot
    kernel in positional mode (`attend_positions`) over the model's own [B, Hkv, S, D] cache (none) or
    int8 codes + per-token (scale, zero), swept over tile, warps and splits; the row's `config` is the
    best, `default_us` the time of the default launch (what the compile path uses today)."""
    rows = []
    scale = D ** -0.5
    configs = [] if not sweep else [dict(block_n=64, num_warps=4, split_factor=1)] if quick else \
        [dict(block_n=bn, num_warps=w, split_factor=f) for bn in (64, 128) for w in (4, 8) for f in (0.25, 0.5, 1, 2)]
    codes_k, params_k = quantize_int8_reference(k)
    codes_v, params_v = quantize_int8_reference(v)
    for name, args, nbytes in (("none", (k, v, None, None), sdpa_bytes(base["batch"], base["seq"])),
                               ("int8", (codes_k, codes_v, params_k, params_v),
                                2 * codes_k.numel() + 2 * params_k.numel() * DTYPE.itemsize + 2 * q.numel() * DTYPE.itemsize)):
        def run(**kw):
            return attend_positions(q, *args, None, -1, scale, **kw)
        best, tried = None, []
        for c in configs:
            unit = default_slot_splits(q, k.shape[1], k.shape[2], c["block_n"], positional=name)
            kw = dict(block_n=c["block_n"], num_warps=c["num_warps"], num_splits=max(1, round(c["split_factor"] * unit)))
            result = time_or_error(lambda: run(**kw), reps)
            tried.append(dict(kw, us=result.get("median_us")))
            if "median_us" in result and (best is None or result["median_us"] < best["median_us"]):
                best = dict(result, config=dict(c, num_splits=kw["num_splits"]),
                            max_abs_err_vs_sdpa=(run(**kw).float() - want).abs().max().item())
        # After the sweep: timed first (right after SDPA), the default read 12-18% slow in session 9, call 2
        # (B8 S64K none 854.5 us where the same launch in the sweep took 725.9)
        default = time_or_error(run, reps)
        if not configs and "median_us" in default:  # --no-sweep: the default launch is the row
            best = dict(default, config="default", max_abs_err_vs_sdpa=(run().float() - want).abs().max().item())
        rows.append(dict(base, impl=f"kvfx-attend-{name}-positional", bytes=nbytes, default_us=default.get("median_us"),
                         sweep=tried, **(best or {"error": "no config ran"})))
    return rows


def bench_writes(b: int, s: int, reps: int, formats=FORMATS) -> list[dict]:
    """32 layers' worth of one-token quantize-and-store at position s - 1 (the write that also
    quantizes a completed group, the most expensive decode write)."""
    rows = []
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    k1 = torch.randn(b, HKV, 1, D, device=DEVICE, dtype=DTYPE, generator=gen)
    v1 = torch.randn(b, HKV, 1, D, device=DEVICE, dtype=DTYPE, generator=gen)
    start = torch.full((b,), s - 1, dtype=torch.int32, device=DEVICE)
    for name, cfg in formats.items():
        store = KiviStore.allocate(b, HKV, s, D, DTYPE, DEVICE, group_size=GROUP, **cfg)

        def write_32_layers(store=store):
            for _ in range(32):
                store_write(store, k1, v1, start)
        for graph in (True, False):
            result = cuda_time_us(write_32_layers, reps=reps, graph=graph)
            rows.append(dict(batch=b, seq=s, impl=f"kvfx-{name}", layers=32, **result))
        del store
    return rows


def row_summary(r: dict) -> str:
    """One printed line's figures: time, GB/s and its share of the copy bandwidth, speedup over best
    SDPA and, for kvfx rows, the speedup equal bandwidth would give (`bytes_ratio_vs_sdpa`)."""
    if "median_us" not in r:
        return r["error"]
    ceiling = f"  (x{r['bytes_ratio_vs_sdpa']:.2f} at SDPA's GB/s)" if "bytes_ratio_vs_sdpa" in r else ""
    return (f"{r['median_us']:9.1f} us  {r['gb_per_s']:7.0f} GB/s {r['copy_fraction']:4.0%} of copy  "
            f"x{r['speedup_vs_best_sdpa'] or 0:.2f}{ceiling}")


def plot(payload: dict, path: pathlib.Path) -> bool:
    """Speedup over best SDPA per format and shape: the newest row of each (a results file gathers
    several sessions' runs in order, each ratio taken within its own run)."""
    newest = {(r["impl"], r["batch"], r["seq"]): dict(r, format=r["impl"].removeprefix("kvfx-"))
              for r in payload["attention"] if r["impl"].startswith("kvfx-") and r.get("speedup_vs_best_sdpa")}
    return plot_speedups(path, list(newest.values()), "batch", "seq", "format", "speedup_vs_best_sdpa",
                         f"kvfx decode attention vs best SDPA (Hq={HQ}, Hkv={HKV}, D={D}, bf16) on "
                         f"{payload['environment']['device']}, newest run per point", "speedup over best SDPA (x)",
                         baseline=1.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python benchmarks/decode_attention.py --quick",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--quick", action="store_true", help="B in {1, 8}, S in {4K, 16K}, one launch config")
    parser.add_argument("--positional-only", action="store_true",
                        help="time SDPA and the positional rows only (no KIVI stores, no writes)")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS),
                        help="KIVI-store formats to time (the positional rows run with none or int8)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="time each format at its default launch only (what the compile path runs)")
    parser.add_argument("--reps", type=int, default=50, help="timed runs per measurement (median reported)")
    parser.add_argument("--profile", action="store_true", help="record each format's GPU time by kernel (default launch)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for decode_attention.json/.png")
    parser.add_argument("--plot-only", type=pathlib.Path, help="redraw the PNG from an existing JSON and exit")
    args = parser.parse_args(argv)
    if args.plot_only:
        import json

        payload = json.loads(args.plot_only.read_text())
        return 0 if plot(payload, args.out / "decode_attention.png") else 1
    if not torch.cuda.is_available():
        print("decode_attention benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    if args.quick:
        args.batch, args.seq = [1, 8], [4096, 16384]
    formats = {name: FORMATS[name] for name in args.formats}

    def configs(name: str) -> list[dict]:
        return launch_configs(name, args.quick, not args.no_sweep)
    payload = {"environment": environment(), "shape": dict(hq=HQ, hkv=HKV, head_dim=D, dtype=str(DTYPE),
                                                            group_size=GROUP, residual_int=RESIDUAL),
               "timing": "CUDA graph replay, cold L2, median of --reps", "copy_bandwidth": copy_bandwidth_gb_s(),
               "attention": [], "writes": [], "skipped": []}
    copy_gb_s = payload["copy_bandwidth"]["gb_per_s"]
    print(f"copy bandwidth (read + write) {copy_gb_s:.0f} GB/s", flush=True)
    for b in args.batch:
        for s in args.seq:
            try:
                rows = bench_shape(b, s, configs, args.reps, copy_gb_s, args.quick,
                                   {} if args.positional_only else formats,
                                   args.positional_only or bool({"none", "int8"} & set(args.formats)), args.profile,
                                   not args.no_sweep)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                payload["skipped"].append(dict(batch=b, seq=s, reason="out of memory"))
                continue
            payload["attention"] += rows
            for r in rows:
                print(f"B={b:<3} S={s:<6} {r['impl']:<20} {row_summary(r)}", flush=True)
            torch.cuda.empty_cache()
            write_json(args.out / "decode_attention.json", payload)  # partial results survive a timeout
        for w in [] if args.positional_only else bench_writes(b, min(args.seq), args.reps, formats):
            attn = [r for r in payload["attention"] if r["impl"] == w["impl"] and r["batch"] == b and "median_us" in r]
            w["attention_32_layers_us"] = {str(r["seq"]): 32 * r["median_us"] for r in attn}
            payload["writes"].append(w)
            print(f"write B={b:<3} {w['impl']:<12} {w['mode']:<10} 32 layers {w['median_us']:9.1f} us", flush=True)
        write_json(args.out / "decode_attention.json", payload)
    plot(payload, args.out / "decode_attention.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
