"""Launch sweep of the positional slot kernel (`kvfx::attend` for kv="none"): splits x tile x pipelining.

B rows, Hq=32, Hkv=8, D=128, bf16, S cached tokens, no mask; each config timed three times (GPU time
of a CUDA-graph replay with a cold L2, median of --reps) so run-to-run noise shows beside the
differences. Writes slot_sweep.json. The defaults in kvfx.kernels.slot_attention (SLOT_BLOCK_N,
SLOT_NUM_WARPS, `default_slot_splits`) were checked against it.

example: python benchmarks/slot_sweep.py --batch 8 --seq 32768 65536
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from common import RESULTS, cuda_time_us, environment, write_json
from kvfx.kernels.slot_attention import attend_positions, default_slot_splits

HQ, HKV, D = 32, 8, 128


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python benchmarks/slot_sweep.py --batch 8 --seq 65536")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--splits", type=int, nargs="+", default=[16, 24, 32, 36, 48, 64, 96])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for slot_sweep.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("slot_sweep needs a CUDA GPU", file=sys.stderr)
        return 1
    rows = []
    for s in args.seq:
        q = torch.randn(args.batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn(2, args.batch, HKV, s, D, device="cuda", dtype=torch.bfloat16)
        rows.append(dict(seq=s, config="default", num_splits=default_slot_splits(q, HKV, s, 128, positional="none"), us=[
            cuda_time_us(lambda: attend_positions(q, k, v, None, None, None, -1, D ** -0.5), reps=args.reps)["median_us"]
            for _ in range(3)]))
        for block_n in (64, 128):
            for stages in (None, 2, 4):
                for splits in args.splits:
                    kw = dict(block_n=block_n, num_warps=4, num_splits=splits,
                              **({} if stages is None else {"num_stages": stages}))
                    us = [cuda_time_us(lambda: attend_positions(q, k, v, None, None, None, -1, D ** -0.5, **kw),
                                       reps=args.reps)["median_us"] for _ in range(3)]
                    rows.append(dict(seq=s, **kw, us=us))
                    print(s, kw, [round(u) for u in us], flush=True)
    write_json(args.out / "slot_sweep.json", dict(benchmark="slot_sweep", environment=environment(),
                                                 shape=dict(batch=args.batch, hq=HQ, hkv=HKV, head_dim=D), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
