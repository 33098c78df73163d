"""Caches that grow by concatenation (HF DynamicCache, nanoGPT `present`) held in kvfx's int8
CatStore, and how often each cache kind makes dynamo compile."""
import copy

import gptfast
import nanogpt
import pytest
import torch
from transformers import DynamicCache

import kvfx
from kvfx.models import tiny_model
from kvfx.runtime import FreedKVBuffer


def prompt(n, seed=0, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def hf_generate(model, ids, n, cache=None, **kw):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation=cache, **kw)


def test_dynamic_cache_holds_int8_stores_not_fp_tensors():
    model = tiny_model()
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options={"kv": "int8"})
    cache = DynamicCache(config=model.config)
    hf_generate(compiled, prompt(9), 24, past_key_values=cache)
    keys = [layer.keys for layer in cache.layers]
    assert all(isinstance(k, FreedKVBuffer) and k.untyped_storage().nbytes() == 0 for k in keys)
    assert keys[0].shape == (1, 2, 32, 16)  # 9 prompt + 23 decoded tokens written
    rep = kvfx.report(compiled)
    assert rep.fp_kv_bytes == 2 * 2 * keys[0].numel() * 4
    # Measured storages == the store's arithmetic: 64 slots (grown in steps of 64) of uint8 codes
    # and fp32 (scale, zero) per token and KV head, for K and V of 2 layers.
    assert rep.kv_bytes == 2 * 2 * (1 * 2 * 64 * (16 + 2 * 4))
    torch.testing.assert_close(kvfx.runtime.dequantized(keys[0]).shape, keys[0].shape)


def test_int8_left_padded_batch_with_a_dynamic_cache_matches_eager_per_row():
    model = tiny_model()
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options={"kv": "int8"})
    ids = prompt(10, seed=5, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # row 1 is 4 tokens shorter, left padded
    kw = dict(attention_mask=mask, pad_token_id=0)
    assert torch.equal(hf_generate(compiled, ids, 12, **kw), hf_generate(model, ids, 12, **kw))
    assert kvfx.report(compiled).rewritten == kvfx.report(compiled).found


def test_two_continuations_of_one_past_do_not_mix():
    """A past used twice (two continuations): the second continues in a copy of the store, so
    neither sees the other's tokens."""
    model = nanogpt.tiny()
    compiled = torch.compile(model, backend="kvfx", options={"kv": "int8"})
    with torch.no_grad():
        _, past = compiled(prompt(6))
        _, eager_past = model(prompt(6))
        for token in (5, 9, 5):
            ids = torch.tensor([[token]])
            ours, _ = compiled(ids, past)
            want, _ = model(ids, eager_past)
            assert ours.argmax(-1).item() == want.argmax(-1).item()
            torch.testing.assert_close(ours, want, atol=0.05, rtol=0.05)


def test_an_older_sliding_window_cache_cannot_be_continued():
    """A sliding window's store keeps only the newest window: a caller that goes back to an older one
    gets a clear error before anything runs (its oldest tokens are gone), and the newest one goes on."""
    from kvfx.errors import KVFXError

    model = tiny_model("mistral", sliding_window=8)
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="kvfx", options={"kv": "int8"})
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        compiled(prompt(10), past_key_values=cache)  # 10 tokens: the store keeps the last 7
        older = [(layer.keys, layer.values) for layer in cache.layers]
        compiled(prompt(1, seed=1), past_key_values=cache)
        newest = [(layer.keys, layer.values) for layer in cache.layers]
        for layer, (keys, values) in zip(cache.layers, older):
            layer.keys, layer.values = keys, values
        with pytest.raises(KVFXError, match="older than the newest"):
            compiled(prompt(1, seed=2), past_key_values=cache)
        for layer, (keys, values) in zip(cache.layers, newest):
            layer.keys, layer.values = keys, values
        compiled(prompt(1, seed=2), past_key_values=cache)
    assert cache.layers[0].keys.shape[2] == 7


def static_and_dynamic(options, layers=2, model=None):
    """Logits of 20 + 30 greedy tokens of a tiny model (Llama of `layers` layers, or `model`) under kvfx
    `options`, with a static and with a DynamicCache (every site rewritten in both), the DynamicCache's
    (key, value) placeholders, and the bytes held for them."""
    from kvfx.runtime import held_bytes

    model, ids, runs = model or tiny_model(num_hidden_layers=layers), prompt(20, seed=11), []
    for cache in ("static", "dynamic"):
        torch._dynamo.reset()
        compiled = copy.deepcopy(model)
        compiled.forward = torch.compile(compiled.forward, backend="kvfx", options=options)
        past = DynamicCache(config=model.config) if cache == "dynamic" else None
        out = hf_generate(compiled, ids, 30, cache if past is None else None, past_key_values=past,
                          output_logits=True, return_dict_in_generate=True)
        runs.append(torch.stack(out.logits, 1))
        assert kvfx.report(compiled).rewritten == kvfx.report(compiled).found
    held = [(layer.keys, layer.values) for layer in past.layers]
    return runs, held, held_bytes([t for pair in held for t in pair])


# h2o (scored, evicting) in make test; streaming and snapkv + int8 in make test-all (two compiles each, cold)
@pytest.mark.parametrize("options", [pytest.param(dict(policy="streaming", budget=12, sink=2), marks=pytest.mark.heavy),
                                     dict(policy="h2o", budget=12),
                                     pytest.param(dict(policy="snapkv", budget=12, window=4, kv="int8"),
                                                  marks=pytest.mark.heavy)])
def test_a_policy_with_an_integer_budget_holds_a_dynamic_cache(options):
    """HF's DynamicCache under a policy: the store's capacity is the budget, so the cache no longer needs
    a length fixed in advance. The same logits as the same policy on a static cache, and the memory held
    stays the store's whatever the length (2 layers, 0 fp bytes)."""
    (static, dynamic), held, nbytes = static_and_dynamic(options)
    assert torch.equal(static, dynamic)
    store = kvfx.runtime.store_of(held[0][0])
    assert held[0][0].shape[2] == 49 and store.slot_pos.shape[-1] == 12 + options.get("window", 0)
    assert nbytes == 2 * store.nbytes()
    with pytest.raises(kvfx.KVFXError, match="one per slot, not a cache by position"):
        kvfx.runtime.dequantized(held[0][0])  # (what is there is in store_of(...): slot_pos by slot)


@pytest.mark.parametrize("options", [dict(policy="h2o", budget=0.5),
                                     pytest.param(dict(policy="snapkv", budget=0.5, window=4), marks=pytest.mark.heavy)])
def test_a_fractional_budget_is_a_share_of_the_dynamic_cache(options):
    """A budget of 0.5 on HF's DynamicCache is half its length, whatever it grows to: the store (a GrowingStore)
    is re-made one slot larger every second token. A 20-token prompt keeps its 10 best, as on a static cache of
    21 slots (ceil(0.5 * 21) = 11: its one free slot holds back a candidate that the first step empties), so
    the prompt's and the first step's logits are that cache's; 30 tokens later the store has ceil(0.5 * 49)
    = 25 slots (+ SnapKV's window), and they are all that is held."""
    from transformers import StaticCache

    from kvfx.runtime import held_bytes

    model, ids, runs = tiny_model(), prompt(20, seed=11), []
    for past, new in ((StaticCache(config=model.config, max_cache_len=21), 2), (DynamicCache(config=model.config), 30)):
        torch._dynamo.reset()
        compiled = copy.deepcopy(model)
        compiled.forward = torch.compile(compiled.forward, backend="kvfx", options=options)
        out = hf_generate(compiled, ids, new, past_key_values=past, output_logits=True, return_dict_in_generate=True)
        runs.append(torch.stack(out.logits, 1))
        assert kvfx.report(compiled).rewritten == kvfx.report(compiled).found
    torch.testing.assert_close(runs[1][:, :2], runs[0], atol=1e-5, rtol=1e-5)
    held = [t for layer in past.layers for t in (layer.keys, layer.values)]
    store = kvfx.runtime.store_of(held[0])
    assert held[0].shape[2] == 49 and store.store.slot_pos.shape[-1] == 25 + options.get("window", 0)
    assert held_bytes(held) == 2 * store.nbytes()


def test_a_policy_follows_a_sliding_window_on_either_cache():
    """H2O (budget 12) on a sliding-window layer (window 24): HF's static cache rolls its buffer one slot a
    step once full, its DynamicCache keeps the last 23 tokens of each call; the store numbers positions from
    the window's first (`dropped_positions`), so tokens that leave the window leave the store, and both
    caches give the same logits."""
    (static, dynamic), held, _ = static_and_dynamic(dict(policy="h2o", budget=12),
                                                    model=tiny_model("mistral", sliding_window=24))
    torch.testing.assert_close(dynamic, static, atol=1e-5, rtol=1e-5)
    store = kvfx.runtime.store_of(held[0][0])
    assert held[0][0].shape[2] == 23 and int(store.slot_pos.max()) == 22


@pytest.mark.parametrize("options, slots", [(dict(kv="int4", group_size=16, residual=16), 48),
                                             pytest.param(dict(kv="fp8", group_size=16, residual=0), 48,
                                                          marks=pytest.mark.heavy),  # (make test-all)
                                             (dict(policy="quest", pages=2, page_size=8, kv="int4", group_size=16),
                                              56)])
def test_stores_by_position_hold_a_dynamic_cache(options, slots):
    """HF's DynamicCache under a KIVI format, or Quest (4 layers: the last two read 2 pages of 8 tokens and
    the newest): the store is re-made one group (page) larger as the cache crosses each boundary
    (GrowingStore). The logits of the same config on a static cache, and the store's bytes are all that
    is held: its slots the 48 whole groups of 16 (KIVI's packed part) or the 7 pages of 8 of 49 tokens."""
    (static, dynamic), held, nbytes = static_and_dynamic(options, layers=4)
    torch.testing.assert_close(dynamic, static, atol=1e-5, rtol=1e-5)
    store = kvfx.runtime.store_of(held[0][0])
    assert held[0][0].shape[2] == 49 and store.length == 49 and store.store.k_codes.shape[2] == slots
    assert nbytes == 4 * store.nbytes()


@pytest.mark.parametrize("kv", ["int4", pytest.param("fp8", marks=pytest.mark.heavy)])
def test_a_sliding_window_kivi_store_holds_the_window(kv):
    """HF's DynamicSlidingWindowLayer (window 40: it keeps the last 39 tokens) under a KIVI format, a 45-token
    prompt already past the window, then 40 tokens: the store drops whole groups of 16 as the window slides,
    the model's mask is moved onto its positions, and the logits are those of the same format over HF's full
    DynamicLayer with the same sliding mask (which keeps every token, quantized in the same groups). The
    tokens held are that cache's last 39, in a store that follows the window (64 packed slots), not the
    sequence (84 tokens)."""
    from kvfx.runtime import dequantized, store_of

    model, ids, runs = tiny_model("mistral", sliding_window=40), prompt(45, seed=3), []
    options = dict(kv=kv, group_size=16, residual=16 if kv == "int4" else 0)
    for past in (DynamicCache(config=model.config), DynamicCache()):  # sliding layers; full layers
        torch._dynamo.reset()
        compiled = copy.deepcopy(model)
        compiled.forward = torch.compile(compiled.forward, backend="kvfx", options=options)
        out = hf_generate(compiled, ids, 40, past_key_values=past, output_logits=True, return_dict_in_generate=True)
        assert kvfx.report(compiled).rewritten == kvfx.report(compiled).found
        runs.append((torch.stack(out.logits, 1), past.layers[0]))
    (sliding, window), (full, everything) = runs
    torch.testing.assert_close(sliding, full, atol=1e-5, rtol=1e-5)
    assert window.keys.shape[2] == 39 and everything.keys.shape[2] == 84
    for held, fp in ((window.keys, everything.keys), (window.values, everything.values)):
        assert torch.equal(dequantized(held), dequantized(fp)[:, :, -39:])
    assert store_of(window.keys).store.k_codes.shape[2] <= 64


# Graphs compiled for three generations: prompt lengths 7, 7 (the same shapes: nothing new) and 11.
# HF static: prefill + decode, then a new prompt and cache length make both dynamic (+2).
# Growing caches (HF dynamic, nanoGPT): prefill, the first decode, then a decode with the past length
# dynamic (+1 for a new prompt length). gpt-fast: prefill + decode (positions are tensors), +1 prefill.
BOUNDS = {"hf-static": [2, 2, 4], "hf-dynamic": [3, 3, 4], "gptfast": [2, 2, 3], "nanogpt": [3, 3, 4]}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.heavy) if k == "nanogpt" else k for k in BOUNDS])
def test_compiles_per_cache_kind_are_bounded(kind):  # nanogpt: 83 s cold, make test-all
    if kind.startswith("hf"):
        model = tiny_model()
        model.forward = compiled = torch.compile(model.forward, backend="kvfx", options={"kv": "int8"})
        run = lambda ids: hf_generate(model, ids, 6, "static" if kind == "hf-static" else None)  # noqa: E731
    elif kind == "gptfast":
        model = gptfast.tiny()
        compiled = torch.compile(model.forward, backend="kvfx", options={"kv": "int8"})
        run = lambda ids: gptfast.generate(model, compiled, ids, 6, max_seq=32)  # noqa: E731
    else:
        compiled = torch.compile(nanogpt.tiny(), backend="kvfx", options={"kv": "int8"})
        run = lambda ids: nanogpt.generate(compiled, ids, 6)  # noqa: E731
    counts = []
    for n in (7, 7, 11):
        run(prompt(n))
        counts.append(len({s.graph for s in kvfx.report(compiled).sites}))
    assert counts == BOUNDS[kind]
