"""The model zoo: tiny random-weight HF architectures (static and dynamic caches) and the gpt-fast-
and nanoGPT-style models of tests/models, each decoding 32 greedy tokens through kvfx.

kv="none" must give eager's tokens with every site rewritten; kv="int8" must stay within the
foundation's tolerance (tests/models/agreement.py) with every site rewritten except those named.
"""
import copy

import gptfast
import nanogpt
import pytest
import torch
import transformers
from agreement import assert_int8_agrees, hf_greedy

import kvfx
from kvfx.models import tiny_model

NEW_TOKENS = 32
SLIDING = dict(sliding_window=8)  # a window shorter than prompt + 32 tokens: it really slides
# (arch, attention implementation, config overrides); gemma2 without its logit softcap (kept: below)
HF = {
    "llama": ("llama", "sdpa", {}),
    "qwen2": ("qwen2", "sdpa", {}),
    "mistral": ("mistral", "sdpa", SLIDING),
    "mistral-full": ("mistral", "sdpa", {}),
    "gpt2": ("gpt2", "sdpa", {}),
    "gpt2-eager": ("gpt2", "eager", {}),
    "phi3": ("phi3", "sdpa", {}),
    "gemma2": ("gemma2", "eager", dict(attn_logit_softcapping=None)),
    "gemma2-softcap": ("gemma2", "eager", {}),   # its default attention logit softcapping (50.0)
    "bloom": ("bloom", "eager", {}),             # 3-D bmm attention, ALiBi through baddbmm
    "falcon": ("falcon", "sdpa", {}),            # one KV head broadcast by SDPA
    "qwen3_5": ("qwen3_5", "sdpa", {}),          # hybrid: linear attention, then gated full attention
}
ATTENTION_LAYERS = {"qwen3_5": 1}  # layers with a KV cache (2 elsewhere)
PROMPT = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(11))


def compiled_copy(model, kv):
    clone = copy.deepcopy(model)
    clone.forward = torch.compile(clone.forward, backend="kvfx", options={"kv": kv})
    return clone


def hf_run(name, cache, kv):
    arch, impl, overrides = HF[name]
    if arch == "qwen3_5" and not hasattr(transformers, "Qwen3_5TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5")
    model = tiny_model(arch, attn_implementation=impl, **overrides)
    eager = hf_greedy(model, PROMPT, NEW_TOKENS, cache)
    compiled = compiled_copy(model, kv)
    return eager, hf_greedy(compiled, PROMPT, NEW_TOKENS, cache), kvfx.report(compiled)


def own_run(name, kv):
    """The gpt-fast- or nanoGPT-style model: (eager, kvfx) (tokens, logits) and the report."""
    if name.startswith("gptfast"):
        _, write, gqa = name.split(":")
        model = gptfast.tiny(write=write, gqa=gqa)
        compiled = torch.compile(model.forward, backend="kvfx", options={"kv": kv})
        return (gptfast.generate(model, model.forward, PROMPT, NEW_TOKENS),
                gptfast.generate(model, compiled, PROMPT, NEW_TOKENS), kvfx.report(compiled))
    model = nanogpt.tiny(alibi=name.endswith("alibi"))
    compiled = torch.compile(model, backend="kvfx", options={"kv": kv})
    return nanogpt.generate(model, PROMPT, NEW_TOKENS), nanogpt.generate(compiled, PROMPT, NEW_TOKENS), \
        kvfx.report(compiled)


def run(case, kv):
    name, cache = case
    return own_run(name, kv) if cache == "own" else hf_run(name, cache, kv)


def assert_rewritten(report, layers=2, unchanged=None):
    """Every site of every graph is in the report; all rewritten but the layers `unchanged` names
    ({layer: words of its reason})."""
    unchanged = unchanged or {}
    assert report.found % layers == 0 and report.found >= 2 * layers  # prefill and decode graphs
    for site in report.sites:
        if site.layer in unchanged:
            assert not site.rewritten and unchanged[site.layer] in site.reason, site
        else:
            assert site.rewritten and site.pattern, site


# Each architecture with each cache kind across the two tests below (+ llama and qwen2 static in
# tests/kvfx/test_backend_hf.py); the pairs that add a pattern (sliding windows, GPT-2's eager
# attention) under both. Every case compiles 2-3 graphs: the zoo is kept to what it proves.
LOSSLESS = [("llama", "dynamic"), ("mistral", "static"), ("mistral", "dynamic"), ("gpt2", "static"),
            ("gpt2-eager", "dynamic"), ("phi3", "static"), ("gemma2", "static"), ("gemma2-softcap", "dynamic"),
            ("bloom", "dynamic"), ("falcon", "static"), ("qwen3_5", "static")]
OWN = [("gptfast:index_put:enable_gqa", "own"), ("gptfast:slice:repeat_interleave", "own"), ("nanogpt", "own")]


# gemma2-static (43 s cold) runs in make test-all; gemma2 stays covered by its softcap / dynamic cases
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.heavy) if c == ("gemma2", "static") else c
                                  for c in LOSSLESS + OWN], ids=lambda c: f"{c[0]}-{c[1]}")
def test_kv_none_gives_eager_tokens(case):
    (eager, _), (ours, _), report = run(case, "none")
    assert torch.equal(ours, eager)
    assert_rewritten(report, ATTENTION_LAYERS.get(case[0], 2))


QUANTIZED = {
    ("qwen2", "dynamic"): {},
    ("mistral-full", "static"): {},
    ("gpt2", "static"): {},
    ("phi3", "dynamic"): {},
    # Gemma-2's layer 0 slides: its DynamicCache keeps only the last tokens of the concatenation.
    ("gemma2", "dynamic"): {},
    ("gptfast:index_put:enable_gqa", "own"): {},
    ("nanogpt-alibi", "own"): {},
    ("qwen3_5", "dynamic"): {},
}


@pytest.mark.parametrize("case", list(QUANTIZED), ids=lambda c: f"{c[0]}-{c[1]}")
def test_int8_stays_within_tolerance(case):
    (eager, eager_logits), (ours, logits), report = run(case, "int8")
    assert_int8_agrees(eager, eager_logits, ours, logits, PROMPT.shape[1])
    assert_rewritten(report, ATTENTION_LAYERS.get(case[0], 2), unchanged=QUANTIZED[case])


def test_int8_dynamic_sliding_window_holds_only_its_window():
    """HF's DynamicSlidingWindowLayer returns cat(past, new)[:, :, -(W - 1):]: kvfx's store drops the older
    tokens before each call, so after 7 + 40 tokens through an 8-token window it holds the 7 newest, the
    same tokens (to int8's rounding) as eager's cache, in a store the size of the window, not the sequence."""
    from kvfx.runtime import dequantized, store_of

    model = tiny_model("mistral", attn_implementation="sdpa", **SLIDING)
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options={"kv": "int8"})
    runs = [m.generate(PROMPT, max_new_tokens=40, min_new_tokens=40, do_sample=False, output_logits=True,
                       return_dict_in_generate=True) for m in (model, compiled)]
    eager, ours = runs
    assert_int8_agrees(eager.sequences, torch.stack(eager.logits, 1), ours.sequences, torch.stack(ours.logits, 1),
                       PROMPT.shape[1])
    assert_rewritten(kvfx.report(compiled))
    for theirs, mine in zip(eager.past_key_values.layers, ours.past_key_values.layers):
        for fp, held in ((theirs.keys, mine.keys), (theirs.values, mine.values)):
            assert held.shape == fp.shape and fp.shape[2] == SLIDING["sliding_window"] - 1
            torch.testing.assert_close(dequantized(held), fp, atol=fp.abs().amax().item() / 100, rtol=0)
        assert store_of(mine.keys).capacity <= 64  # the first allocation step: the window never outgrew it


def test_int8_static_sliding_window_rolls_its_store():
    """Gemma-2 (softcapped) with a static cache: once its sliding layer's window is full, HF rolls the
    buffer (roll, the new token into the last slot, copy_ back); int8's per-token codes roll with their
    tokens, so that graph is rewritten too and the layer stays int8 to the end."""
    (eager, eager_logits), (ours, logits), report = run(("gemma2-softcap", "static"), "int8")
    assert_int8_agrees(eager, eager_logits, ours, logits, PROMPT.shape[1])
    assert_rewritten(report)
    assert any(s.layer == 0 and s.rewritten and "roll" in s.pattern and "softcap" in s.pattern for s in report.sites)


def test_int8_static_sliding_window_through_a_chunk_that_crosses_it():
    """A prompt in chunks of 3 into an 8-token window: the third chunk crosses it (HF concatenates a slice
    of the buffer with the chunk and overwrites the buffer whole with copy_, which kvfx leaves unchanged
    and reads back in fp), the
    next call rolls the fp buffer (kvfx adopts it into a new int8 store) and decoding rolls the store.
    Teacher-forced logits stay within int8's tolerance of eager's at every step."""
    from transformers import StaticCache

    from kvfx.decode import decode_steps

    model = tiny_model("mistral", attn_implementation="sdpa", **SLIDING)
    prompt = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options={"kv": "int8"})
    eager, _ = decode_steps(model, prompt, 12, prefill_chunk=3,
                            cache=StaticCache(config=model.config, max_cache_len=22))
    forced = eager[:-1, 0].argmax(-1)
    runs = [decode_steps(m, prompt, 12, forced, StaticCache(config=model.config, max_cache_len=22), 3)[0]
            for m in (model, compiled)]
    for a, b in zip(*runs):
        assert (a - b).abs().max() <= 0.02 * (a.max() - a.min())
    sites = kvfx.report(compiled).sites
    assert any(not s.rewritten and "concatenation" in s.reason for s in sites)  # the crossing chunk's graph
    assert any(s.rewritten and "roll" in s.pattern for s in sites)


def test_kivi_static_sliding_window_reads_back_once_the_window_rolls():
    """kv="int4" cannot roll a KIVI store (keys are quantized per channel over groups of tokens): the
    rolling graph leaves the sliding layers unchanged with that reason, and the runtime gives their
    buffers back their tokens in fp (every slot is written by then, which a KIVI store, keeping no
    length, needs to be read). Until session 23 this raised a KVFXError mid-generation. Within the
    8-token window every token is in the full-precision residual, so the tokens equal eager's."""
    model = tiny_model("mistral", attn_implementation="sdpa", **SLIDING)
    eager, _ = hf_greedy(model, PROMPT, NEW_TOKENS, "static")
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options={"kv": "int4", "group_size": 16})
    ours, _ = hf_greedy(compiled, PROMPT, NEW_TOKENS, "static")
    assert torch.equal(ours, eager)
    unchanged = [s for s in kvfx.report(compiled).sites if not s.rewritten]
    assert unchanged and all("rolled" in s.reason and "roll" in s.pattern for s in unchanged)


@pytest.mark.parametrize("options", [{"kv": "int4", "group_size": 16}, {"policy": "h2o", "budget": 64}])
@pytest.mark.parametrize("cache", [pytest.param("static", marks=pytest.mark.heavy), "dynamic"])  # (22 s each)
def test_softcapped_attention_gives_eager_logits(cache, options):
    """Gemma-2 capping its logits hard (tanh(s / 0.02) * 0.02; the tiny model's scores are far larger):
    kv="int4" (group 16: head dim 16) and H2O rewrite the softcapped attention, the sliding layer's too
    (cropped on a dynamic cache; rolled on a static one, which int4 leaves in fp). Every token stays in int4's full-precision residual
    (128) and in H2O's budget (64), so the logits are eager's; dropping the cap misses them by 3e-3."""
    model = tiny_model("gemma2", attn_implementation="eager", attn_logit_softcapping=0.02)
    eager, eager_logits = hf_greedy(model, PROMPT, NEW_TOKENS, cache)
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options=options)
    ours, logits = hf_greedy(compiled, PROMPT, NEW_TOKENS, cache)
    assert torch.equal(ours, eager)
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    report = kvfx.report(compiled)
    assert any(s.layer == 1 and s.rewritten and "softcap" in s.pattern for s in report.sites)
    rolled_in_fp = cache == "static" and "kv" in options  # (a KIVI store does not roll: that layer goes on in fp)
    assert all(s.rewritten or (rolled_in_fp and "rolled" in s.reason) for s in report.sites)
