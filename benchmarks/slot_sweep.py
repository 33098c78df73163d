"""Launch sweep of the slot-attention kernel: over a cache addressed by position (`kvfx::attend`,
kv="none"), or over a policy store's slots (an H2O store at 20% of S, one per --formats).

B rows, Hq=32, Hkv=8, D=128, bf16, S cached tokens, no mask; each config timed three times (GPU time
of a CUDA-graph replay with a cold L2, median of --reps) so run-to-run noise shows beside the
differences. Positional: splits x tile x pipelining. Store (logits kept, as H2O's step reads them):
tile x warps x pipelining x the dead-tile branch at the default splits, then a splits sweep of the
best three. Writes slot_sweep.json (positional) or slot_sweep_store.json. The defaults in
kvfx.kernels.slot_attention (SLOT_BLOCK_N, SLOT_NUM_WARPS, STORE_LAUNCH, `default_slot_splits`)
were checked against it.

example: python benchmarks/slot_sweep.py --batch 8 --seq 32768 65536
         python benchmarks/slot_sweep.py --target store --formats int4 fp8 --seq 65536
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from common import RESULTS, cuda_time_us, environment, write_json
from kvfx.kernels.slot_attention import STORE_LAUNCH, attend_positions, default_slot_splits, slot_partials

HQ, HKV, D = 32, 8, 128
# (slots a tile, warps) of the store sweep: at most 32 slots a warp, at least 16
TILES = [(32, 1), (64, 1), (64, 2), (128, 2), (128, 4), (256, 4), (256, 8)]
# (skip_dead, num_stages): the dead-tile branch keeps Triton from pipelining the loads, so stages only
# vary without it (3 is Triton's default)
BRANCHES = [(True, 3), (False, 2), (False, 3), (False, 4)]


def timed(fn, reps: int) -> list[float]:
    return [cuda_time_us(fn, reps=reps)["median_us"] for _ in range(3)]


def sweep_positional(args) -> list[dict]:
    rows = []
    for s, b in ((s, b) for b in args.batch for s in args.seq):
        q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn(2, b, HKV, s, D, device="cuda", dtype=torch.bfloat16)
        splits = default_slot_splits(q, HKV, s, 128, positional="none")
        us = timed(lambda: attend_positions(q, k, v, None, None, None, -1, D ** -0.5), args.reps)
        rows.append(dict(batch=b, seq=s, config="default", num_splits=splits, us=us))
        for block_n in (64, 128):
            for stages in (None, 2, 4):
                for splits in args.splits:
                    kw = dict(block_n=block_n, num_warps=4, num_splits=splits,
                              **({} if stages is None else {"num_stages": stages}))
                    us = timed(lambda: attend_positions(q, k, v, None, None, None, -1, D ** -0.5, **kw), args.reps)
                    rows.append(dict(batch=b, seq=s, **kw, us=us))
                    print(s, kw, [round(u) for u in us], flush=True)
    return rows


def sweep_store(args) -> list[dict]:
    from policy_attention import full_store

    rows = []
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles]
    branches = [(b[0] == "T", int(b[1:])) for b in args.branches]
    for b in args.batch:
        for s in args.seq:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            k, v = torch.randn(2, b, HKV, s, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            pos = torch.tensor([s], device="cuda")
            for kv in args.formats:
                _, store = full_store(dict(kv=kv, policy="h2o", budget=0.2), k, v)
                c = store.slot_pos.shape[-1]
                launch = STORE_LAUNCH[kv]

                def run(**kw):
                    return slot_partials(q, pos, store, None, False, D ** -0.5, want_logits=True, **kw)

                def record(kw, label=None):
                    try:
                        us = timed(lambda: run(**kw), args.reps)
                    except Exception as e:  # e.g. out of shared memory at a deep pipeline
                        rows.append(dict(base, **kw, error=f"{type(e).__name__}: {str(e)[:120]}"))
                        return None
                    splits = kw.get("num_splits") or default_slot_splits(q, HKV, c, kw["block_n"],
                                                                          split_slots=launch.split_slots)
                    rows.append(dict(base, **dict(kw, num_splits=splits), us=us,
                                     **({"config": label} if label else {})))
                    print(b, s, kv, rows[-1]["num_splits"], kw, [round(u, 1) for u in us], flush=True)
                    return min(us)
                base = dict(batch=b, seq=s, kv=kv, slots=c)
                default = dict(block_n=launch.block_n, num_warps=launch.num_warps, skip_dead=launch.skip_dead,
                               num_stages=launch.num_stages)
                tried = [(record(default, "default"), default)]
                for block_n, warps in tiles:
                    for skip, stages in branches:
                        kw = dict(block_n=block_n, num_warps=warps, skip_dead=skip, num_stages=stages)
                        tried.append((record(kw), kw))
                best = sorted((t for t in tried if t[0] is not None), key=lambda t: t[0])[:args.top]
                for _, kw in best:
                    unit = default_slot_splits(q, HKV, c, kw["block_n"], split_slots=launch.split_slots)
                    for factor in args.split_factors:
                        record(dict(kw, num_splits=max(1, round(factor * unit))))
                del store
                torch.cuda.empty_cache()
                write(args, rows)  # after each format: a run cut short keeps what it measured
    return rows


def write(args, rows: list[dict]) -> None:
    name = "slot_sweep.json" if args.target == "positional" else "slot_sweep_store.json"
    write_json(args.out / name, dict(benchmark=f"slot_sweep ({args.target})", environment=environment(),
                                     shape=dict(batch=args.batch, hq=HQ, hkv=HKV, head_dim=D), rows=rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python benchmarks/slot_sweep.py --batch 8 --seq 65536\n"
                                            "         python benchmarks/slot_sweep.py --target store --formats int4")
    parser.add_argument("--target", choices=("positional", "store"), default="positional")
    parser.add_argument("--formats", nargs="+", default=["int4", "int2", "fp8", "int8", "none"],
                        help="store target: the stores' kv formats")
    parser.add_argument("--tiles", nargs="*", default=[f"{n}x{w}" for n, w in TILES],
                        help="store target: (slots a tile)x(warps) to try")
    parser.add_argument("--branches", nargs="*", default=[("T" if k else "F") + str(st) for k, st in BRANCHES],
                        help="store target: T|F (skip dead tiles) + pipeline stages, e.g. T3 F2 F3")
    parser.add_argument("--split-factors", type=float, nargs="*", default=[0.5, 2, 4],
                        help="store target: splits tried for the best configs, as factors of the default rule's")
    parser.add_argument("--top", type=int, default=3, help="store target: configs whose splits are swept")
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--splits", type=int, nargs="+", default=[16, 24, 32, 36, 48, 64, 96],
                        help="positional target: the splits to try")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for the JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("slot_sweep needs a CUDA GPU", file=sys.stderr)
        return 1
    write(args, sweep_positional(args) if args.target == "positional" else sweep_store(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
