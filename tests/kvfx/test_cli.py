"""The `kvfx` console script, run as a user runs it (subprocess of the installed entry point)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from kvfx.cli import main
from kvfx.models import tiny_model, tiny_tokenizer

VOCAB = 320


def kvfx(*args, cwd=None):
    exe = shutil.which("kvfx", path=os.path.dirname(sys.executable)) or shutil.which("kvfx")
    assert exe, "the kvfx console script is not installed (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved with a tokenizer: a model path the CLI loads like any other."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=VOCAB).save_pretrained(folder)
    tiny_tokenizer(VOCAB).save_pretrained(folder)
    return folder


def test_console_script_help():
    result = kvfx("--help")
    assert result.returncode == 0
    assert all(verb in result.stdout for verb in ("generate", "report", "eval", "bench"))


@pytest.mark.parametrize("verb", ["generate", "report", "eval", "eval passkey", "eval perplexity", "bench",
                                  "export onnx"])
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*verb.split(), "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "example:" in out and f"kvfx {verb}" in out


@pytest.mark.parametrize("args, says", [
    (["generate", "--kv", "int3"], "kvfx option 'kv' got 'int3'; valid choices: 'none', 'int8'"),
    (["generate", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    (["generate", "-o", "residual"], "expected KEY=VALUE"),
    (["report", "-o", "group_size=12"], "kvfx option 'group_size' got 12"),
    (["eval", "perplexity", "--kv", "none", "--policy-kv", "int5"], "kvfx option 'kv' got 'int5'"),
    (["eval", "passkey", "--merge"], "--merge needs --out"),
    (["bench", "no-such-benchmark"], "unknown benchmark 'no-such-benchmark'; valid: "),
    (["bench", "e2e", "--tiny", "--", "--steps", "2"], "unrecognized arguments before --: --tiny"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_option_is_one_line_and_exit_2(args, says, capsys):
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_bad_option_from_the_console_script():
    result = kvfx("generate", "--kv", "int3")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("kvfx: error: kvfx option 'kv' got 'int3'; valid choices: 'none', 'int8', "
                                     "'int4', 'int2', 'fp8'")


def test_missing_model_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["report", "--model", str(tmp_path / "absent")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("kvfx: error: FileNotFoundError: no model at") and last.endswith("(--debug shows the traceback)")
    with pytest.raises(FileNotFoundError):
        main(["report", "--model", str(tmp_path / "absent"), "--debug"])


def test_generate_streams_then_reports_speed_bytes_and_sites(tiny_folder):
    result = kvfx("generate", "--model", str(tiny_folder), "--prompt", "The sky is", "--raw",
                  "--kv", "int8", "--max-new-tokens", "6", "--compare")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tokens/s" in out and "KV bytes for 10 slots: kvfx " in out and "kvfx report" in out
    assert "against the model without kvfx" in out and " of 6 (" in out
    assert "attention sites rewritten: graph 0: 2/2, graph 1: 2/2" in out
    ratio = float(out.split("in the model dtype (")[1].split("x)")[0])
    assert 0 < ratio <= 0.55  # per-token int8 of an fp32 cache


@pytest.mark.heavy  # ~60 s cold: make test-all (CI time); kvfx.quality is tested in test_quality.py
def test_eval_perplexity_writes_json_and_png(tiny_folder, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The grass is green. The sky is blue. " * 20)
    code = main(["eval", "perplexity", "--model", str(tiny_folder), "--text", str(text), "--prefix", "16",
                  "--tokens", "8", "--kv", "none", "--policy", "h2o", "--budget", "0.5", "--policy-kv", "none",
                  "--quanto-bits", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    payload = json.loads((tmp_path / "out" / "quality_perplexity.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["eager fp", "kvfx none", "kvfx h2o @ 0.5"]
    assert payload["rows"][1]["perplexity"] == pytest.approx(payload["rows"][0]["perplexity"], rel=1e-5)
    h2o = payload["rows"][2]
    assert h2o["perplexity"] > 1 and h2o["kv_bytes"] < payload["rows"][1]["kv_bytes"]  # half the tokens kept
    assert (tmp_path / "out" / "quality_perplexity.png").stat().st_size > 0
    assert "perplexity (16-token prefill, 8 teacher-forced decode steps)" in out
    # A second run of one more method, merged into the first run's result, without re-measuring eager.
    assert main(["eval", "perplexity", "--model", str(tiny_folder), "--text", str(text), "--prefix", "16",
                 "--tokens", "8", "--kv", "--policy", "h2o", "--budget", "0.25", "--policy-kv", "none",
                 "--quanto-bits", "--no-eager", "--merge", "--out", str(tmp_path / "out")]) == 0
    merged = json.loads((tmp_path / "out" / "quality_perplexity.json").read_text())
    assert [r["method"] for r in merged["rows"]] == ["eager fp", "kvfx none", "kvfx h2o @ 0.5", "kvfx h2o @ 0.25"]
    assert merged["rows"][:3] == payload["rows"] and merged["merged"][0]["meta"] == payload["meta"]
    # Merging is by the text's content, not its path; another text is refused before anything runs.
    moved, other = tmp_path / "moved.txt", tmp_path / "other.txt"
    moved.write_text(text.read_text())
    other.write_text("Another text entirely. " * 20)
    for path, code in ((moved, 0), (other, 2)):
        capsys.readouterr()
        assert main(["eval", "perplexity", "--model", str(tiny_folder), "--text", str(path), "--prefix", "16",
                     "--tokens", "8", "--kv", "--policy", "h2o", "--budget", "0.75", "--policy-kv", "none",
                     "--quanto-bits", "--no-eager", "--merge", "--out", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert "text_sha256 differ" in err and "loading" not in err.lower()


def test_export_onnx_writes_a_model_onnxruntime_loads(tiny_folder, tmp_path):
    import onnxruntime

    out = tmp_path / "tiny-int8.onnx"
    result = kvfx("export", "onnx", "--model", str(tiny_folder), "--kv", "int8", "--max-cache-len", "32",
                  "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and out.exists()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert any("codes" in i.name or "k_" in i.name for i in session.get_inputs())


@pytest.mark.heavy  # ~1 min cold (a subprocess that compiles): make test-all, run it before a GPU session
def test_bench_e2e_runs_its_tiny_smoke_config(tmp_path):
    """`kvfx bench e2e` on the CPU (2-layer toy model): the script the GPU runs works end to end, its
    row carries the fields the README quotes, and kvfx holds fewer KV bytes than the fp cache."""
    result = kvfx("bench", "e2e", "--out", str(tmp_path), "--", "--tiny", "--device", "cpu", "--configs", "kvfx-int4",
                  "--batch", "1", "--context", "512", "--steps", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert row["config"] == "kvfx-int4" and row["tokens_per_s"] > 0 and row["cudagraph_skips"] == 0
    assert 0 < row["kv_bytes"] < row["fp_kv_bytes"]  # (512 tokens: past KIVI's fixed fp ring of R + G slots)
    assert (tmp_path / "e2e.png").exists()
