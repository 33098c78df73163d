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


def test_rounds_refill_the_same_store_and_time_every_replay(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = ["--device", "cpu", "--quick", "--configs", "h2o-20%", "--rounds", "2", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    row = json.loads((tmp_path / "step_modes.json").read_text())["rows"][0]
    assert row["rounds"] == 2 and len(row["times_us"]) == 6


def test_each_new_store_gets_its_row(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = ["--device", "cpu", "--quick", "--configs", "h2o-20%", "--stores", "2", "--spacer-mib", "1",
            "--keep-stores", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    rows = json.loads((tmp_path / "step_modes.json").read_text())["rows"]
    assert [(r["store"], r["spacer_mib"], r["keep_stores"]) for r in rows] == [(0, 0, True), (1, 1, True)]


def test_slow_replays_counts_the_slow_start(bench):
    settled = [100.0] * 40
    assert bench.slow_replays([250.0] + settled) == 0  # the graph's first launch is not a mode
    assert bench.slow_replays([250.0] + [120.0] * 12 + settled) == 13
    assert bench.slow_replays([250.0, 120.0, 101.0, 120.0] + settled) == 4
    assert bench.slow_replays(settled[:20] + [120.0] * 20) == 0  # slow at the end is not a slow start


def test_a_refilled_store_holds_what_a_new_one_does(bench, monkeypatch):
    """Refilling after decode steps (which moved tokens and positions) leaves the store as a new one."""
    import torch
    from policy_attention import CONFIGS, D, HKV, HQ, LAYER, LAYERS, fill_store, full_store

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k, v = torch.randn(2, 1, HKV, 64, D).unbind(0)
    fmt, used = full_store(CONFIGS["quest-1/8"], k, v)
    _, new = full_store(CONFIGS["quest-1/8"], k, v)
    q = torch.randn(1, HQ, 1, D)
    for p in (64, 65, 66):
        torch.ops.kvfx.policy_attend(q, k[:, :, -1:], v[:, :, -1:], torch.tensor([p]), *used.tensors(), None, False,
                                     D ** -0.5, fmt.options, LAYER, LAYERS)
    assert not torch.equal(used.slot_pos, new.slot_pos)
    fill_store(used, k, v)
    assert torch.equal(used.slot_pos, new.slot_pos)
    live = new.slot_pos >= 0  # a free slot's codes are never read
    for name in ("k_codes", "v_codes"):
        assert torch.equal(getattr(used, name)[live], getattr(new, name)[live]), name
    assert torch.equal(used.page_min, new.page_min) and torch.equal(used.page_max, new.page_max)


def test_cpu_needs_the_interpreter(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 2
