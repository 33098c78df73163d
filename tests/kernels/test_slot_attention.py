"""The Triton slot-attention kernel (TRITON_INTERPRET=1 on CPU) against the torch path it replaces."""
import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import kvfx
from kvfx.kernels.policies import _decode_attention_torch, _page_slots, candidate_bias, quest_pages

KV_FORMATS = ["none", "int8", "int4", "int2", "fp8"]


def filled_store(fmt, b, hkv, c, d, empty, gen, dtype=torch.float32, live=None):
    """A store of `fmt` for a cache of c tokens with random tokens in a random share `empty` of its
    slots empty (or exactly `live` slots held)."""
    store = fmt.allocate((b, hkv, c, d), dtype, torch.device("cpu"))
    cap = store.slot_pos.shape[-1]
    for codes, params in ((store.k_codes, store.k_params), (store.v_codes, store.v_params)):
        new_codes, new_params = store.codec.quantize(torch.randn(b, hkv, cap, d, generator=gen).to(dtype))
        codes.copy_(new_codes), params.copy_(new_params)
    if live is None:
        held = torch.rand(b, hkv, cap, generator=gen) >= empty
    else:
        held = torch.rand(b, hkv, cap, generator=gen).argsort(-1).argsort(-1) < live
    store.slot_pos.copy_(torch.where(held, torch.randperm(cap, generator=gen).int(), -1))
    if store.page_min.numel():
        store.bound_pages()
    return store


def check_against_torch_path(fmt, store, d, g, masked, causal, quest, splits, gen, seed):
    """The kernel's output, new-token probability and (not Quest) slot probabilities equal the torch path's."""
    from kvfx.kernels.slot_attention import slot_attention

    b, hkv, cap = store.slot_pos.shape
    q = torch.randn(b, hkv * g, 1, d, generator=gen)
    k_new, v_new = torch.randn(b, hkv, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen)
    pos = torch.tensor([cap - 1 if causal else cap])  # causal: the slot at position cap - 1 is not seen
    mask = None
    if masked:
        mask = torch.rand(b, 1, 1, cap + 1, generator=gen) > 0.3
        mask[..., pos] = True
    bias = candidate_bias(mask, causal, torch.cat([store.slot_pos, pos.view(1, 1, 1).expand(b, hkv, 1).int()], -1),
                          pos, g)
    bias = bias[:, :, :, 0].expand(b, hkv, g, -1)
    qg = q.view(b, hkv, g, d)
    pages = quest_pages(qg, store.page_min, store.page_max, store.slot_pos, fmt.spec) if quest else None
    want, want_probs, want_new = _decode_attention_torch(qg, k_new, v_new, store, bias, pages, 0.2, fmt.spec)
    if quest and seed % 2:  # the page list, or the same pages as a slot list
        index, page = pages[0], 8
    else:
        index, page = (_page_slots(*pages, 8)[0], 0) if quest else (None, 0)
    skip_dead = seed // 2 % 2 == 0  # tiles with no live slot skipped, or read and masked (independent of seed % 2)
    got, probs, p_new = slot_attention(q, k_new, v_new, pos, store, mask, causal, 0.2, index, page,
                                       want_logits=not quest, num_splits=splits, block_n=16, skip_dead=skip_dead)
    torch.testing.assert_close(got, want.reshape(got.shape), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p_new, want_new, atol=1e-5, rtol=1e-4)
    if not quest:
        torch.testing.assert_close(probs, want_probs, atol=1e-5, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(kv=st.sampled_from(KV_FORMATS), b=st.integers(1, 3), hkv=st.integers(1, 2), g=st.integers(1, 5),
       d=st.sampled_from([64, 128]), c=st.integers(1, 90), empty=st.floats(0, 0.9), splits=st.integers(1, 4),
       masked=st.booleans(), causal=st.booleans(), quest=st.booleans(), seed=st.integers(0, 99))
def test_kernel_equals_the_torch_path(kv, b, hkv, g, d, c, empty, splits, masked, causal, quest, seed):
    gen = torch.Generator().manual_seed(seed)
    options = dict(kv=kv, group_size=32, policy="quest", page_size=8, pages=2) if quest \
        else dict(kv=kv, group_size=32, policy="h2o", budget=c)
    fmt = kvfx.KVConfig(**options).format
    check_against_torch_path(fmt, filled_store(fmt, b, hkv, c, d, empty, gen), d, g, masked, causal, quest, splits,
                             gen, seed)


@pytest.mark.parametrize("kv", ["int4", "int2"])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("d", [64, 128])
@settings(max_examples=4, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 8), c=st.integers(1, 70), live=st.integers(0, 35),
       splits=st.integers(1, 3), masked=st.booleans(), causal=st.booleans(), quest=st.booleans(), seed=st.integers(0, 99))
def test_bit_packed_codes_read_in_place(kv, group, d, b, hkv, g, c, live, splits, masked, causal, quest, seed):
    """int4/int2 code slots dequantized where they lie in the bytes: every group size and head dim, GQA
    groups of 1 to 8 query heads, an odd number of live slots."""
    gen = torch.Generator().manual_seed(seed)
    options = dict(kv=kv, group_size=group, policy="quest", page_size=8, pages=2) if quest \
        else dict(kv=kv, group_size=group, policy="h2o", budget=c)
    fmt = kvfx.KVConfig(**options).format
    cap = fmt.allocate((1, 1, c, d), torch.float32, torch.device("cpu")).slot_pos.shape[-1]
    odd = min(2 * live + 1, cap - 1 + cap % 2)  # odd, at most cap
    store = filled_store(fmt, b, hkv, c, d, 0.0, gen, live=odd)
    assert all(n % 2 for n in (store.slot_pos >= 0).sum(-1).flatten().tolist())
    check_against_torch_path(fmt, store, d, g, masked, causal, quest, splits, gen, seed)


@pytest.mark.parametrize("kv", ["int4", "int2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_params_read_as_words_equal_the_fp32_params(kv, dtype):
    """A bf16 / fp16 store's (scale, zero) pairs, read as one int32 word each, give the output of the same
    params widened to fp32 (read one by one); both are the torch path's to the store dtype's rounding."""
    from kvfx.kernels.slot_attention import slot_attention

    gen = torch.Generator().manual_seed(0)
    fmt = kvfx.KVConfig(kv=kv, group_size=32, policy="h2o", budget=40).format
    store = filled_store(fmt, 2, 2, 40, 128, 0.3, gen, dtype=dtype)
    wide = copy.deepcopy(store)
    wide.k_params, wide.v_params, wide.dtype = store.k_params.float(), store.v_params.float(), torch.float32
    q = torch.randn(2, 8, 1, 128, generator=gen)
    k_new, v_new = torch.randn(2, 2, 1, 128, generator=gen), torch.randn(2, 2, 1, 128, generator=gen)
    pos = torch.tensor([40])
    got = slot_attention(q, k_new, v_new, pos, store, None, False, 0.1, want_logits=True, block_n=16)
    want = slot_attention(q, k_new, v_new, pos, wide, None, False, 0.1, want_logits=True, block_n=16)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    bias = torch.zeros(2, 2, 4, 41).masked_fill(torch.cat([store.slot_pos, pos.view(1, 1, 1).expand(2, 2, 1)], -1)
                                                 [:, :, None] < 0, float("-inf"))
    out = _decode_attention_torch(q.view(2, 2, 4, 128), k_new, v_new, store, bias, None, 0.1, fmt.spec)[0]
    torch.testing.assert_close(got[0], out.reshape(got[0].shape), atol=2e-2, rtol=2e-2)
