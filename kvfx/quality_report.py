"""Tables and plots of quality rows (`kvfx.quality`): passkey accuracy and perplexity per method.

Rows with a `budget` are points of a curve (one line per `series`, x = budget); rows without one are
full-cache methods, drawn as horizontal reference lines beside curves, or as bars when no method has
a budget. Rows from other libraries (e.g. kvpress) are plain rows with their own series.
"""
from __future__ import annotations

import pathlib
from collections import defaultdict
from typing import Iterable, Sequence

METRICS = {"passkey": ("correct", "passkey accuracy"), "perplexity": ("perplexity", "perplexity")}


def by_method(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """Rows grouped by method label, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return groups


def score(rows: Sequence[dict]) -> float:
    """A method's figure: passkey accuracy (fraction correct) or mean perplexity over its rows."""
    key, _ = METRICS[rows[0]["task"]]
    return sum(float(r[key]) for r in rows) / len(rows)


def _kv_ratio(rows: Sequence[dict]) -> str:
    ratios = [r["kv_bytes"] / r["fp_kv_bytes"] for r in rows if r.get("fp_kv_bytes")]
    return f"{sum(ratios) / len(ratios):.2f}x" if ratios else "-"


def _sites(rows: Sequence[dict]) -> str:
    if rows[0].get("sites_found") is None:
        return "-"
    low = min(rows, key=lambda r: r["sites_rewritten"] / max(r["sites_found"], 1))
    return f"{low['sites_rewritten']}/{low['sites_found']}"


def _grid(header: Sequence[str], body: list[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body])


def _accuracy_by(groups: dict[str, list[dict]], field: str, fmt) -> str:
    values = sorted({r[field] for rows in groups.values() for r in rows})
    body = []
    for method, rows in groups.items():
        cells = []
        for v in values:
            mine = [r for r in rows if r[field] == v]
            cells.append(f"{sum(r['correct'] for r in mine)}/{len(mine)}" if mine else "")
        body.append([method, *cells, f"{score(rows):.0%}"])
    return _grid(["method", *(fmt(v) for v in values), "all"], body)


def table(rows: Sequence[dict]) -> str:
    """A text table per task: passkey accuracy by prompt length and by needle depth (a policy that
    keeps only recent tokens shows as failing at shallow depths), perplexity against the first
    full-precision row, KV bytes as kvfx's report measured them, and the sites kvfx rewrote (the
    fewest seen for the method: anything below all of them means part of the model ran unchanged)."""
    out = []
    passkey = by_method(r for r in rows if r["task"] == "passkey")
    if passkey:
        out.append("passkey accuracy by prompt length (tokens)")
        out.append(_accuracy_by(passkey, "length", str))
        out.append("\npasskey accuracy by needle depth")
        out.append(_accuracy_by(passkey, "depth", lambda d: f"{d:.0%}"))
        out.append("\n" + _grid(["method", "KV vs fp", "sites rewritten"],
                                [[m, _kv_ratio(rs), _sites(rs)] for m, rs in passkey.items()]))
    ppl = by_method(r for r in rows if r["task"] == "perplexity")
    if ppl:
        reference_method = next((m for m, rs in ppl.items() if rs[0]["series"] == "eager fp"), next(iter(ppl)))
        reference = score(ppl[reference_method])
        body = [[m, f"{score(rs):.3f}", f"{score(rs) / reference - 1:+.2%}", _kv_ratio(rs), _sites(rs)]
                for m, rs in ppl.items()]
        first = ppl[reference_method][0]
        out.append(f"{'' if not out else chr(10)}perplexity ({first['prefix']}-token prefill, "
                   f"{first['tokens']} teacher-forced decode steps)")
        out.append(_grid(["method", "perplexity", f"vs {reference_method}", "KV vs fp", "sites rewritten"], body))
    return "\n".join(out)


def plot(rows: Sequence[dict], path: pathlib.Path, title: str) -> bool:
    """One PNG for the rows of one task: curves against budget when any method has a budget (full-cache
    methods as horizontal lines), else a bar per method. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    task = rows[0]["task"]
    _, ylabel = METRICS[task]
    groups = by_method(rows)
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    full: dict[str, float] = {}
    for method, mine in groups.items():
        if mine[0]["budget"] is None:
            full[method] = score(mine)
        else:
            curves[mine[0]["series"]].append((float(mine[0]["budget"]), score(mine)))
    fig, ax = plt.subplots(figsize=(10, 4.5) if curves else (7.5, 4.5))
    shown = (lambda v: f"{v:.0%}") if task == "passkey" else (lambda v: f"{v:.3f}")
    if curves:
        for i, (series, points) in enumerate(curves.items()):
            points.sort()
            external = not series.startswith("kvfx")
            # series often coincide (two methods at 0%): distinct markers keep each visible
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="xo+sd^v"[i % 7], markerfacecolor="none",
                    linestyle="--" if external else "-", label=series)
        for i, (method, value) in enumerate(full.items()):
            ax.axhline(value, color=f"C{(len(curves) + i) % 10}", linestyle=":", linewidth=1.5,
                       label=f"{method}, full cache: {shown(value)}")
        ax.set_xlabel("budget (fraction of prompt tokens kept; quest: of pages read)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        names = list(full)
        bars = ax.bar(range(len(names)), [full[n] for n in names], color=[f"C{i % 10}" for i in range(len(names))])
        ax.bar_label(bars, labels=[shown(full[n]) for n in names])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        if task == "perplexity":
            ax.set_ylim(min(full.values()) * 0.95, max(full.values()) * 1.03)
    if task == "passkey":
        ax.set_ylim(-0.03, 1.08)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
