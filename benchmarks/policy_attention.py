"""Decode attention under a policy on the GPU: one `kvfx::policy_attend` decode step vs SDPA over
the full cache.

One query token per row, Hq=32, Hkv=8, D=128, bf16, S cached tokens per row. Baseline: the best of
`F.scaled_dot_product_attention(enable_gqa=True)` with the FLASH and cuDNN backends over all S tokens
(what a full cache costs). kvfx rows time the whole decode step of one site: attention over the kept
slots (Quest: over the chosen pages), H2O/SnapKV score accumulation, and the write of the new token
(eviction included), on a store already holding its budget. "sdpa-over-kept" is SDPA over a dense
copy of the kept slots: the floor an attention-only kernel over the same bytes would reach. The
h2o row against the "streaming" row (same slots, no score accumulation) prices H2O's scores.
Every time is a CUDA-graph replay with a cold L2 (see `common.cuda_time_us`). "kvfx-<config>-attention"
rows time the slot-attention kernel alone (`slot_partials`, every slot; not Quest) over a sweep of its
launch (slots per tile, warps, splits): the best config, and `default_us` at the default launch, so the
step's time splits into attention and the rest (the eviction kernels: scan, select, finish). The decode step is the
Triton path of `decode_step` (kvfx.kernels.slot_decode: Quest's page kernels, the slot-attention
kernel, the scan / select / finish eviction kernels) for every format; each kvfx row also reports `max_err`, the largest
difference of its output from `decode_step_reference` (torch) on a copy of the same store, and
`same_kept`, whether both keep the same positions afterwards.

example: python benchmarks/policy_attention.py --batch 8 --seq 65536
         python benchmarks/policy_attention.py --quick --out /tmp/results
         python benchmarks/policy_attention.py --batch 8 --seq 65536 --no-sweep --profile
         python benchmarks/policy_attention.py --batch 8 --seq 65536 --no-sweep --profile --unchained
         python benchmarks/policy_attention.py --batch 8 --seq 65536 --configs quest-1/8 h2o-20% --no-sweep
         TRITON_INTERPRET=1 python benchmarks/policy_attention.py --device cpu --quick --out /tmp/results
         (CPU: the Triton interpreter on tiny shapes, a check that the script and the paths run; no timing claim)
"""
from __future__ import annotations

import copy
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import (RESULTS, device_problem, doc_parser, environment, graph_timeline, kernel_profile, plot_speedups,
                    time_or_error, write_json)
import kvfx
import kvfx.kernels  # noqa: F401  (registers the ops)
from kvfx.kernels.policies import decode_step_reference
from kvfx.kernels.slot_decode import SCORED
from kvfx.kernels import slot_attention
from kvfx.kernels.slot_attention import STORE_LAUNCH, default_slot_splits, slot_partials

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
DEVICE = "cuda"  # --device sets it
LAYER, LAYERS = 4, 32  # a layer Quest reads sparsely
CONFIGS = {  # row name -> KVConfig options
    "streaming-20%": dict(policy="streaming", budget=0.2),
    "h2o-20%": dict(policy="h2o", budget=0.2),
    "snapkv-20%": dict(policy="snapkv", budget=0.2),
    "quest-1/8": dict(policy="quest", pages=0.125),
    "quest-1/8-fp8-bounds": dict(policy="quest", pages=0.125, page_bounds="fp8"),
    "quest-1/8-page-8": dict(policy="quest", pages=0.125, page_size=8),  # the passkey lead at 7K (README)
    "int8+h2o-20%": dict(kv="int8", policy="h2o", budget=0.2),
    "int4+h2o-20%": dict(kv="int4", policy="h2o", budget=0.2),
    "int4+snapkv-20%": dict(kv="int4", policy="snapkv", budget=0.2),
    "int2+h2o-20%": dict(kv="int2", policy="h2o", budget=0.2),
    "fp8+h2o-20%": dict(kv="fp8", policy="h2o", budget=0.2),
    "int4+quest-1/8": dict(kv="int4", policy="quest", pages=0.125),
}


def check_against_reference(fmt, store, q, k1, v1, pos) -> dict:
    """One step of the kvfx op and of `decode_step_reference`, each on its own copy of `store`."""
    mine, ref = copy.deepcopy(store), copy.deepcopy(store)
    got = torch.ops.kvfx.policy_attend(q, k1, v1, pos, *mine.tensors(), None, False, D ** -0.5, fmt.options,
                                       LAYER, LAYERS)
    want = decode_step_reference(q, k1, v1, pos, ref, None, False, D ** -0.5, fmt.spec, LAYER)
    same = bool(torch.equal(mine.slot_pos.sort(-1).values, ref.slot_pos.sort(-1).values))
    return {"max_err": float((got.float() - want.float()).abs().max()), "same_kept": same}


def full_store(options: dict, k: torch.Tensor, v: torch.Tensor):
    """A store of the config holding as many of the S tokens as its capacity takes (the newest)."""
    fmt = kvfx.KVConfig(**options).format
    b, h, s, d = k.shape
    store = fmt.allocate((b, h, s + 1, d), k.dtype, k.device, layer=LAYER, layers=LAYERS)
    fill_store(store, k, v)
    return fmt, store


def fill_store(store, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write the newest of the S tokens of `k` / `v` into `store`'s own tensors, as many as its capacity
    takes, with random scores and (Quest) the page bounds."""
    b, h, s, d = k.shape
    c = store.slot_pos.shape[-1]
    n = min(c - 1, s)  # one slot stays free for the first timed step; later steps evict
    for codes, params, x in ((store.k_codes, store.k_params, k), (store.v_codes, store.v_params, v)):
        new_codes, new_params = store.codec.quantize(x[:, :, s - n:])
        codes[:, :, :n].copy_(new_codes)
        params[:, :, :n].copy_(new_params)
    store.slot_pos[:, :, :n] = torch.arange(s - n, s, device=k.device, dtype=torch.int32)
    store.slot_pos[:, :, n:] = -1  # free, whatever steps wrote there before a refill
    store.score[:, :, :n] = torch.rand(b, h, n, device=k.device)
    if store.page_min.numel():
        store.bound_pages()


# (slots a tile, warps) x split factor around the codec's `STORE_LAUNCH` (its pipelining and dead-tile
# branch kept); benchmarks/slot_sweep.py --target store sweeps those too.
SLOT_SWEEP = [dict(block_n=bn, num_warps=w, split_factor=f) for bn, w in ((32, 1), (64, 2), (128, 4))
              for f in (0.5, 1, 2)]


def sweep_slot_attention(fmt, store, q, pos, reps: int, sweep: bool = True) -> dict:
    """The slot-attention kernel alone over every slot of the store (logits kept for scored policies),
    at its default launch and (sweep) over `SLOT_SWEEP`: the best time with its config, and `default_us`."""
    hkv, c = store.slot_pos.shape[1:]
    logits = fmt.spec.policy in SCORED
    split_slots = STORE_LAUNCH[store.codec.kv].split_slots

    def run(**kw):
        return slot_partials(q, pos, store, None, False, D ** -0.5, want_logits=logits, **kw)
    default = time_or_error(run, reps, DEVICE)
    best = None if sweep else dict(default, config="default")
    for cfg in SLOT_SWEEP if sweep else ():
        unit = default_slot_splits(q, hkv, c, cfg["block_n"], split_slots=split_slots)
        kw = dict(block_n=cfg["block_n"], num_warps=cfg["num_warps"],
                  num_splits=max(1, round(cfg["split_factor"] * unit)))
        result = time_or_error(lambda: run(**kw), reps, DEVICE)
        if "median_us" in result and (best is None or result["median_us"] < best["median_us"]):
            best = dict(result, config=dict(cfg, num_splits=kw["num_splits"]))
    return dict(best or {"error": "no config ran"}, default_us=default.get("median_us"))


def bench_shape(b: int, s: int, reps: int, sweep: bool = True, profile: bool = False, configs=tuple(CONFIGS)
                ) -> list[dict]:
    """The shape's rows for the kvfx `configs` (names of CONFIGS); profile: each kvfx step row also gets
    its GPU time by kernel (`kernel_profile`) and the kernels of its CUDA-graph replay (`graph_timeline`)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION} if DEVICE == "cuda" \
        else {"math": SDPBackend.MATH}
    q = torch.randn(b, HQ, 1, D, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(b, HKV, s, D, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(b, HKV, s, D, device=DEVICE, dtype=DTYPE, generator=gen)
    k1, v1 = k[:, :, -1:].clone(), v[:, :, -1:].clone()
    base = dict(batch=b, seq=s)
    rows = []
    for name, backend in backends.items():
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        rows.append(dict(base, impl=f"sdpa-{name}", **time_or_error(sdpa, reps, DEVICE)))
    timed = [r["median_us"] for r in rows if "median_us" in r]
    best_sdpa = min(timed) if timed else None
    pos = torch.tensor([s], device=DEVICE)
    for name, options in ((n, CONFIGS[n]) for n in configs):
        try:
            fmt, store = full_store(options, k, v)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(dict(base, impl=f"kvfx-{name}", error="out of memory (store)"))
            continue
        try:
            check = check_against_reference(fmt, store, q, k1, v1, pos)
        except torch.OutOfMemoryError:  # the torch reference dequantizes the whole store
            torch.cuda.empty_cache()
            check = {"max_err": None, "same_kept": None}

        def step(store=store, json_options=fmt.options):
            return torch.ops.kvfx.policy_attend(q, k1, v1, pos, *store.tensors(), None, False, D ** -0.5,
                                                json_options, LAYER, LAYERS)

        kept = store.slot_pos.shape[-1]
        rows.append(dict(base, impl=f"kvfx-{name}", slots=kept, bytes_held=store.nbytes(), **check,
                         **time_or_error(step, reps, DEVICE)))
        if profile and DEVICE == "cuda":
            rows[-1]["profile"] = kernel_profile(step)
            rows[-1]["timeline"] = graph_timeline(step)
        if fmt.spec.policy != "quest" and DEVICE == "cuda":
            rows.append(dict(base, impl=f"kvfx-{name}-attention", slots=kept,
                             **sweep_slot_attention(fmt, store, q, pos, reps, sweep)))
        if name in ("h2o-20%", "quest-1/8"):
            read = kept if name != "quest-1/8" else s // 8 + fmt.spec.page_size  # Quest: its pages + the newest
            dense_k, dense_v = k[:, :, :read], v[:, :, :read]

            def over_kept(dense_k=dense_k, dense_v=dense_v):
                with sdpa_kernel(list(backends.values())[0]):
                    return F.scaled_dot_product_attention(q, dense_k, dense_v, enable_gqa=True)
            rows.append(dict(base, impl=f"sdpa-over-kept-{name}", slots=dense_k.shape[2],
                             **time_or_error(over_kept, reps, DEVICE)))
        del store
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        if "median_us" in r and best_sdpa:
            r["speedup_vs_best_sdpa"] = best_sdpa / r["median_us"]
    return rows


def main(argv=None) -> int:
    parser = doc_parser(__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--quick", action="store_true", help="B 1, S 4K (CPU: S 256): a smoke run")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the Triton interpreter (TRITON_INTERPRET=1) on tiny shapes, no timing claim")
    parser.add_argument("--reps", type=int, default=30, help="timed runs per measurement (median reported)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for policy_attention.json/.png")
    parser.add_argument("--no-sweep", action="store_true", help="time the slot-attention kernel at its default launch only")
    parser.add_argument("--profile", action="store_true", help="record each kvfx step's GPU time by kernel, and its graph replay's timeline")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="kvfx rows to run")
    parser.add_argument("--unchained", action="store_true",
                        help="launch the step's kernels one after another, without programmatic dependent launch "
                             "(the A/B against the default, chained)")
    args = parser.parse_args(argv)
    slot_attention.CHAINED_LAUNCH = not args.unchained
    global DEVICE
    DEVICE = args.device
    if problem := device_problem("policy_attention", DEVICE):
        print(problem, file=sys.stderr)
        return 2
    quick = (1, 4096) if DEVICE == "cuda" else (1, 256)
    shapes = [quick] if args.quick else [(b, s) for b in args.batch for s in args.seq]
    rows = []
    for b, s in shapes:
        shape_rows = bench_shape(b, s, args.reps, not args.no_sweep, args.profile, args.configs)
        rows += shape_rows
        for r in shape_rows:
            status = f"{r['median_us']:9.1f} us  {r.get('speedup_vs_best_sdpa', 0):5.2f}x" if "median_us" in r else r["error"]
            print(f"B{b:<3} S{s:<6} {r['impl']:<28} {status}", flush=True)
    payload = {"benchmark": "policy_attention", "environment": environment(),
               "shape": dict(hq=HQ, hkv=HKV, head_dim=D, dtype=str(DTYPE)),
               "chained_launch": slot_attention.chained_launch(torch.device(DEVICE)), "rows": rows}
    write_json(args.out / "policy_attention.json", payload)
    steps = [r for r in rows if r["impl"].startswith("kvfx") and not r["impl"].endswith("-attention")]
    if not (args.profile and plot_step_kernels(args.out / "policy_attention.png", rows, payload["environment"]["device"])):
        plot_speedups(args.out / "policy_attention.png", steps, "batch", "seq", "impl", "speedup_vs_best_sdpa",
                      "kvfx policy decode step vs best SDPA over the full cache", "speedup (x)", baseline=1.0)
    return 0


KERNEL_PARTS = {"attention": ("_slot_attention_kernel",), "eviction": ("_slot_scan", "_slot_select", "_slot_finish"),
                "Quest's pages": ("_quest_",)}


def plot_step_kernels(path: pathlib.Path, rows: list[dict], device: str) -> bool:
    """A bar per profiled step (one panel per shape): its GPU time split into the slot-attention kernel,
    the eviction kernels and Quest's page kernels, against the best SDPA over the full cache (a line).
    False (nothing written) without matplotlib or profiles."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in rows if "profile" in r))
    if not shapes:
        return False
    fig, axes = plt.subplots(1, len(shapes), figsize=(10 * len(shapes), 5), squeeze=False)
    for ax, (b, s) in zip(axes[0], shapes):
        mine = [r for r in rows if (r["batch"], r["seq"]) == (b, s) and "profile" in r]
        left = [0.0] * len(mine)
        for part, prefixes in KERNEL_PARTS.items():
            us = [sum(k["us_per_step"] for k in r["profile"]["kernels"] if k["name"].startswith(prefixes)) for r in mine]
            ax.barh([r["impl"].removeprefix("kvfx-") for r in mine], us, left=left, label=part)
            left = [a + u for a, u in zip(left, us)]
        sdpa = [r["median_us"] for r in rows if (r["batch"], r["seq"]) == (b, s) and r["impl"] in ("sdpa-flash", "sdpa-cudnn")
                and "median_us" in r]
        if sdpa:
            ax.axvline(min(sdpa) / 4, color="gray", linestyle="--", linewidth=1, label="best SDPA / 4")
        for y, r in enumerate(mine):
            ax.text(left[y], y, f" {r.get('speedup_vs_best_sdpa', 0):.2f}x", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("GPU time per step by kernel (us, profiler)")
        ax.set_title(f"B={b}, S={s}: step vs best SDPA over the full cache")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.suptitle(f"kvfx policy decode step ({device})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
