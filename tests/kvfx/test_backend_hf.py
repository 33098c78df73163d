"""End to end on tiny random-weight HF models decoding with a static cache."""
import copy

import pytest
import torch
from transformers import StaticCache

import kvfx
from kvfx.kernels.kivi import KiviStore
from kvfx.models import tiny_model
from kvfx.runtime import FreedKVBuffer

ARCHS = ["llama", "qwen2"]


def compiled_copy(model, **options):
    clone = copy.deepcopy(model)
    clone.forward = torch.compile(clone.forward, backend="kvfx", options=options)
    return clone


def greedy(model, ids, n, **kw):
    kw.setdefault("cache_implementation", None if "past_key_values" in kw else "static")
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_none_gives_eager_tokens(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    compiled = compiled_copy(model, kv="none")
    cache = StaticCache(config=model.config, max_cache_len=80)  # kept alive: the report counts live caches
    assert torch.equal(greedy(compiled, ids, 64, past_key_values=cache), greedy(model, ids, 64))
    rep = kvfx.report(compiled)
    assert rep.found == rep.rewritten == 4  # 2 layers x (prefill graph + decode graph)
    assert rep.kv_bytes == rep.fp_kv_bytes > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_logits_close_and_cache_freed(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    compiled = compiled_copy(model, kv="int8")
    eager = model.generate(ids, max_new_tokens=32, do_sample=False, cache_implementation="static",
                           output_logits=True, return_dict_in_generate=True)
    cache = StaticCache(config=model.config, max_cache_len=48)
    ours = compiled.generate(ids, max_new_tokens=32, do_sample=False, past_key_values=cache,
                             output_logits=True, return_dict_in_generate=True)
    # Per-token int8 keeps every K/V element within max|row|/254: logits move by far less than
    # their spread. Tolerance: 2% of the logit range, on the steps before tokens could diverge.
    same = (eager.sequences == ours.sequences).all()
    steps = len(eager.logits) if same else 1
    for a, b in zip(eager.logits[:steps], ours.logits[:steps]):
        assert (a - b).abs().max() <= 0.02 * (a.max() - a.min())
    rep = kvfx.report(compiled)
    assert rep.rewritten == rep.found == 4
    assert rep.fp_kv_bytes == 2 * 2 * cache.layers[0].keys.numel() * 4  # 2 layers x (K, V), fp32
    assert rep.kv_bytes == kvfx.runtime.held_bytes([t for l in cache.layers for t in (l.keys, l.values)])
    assert rep.kv_bytes <= 0.55 * rep.fp_kv_bytes
    del cache, ours  # the generate output holds the cache too
    assert kvfx.report(compiled).kv_bytes == 0  # a dead cache holds nothing


def test_decode_compiles_once():
    model = tiny_model()
    compiled = compiled_copy(model, kv="int8")
    ids = torch.randint(0, 128, (1, 6))
    greedy(compiled, ids, 24)
    session_graphs = len(kvfx.report(compiled).sites) // 2
    assert session_graphs == 2  # one prefill graph, one decode graph, for 24 tokens
    greedy(compiled, ids, 24)  # same shapes: no new graph
    assert len(kvfx.report(compiled).sites) // 2 == 2


@pytest.mark.heavy  # ~60 s cold: make test-all (CI time)
def test_two_caches_in_flight_do_not_mix():
    model = tiny_model()
    compiled = compiled_copy(model, kv="int8")
    prompts = [torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 8)]
    alone = [greedy(compiled, p, 8) for p in prompts]
    caches = [StaticCache(config=model.config, max_cache_len=32) for _ in prompts]
    seqs = [p.clone() for p in prompts]
    lengths = [0, 0]
    with torch.no_grad():
        run_interleaved(compiled, caches, seqs, lengths)
    for got, want in zip(seqs, alone):
        assert torch.equal(got, want)


def run_interleaved(compiled, caches, seqs, lengths):
    for step in range(8):
        for i in range(2):  # interleaved, step by step
            new = seqs[i][:, lengths[i]:]
            pos = torch.arange(lengths[i], seqs[i].shape[1]).unsqueeze(0)
            logits = compiled(new, past_key_values=caches[i], position_ids=pos, use_cache=True).logits
            lengths[i] = seqs[i].shape[1]
            seqs[i] = torch.cat([seqs[i], logits[:, -1:].argmax(-1)], dim=1)


def test_new_prompt_starts_clean():
    model = tiny_model()
    compiled = compiled_copy(model, kv="int8")
    a = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    first_b = greedy(compiled, b, 12)
    greedy(compiled, a, 12)
    assert torch.equal(greedy(compiled, b, 12), first_b)


def test_left_padded_batch_matches_eager_per_row():
    model = tiny_model()
    compiled = compiled_copy(model, kv="none")
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # row 1 is 4 tokens shorter, left padded
    kw = dict(attention_mask=mask, pad_token_id=0)
    assert torch.equal(greedy(compiled, ids, 16, **kw), greedy(model, ids, 16, **kw))


def test_int8_left_padded_batch_rows_agree_with_single_rows():
    model = tiny_model()
    compiled = compiled_copy(model, kv="int8")
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    batch = greedy(compiled, ids, 12, attention_mask=mask, pad_token_id=0)
    eager = greedy(model, ids, 12, attention_mask=mask, pad_token_id=0)
    # Padding rows see no key (SDPA gives them zeros, and so must kvfx, or NaN reaches the cache).
    assert torch.equal(batch, eager)


def test_freed_buffer_read_is_a_clear_error():
    model = tiny_model()
    compiled = compiled_copy(model, kv="int8")
    cache = StaticCache(config=model.config, max_cache_len=16)
    compiled(torch.randint(0, 128, (1, 4)), past_key_values=cache, use_cache=True)
    keys = cache.layers[0].keys
    assert isinstance(keys, FreedKVBuffer) and keys.untyped_storage().nbytes() == 0
    assert keys.shape == (1, 2, 16, 16)  # shape kept for the model's bookkeeping
    with pytest.raises(kvfx.KVFXError, match="freed by kvfx"):
        keys.sum()
    with pytest.raises(kvfx.KVFXError, match="freed by kvfx"):
        model(torch.randint(0, 128, (1, 1)), past_key_values=cache, use_cache=True)  # eager forward
    assert kvfx.runtime.dequantized(keys).shape == keys.shape


def test_prompt_longer_than_cache_is_a_clear_error():
    model = tiny_model()
    compiled = compiled_copy(model, kv="int8")
    cache = StaticCache(config=model.config, max_cache_len=8)
    with pytest.raises(kvfx.KVFXError, match="do not fit the KV cache of 8 slots"):
        compiled(torch.randint(0, 128, (1, 12)), past_key_values=cache, use_cache=True)


def test_graph_without_attention_is_unchanged_and_reported():
    def mlp(x, w):
        return torch.relu(x @ w).sum(-1)

    compiled = torch.compile(mlp, backend="kvfx", options={"kv": "int8"})
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    torch.testing.assert_close(compiled(x, w), mlp(x, w))
    rep = kvfx.report(compiled)
    assert rep.found == 0 and "no attention site" in str(rep)


@pytest.mark.heavy  # ~60 s cold: make test-all (CI time)
def test_longer_cache_recompiles_dynamic_and_stays_rewritten():
    """A second generate with a longer cache makes dynamo trace the cache length symbolically;
    kvfx must still rewrite every site (the store is sized from the symbolic length) and match eager."""
    model = tiny_model()
    compiled = compiled_copy(model, kv="none")
    quantized = compiled_copy(model, kv="int8")
    for n in (6, 11):
        ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))
        assert torch.equal(greedy(compiled, ids, 12 + n), greedy(model, ids, 12 + n))
        greedy(quantized, ids, 12 + n)
    for rep in (kvfx.report(compiled), kvfx.report(quantized)):
        assert rep.rewritten == rep.found and rep.found >= 8  # at least 4 graphs of 2 sites


def test_report_finds_every_way_of_compiling():
    ids = torch.randint(0, 128, (1, 5))
    wrapped = torch.compile(tiny_model(), backend="kvfx", options={"kv": "int8"})  # OptimizedModule
    in_place = tiny_model()
    in_place.compile(backend="kvfx", options={"kv": "int8"})  # module.compile()
    function = torch.compile(tiny_model().forward, backend="kvfx", options={"kv": "int8"})
    with torch.no_grad():
        for compiled in (wrapped, in_place, function):
            compiled(ids, past_key_values=StaticCache(config=tiny_model().config, max_cache_len=8), use_cache=True)
            rep = kvfx.report(compiled)
            assert rep.found == rep.rewritten == 2
    with pytest.raises(TypeError, match="kvfx.report expects"):
        kvfx.report(torch.compile(tiny_model().forward, backend="inductor"))


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_hand_written_attention_is_rewritten(kv):
    model = tiny_model(attn_implementation="eager")  # HF's matmul -> scale -> mask -> softmax -> matmul
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(7))
    compiled = compiled_copy(model, kv=kv)
    got, want = greedy(compiled, ids, 32), greedy(model, ids, 32)
    assert torch.equal(got, want) if kv == "none" else (got == want).float().mean() >= 0.9
    rep = kvfx.report(compiled)
    assert rep.found == rep.rewritten >= 4 and all(s.pattern.startswith("manual") for s in rep.latest_graph())


KIVI_OPTIONS = {"group_size": 16, "residual": 16}


@pytest.mark.parametrize("kv", ["int4", "int2", "fp8"])
def test_kivi_formats_rewrite_and_hold_their_arithmetic_bytes(kv):
    model = tiny_model(hidden_size=128)  # head dim 32: room for groups of 16 channels
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(8))
    compiled = compiled_copy(model, kv=kv, **KIVI_OPTIONS)
    cache = StaticCache(config=model.config, max_cache_len=64)
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ours = compiled.generate(ids, past_key_values=cache, **kw)
    eager = model.generate(ids, cache_implementation="static", **kw)
    # The prompt attends over its own keys at full precision: the first token's logits are eager's.
    torch.testing.assert_close(ours.logits[0], eager.logits[0], rtol=1e-5, atol=1e-5)
    rep = kvfx.report(compiled)
    assert rep.found == rep.rewritten == 4 and all(s.storage == kv for s in rep.sites)
    keys = kvfx.runtime.dequantized(cache.layers[0].keys, length=47)  # 40 prompt + 7 decoded tokens written
    assert keys.shape == (1, 2, 47, 32) and keys.abs().sum() > 0
    bits, fp8 = {"int4": (4, False), "int2": (2, False), "fp8": (8, True)}[kv]
    per_layer = KiviStore.expected_nbytes(1, 2, 64, 32, torch.float32, bits, fp8=fp8, **KIVI_OPTIONS)
    assert rep.kv_bytes == 2 * per_layer  # measured storages == the format's arithmetic


def test_head_dim_a_kivi_group_cannot_divide_is_left_unchanged():
    model = tiny_model()  # head dim 16 < group_size 32
    compiled = compiled_copy(model, kv="int4")
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(greedy(compiled, ids, 4), greedy(model, ids, 4))
    rep = kvfx.report(compiled)
    assert rep.rewritten == 0 and "group_size=32 must divide head_dim=16" in rep.sites[0].reason


def test_cudagraphs_option_leaves_cpu_graphs_alone():
    """cudagraphs=True graphs only CUDA decode graphs (test_cuda.py covers those): on CPU the compile and
    the tokens are those of the same options without it."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    compiled = compiled_copy(model, kv="none", cudagraphs=True)
    cache = StaticCache(config=model.config, max_cache_len=40)
    assert torch.equal(greedy(compiled, ids, 16, past_key_values=cache), greedy(model, ids, 16))
    assert kvfx.report(compiled).rewritten == 4
