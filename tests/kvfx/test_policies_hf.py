"""Policies end to end on tiny random-weight HF models (static cache, through generate)."""
import pytest
import torch
from transformers import StaticCache

import kvfx
from kvfx.models import tiny_model

from .test_backend_hf import compiled_copy, greedy

EVERY_TOKEN = {  # budgets that keep every token of these tests' caches: nothing may change
    "streaming": dict(budget=64), "h2o": dict(budget=64), "snapkv": dict(budget=1.0),
    "pyramidkv": dict(budget=2000), "quest": dict(pages=1.0),  # pyramidkv: the top layer gets budget / 20
}


@pytest.mark.parametrize("policy", list(EVERY_TOKEN))
def test_budget_keeping_every_token_gives_eager_tokens(policy):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    compiled = compiled_copy(model, policy=policy, **EVERY_TOKEN[policy])
    cache = StaticCache(config=model.config, max_cache_len=44)
    assert torch.equal(greedy(compiled, ids, 24, past_key_values=cache), greedy(model, ids, 24))
    rep = kvfx.report(compiled)
    assert rep.found == rep.rewritten == 4
    assert all(s.storage == f"none+{policy}" for s in rep.sites)


def test_left_padded_batch_with_a_policy_matches_eager_per_row():
    model = tiny_model("qwen2")
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    kw = dict(attention_mask=mask, pad_token_id=0)
    compiled = compiled_copy(model, policy="h2o", budget=64)
    assert torch.equal(greedy(compiled, ids, 12, **kw), greedy(model, ids, 12, **kw))


@pytest.mark.parametrize("kv", [pytest.param("none", marks=pytest.mark.heavy), "int8", "int4"])  # none: 54 s cold
def test_bytes_held_follow_the_budget_not_the_cache_length(kv):
    """An 8-token H2O budget holds the same bytes whatever the cache length; the fp cache grows."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    compiled = compiled_copy(model, kv=kv, group_size=16, policy="h2o", budget=8)
    held = []
    for length in (40, 120):
        cache = StaticCache(config=model.config, max_cache_len=length)
        greedy(compiled, ids, 8, past_key_values=cache)
        rep = kvfx.report(compiled)
        held.append((rep.kv_bytes, rep.fp_kv_bytes))
        del cache
    (small, fp_small), (large, fp_large) = held
    assert small == large and fp_large == 3 * fp_small
    # 2 layers x 2 KV heads x 8 slots x (K + V) per-token bytes + a 4-byte position and score per slot
    per_token = {"none": 16 * 4, "int8": 16 + 2 * 4, "int4": 16 // 2 + 2 * 4}[kv]
    assert small == 2 * 2 * 8 * (2 * per_token + 8)


def test_eviction_changes_tokens_only_where_it_evicts():
    """A budget smaller than the prompt evicts (tokens may differ from eager) but still decodes,
    composes with int4, and reports what it did."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    compiled = compiled_copy(model, kv="int4", group_size=16, policy="snapkv", budget=0.3, window=4)
    out = greedy(compiled, ids, 8)
    assert out.shape == (1, 38)
    rep = kvfx.report(compiled)
    assert rep.rewritten == 4 and "int4 + snapkv (budget 0.3)" in str(rep)


def test_quest_more_pages_than_the_cache_is_a_clear_error_and_the_model_still_runs():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 6))
    compiled = compiled_copy(model, policy="quest", pages=9, page_size=16)
    with pytest.raises(Exception) as err:
        greedy(compiled, ids, 2, past_key_values=StaticCache(config=model.config, max_cache_len=64))
    assert isinstance(getattr(err.value, "inner_exception", err.value), kvfx.KVConfigError)
    assert "'pages'=9" in str(err.value) and "4 pages" in str(err.value)
    assert greedy(model, ids, 2).shape == (1, 8)
