"""kvfx.export_onnx end to end: onnxruntime (CPU) greedy generation over the exported graph gives
PyTorch kvfx's tokens, and holds exactly kvfx's compressed cache between steps."""
import copy

import numpy as np
import onnx
import pytest
import torch
from transformers import StaticCache

import kvfx
from kvfx.config import KVConfig
from kvfx.kernels.kivi import dequantize_reference
from kvfx.lowering.ort_loop import OrtGenerator
from kvfx.models import tiny_model
from kvfx.runtime import dequantized

PROMPT, NEW, SLOTS = 20, 32, 64
# The tiny Llama has head dim 16, so KIVI groups are 16. int4 with R=0 quantizes part of the prompt in
# the prefill; int2 with R=16 flushes groups out of the residual ring during decode.
OPTIONS = {
    "none": {"kv": "none"},
    "int8": {"kv": "int8"},
    "int4": {"kv": "int4", "group_size": 16, "residual": 0},
    "int2": {"kv": "int2", "group_size": 16, "residual": 16},
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=2)  # its greedy continuation varies (20 distinct tokens of 32)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def assert_same_cache(ours, theirs, bits):
    """The graph's inputs to each write differ from PyTorch's by float rounding (~1e-7: other matmul
    and rotary kernels), so a code may flip at a rounding boundary; anything more is a bug. (Equal
    inputs give bit-equal stores: tests/lowering/test_onnx_ops.py.)"""
    diff = (ours - theirs).abs()
    step = (theirs.max() - theirs.min()) / ((1 << bits) - 1)
    assert diff.max() <= step and (diff > 1e-5).float().mean() <= 0.01


def kvfx_generate(model, prompt, options):
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options=options)
    cache = StaticCache(config=model.config, max_cache_len=SLOTS)
    tokens = compiled.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, past_key_values=cache)
    return tokens, kvfx.report(compiled), cache


# int4 / int2 run in make test-all (CI time); their ONNX ops are checked against PyTorch in test_onnx_ops.py.
@pytest.mark.parametrize("kv", [kv if kv in ("none", "int8") else pytest.param(kv, marks=pytest.mark.heavy)
                                for kv in OPTIONS])
def test_ort_generation_matches_kvfx(kv, model, prompt, tmp_path):
    options = OPTIONS[kv]
    tokens, report, cache = kvfx_generate(model, prompt, options)
    assert report.rewritten == report.found > 0

    path = tmp_path / f"{kv}.onnx"
    kvfx.export_onnx(model, path, options, max_cache_len=SLOTS, batch_size=1)
    graph = onnx.load(path)
    onnx.checker.check_model(graph, full_check=True)
    ops = {node.op_type for node in graph.graph.node}
    assert "Attention" in ops
    if kv in ("int4", "int2"):
        assert {"BitShift", "BitwiseAnd"} <= ops  # codes are unpacked in the graph, not by a runtime

    generator = OrtGenerator(path, threads=1)
    ort_tokens = generator.generate(prompt.numpy(), NEW)
    np.testing.assert_array_equal(ort_tokens, tokens.numpy())
    assert generator.cache_bytes() == report.kv_bytes

    if kv != "none":  # the ORT-held store holds the K/V of kvfx's store
        bits = {"int8": 8, "int4": 4, "int2": 2}
        length = PROMPT + NEW - 1
        fmt = KVConfig(**options).format
        names = generator.cache_names
        for layer, cache_layer in enumerate(cache.layers):
            arrays = [generator.cache[names.index(f"layer{layer}.{n}")] for n in fmt.tensor_names]
            store = fmt.from_tensors([torch.from_numpy(a) for a in arrays])
            keys, values = store.dequantize(torch.float32) if kv == "int8" else dequantize_reference(store, length)
            expected = [dequantized(b, None if kv == "int8" else length) for b in (cache_layer.keys, cache_layer.values)]
            assert_same_cache(keys, expected[0], bits[kv])
            assert_same_cache(values, expected[1], bits[kv])


STREAMING = dict(policy="streaming", budget=24, sink=4)  # 24 slots for 51 tokens: eviction from the prompt on


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_ort_generation_with_streaming_policy_matches_kvfx(kv, model, prompt, tmp_path):
    """StreamingLLM (prompt 20 > budget 24 - sink after 4 steps): the exported graph evicts as kvfx does
    (same tokens), holds only the 24-slot stores, and keeps exactly the sink + the newest positions."""
    options = {"kv": kv, **STREAMING}
    tokens, report, _ = kvfx_generate(model, prompt, options)
    assert report.rewritten == report.found > 0

    path = tmp_path / f"streaming-{kv}.onnx"
    kvfx.export_onnx(model, path, options, max_cache_len=SLOTS, batch_size=1)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    generator = OrtGenerator(path, threads=1)
    np.testing.assert_array_equal(generator.generate(prompt.numpy(), NEW), tokens.numpy())
    assert generator.cache_bytes() == report.kv_bytes

    written = PROMPT + NEW - 1  # the last token is generated, never fed back
    kept = list(range(STREAMING["sink"])) + list(range(written - STREAMING["budget"] + STREAMING["sink"], written))
    for name, slots in zip(generator.cache_names, generator.cache):
        if name.endswith(".slot_pos"):
            assert slots.shape[-1] == STREAMING["budget"]
            assert (np.sort(slots, axis=-1) == kept).all(), name


@pytest.mark.parametrize("options,message", [
    ({"policy": "h2o", "budget": 24}, r"no ONNX lowering for policy='h2o'; policies with one: 'streaming'"),
    ({"policy": "streaming", "budget": 0.5}, r"policy='streaming' needs a token-count budget .*got budget=0.5"),
])
def test_policy_without_lowering_is_refused(options, message, model, tmp_path):
    with pytest.raises(kvfx.KVFXError, match=message):
        kvfx.export_onnx(model, tmp_path / "x.onnx", options)


def test_unmatched_site_warns_and_keeps_its_fp_cache(model, prompt, tmp_path):
    path = tmp_path / "unmatched.onnx"
    with pytest.warns(UserWarning, match=r"attention site 0 .*group_size=32 must divide head_dim=16"):
        kvfx.export_onnx(model, path, {"kv": "int4"}, max_cache_len=SLOTS)  # G=32 does not fit D=16
    generator = OrtGenerator(path, threads=1)
    assert generator.cache_names == ["layer0.key", "layer0.value", "layer1.key", "layer1.value"]
    eager = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="static")
    np.testing.assert_array_equal(generator.generate(prompt.numpy(), 8), eager.numpy())


def test_opset_too_old_names_the_opset_needed(model, tmp_path):
    with pytest.raises(kvfx.KVFXError, match=r"kv='int4' needs opset >= 23 .*got opset=21"):
        kvfx.export_onnx(model, tmp_path / "x.onnx", {"kv": "int4", "group_size": 16}, opset=21)


def test_format_without_lowering_is_refused(model, tmp_path):
    with pytest.raises(kvfx.KVFXError, match=r"no ONNX lowering for kv='fp8'"):
        kvfx.export_onnx(model, tmp_path / "x.onnx", {"kv": "fp8", "group_size": 16})
