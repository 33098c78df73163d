"""benchmarks/step_modes.py runs end to end on the CPU (the Triton interpreter, tiny shape): one time per
replay, in order, per config, and it refuses --device cpu outside the interpreter. No timing claim."""
import json
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import step_modes

    return step_modes


def test_each_replay_gets_its_time_in_order(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.main(["--device", "cpu", "--quick", "--configs", "quest-1/8", "--advance", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "step_modes.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["quest-1/8"]
    assert len(rows[0]["times_us"]) == 3 and all(t > 0 for t in rows[0]["times_us"])
    assert rows[0]["advancing_position"] and (rows[0]["batch"], rows[0]["seq"]) == (1, 256)


def test_cpu_needs_the_interpreter(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 2
