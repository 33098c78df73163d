"""benchmarks/coverage.py's tiny configs: a hybrid whose first layers are not attention keeps one."""
import importlib.util
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[2] / "benchmarks"


@pytest.fixture
def coverage(monkeypatch):
    """The script by its path: `import coverage` could find coverage.py's PyPI namesake first."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # (its `from common import ...`)
    spec = importlib.util.spec_from_file_location("kvfx_coverage_script", BENCHMARKS / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_list_that_opens_with_attention_is_cut_to_its_first_two(coverage):
    kinds = ["sliding_attention"] * 5 + ["full_attention"]
    assert coverage.first_two_layers(kinds[:2], kinds) == ["sliding_attention", "sliding_attention"]


def test_a_hybrid_keeps_its_first_layer_and_its_first_attention_layer(coverage):
    default = ["linear_attention"] * 3 + ["full_attention"]  # Qwen3-Next's pattern
    assert coverage.first_two_layers(["linear_attention"] * 2, default * 12) == ["linear_attention", "full_attention"]
    assert coverage.first_two_layers(["conv", "conv"], ["conv", "conv", "full_attention"]) == ["conv", "full_attention"]
    nemotron = ["linear_attention", "moe", "full_attention", "mlp"]  # Nemotron-H's layers_block_type
    assert coverage.first_two_layers(nemotron, nemotron) == ["linear_attention", "full_attention"]


def test_a_model_without_attention_layers_is_left_as_it_is(coverage):
    assert coverage.first_two_layers(["mamba", "mamba"], ["mamba"] * 8) == ["mamba", "mamba"]
