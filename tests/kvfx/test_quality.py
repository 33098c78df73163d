"""The quality harness: passkey prompts, perplexity against an independent computation, kvfx none
against the model's own forward, and methods kvfx cannot run reported as skipped."""
import json
import math
import sys

import pytest
import torch

from kvfx.models import tiny_model, tiny_tokenizer
from kvfx.quality import (EAGER, FILLER, NEEDLE, agreement_with_fp, evaluate_passkey, evaluate_perplexity,
                          kvfx_method, passkey_correct, passkey_prompt, passkey_prompts, perplexity)
from kvfx.quality_report import plot, table
from kvfx.quality_sweep import kvpress_comparison, kvpress_rows, merge, quanto_methods

VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(VOCAB)


@pytest.mark.parametrize("length", [1500, 3000])  # the tiny vocabulary spends ~120 tokens on the intro
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_prompt_has_the_key_at_the_depth_and_the_length(tokenizer, length, depth):
    prompt = passkey_prompt(tokenizer, length, depth)
    longest_sentence = max(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER)
    assert length - longest_sentence < len(prompt.ids) <= length
    needle = tokenizer(NEEDLE.format(key=prompt.key), add_special_tokens=False)["input_ids"]
    assert list(prompt.ids[prompt.needle_start:prompt.needle_start + len(needle)]) == needle
    assert abs(prompt.needle_start - depth * length) <= longest_sentence
    text = tokenizer.decode(prompt.ids)
    assert text.count(prompt.key) == 2 and text.endswith("The pass key is")
    assert len(prompt.key) == 5 and prompt.key.isdigit()


def test_passkey_prompts_differ_and_are_reproducible(tokenizer):
    prompts = passkey_prompts(tokenizer, lengths=[256, 512], depths=[0.2, 0.8])
    assert [(p.length, p.depth) for p in prompts] == [(256, 0.2), (256, 0.8), (512, 0.2), (512, 0.8)]
    assert len({p.key for p in prompts}) == 4
    assert prompts == passkey_prompts(tokenizer, lengths=[256, 512], depths=[0.2, 0.8])
    assert type(prompts[0]).from_json(prompts[0].to_json()) == prompts[0]
    with pytest.raises(ValueError, match="shorter than its fixed text"):
        passkey_prompt(tokenizer, 20, 0.5)


def test_passkey_correct_reads_the_digits():
    assert passkey_correct(" 71432. Remember", "71432")
    assert passkey_correct(" 7 1 4 3 2", "71432")
    assert not passkey_correct(" 71423", "71432")


def test_perplexity_is_exp_of_mean_nll_over_the_forced_tokens():
    model = tiny_model("llama", vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    prefix, tokens = 24, 12
    with torch.no_grad():  # independently: one full forward, no cache
        logits = model(ids[:prefix + tokens].unsqueeze(0)).logits[0, prefix - 1:prefix + tokens - 1].float()
    nll = -logits.log_softmax(-1).gather(1, ids[prefix:prefix + tokens, None]).squeeze(1)
    assert perplexity(model, ids, prefix, tokens) == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    with pytest.raises(ValueError, match="prefix \\+ tokens <= 40"):
        perplexity(model, ids, prefix, 17)


def test_kvfx_none_perplexity_equals_eager_and_bad_methods_are_skipped():
    model = tiny_model("llama", vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(1))
    result = evaluate_perplexity(model, ids, 32, 16, [EAGER, kvfx_method(kv="none"), kvfx_method(kv="int3")],
                                 progress=False)
    eager, none = result.rows
    assert none["perplexity"] == pytest.approx(eager["perplexity"], rel=1e-5)
    assert none["sites_rewritten"] == none["sites_found"] == 4  # 2 layers x (prefill, decode): kvfx really ran
    assert eager.get("sites_found") is None
    assert [s["method"] for s in result.skipped] == ["kvfx int3"]
    assert "'kv' got 'int3'" in result.skipped[0]["reason"]
    assert "kvfx none" in table(result.rows) and "+0.00%" in table(result.rows)


@pytest.mark.heavy  # ~50 s cold: make test-all (CI time)
def test_passkey_through_kvfx_none_answers_as_eager(tokenizer, tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB)
    prompts = passkey_prompts(tokenizer, lengths=[200], depths=[0.3, 0.7])
    result = evaluate_passkey(model, tokenizer, prompts, [EAGER, kvfx_method(kv="none")], progress=False)
    eager = [r for r in result.rows if r["method"] == "eager fp"]
    ours = [r for r in result.rows if r["method"] == "kvfx none"]
    assert [r["answer"] for r in ours] == [r["answer"] for r in eager] and len(ours) == 2
    assert all(r["sites_rewritten"] == r["sites_found"] > 0 for r in ours)
    text = table(result.rows)
    assert "passkey accuracy by needle depth" in text and "kvfx none" in text
    assert plot(result.rows, tmp_path / "passkey.png", "tiny")
    assert (tmp_path / "passkey.png").stat().st_size > 0


def test_a_prompt_in_chunks_answers_as_in_one_call(tokenizer):
    """At full precision a chunked prefill is the same attention: eager answers the same either way, and
    the rows say how the prompt was sent."""
    model = tiny_model("llama", vocab_size=VOCAB)
    prompts = passkey_prompts(tokenizer, lengths=[200], depths=[0.3, 0.7])
    whole = evaluate_passkey(model, tokenizer, prompts, [EAGER], progress=False).rows
    chunked = evaluate_passkey(model, tokenizer, prompts, [EAGER], progress=False, prefill_chunk=48).rows
    assert [r["answer"] for r in chunked] == [r["answer"] for r in whole] and len(whole) == 2
    assert [r["prefill_chunk"] for r in whole + chunked] == [None, None, 48, 48]
    assert all(r["tokens"] > 48 for r in chunked)  # several calls each
    with pytest.raises(ValueError, match="prefill chunk must be a token count >= 1.*got 0"):
        evaluate_passkey(model, tokenizer, prompts, [EAGER], progress=False, prefill_chunk=0)


def test_snapkv_holds_its_budget_of_a_prompt_in_chunks():
    """Through the compile path, a prompt in chunks of 48 leaves each head's store holding what a one-call
    prompt leaves: 20% of the prompt's 200 tokens (session 20's fault kept 20% of each call's candidates:
    4 here)."""
    from transformers import StaticCache

    from kvfx.decode import decode_steps
    from kvfx.runtime import store_of

    model = tiny_model("llama", vocab_size=VOCAB)
    prompt = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))
    model.forward = torch.compile(model.forward, backend="kvfx", options={"policy": "snapkv", "budget": 0.2})
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 1)
    decode_steps(model, prompt, 1, cache=cache, prefill_chunk=48)
    held = [(store_of(layer.keys).slot_pos >= 0).sum(-1).flatten().tolist() for layer in cache.layers]
    assert held == [[40, 40]] * len(cache.layers)


def test_kvpress_results_are_scored_by_kvfx_and_must_come_from_the_same_prompts(tokenizer, tmp_path):
    prompts = passkey_prompts(tokenizer, lengths=[1500], depths=[0.2, 0.8])
    rows = [{"press": "SnapKV", "budget": 0.2, "length": p.length, "tokens": len(p.ids), "depth": p.depth,
             "key": p.key, "answer": f" {p.key}." if p.depth < 0.5 else " 12345."} for p in prompts]
    path = tmp_path / "kvpress_passkey.json"
    path.write_text(json.dumps({"rows": rows}))
    theirs = kvpress_rows(path, prompts)
    assert [r["correct"] for r in theirs] == [True, False] and theirs[0]["series"] == "kvpress SnapKV"
    [snap] = kvpress_comparison(theirs, [{"method": "kvfx snapkv @ 0.2", "reason": "no policy"}])
    assert snap == {"policy": "snapkv", "press": "SnapKV", "budget": 0.2, "kvfx": None, "kvpress": 0.5,
                    "note": "no policy"}
    ours = [{"task": "passkey", "method": "kvfx snapkv @ 0.2", "series": "kvfx snapkv", "budget": 0.2,
             "length": 1500, "depth": d, "correct": True} for d in (0.2, 0.8)]
    assert kvpress_comparison(theirs + ours, [])[0]["kvfx"] == 1.0
    with pytest.raises(ValueError, match="other passkey prompts"):
        kvpress_rows(path, passkey_prompts(tokenizer, lengths=[1500], depths=[0.2, 0.8], seed=1))


def test_h2o_is_compared_with_kvpress_observed_attention():
    def rows(series, method, budget, correct):
        return [{"task": "passkey", "method": method, "series": series, "budget": budget, "length": 1500,
                 "depth": d, "correct": c} for d, c in zip((0.2, 0.8), correct)]

    theirs = rows("kvpress ObservedAttention", "kvpress ObservedAttention @ 0.1", 0.1, [False, True])
    ours = rows("kvfx h2o", "kvfx h2o @ 0.1", 0.1, [False, False])
    [h2o] = kvpress_comparison(theirs + ours, [])
    assert h2o == {"policy": "h2o", "press": "ObservedAttention", "budget": 0.1, "kvfx": 0.0, "kvpress": 0.5,
                   "note": ""}


def _result(methods, run, **settings):
    rows = [{"task": "passkey", "method": m, "series": m, "budget": None, "correct": run == "new"} for m in methods]
    return {"task": "passkey", "meta": {"commit": run}, "rows": rows, "skipped": [{"method": "kvfx quest", "reason": run}],
            "settings": {"lengths": [1024], "depths": [0.5], "seed": 0, **settings}}


def test_merge_keeps_earlier_methods_and_replaces_remeasured_ones():
    earlier = _result(["eager fp", "kvfx none", "kvpress SnapKV @ 0.2"], "old")
    merged = merge(earlier, _result(["eager fp", "kvfx snapkv @ 0.2"], "new"))
    assert [(r["method"], r["correct"]) for r in merged["rows"]] == [
        ("kvfx none", False), ("kvpress SnapKV @ 0.2", False), ("eager fp", True), ("kvfx snapkv @ 0.2", True)]
    assert merged["meta"] == {"commit": "new"} and merged["skipped"] == [{"method": "kvfx quest", "reason": "new"}]
    assert [m["meta"]["commit"] for m in merge(merged, _result([], "newer"))["merged"]] == ["old", "new"]
    assert "notes" not in merged and merge(dict(merged, notes=["how"]), _result([], "newer"))["notes"] == ["how"]
    # A method this run skipped (say, an optional package missing here) keeps the rows measured before.
    skipped_now = dict(_result([], "newer"), skipped=[{"method": "kvfx none", "reason": "no package"}])
    again = merge(merged, skipped_now)
    assert [r["method"] for r in again["rows"]] == [r["method"] for r in merged["rows"]] and again["skipped"] == []
    with pytest.raises(ValueError, match="other settings \\(depths, seed differ\\)"):
        merge(earlier, _result([], "new", depths=[0.9], seed=1))


def test_quanto_methods_name_both_key_axes_when_skipped(monkeypatch):
    """Without optimum-quanto every method it would have run is reported skipped, at both key axes."""
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # import fails
    methods, skipped = quanto_methods([4, 2], 32, 128)
    assert methods == [] and [s["method"] for s in skipped] == [
        "transformers quanto int4", "transformers quanto int4, keys per channel", "transformers quanto int2",
        "transformers quanto int2, keys per channel"]


def test_agreement_with_fp_aligns_each_step_with_the_token_it_chose():
    """The model's own greedy generation agrees with itself at every token (KL 0); a last token other than
    its top-1 is the one disagreement (it predicts nothing that is compared, so the KL stays 0); an
    off-by-one alignment of logits and tokens would fail both."""
    model = tiny_model()
    prompt = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    same = agreement_with_fp(model.forward, out.sequences, 7, out.logits)
    assert (same.tokens, same.agree, same.first_disagreement) == (6, 6, None)
    assert same.mean_kl == pytest.approx(0.0, abs=1e-6)
    changed = out.sequences.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.config.vocab_size
    other = agreement_with_fp(model.forward, changed, 7, out.logits)
    assert (other.agree, other.first_disagreement) == (5, 5) and other.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert "at 5 of 6 (83.3%; first disagreement: new token 6)" in str(other)
