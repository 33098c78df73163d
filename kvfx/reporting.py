"""What kvfx did to a compiled model: every attention site, and the KV bytes held.

`kvfx.report(x)` takes the function returned by ``torch.compile(..., backend="kvfx")`` or a module
whose ``forward`` is one, and returns a `Report`; ``print(report)`` shows a table.
"""
from __future__ import annotations

import gc
import inspect
from dataclasses import dataclass, field
from typing import Any

from torch.utils.weak import WeakIdKeyDictionary


@dataclass(frozen=True)
class SiteReport:
    """One attention site in one compiled graph."""

    graph: int          # which graph dynamo handed the backend (prefill and decode are two)
    layer: int          # the site's order among the graph's attention sites
    pattern: str        # what was found
    rewritten: bool
    reason: str         # why not, in words a user can act on ("" when rewritten)
    storage: str        # "model dtype", "int8", ... or "unchanged"


@dataclass
class Session:
    """Everything the compilations with one set of options produced.

    Keyed by the options' value, not by the torch.compile call: dynamo reuses a compiled graph for
    any later torch.compile of the same code with equal backend options, so such compilations share
    their graphs, and their report.
    """

    kv: str = "none"
    graphs: list[list[SiteReport]] = field(default_factory=list)
    # fp cache buffer -> (its value buffer, the store holding both, or None when kept in fp)
    caches: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)

    def add_graph(self, sites: list[SiteReport]) -> int:
        self.graphs.append(sites)
        return len(self.graphs) - 1


_SESSIONS: dict[Any, Session] = {}


def session_for(config: Any) -> Session:
    """The session of a (hashable, validated) `KVConfig`."""
    return _SESSIONS.setdefault(config, Session(kv=config.summary))


def clear_sessions() -> None:
    """Forget every report (torch._dynamo.reset() calls this: the compiled graphs are gone too)."""
    _SESSIONS.clear()


@dataclass
class Report:
    kv: str
    sites: list[SiteReport]
    kv_bytes: int        # bytes held now by the caches this compiled model uses
    fp_kv_bytes: int     # what the same caches take in the model's dtype

    @property
    def found(self) -> int:
        return len(self.sites)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    def latest_graph(self) -> list[SiteReport]:
        """Sites of the most recently compiled graph that has attention (the decode graph, after generate)."""
        last = max((s.graph for s in self.sites), default=None)
        return [s for s in self.sites if s.graph == last]

    def __str__(self) -> str:
        if not self.sites:
            return "kvfx report: no attention site found; the graph was compiled unchanged"
        rows = [("graph", "layers", "pattern", "rewritten", "storage / reason")]
        for (graph, pattern, rewritten, detail), layers in _group(self.sites):
            rows.append((str(graph), _ranges(layers), pattern, "yes" if rewritten else "NO", detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        graphs = sorted({s.graph for s in self.sites})
        per_graph = ", ".join(f"graph {g}: {sum(s.rewritten for s in self.sites if s.graph == g)}/"
                              f"{sum(s.graph == g for s in self.sites)}" for g in graphs)
        ratio = f" ({self.kv_bytes / self.fp_kv_bytes:.2f}x)" if self.fp_kv_bytes else ""
        lines += [f"attention sites rewritten: {per_graph}",
                  f"KV cache held: {_mib(self.kv_bytes)} (kv={self.kv}) vs {_mib(self.fp_kv_bytes)} in the model dtype{ratio}"]
        return "kvfx report\n" + "\n".join(lines)


def _group(sites: list[SiteReport]) -> list[tuple[tuple, list[int]]]:
    """Sites that differ only by layer share a row."""
    groups: dict[tuple, list[int]] = {}
    for s in sites:
        groups.setdefault((s.graph, s.pattern, s.rewritten, s.storage if s.rewritten else s.reason), []).append(s.layer)
    return list(groups.items())


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur is None or cur != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return ",".join(parts)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def report(x: Any) -> Report:
    """The report of a kvfx-compiled function, or of a module whose forward was compiled with kvfx."""
    session = _find_session(x)
    gc.collect()  # count only caches that are still alive
    sites = [s for g in session.graphs for s in g]
    kv_bytes = fp_bytes = 0
    for key_buffer, (value_buffer, store) in list(session.caches.items()):
        fp = sum(b.numel() * b.element_size() for b in (key_buffer, value_buffer))
        fp_bytes += fp
        kv_bytes += store.nbytes() if store is not None else fp
    return Report(session.kv, sites, kv_bytes, fp_bytes)


def _find_session(x: Any) -> Session:
    # a compiled function; torch.compile(module); module.compile(); a module whose forward was replaced
    candidates = [x] if inspect.isfunction(x) else [
        getattr(x, name) for name in ("dynamo_ctx", "_compiled_call_impl", "forward") if getattr(x, name, None)]
    wrapper = next((w for w in map(_compile_wrapper, candidates) if w is not None), None)
    if wrapper is None or not _is_kvfx(wrapper):
        raise TypeError("kvfx.report expects the result of torch.compile(..., backend='kvfx') "
                        "or a module whose forward is one")
    from kvfx.config import KVConfig

    config = KVConfig.from_options(wrapper.kwargs.get("options"))
    return _SESSIONS.get(config, Session(kv=config.summary))  # an empty one: compiled but not called yet


def _compile_wrapper(fn: Any, depth: int = 0) -> Any:
    """The torch.compile backend wrapper hidden in the closure of a compiled function."""
    import torch

    if isinstance(fn, torch._TorchCompileWrapper):
        return fn
    if depth > 6:
        return None
    if inspect.isfunction(fn):
        children = [c.cell_contents for c in (fn.__closure__ or ()) if _has_contents(c)]
    else:
        children = list(getattr(fn, "__dict__", {}).values())
    for child in children:
        if callable(child) or hasattr(child, "__dict__"):
            found = _compile_wrapper(child, depth + 1)
            if found is not None:
                return found
    return None


def _has_contents(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _is_kvfx(wrapper: Any) -> bool:
    return getattr(wrapper, "compiler_name", "") == "kvfx" or getattr(
        wrapper.compiler_fn, "__name__", "") == "kvfx_backend"
