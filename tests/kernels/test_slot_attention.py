"""The Triton slot-attention kernel (TRITON_INTERPRET=1 on CPU) against the torch path it replaces."""
import hypothesis.strategies as st
import torch
from hypothesis import given, settings

import kvfx
from kvfx.kernels.policies import _decode_attention_torch, _page_slots, candidate_bias, quest_pages

KV_FORMATS = ["none", "int8", "int4", "int2", "fp8"]


def filled_store(fmt, b, hkv, c, d, empty, gen):
    """A store of `fmt` for a cache of c tokens with random tokens in a random share of its slots."""
    store = fmt.allocate((b, hkv, c, d), torch.float32, torch.device("cpu"))
    cap = store.slot_pos.shape[-1]
    for codes, params in ((store.k_codes, store.k_params), (store.v_codes, store.v_params)):
        new_codes, new_params = store.codec.quantize(torch.randn(b, hkv, cap, d, generator=gen))
        codes.copy_(new_codes), params.copy_(new_params)
    held = torch.rand(b, hkv, cap, generator=gen) >= empty
    store.slot_pos.copy_(torch.where(held, torch.randperm(cap, generator=gen).int(), -1))
    if store.page_min.numel():
        store._update_pages()
    return store


@settings(max_examples=20, deadline=None)
@given(kv=st.sampled_from(KV_FORMATS), b=st.integers(1, 3), hkv=st.integers(1, 2), g=st.integers(1, 5),
       d=st.sampled_from([64, 128]), c=st.integers(1, 90), empty=st.floats(0, 0.9), splits=st.integers(1, 4),
       masked=st.booleans(), causal=st.booleans(), quest=st.booleans(), seed=st.integers(0, 99))
def test_kernel_equals_the_torch_path(kv, b, hkv, g, d, c, empty, splits, masked, causal, quest, seed):
    from kvfx.kernels.slot_attention import slot_attention

    gen = torch.Generator().manual_seed(seed)
    options = dict(kv=kv, group_size=32, policy="quest", page_size=8, pages=2) if quest \
        else dict(kv=kv, group_size=32, policy="h2o", budget=c)
    fmt = kvfx.KVConfig(**options).format
    store = filled_store(fmt, b, hkv, c, d, empty, gen)
    cap = store.slot_pos.shape[-1]
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
    got, probs, p_new = slot_attention(q, k_new, v_new, pos, store, mask, causal, 0.2, index, page,
                                       want_logits=not quest, num_splits=splits, block_n=16)
    torch.testing.assert_close(got, want.reshape(got.shape), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p_new, want_new, atol=1e-5, rtol=1e-4)
    if not quest:
        torch.testing.assert_close(probs, want_probs, atol=1e-5, rtol=1e-4)
