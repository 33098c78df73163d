"""Shared benchmark utilities: timing (warmup, cold L2, medians with spread), environment, JSON, plots."""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Callable

import torch

RESULTS = pathlib.Path(__file__).parent / "results"
L2_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (H100: 50 MB)


def cuda_time_us(fn: Callable[[], object], reps: int = 50, warmup: int = 5, graph: bool = True) -> dict:
    """GPU time of fn() in microseconds: median and 20th / 80th percentiles over `reps` runs.

    Each run starts with a cold L2 (a 256 MB write between runs, outside the timed region), so a small
    KV cache is not served from L2 across repetitions. With graph=True fn is captured once in a CUDA
    graph and replayed, which removes Python launch overhead (what a decode loop under
    torch.compile(mode="reduce-overhead") sees); if capture fails it is timed eagerly instead and the
    result says so.
    """
    for _ in range(warmup):  # also compiles Triton kernels before any capture
        fn()
    torch.cuda.synchronize()
    run, mode = fn, "eager"
    if graph:
        try:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                fn()
            run, mode = cuda_graph.replay, "cuda_graph"
        except Exception:  # e.g. an op that syncs: fall back to eager launches
            torch.cuda.synchronize()
    times = sorted(cold_l2_times_us(run, reps))
    return {"median_us": statistics.median(times), "p20_us": times[len(times) // 5],
            "p80_us": times[(4 * len(times)) // 5], "reps": reps, "mode": mode}


def cold_l2_times_us(run: Callable[[], object], reps: int, before: Callable[[], object] | None = None) -> list[float]:
    """GPU microseconds of each of `reps` runs of run(), in order, each after `before()` (if given) and a
    256 MB write that leaves the L2 cold, both outside the timed region (CUDA events around run())."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if before is not None:
            before()
        flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [1000.0 * start.elapsed_time(end) for start, end in events]


def copy_bandwidth_gb_s(nbytes: int = 1 << 30) -> dict:
    """Device-to-device copy bandwidth, the reference a memory-bound kernel's GB/s is read against:
    `dst.copy_(src)` of `nbytes` uint8, timed like the kernels (`cuda_time_us`, CUDA-graph replay).

    A copy counts its read and its write (2 * nbytes), as STREAM and nvbandwidth count one, so the figure
    compares with published copy numbers. It is not a ceiling for a kernel that only reads: HBM loses
    time turning between reads and writes, and on an H100 a 1 GiB copy gave 2430 GB/s where SDPA's
    decode read 3040 GB/s. At 1 GiB the cold-L2 flush between runs is irrelevant (256 MiB gave 2950).
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    timing = cuda_time_us(lambda: dst.copy_(src))
    return dict(timing, bytes=2 * nbytes, gb_per_s=2 * nbytes / timing["median_us"] / 1e3)


def wall_time_us(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> dict:
    """Wall-clock median of fn() in microseconds, for CPU smoke runs (the Triton interpreter): a check
    that a script runs, never a performance figure."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - start))
    times.sort()
    return {"median_us": statistics.median(times), "p20_us": times[len(times) // 5],
            "p80_us": times[(4 * len(times)) // 5], "reps": reps, "mode": "cpu_wall_clock"}


def time_or_error(fn, reps: int, device: str = "cuda") -> dict:
    """`cuda_time_us` (`wall_time_us` on the CPU), or {"error": ...} for an input a kernel or backend
    does not take (OOM included)."""
    try:
        return cuda_time_us(fn, reps=reps) if device == "cuda" else wall_time_us(fn, reps=min(reps, 3))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    except Exception as exc:  # noqa: BLE001  (a backend that does not take these inputs)
        torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def kernel_profile(step, steps: int = 3, top: int = 12) -> dict:
    """GPU time per call of step() by kernel name (the top kernels by time), from torch.profiler over
    `steps` eager calls: where the time of a step goes (e.g. attention vs the eviction kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    kernels = sorted(((e.key, e.self_device_time_total / steps, e.count // steps) for e in events
                      if e.self_device_time_total > 0), key=lambda x: -x[1])
    total = sum(k[1] for k in kernels)
    return {"device_us_per_step": total,
            "kernels": [{"name": n[:90], "us_per_step": round(us, 1), "calls_per_step": c, "share": round(us / total, 3)}
                        for n, us, c in kernels[:top]]}


def graph_timeline(fn: Callable[[], object], reps: int = 10) -> dict:
    """Each kernel of a CUDA-graph replay of fn(), as `cuda_time_us` times it (cold L2 before each
    replay): its start and end from the step's first start, medians over `reps` replays; the step's span
    (first start to last end) and its gaps, the span's time with no kernel running (what the launches
    between kernels cost, which a profile of eager calls, `kernel_profile`, warm L2, does not show); its
    lead, from the L2 flush's end to the step's first kernel (the graph's launch); and the copies and
    memsets in the replays (none expected: a step's graph should hold only kernels).
    Chained launches (`slot_attention.chained_launch`) start a kernel while the one before it drains,
    and its wait counts in its duration: read the ends and the gaps then, not the durations' sum."""
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # e.g. an op that syncs: no graph to trace
        torch.cuda.synchronize()
        return {"error": f"no CUDA graph: {type(error).__name__}: {error}"[:300]}
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:  # the trace's "kernel" events: no memcpy, no profiler overhead
        trace = pathlib.Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "kernel"))
    # Copies and memsets a graph may hold (a captured host-to-device copy, a zeroed buffer) are not kernels:
    # listed apart, per replay, so a step slower than its kernels' span can be read.
    others, other_us = collections.Counter(), collections.Counter()
    for e in (e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")):
        others[e["cat"], e["name"][:90]] += 1
        other_us[e["cat"], e["name"][:90]] += e.get("dur", 0.0)
    per_rep = len(kernels) // reps
    replays = [kernels[i * per_rep:(i + 1) * per_rep] for i in range(reps)]
    if per_rep < 2 or per_rep * reps != len(kernels) or len({tuple(k[2] for k in r) for r in replays}) != 1:
        return {"error": f"{len(kernels)} kernels traced over {reps} replays: not the same flush + graph each"}
    steps = [replay[1:] for replay in replays]  # each replay without its L2 flush (the first kernel)
    timeline = []
    for j, first in enumerate(steps[0]):
        start = statistics.median(step[j][0] - step[0][0] for step in steps)
        end = statistics.median(step[j][1] - step[0][0] for step in steps)
        timeline.append({"name": first[2][:90], "start_us": round(start, 1), "end_us": round(end, 1),
                         "us": round(statistics.median(step[j][1] - step[j][0] for step in steps), 1)})
    spans, gaps = [], []
    leads = [replay[1][0] - replay[0][1] for replay in replays]
    for step in steps:
        spans.append(max(k[1] for k in step) - step[0][0])
        busy, reach = 0.0, step[0][0]
        for begin, finish, _ in step:  # the union of the kernels' intervals (they overlap when chained)
            busy += max(0.0, finish - max(begin, reach))
            reach = max(reach, finish)
        gaps.append(spans[-1] - busy)
    return {"span_us": round(statistics.median(spans), 1), "gaps_us": round(statistics.median(gaps), 1),
            "lead_us": round(statistics.median(leads), 1), "kernels": timeline,
            "copies_and_memsets": [{"kind": kind, "name": name, "per_replay": n / reps,
                                    "us_per_replay": round(other_us[(kind, name)] / reps, 1)}
                                   for (kind, name), n in others.items()]}


def environment() -> dict:
    """Device, versions and commit, for the header of every result file."""
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       check=True, cwd=pathlib.Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None  # the device machine gets a copy of the tree without .git
    return env


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser from its docstring: the first paragraph as --help's description, the text from
    "example:" on as its epilog, laid out as written."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog="example:" + doc.split("example:")[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def device_problem(script: str, device: str) -> str | None:
    """Why `script` cannot run its kernels on `device` here (None: it can): CUDA needs a GPU, and the CPU
    runs Triton kernels only in the interpreter."""
    if device == "cuda" and not torch.cuda.is_available():
        return f"{script}: needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1 for a smoke run)"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"{script}: --device cpu runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1"
    return None


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def plot_speedups(path: pathlib.Path, rows: list[dict], group_key: str, x_key: str, series_key: str,
                  y_key: str, title: str, ylabel: str, baseline: float | None = None) -> bool:
    """One panel per value of group_key, y_key against x_key, a line per series_key. Returns False
    (and writes nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({r[group_key] for r in rows})
    if not groups:  # nothing ran (every run failed): no plot
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        mine = [r for r in rows if r[group_key] == group and r.get(y_key) is not None]
        for series in dict.fromkeys(r[series_key] for r in mine):
            points = sorted((r[x_key], r[y_key]) for r in mine if r[series_key] == series)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=series)
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{group_key}={group}")
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
