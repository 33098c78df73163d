"""Quest's page kernels alone on the GPU: the page-scoring kernel over its launch, and the selection over
its warps, on the scores a decode step sees.

The store is policy_attention.py's (`full_store`: Quest reading 1/8 of the pages, B rows of S random bf16
tokens, Hq 32, Hkv 8, D 128). Rows:
- "score": `quest_page_scores` (`_quest_score_kernel`) at block_pages x num_warps, with the page bounds in
  the model dtype and in fp8 (`page_bounds`); GB/s over the bytes it reads (bounds and slot positions).
- "select": `quest_select` (`_quest_select_kernel`) at several warp counts, on the step's scores
  (max-pooled over `page_pool` neighbours, which makes ties), on distinct random scores, and on the
  step's scores of the first power-of-two pages (the store has S + 1 slots: 4097 pages at S64K, which the
  kernel holds as 4096 + a tail of 1, `quest.select_tiles`; also timed as one padded tile of 8192, as
  before session 19: `tiles` [8192, 0]); `reductions`: the block-wide reductions its bisection runs per head
  (mean), from a torch replay.
Session 18's run (results/quest_pages.json, H100) also timed a second search, snapped to keys, since
removed as slower; it set the scoring kernel's launch (`quest.SCORE_PAGES`, `quest.SCORE_WARPS`).
Times are CUDA-graph replays with a cold L2 (`common.cuda_time_us`); `default` marks the launch the
decode step uses.

example: python benchmarks/quest_pages.py --batch 8 --seq 65536
         python benchmarks/quest_pages.py --batch 8 --seq 65536 --out /tmp/results
         TRITON_INTERPRET=1 python benchmarks/quest_pages.py --device cpu --quick
         (CPU: the Triton interpreter on a tiny shape, a check that the script runs; no timing claim)
"""
from __future__ import annotations

import contextlib
import pathlib
import sys

import torch

from common import RESULTS, device_problem, doc_parser, environment, time_or_error, write_json
from policy_attention import CONFIGS, D, DTYPE, HKV, HQ, full_store
from kvfx.kernels import quest
from kvfx.kernels.policies import quest_page_ranking
from kvfx.kernels.quest import quest_page_scores, quest_select, select_warps

SCORE_LAUNCHES = [(p, w) for p in (16, 32, 64, 128) for w in (2, 4, 8)]  # (block_pages, num_warps)
SELECT_WARPS = (4, 8, 16, 32)


def order_keys(scores: torch.Tensor, newest: torch.Tensor, page_pool: int) -> torch.Tensor:
    """The select kernel's int keys [heads, pages] (as int64): `policies.quest_page_ranking`'s scores
    (the reference's ranking, which the kernel follows) in the kernel's order-preserving int32 form."""
    ranked, _ = quest_page_ranking(scores, newest, page_pool)
    bits = ranked.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()


def search_reductions(key: torch.Tensor, k: int) -> float:
    """Block-wide reductions per head (mean) of the select's bisection (`_kth_key_by_bits`), replayed."""
    bits = []
    for row in key:
        lo, n_lo, steps = -(1 << 31), row.numel(), 0
        for bit in range(31, -1, -1):
            if n_lo == k:
                break
            steps += 1
            n = int((row >= lo + (1 << bit)).sum())
            lo, n_lo = (lo + (1 << bit), n) if n >= k else (lo, n_lo)
        bits.append(steps)
    return sum(bits) / len(bits)


def score_rows(q: torch.Tensor, store, spec, base: dict, reps: int, device: str) -> list[dict]:
    """The scoring kernel at every `SCORE_LAUNCHES` launch, with its read rate."""
    nbytes = 2 * store.page_min.numel() * store.page_min.element_size() + store.slot_pos.numel() * 4
    rows = []
    for block_pages, warps in SCORE_LAUNCHES:
        t = time_or_error(lambda: quest_page_scores(q, store, spec, block_pages=block_pages, num_warps=warps),
                          reps, device)
        rows.append(dict(base, kernel="score", bounds=spec.page_bounds, block_pages=block_pages, num_warps=warps,
                         default=(block_pages, warps) == (quest.SCORE_PAGES, quest.SCORE_WARPS), bytes=nbytes, **t,
                         **({"gb_per_s": nbytes / t["median_us"] / 1e3} if "median_us" in t else {})))
    return rows


def select_rows(q: torch.Tensor, store, spec, base: dict, reps: int, device: str, gen: torch.Generator) -> list[dict]:
    """The select at every `SELECT_WARPS` count on the step's scores, distinct scores and the step's first
    power-of-two pages, each row with the replayed reductions; where `quest.select_tiles` makes a tail
    tile, also without it (one padded tile: `quest.SELECT_TAIL_PAGES` = 0)."""
    scores, newest = quest_page_scores(q, store, spec)
    k_pages = spec.pages_read(store.slot_pos.shape[2])
    distinct = torch.randn(scores.shape, device=device, generator=gen)
    pow2 = 1 << (scores.shape[1].bit_length() - 1)  # the first pages, a power of two of them: no padding
    rows = []
    for label, sc, held in (("step", scores, newest), ("distinct", distinct, newest),
                            (f"step, first {pow2} pages", scores[:, :pow2].contiguous(), newest[:, :pow2].contiguous())):
        steps = search_reductions(order_keys(sc, held, spec.page_pool), k_pages)
        tails = (quest.SELECT_TAIL_PAGES, 0) if quest.select_tiles(sc.shape[1])[1] else (quest.SELECT_TAIL_PAGES,)
        for tail_pages in tails:
            for warps in SELECT_WARPS:
                with select_tail_pages(tail_pages):
                    tiles = quest.select_tiles(sc.shape[1])
                    t = time_or_error(lambda: quest_select(sc, held, base["batch"], k_pages, spec.page_pool,
                                                           num_warps=warps), reps, device)
                rows.append(dict(base, kernel="select", scores=label, pages=sc.shape[1], tiles=list(tiles),
                                 num_warps=warps, default=warps == select_warps(sc.shape[1]) and tail_pages ==
                                 quest.SELECT_TAIL_PAGES, pages_read=k_pages, page_pool=spec.page_pool,
                                 reductions=steps, **t))
    return rows


@contextlib.contextmanager
def select_tail_pages(n: int):
    """`quest.SELECT_TAIL_PAGES` = n inside the block."""
    saved, quest.SELECT_TAIL_PAGES = quest.SELECT_TAIL_PAGES, n
    try:
        yield
    finally:
        quest.SELECT_TAIL_PAGES = saved


def bench(b: int, s: int, reps: int, device: str) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, HQ, 1, D, device=device, dtype=DTYPE, generator=gen)
    k = torch.randn(b, HKV, s, D, device=device, dtype=DTYPE, generator=gen)
    base = dict(batch=b, seq=s)
    rows = []
    for config in ("quest-1/8", "quest-1/8-fp8-bounds"):
        fmt, store = full_store(CONFIGS[config], k, k)  # (the page kernels read no values)
        rows += score_rows(q, store, fmt.spec, base, reps, device)
        if fmt.spec.page_bounds == "model":  # the selection does not depend on the bounds' dtype
            rows += select_rows(q, store, fmt.spec, base, reps, device, gen)
        del store
    return rows


def plot(path: pathlib.Path, rows: list[dict], device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for bounds in dict.fromkeys(r["bounds"] for r in rows if r["kernel"] == "score"):
        mine = [r for r in rows if r["kernel"] == "score" and r["bounds"] == bounds and "median_us" in r]
        left.plot(range(len(mine)), [r["median_us"] for r in mine], marker="o", label=f"bounds {bounds}")
        left.set_xticks(range(len(mine)), [f"{r['block_pages']}p/{r['num_warps']}w" for r in mine], rotation=60)
    left.set(title="page scoring (pages a program / warps)", ylabel="us")
    left.legend()
    sel = [r for r in rows if r["kernel"] == "select" and "median_us" in r]
    right.barh([f"{r['scores']} {r['num_warps']}w {'+'.join(map(str, r.get('tiles', [])))}" for r in sel], [r["median_us"] for r in sel],
               color=["C1" if r["default"] else "C0" for r in sel])
    right.set(title="page selection (scores, warps; default orange)", xlabel="us")
    fig.suptitle(f"Quest's page kernels, B{rows[0]['batch']} S{rows[0]['seq']} - {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = doc_parser(__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--quick", action="store_true", help="B 1, S 4K (CPU: S 512): a smoke run")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the Triton interpreter (TRITON_INTERPRET=1) on a tiny shape, no timing claim")
    parser.add_argument("--reps", type=int, default=30, help="timed runs per measurement (median reported)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for quest_pages.json/.png")
    args = parser.parse_args(argv)
    if problem := device_problem("quest_pages", args.device):
        print(problem, file=sys.stderr)
        return 2
    b, s = ((1, 4096) if args.device == "cuda" else (1, 512)) if args.quick else (args.batch, args.seq)
    rows = bench(b, s, args.reps, args.device)
    for r in rows:
        what = (f"score  bounds {r['bounds']:<5} {r['block_pages']:>3} pages {r['num_warps']} warps"
                if r["kernel"] == "score" else
                f"select {r['scores']:<24} {r['num_warps']:>2} warps tiles {r['tiles']}  {r['reductions']:4.1f} reductions")
        status = f"{r['median_us']:8.1f} us" if "median_us" in r else r["error"]
        print(f"B{b} S{s}  {what:<70} {status}{'  (default)' if r['default'] else ''}", flush=True)
    payload = {"benchmark": "quest_pages", "environment": environment(),
               "shape": dict(hq=HQ, hkv=HKV, head_dim=D, dtype=str(DTYPE)), "rows": rows}
    write_json(args.out / "quest_pages.json", payload)
    plot(args.out / "quest_pages.png", rows, payload["environment"]["device"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
