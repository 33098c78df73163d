"""The real embedded model: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head dim 64)."""
import pytest
import torch
from transformers import StaticCache

import kvfx
from kvfx.decode import teacher_forced_logits
from kvfx.models import load_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2()
    messages = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    with torch.no_grad():
        reference = model.generate(prompt, max_new_tokens=256, min_new_tokens=256, do_sample=False,
                                   cache_implementation="static")
    return model, prompt, reference[0, prompt.shape[1]:]


def compiled_forward(model, kv):
    return torch.compile(model.forward, backend="kvfx", options={"kv": kv})


@pytest.mark.heavy  # 80 s + 80 s of model load, cold: make test-all (CI time); `make demo` runs SmolLM2
def test_kv_none_is_lossless_for_64_tokens(smollm2):
    model, prompt, reference = smollm2
    eager_forward = model.forward
    model.forward = compiled_forward(model, "none")
    try:
        out = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             cache_implementation="static")
        rep = kvfx.report(model)
    finally:
        model.forward = eager_forward
    assert torch.equal(out[0, prompt.shape[1]:], reference[:64])
    assert [s.rewritten for s in rep.latest_graph()] == [True] * 30


@pytest.mark.heavy  # ~2.5 min cold: make test-all (CI time); the zoo checks int8 tolerance in make test
def test_int8_top1_agrees_on_256_decode_steps(smollm2):
    model, prompt, reference = smollm2
    eager_forward = model.forward
    model.forward = compiled_forward(model, "int8")
    try:
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + reference.numel())
        logits = teacher_forced_logits(model, prompt, reference, cache)
        rep = kvfx.report(model)
    finally:
        model.forward = eager_forward
    agreement = (logits.argmax(-1) == reference).float().mean().item()
    assert agreement >= 0.99, agreement
    assert rep.rewritten == rep.found and len(rep.latest_graph()) == 30
    assert rep.fp_kv_bytes == 2 * 30 * cache.layers[0].keys.numel() * 4  # the one live cache, fp32
    assert rep.kv_bytes <= 0.55 * rep.fp_kv_bytes


@pytest.mark.heavy  # ~2 min cold: make test-all (CI time); the tiny-model KIVI tests stay in make test
def test_kivi_int4_top1_agrees_on_256_decode_steps(smollm2):
    model, prompt, reference = smollm2
    eager_forward = model.forward
    model.forward = compiled_forward(model, "int4")  # KIVI, group 32, residual 128
    try:
        logits = teacher_forced_logits(model, prompt, reference)
        rep = kvfx.report(model)
    finally:
        model.forward = eager_forward
    agreement = (logits.argmax(-1) == reference).float().mean().item()
    assert agreement >= 0.95, agreement
    assert [s.storage for s in rep.latest_graph()] == ["int4"] * 30
