"""Quality sweeps of the embedded SmolLM2 (the `kvfx eval` command, writing under benchmarks/results/).

    python benchmarks/quality.py perplexity                  # every format, policies x budgets, quanto int4/int2
    python benchmarks/quality.py passkey --lengths 1024 2048 --depths 0.1 0.5 0.9 --kvpress results/kvpress_passkey.json
    python benchmarks/quality.py prompts --lengths 1024 2048 --depths 0.1 0.5 0.9 --file /tmp/prompts.json

Runs behind benchmarks/results/quality_*.json (CPU, 2 cores): see docs/ARCHITECTURE.md, "Quality harness".
quality_passkey.json was measured a few methods at a time (--merge --no-eager --kv, e.g.
`... passkey --lengths 1024 2048 --depths 0.1 0.5 0.9 --kv --no-eager --policy snapkv --budget 0.2
--policy-kv none --kvpress benchmarks/results/kvpress_passkey.json --merge`). Any `kvfx eval` flag works
here; --out defaults to benchmarks/results.
"""
import pathlib
import sys

from kvfx.cli import main

RESULTS = pathlib.Path(__file__).parent / "results"

if __name__ == "__main__":
    argv = sys.argv[1:]
    writes_results = argv[:1] in (["passkey"], ["perplexity"])
    if writes_results and "--out" not in argv and "--plot-only" not in argv:
        argv += ["--out", str(RESULTS)]
    sys.exit(main(["eval", *argv]))
