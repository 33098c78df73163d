"""A policy decode step's time replay by replay, in order, from the store's first step on.

policy_attention.py reports a median over 30 replays after 5 warm-up calls. Session 20 found that a
Quest step runs about 20 us slower for its first 10-44 replays after a store is built than for every
later one (results/quest_step_modes.json), while H2O's step has one mode: this script shows such
modes. Per config: the store of policy_attention.py (`full_store`: B rows of S random bf16 tokens,
Hq 32, Hkv 8, D 128, layer 4 of 32), one CUDA graph of the step, then `--replays` replays each timed
with CUDA events after a cold-L2 flush, at the same position each replay or (`--advance`) the next
one, as in decoding. `--busy S` runs matmuls for S seconds just before the first replay, so the replays
start on a GPU already at its working clocks; each row records the SM clock (pynvml, when there) before
and after its replays. `--stores N` builds N new stores per config, one after another in the process, the
i-th after a spacer of i x `--spacer-mib` MiB (so each lands at other addresses), to count how often a new
store starts slow (`slow_replays`); `--keep-stores` holds every store built so far (each new one then
lands in memory the process never used before), `--empty-cache` hands the allocator's free blocks back to
the driver before each store is built; `--pause S` leaves the GPU idle for S seconds between a store's
build and its first step (as the kernels' first load in the process does for the first store). The plot
draws each config's times against the replay's index.

example: python benchmarks/step_modes.py --batch 8 --seq 65536
         python benchmarks/step_modes.py --configs quest-1/8 --advance --replays 200 --out /tmp/results
         python benchmarks/step_modes.py --configs h2o-20% quest-1/8 --busy 2
         python benchmarks/step_modes.py --configs quest-1/8 --advance --stores 6 --spacer-mib 64
         python benchmarks/step_modes.py --configs quest-1/8 --advance --stores 4 --keep-stores
         python benchmarks/step_modes.py --configs quest-1/8 --advance --stores 4 --pause 2
         TRITON_INTERPRET=1 python benchmarks/step_modes.py --device cpu --quick
         (CPU: the Triton interpreter on a tiny shape, wall-clock per step, no graph: a check that the
         script runs; no timing claim)
"""
from __future__ import annotations

import pathlib
import statistics
import sys
import time

import torch

from common import RESULTS, cold_l2_times_us, device_problem, doc_parser, environment, write_json
from policy_attention import CONFIGS, D, DTYPE, HKV, HQ, LAYER, LAYERS, fill_store, full_store
import kvfx.kernels  # noqa: F401  (registers the ops)


def sm_clock_mhz() -> int | None:
    """The GPU's SM clock now (None without pynvml)."""
    try:
        return torch.cuda.clock_rate()
    except Exception:  # pynvml missing or NVML unavailable: the clock is unknown, the timing still stands
        return None


def keep_busy(seconds: float, device: str) -> None:
    """bf16 matmuls for `seconds` of GPU time, so the next work starts at the clocks of a busy GPU."""
    if seconds <= 0:
        return
    a = torch.randn(8192, 8192, device=device, dtype=DTYPE)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize()


def slow_replays(times: list[float], margin: float = 0.04) -> int:
    """How many replays a step ran in a slow mode before it settled: 1 + the index of the last replay of the
    first half (the graph's first launch, replay 0, aside) over the second half's median by more than
    `margin`; 0 when none is."""
    settled = statistics.median(times[len(times) // 2:]) * (1 + margin)
    slow = [i for i in range(1, len(times) // 2) if times[i] > settled]
    return slow[-1] + 1 if slow else 0


def replay_times(name: str, b: int, s: int, replays: int, advance: bool, device: str, busy: float = 0.0,
                 rounds: int = 1, spacer_mib: int = 0, kept: list | None = None, pause: float = 0.0) -> dict:
    """Microseconds of each of `replays` steps of config `name`, in order, from a newly built store
    (`times_us`), with the SM clock before and after them. With `rounds` > 1 the store's own tensors are
    then refilled with new tokens and the same graph replayed again, `rounds` times in all (times_us
    holds them all, in order). `spacer_mib`: that much memory is taken first and held, so the store lands
    elsewhere. `kept`: a list the store and its graph are appended to (the caller holds them). `pause`:
    seconds the GPU is left idle between the store's build and its first step."""
    spacer = torch.empty(spacer_mib << 20, dtype=torch.uint8, device=device)  # noqa: F841 (held: it moves the store)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, HQ, 1, D, device=device, dtype=DTYPE, generator=gen)
    k, v = (torch.randn(b, HKV, s, D, device=device, dtype=DTYPE, generator=gen) for _ in range(2))
    fmt, store = full_store(CONFIGS[name], k, v)
    k1, v1 = k[:, :, -1:].clone(), v[:, :, -1:].clone()
    del k, v
    pos = torch.tensor([s], device=device)

    def step():
        return torch.ops.kvfx.policy_attend(q, k1, v1, pos, *store.tensors(), None, False, D ** -0.5, fmt.options,
                                            LAYER, LAYERS)

    if device == "cuda":
        torch.cuda.synchronize()
        time.sleep(pause)
        step()  # compiles the kernels (the store's first step)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    times, clocks = [], []
    for round_ in range(rounds):
        if round_:  # the same tensors (and graph), new tokens
            k, v = (torch.randn(b, HKV, s, D, device=device, dtype=DTYPE, generator=gen) for _ in range(2))
            fill_store(store, k, v)
            del k, v
            pos.fill_(s)
        if device == "cpu":
            for _ in range(replays):
                pos.add_(int(advance))
                start = time.perf_counter()
                step()
                times.append(1e6 * (time.perf_counter() - start))
            continue
        keep_busy(busy, device)
        clocks.append(sm_clock_mhz())
        times += cold_l2_times_us(graph.replay, replays, before=lambda: pos.add_(int(advance)))
        clocks.append(sm_clock_mhz())
    if kept is not None:
        kept.append((store, graph if device == "cuda" else None))
    return dict(times_us=times, sm_clock_mhz_before_after=clocks)


def plot(path: pathlib.Path, rows: list[dict], device: str) -> bool:
    """Each config's step time against the replay's index; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        ax.plot(range(1, len(r["times_us"]) + 1), r["times_us"], marker=".", linewidth=1,
                label=f"{r['config']}, store {r['store']} ({'advancing' if r['advancing_position'] else 'same'} "
                      "position)")
    ax.set_xlabel("replay since the store was built")
    ax.set_ylabel("step time (us, CUDA events)" if device == "cuda" else "step time (us, wall clock)")
    ax.set_title(f"policy decode step, replay by replay (B{rows[0]['batch']} S{rows[0]['seq']}, {device})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = doc_parser(__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                        default=["quest-1/8", "quest-1/8-fp8-bounds", "h2o-20%"])
    parser.add_argument("--replays", type=int, default=100, help="timed replays per config, in order")
    parser.add_argument("--advance", action="store_true", help="the next position each replay (default: the same)")
    parser.add_argument("--busy", type=float, default=0.0, metavar="S",
                        help="seconds of matmuls just before each config's first replay (default 0)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="refill the store's own tensors with new tokens and replay again, this many rounds")
    parser.add_argument("--stores", type=int, default=1, help="new stores per config, one after another (default 1)")
    parser.add_argument("--spacer-mib", type=int, default=0,
                        help="the i-th store is built after a spacer of i x this many MiB (default 0)")
    parser.add_argument("--keep-stores", action="store_true",
                        help="hold every store built (a new one never reuses a freed store's memory)")
    parser.add_argument("--empty-cache", action="store_true",
                        help="torch.cuda.empty_cache() before each new store (the allocator's free blocks go back)")
    parser.add_argument("--pause", type=float, default=0.0, metavar="S",
                        help="seconds of an idle GPU between each store's build and its first step (default 0)")
    parser.add_argument("--quick", action="store_true", help="B 1, S 4K (CPU: S 256, 3 replays): a smoke run")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the Triton interpreter (TRITON_INTERPRET=1) on a tiny shape, no timing claim")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for step_modes.json/.png")
    args = parser.parse_args(argv)
    if problem := device_problem("step_modes", args.device):
        print(problem, file=sys.stderr)
        return 2
    b, s, replays = args.batch, args.seq, args.replays
    if args.quick:
        b, s, replays = (1, 4096, replays) if args.device == "cuda" else (1, 256, 3)
    rows, kept = [], [] if args.keep_stores else None
    for name in args.configs:
        for store in range(args.stores):
            if args.empty_cache and args.device == "cuda":
                torch.cuda.empty_cache()
            replayed = replay_times(name, b, s, replays, args.advance, args.device,
                                    busy=args.busy if args.device == "cuda" else 0.0, rounds=args.rounds,
                                    spacer_mib=store * args.spacer_mib, kept=kept, pause=args.pause)
            times = replayed.pop("times_us")
            rows.append(dict(config=name, store=store, spacer_mib=store * args.spacer_mib, batch=b, seq=s,
                             advancing_position=args.advance, busy_s=args.busy, rounds=args.rounds,
                             keep_stores=args.keep_stores, empty_cache=args.empty_cache, pause_s=args.pause,
                             **replayed,
                             slow_replays=slow_replays(times), first_10_median_us=statistics.median(times[:10]),
                             second_half_median_us=statistics.median(times[len(times) // 2:]),
                             times_us=[round(t, 1) for t in times]))
            print(f"{name:<24} store {store}: first 10 {rows[-1]['first_10_median_us']:8.1f} us, second half "
                  f"{rows[-1]['second_half_median_us']:8.1f} us, {rows[-1]['slow_replays']} slow replays", flush=True)
    write_json(args.out / "step_modes.json", {"benchmark": "step_modes", "environment": environment(), "rows": rows})
    plot(args.out / "step_modes.png", rows, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
