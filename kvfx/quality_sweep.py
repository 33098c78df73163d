"""Sweeps of the quality harness (what `kvfx eval` and benchmarks/quality.py run): every KV format,
every policy at every budget, transformers' QuantizedCache (optimum-quanto) at equal bits, and the
results of NVIDIA kvpress on the same passkey prompts (benchmarks/kvpress_baseline.py, own venv).

Policies are asked for by name and passed to kvfx as options; a kvfx that does not accept one yet
(KVConfig rejects it) reports those methods as skipped, with the reason, and measures the rest.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

from kvfx.quality import EAGER, Method, PasskeyPrompt, kvfx_method, passkey_correct
from kvfx.quality_report import by_method, score

FORMATS = ("none", "int8", "int4", "int2", "fp8")
POLICIES = ("streaming", "h2o", "snapkv", "pyramidkv", "quest")
BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5)            # fraction of the prompt's tokens kept
QUEST_PAGES = (1 / 16, 1 / 8, 3 / 16, 1 / 4)    # fraction of the cache's pages quest reads
POLICY_FORMATS = ("none", "int4")               # each policy at full precision and composed with int4
# kvfx policy -> the kvpress press that implements the same paper (ObservedAttentionPress: H2O's
# prefill score, the prompt queries' attention, there averaged over the queries that see each token)
KVPRESS_TWINS = {"snapkv": "SnapKV", "streaming": "StreamingLLM", "pyramidkv": "PyramidKV", "h2o": "ObservedAttention"}


def sweep_methods(formats: Sequence[str] = FORMATS, policies: Sequence[str] = POLICIES,
                  budgets: Sequence[float] = BUDGETS, pages: Sequence[float] = QUEST_PAGES,
                  policy_formats: Sequence[str] = POLICY_FORMATS,
                  extra: Mapping[str, Any] | None = None) -> list[Method]:
    """The eager reference, each format with the full cache, then each policy composed with each of
    `policy_formats` at every budget (quest: at every fraction of pages). `extra` options (e.g.
    residual=64) go to every kvfx method."""
    extra = dict(extra or {})
    methods = [EAGER] + [kvfx_method(**extra, kv=kv) for kv in formats]
    for kv in policy_formats:
        for policy in policies:
            if policy == "none":
                continue
            if policy == "quest":
                methods += [kvfx_method(**extra, kv=kv, policy=policy, pages=p) for p in pages]
            else:
                methods += [kvfx_method(**extra, kv=kv, policy=policy, budget=b) for b in budgets]
    return methods


def quanto_methods(bits: Sequence[int], group_size: int, residual: int) -> tuple[list[Method], list[dict]]:
    """transformers' QuantizedCache with the optimum-quanto backend at kvfx's group size and residual window
    (equal bits), two methods per bit width: quanto's default axes (keys, like values, per token over groups
    of G channels) and KIVI's (`axis_key=-1`: keys per channel over groups of G tokens, kvfx's grouping, when
    the cache's length is a multiple of G, since quanto groups the flattened rows), so the comparison
    separates the key axis KIVI prescribes from how kvfx implements it. Skipped when quanto is missing."""
    names = {0: "transformers quanto int{}", -1: "transformers quanto int{}, keys per channel"}
    try:
        import optimum.quanto  # noqa: F401  (transformers imports it lazily, inside the first cache update)
        from transformers import QuantizedCache
    except Exception as e:  # an incompatible install fails with more than ImportError
        return [], [{"method": name.format(b), "reason": f"optimum-quanto unusable: {e}"} for b in bits
                    for name in names.values()]

    def cache_of(nbits: int, axis_key: int):
        return lambda config, max_cache_len: QuantizedCache(
            backend="quanto", config=config, nbits=nbits, axis_key=axis_key, axis_value=0, q_group_size=group_size,
            residual_length=residual)

    return [Method(name.format(b), name.format(b), make_cache=cache_of(b, axis)) for b in bits
            for axis, name in names.items()], []


def kvpress_rows(path: str | pathlib.Path, prompts: Sequence[PasskeyPrompt]) -> list[dict]:
    """Rows of a benchmarks/kvpress_baseline.py result, scored as kvfx scores its own. The result must
    come from exactly these prompts (same lengths, depths and keys), or the comparison would not be one."""
    data = json.loads(pathlib.Path(path).read_text())
    ours = {(p.length, p.depth): p.key for p in prompts}
    theirs = {(r["length"], r["depth"]): r["key"] for r in data["rows"]}
    if theirs != ours:
        raise ValueError(f"{path} was made from other passkey prompts than this run's "
                         f"({len(theirs)} vs {len(ours)} prompts, or other keys): run kvpress_baseline.py on the "
                         "file `kvfx eval prompts` writes with the same --lengths, --depths and --seed")
    rows = []
    for r in data["rows"]:
        press, budget = r["press"], r["budget"]
        series = f"kvpress {press}"
        rows.append({"task": "passkey", "method": series + (f" @ {budget:g}" if budget is not None else ""),
                     "series": series, "budget": budget, "options": {"press": press, "budget": budget},
                     "length": r["length"], "tokens": r["tokens"], "depth": r["depth"], "key": r["key"],
                     "answer": r["answer"], "correct": passkey_correct(r["answer"], r["key"])})
    return rows


def kvpress_comparison(rows: Sequence[dict], skipped: Sequence[dict]) -> list[dict]:
    """Passkey accuracy of each kvfx policy and its kvpress twin at each budget kvpress ran; kvfx is None
    (with the reason) where kvfx did not run that policy."""
    groups = by_method(rows)
    comparison = []
    for policy, press in KVPRESS_TWINS.items():
        theirs = {rs[0]["budget"]: rs for rs in groups.values()
                  if rs[0]["series"] == f"kvpress {press}" and rs[0]["budget"] is not None}
        for budget in sorted(theirs):
            ours = next((rs for rs in groups.values()
                         if rs[0]["series"] == f"kvfx {policy}" and rs[0]["budget"] == budget), None)
            why = next((s["reason"] for s in skipped if s["method"].startswith(f"kvfx {policy} @")), "not run")
            comparison.append({"policy": policy, "press": press, "budget": budget,
                               "kvfx": score(ours) if ours else None, "kvpress": score(theirs[budget]),
                               "note": "" if ours else why})
    return comparison


def comparison_table(comparison: Sequence[dict]) -> str:
    lines = ["kvfx vs kvpress, passkey accuracy on the same prompts"]
    for c in comparison:
        ours = f"{c['kvfx']:.0%}" if c["kvfx"] is not None else "-"
        lines.append(f"  {c['policy']:<10} vs {c['press'] + 'Press':<22} budget {c['budget']:<5g} "
                     f"kvfx {ours:>5}  kvpress {c['kvpress']:>5.0%}  {c['note']}".rstrip())
    return "\n".join(lines)


# Settings that decide what a row measured: two results merge only when these are equal. The text is
# compared by content (its path differs between checkouts of the same file).
MERGE_KEYS = {"passkey": ("lengths", "depths", "seed", "model", "gguf", "dtype", "device"),
              "perplexity": ("text_sha256", "prefix", "tokens", "model", "gguf", "dtype", "device")}


def check_mergeable(earlier: Mapping[str, Any], task: str, settings: Mapping[str, Any]) -> None:
    """Raise ValueError unless rows measured with `settings` can be merged into `earlier` (checked
    before measuring: a sweep that cannot be merged fails at once, not after its runs)."""
    if earlier.get("task") != task:
        raise ValueError(f"cannot merge a {earlier.get('task')!r} result into a {task!r} one")
    differ = [k for k in MERGE_KEYS[task] if earlier["settings"].get(k) != settings.get(k)]
    if differ:
        raise ValueError(f"cannot merge results measured with other settings ({', '.join(differ)} differ): "
                         "its rows would not be comparable")


def merge(earlier: Mapping[str, Any], payload: dict) -> dict:
    """`payload` (this run) with the rows of `earlier` (a result of the same task and settings) for the
    methods this run did not measure: a sweep can be run, and committed, a few methods at a time.
    This run's rows replace an earlier method's rows; the earlier runs' meta and settings are kept
    under "merged"; "skipped" is this run's (an earlier skip may no longer hold for this kvfx), less
    the methods an earlier run measured: a method this run could not run (an optional package
    missing here) keeps its earlier rows rather than losing them. The earlier "notes" (what a person
    recorded about its rows) are kept, before this run's."""
    check_mergeable(earlier, payload["task"], payload["settings"])
    now = {r["method"] for r in payload["rows"]}
    kept = [r for r in earlier["rows"] if r["method"] not in now]
    measured = {r["method"] for r in kept}
    notes = [*earlier.get("notes", []), *payload.get("notes", [])]
    return {**payload, "rows": kept + payload["rows"],
            "skipped": [s for s in payload["skipped"] if s["method"] not in measured],
            "merged": [*earlier.get("merged", []), {"meta": earlier["meta"], "settings": earlier["settings"]}],
            **({"notes": notes} if notes else {})}


def skipped_summary(skipped: Sequence[dict]) -> str:
    """One line per distinct reason (a policy kvfx lacks skips every budget of it: one line, not ten)."""
    reasons: dict[str, list[str]] = {}
    for s in skipped:
        reasons.setdefault(s["reason"], []).append(s["method"])
    return "\n".join(f"skipped {len(ms)} method(s) ({ms[0]}{', ...' if len(ms) > 1 else ''}): {reason}"
                     for reason, ms in reasons.items())
