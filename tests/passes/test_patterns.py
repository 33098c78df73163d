"""Cache-write and attention patterns beyond HF StaticCache + SDPA, on small hand-written graphs:
each rewritten site gives the eager result, each one kvfx cannot prove is left untouched with its reason."""
import math
import operator

import pytest
import torch
import torch.nn.functional as F

import kvfx
from kvfx.config import KVConfig
from kvfx.passes.rewrite import rewrite_graph
from graphs import dynamo_graphs




def rewritten(fn, args, kv):
    """The one graph of fn, rewritten with kv: (plan, the call targets left in it)."""
    (gm,) = dynamo_graphs(fn, *[a.clone() for a in args])
    plan = rewrite_graph(gm, KVConfig(kv=kv), graph_index=0)
    return plan, [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def unchanged_reason(fn, args, **config):
    """fn's one graph through the rewrite with KVConfig(**config): it must come out exactly as it went
    in, its site not rewritten. Returns the site's reason."""
    (gm,) = dynamo_graphs(fn, *args)
    before = gm.code
    plan = rewrite_graph(gm, KVConfig(**config), graph_index=0)
    assert gm.code == before and not plan.sites[0].rewritten
    return plan.sites[0].reason


def compiled_matches_eager(fn, args, kv, **tolerance):
    want = fn(*[a.clone() for a in args])
    got = torch.compile(fn, backend="kvfx", options={"kv": kv})(*[a.clone() for a in args])
    for w, g in zip(*(x if isinstance(x, tuple) else (x,) for x in (want, got))):
        if kv == "none" or g.untyped_storage().nbytes() > 0:  # grown caches come back as placeholders
            torch.testing.assert_close(g, w, **tolerance)


# ---- gpt-fast-style static buffers: index_put_ and slice writes; GQA by repeat_interleave; MQA -----

def gptfast_step(q, k_cache, v_cache, pos, k, v, mask):
    k_cache[:, :, pos] = k
    v_cache[:, :, pos] = v
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)


def slice_step(q, k_cache, v_cache, start, k, v, mask):
    k_cache[:, :, start:start + k.shape[2]] = k
    v_cache[:, :, start:start + v.shape[2]] = v
    g = q.shape[1] // k_cache.shape[1]
    kk, vv = (c.repeat_interleave(g, dim=1) for c in (k_cache, v_cache))
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=0.3)


def mqa_step(q, k_cache, v_cache, pos, k, v, mask):
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    b, _, s, d = k_cache.shape
    kk, vv = (c.expand(b, q.shape[1], s, d) for c in (k_cache, v_cache))
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


def static_inputs(heads=4, kv_heads=2, d=8, t=2, slots=6, start=2):
    g = torch.Generator().manual_seed(0)
    pos = torch.arange(start, start + t)
    mask = torch.arange(slots)[None, :] <= pos[:, None]  # causal over the filled slots: chunked prefill
    cache = torch.randn(1, kv_heads, slots, d, generator=g)
    return (torch.randn(1, heads, t, d, generator=g), cache, cache.clone() + 1, pos,
            torch.randn(1, kv_heads, t, d, generator=g), torch.randn(1, kv_heads, t, d, generator=g), mask)


@pytest.mark.parametrize("kv", ["none", "int8"])
@pytest.mark.parametrize("step, pattern", [(gptfast_step, "sdpa+enable_gqa, mask, cache input, index_put_"),
                                           (mqa_step, "sdpa+expand, mask, cache input, index_copy_")])
def test_position_writes_are_rewritten(step, pattern, kv):
    args = static_inputs(kv_heads=1) if step is mqa_step else static_inputs()
    plan, found = rewritten(step, args, kv)
    assert [(s.pattern, s.rewritten) for s in plan.sites] == [(pattern, True)]
    assert torch.ops.kvfx.attend.default in found
    assert (torch.ops.kvfx.store_write.default in found) == (kv == "int8")
    compiled_matches_eager(step, args, kv, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_slice_write_with_repeat_interleave_is_rewritten(kv):
    q, k_cache, v_cache, pos, k, v, mask = static_inputs()
    args = (q, k_cache, v_cache, 2, k, v, mask)
    (gm,) = dynamo_graphs(slice_step, *args)
    plan = rewrite_graph(gm, KVConfig(kv=kv), graph_index=0)
    assert plan.sites[0].pattern == "sdpa+repeat_interleave, mask, cache input, slice write"
    assert plan.sites[0].rewritten
    found = [n.target for n in gm.graph.nodes]
    assert "repeat_interleave" not in found
    assert (found.count(torch.arange) == 1) == (kv == "int8")  # one position tensor for both writes
    want = slice_step(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    got = torch.compile(slice_step, backend="kvfx", options={"kv": kv})(
        *[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    torch.testing.assert_close(got, want, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


def test_kivi_slice_writes_become_one_append():
    q, k_cache, v_cache, pos, k, v, mask = static_inputs(d=32, slots=8, start=0, t=3)
    (gm,) = dynamo_graphs(slice_step, q, k_cache, v_cache, 0, k, v, mask)
    plan = rewrite_graph(gm, KVConfig(kv="int4", group_size=16, residual=16), graph_index=0)
    assert plan.sites[0].rewritten
    assert [n.target for n in gm.graph.nodes].count(torch.ops.kvfx.kivi_write.default) == 1


def test_write_with_a_mask_index_is_left_unchanged():
    def bool_index_write(q, k_cache, v_cache, k, v, where):
        k_cache[:, :, where] = k
        v_cache[:, :, where] = v
        return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)

    q, k_cache, v_cache, _, k, v, _ = static_inputs(t=1)
    where = torch.zeros(6, dtype=torch.bool)
    where[3] = True
    unchanged_reason(bool_index_write, (q, k_cache, v_cache, k, v, where), kv="int8")


# ---- caches that grow by concatenation -------------------------------------------------------------

def cat_step(q, past_k, past_v, k, v):
    """HF DynamicLayer.update + SDPA: the grown cache is returned for the next call."""
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True), keys, values


def sliding_cat_step(q, past_k, past_v, k, v):
    """HF DynamicSlidingWindowLayer: attends over the concatenation, keeps only its last 3 tokens."""
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True), keys[:, :, -3:], values[:, :, -3:]


def cat_inputs(t=1, past=5):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, t, 8, generator=g), torch.randn(1, 2, past, 8, generator=g),
            torch.randn(1, 2, past, 8, generator=g), torch.randn(1, 2, t, 8, generator=g),
            torch.randn(1, 2, t, 8, generator=g))


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_concatenated_cache_is_rewritten(kv):
    plan, found = rewritten(cat_step, cat_inputs(), kv)
    assert [(s.pattern, s.rewritten) for s in plan.sites] == [("sdpa+enable_gqa, no mask, cat cache", True)]
    assert torch.ops.kvfx.attend.default in found
    # kv="none" keeps the model's concatenation; int8 builds none: the tokens go to the store.
    assert (torch.cat in found) == (kv == "none")
    assert len(plan.cat_slots) == (kv == "int8")
    compiled_matches_eager(cat_step, cat_inputs(), kv, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


def test_grown_cache_comes_back_as_a_placeholder_and_keeps_growing():
    compiled = torch.compile(cat_step, backend="kvfx", options={"kv": "int8"})
    q, past_k, past_v, k, v = cat_inputs(t=3)
    out, keys, values = compiled(q, past_k, past_v, k, v)  # a past built without kvfx is adopted
    assert isinstance(keys, kvfx.runtime.FreedKVBuffer) and keys.shape == (1, 2, 8, 8)
    assert keys.untyped_storage().nbytes() == 0
    torch.testing.assert_close(kvfx.runtime.dequantized(keys), torch.cat([past_k, k], -2), atol=0.05, rtol=0.05)
    fp = torch.cat([past_k, k], -2), torch.cat([past_v, v], -2)
    keys, values, _ = decode_matches_fp(compiled, keys, values, fp)
    assert keys.shape[2] == 11 and kvfx.runtime.held_bytes([keys, values]) < 0.6 * 2 * keys.numel() * 4 * 64 / 11


def decode_matches_fp(compiled, keys, values, cache, keep=None, steps=3):
    """`steps` one-token calls of `compiled` (a kvfx-compiled step) from its placeholders `keys`, `values`:
    each call's attention equals SDPA over the fp `cache` grown by the token (cut to its last `keep` tokens
    after the call, if given). Returns the last placeholders and fp cache."""
    for _ in range(steps):
        q, _, _, k, v = cat_inputs(t=1, past=0)
        grown = tuple(torch.cat([c, x], -2) for c, x in zip(cache, (k, v)))
        out, keys, values = compiled(q, keys, values, k, v)
        want = F.scaled_dot_product_attention(q, *grown, enable_gqa=True)
        torch.testing.assert_close(out, want, atol=0.05, rtol=0.05)
        cache = grown if keep is None else tuple(g[:, :, -keep:] for g in grown)
    return keys, values, cache


def rolled_step(q, keys, values, k, v, shift=-1, slot=-1):
    """HF's full static sliding-window layer taking one token: roll the buffers, write the last slot, copy back."""
    for buf, new in ((keys, k), (values, v)):
        rolled = buf.roll(shift, dims=-2)
        rolled[:, :, torch.tensor([slot])] = new
        buf.copy_(rolled)
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def roll_inputs():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g),
            torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g),
            torch.randn(1, 2, 1, 8, generator=g))


def test_a_rolled_window_is_an_int8_cache_write():
    """roll(-1) + the last slot + copy_ is one cache write: int8 rolls its store, and the attention over
    it equals eager's over the rolled fp buffers (to int8's rounding)."""
    plan, found = rewritten(rolled_step, roll_inputs(), "int8")
    assert [(s.pattern, s.rewritten) for s in plan.sites] == [("sdpa+enable_gqa, no mask, cache input, roll", True)]
    assert torch.ops.kvfx.store_write.default in found
    compiled_matches_eager(rolled_step, roll_inputs(), "int8", atol=0.05, rtol=0.05)


@pytest.mark.parametrize("shift, slot", [(1, -1), (-1, 0)])
def test_other_rolls_are_not_a_cache_write(shift, slot):
    """A roll the other way, or a write into the first slot, is not HF's window: left unchanged."""
    def step(*args):
        return rolled_step(*args, shift=shift, slot=slot)

    assert "overwritten whole" in unchanged_reason(step, roll_inputs(), kv="int8")


def dropped_first_cat_step(q, past_k, past_v, k, v):
    """Keeps all but the first token of the concatenation: not a window of its last tokens."""
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True), keys[:, :, 1:], values[:, :, 1:]


def test_a_concatenated_cache_the_caller_does_not_keep_is_left_unchanged():
    assert "not returned, whole or as its last tokens" in unchanged_reason(dropped_first_cat_step, cat_inputs(),
                                                                          kv="int8")


@pytest.mark.parametrize("mask", [torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.tensor([[0.0, -1.0, 0.5, 0.0,
                                                                                    float("-inf"), 0.0]])])
def test_a_sliding_window_kivi_store_takes_the_mask_by_column(mask):
    """A sliding window's KIVI store places the model's mask by column (`mask_on_store`): a broadcast column, or
    a 2-D additive mask over the 6 columns. Every token stays in the residual: eager's output."""
    def step(q, past_k, past_v, k, v, mask):
        keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return out, keys[:, :, -3:], values[:, :, -3:]

    inputs = [torch.randn(*x.shape[:-1], 32) for x in cat_inputs()] + [mask]
    plan, found = rewritten(step, inputs, "int4")
    assert plan.sites[0].rewritten and torch.ops.kvfx.kivi_attend.default in found
    compiled_matches_eager(step, inputs, "int4", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options, reason", [(dict(policy="h2o", budget=0.2), "a share of a length the window bounds"),
                                             (dict(policy="quest", pages=1), "Quest's pages are runs of positions")])
def test_a_sliding_window_a_policy_cannot_follow_is_left_unchanged(options, reason):
    """A policy follows a sliding window's crop by renumbering positions, but not with a store sized by the
    cache length: a fractional budget, Quest."""
    assert reason in unchanged_reason(sliding_cat_step, cat_inputs(), **options)


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_sliding_window_concatenation_is_rewritten(kv):
    plan, _ = rewritten(sliding_cat_step, cat_inputs(), kv)
    assert plan.sites[0].rewritten
    compiled_matches_eager(sliding_cat_step, cat_inputs(), kv, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


def test_sliding_window_store_keeps_the_window_call_after_call():
    """int8: the caller keeps 3-token placeholders; each call attends over them and its new token, as the
    fp window does, and the store's tokens are the window's."""
    compiled = torch.compile(sliding_cat_step, backend="kvfx", options={"kv": "int8"})
    q, past_k, past_v, k, v = cat_inputs(t=2)
    _, keys, values = compiled(q, past_k, past_v, k, v)  # 5 + 2 tokens: the store keeps the last 3
    window = torch.cat([past_k, k], -2)[:, :, -3:], torch.cat([past_v, v], -2)[:, :, -3:]
    keys, values, window = decode_matches_fp(compiled, keys, values, window, keep=3, steps=4)
    assert keys.shape == window[0].shape
    torch.testing.assert_close(kvfx.runtime.dequantized(keys), window[0], atol=0.05, rtol=0.05)


# ---- hand-written attention: masked_fill, where, ALiBi bias + mask ---------------------------------

def nanogpt_attention(q, past_k, past_v, k, v, bias, alibi=None):
    k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
    t, s = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    if alibi is not None:
        att = att + alibi[None, :, s - t:s, :s]
    att = att.masked_fill(bias[:, :, s - t:s, :s] == 0, float("-inf"))
    return F.softmax(att, dim=-1) @ v, k, v


def hf_gpt2_attention(q, past_k, past_v, k, v, keep):
    k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
    att = torch.matmul(q, k.transpose(-1, -2)) / 8 ** 0.5
    att = torch.where(keep, att.to(torch.float32), torch.tensor(torch.finfo(torch.float32).min))
    return torch.matmul(F.softmax(att, dim=-1).type(v.dtype), v), k, v


def mha_inputs(t=2, past=5):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(1, 4, t, 8, generator=g), torch.randn(1, 4, past, 8, generator=g),
            torch.randn(1, 4, past, 8, generator=g), torch.randn(1, 4, t, 8, generator=g),
            torch.randn(1, 4, t, 8, generator=g)]


def alibi(heads, n):
    slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)])
    return slopes[:, None, None] * (torch.arange(n)[None, :] - torch.arange(n)[:, None])


@pytest.mark.parametrize("kv", ["none", "int8"])
@pytest.mark.parametrize("case", ["masked_fill", "alibi+masked_fill", "where"])
def test_hand_written_masks_are_rewritten(case, kv):
    tril = torch.ones(1, 1, 16, 16).tril()
    if case == "where":
        fn, extra = hf_gpt2_attention, [tril[:, :, 5:7, :7].bool()]
    else:
        fn, extra = nanogpt_attention, [tril] + ([alibi(4, 16)] if case.startswith("alibi") else [])
    args = mha_inputs() + extra
    plan, found = rewritten(fn, args, kv)
    assert [(s.pattern, s.rewritten) for s in plan.sites] == [("manual+none, mask, cat cache", True)]
    assert not {F.softmax, torch.matmul, operator.matmul, "masked_fill"} & set(found)
    compiled_matches_eager(fn, args, kv, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


def test_fill_that_is_not_a_mask_is_left_unchanged():
    def zero_filled(q, past_k, past_v, k, v, bias):
        k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
        att = (q @ k.transpose(-2, -1)).masked_fill(bias[:, :, 5:7, :7] == 0, 0.0)
        return F.softmax(att, dim=-1) @ v, k, v

    assert unchanged_reason(zero_filled, (*mha_inputs(), torch.ones(1, 1, 16, 16).tril()), kv="none") == \
        "the scores are masked_fill-ed with 0.0, not -inf (kvfx models masking only)"


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_sdpa_with_per_head_additive_bias_and_gqa(kv):
    """ALiBi as SDPA's additive mask, one bias per query head, over a GQA cache (HF repeat_kv)."""
    def step(q, k_cache, v_cache, pos, k, v, bias):
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        b, h, s, d = k_cache.shape
        kk, vv = (c[:, :, None].expand(b, h, 2, s, d).reshape(b, h * 2, s, d) for c in (k_cache, v_cache))
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias)

    q, k_cache, v_cache, pos, k, v, keep = static_inputs()
    bias = alibi(4, 6)[None, :, 2:4].masked_fill(~keep, float("-inf"))
    args = (q, k_cache, v_cache, pos, k, v, bias)
    plan, _ = rewritten(step, args, kv)
    assert plan.sites[0].rewritten
    compiled_matches_eager(step, args, kv, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


# ---- 3-D bmm attention (BLOOM, the BART family): heads merged into the batch -----------------------

def bloom_attention(q, past_k, past_v, k, v, alibi, mask):
    """BLOOM: ALiBi as baddbmm's input [B*H, 1, S], the scores viewed 4-D for the mask, bmm with v."""
    k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
    b, h, t, d = q.shape
    q3, k3, v3 = q.reshape(b * h, -1, d), k.reshape(b * h, -1, d).transpose(-1, -2), v.reshape(b * h, -1, d)
    scores = alibi.baddbmm(batch1=q3, batch2=k3, beta=1.0, alpha=d ** -0.5).view(b, h, t, -1) + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs.view(b * h, t, -1), v3).view(b, h, t, d), k, v


def bart_attention(q, past_k, past_v, k, v, mask, split=None):
    """The BART family: bmm scores viewed 4-D for the mask and back to 3-D for softmax and bmm."""
    k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
    b, h, t, d = q.shape
    q3, k3, v3 = q.reshape(b * h, -1, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
    scores = torch.bmm(q3, k3.transpose(1, 2)).view(*(split or (b, h)), t, -1) + mask
    return torch.bmm(F.softmax(scores.view(b * h, t, -1), dim=-1), v3), k, v


def bmm_inputs(batch=2):
    g = torch.Generator().manual_seed(3)
    q, past_k, past_v, k, v = (torch.randn(batch, *x.shape[1:], generator=g) for x in mha_inputs())
    mask = torch.zeros(batch, 1, 2, 7).masked_fill(torch.ones(2, 7).tril(5) == 0, torch.finfo(torch.float32).min)
    return [q, past_k, past_v, k, v, mask]


@pytest.mark.parametrize("kv", ["none", "int8"])
@pytest.mark.parametrize("case", ["bloom", "bart"])
def test_bmm_attention_is_rewritten(case, kv):
    args = bmm_inputs()
    if case == "bloom":  # per (batch row, head) ALiBi, as BLOOM builds it
        fn = bloom_attention
        args.insert(5, alibi(4, 7)[None, :, -1:].expand(2, 4, 1, 7).reshape(8, 1, 7).contiguous())
    else:
        fn = bart_attention
    plan, found = rewritten(fn, args, kv)
    assert [(s.pattern, s.rewritten) for s in plan.sites] == [("bmm+none, mask, cat cache", True)]
    assert not {torch.bmm, "baddbmm", F.softmax} & set(found)
    compiled_matches_eager(fn, args, kv, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


def test_bmm_scores_split_into_other_factors_are_left_unchanged():
    """[B*H, T, S] viewed as [H, B, T, S] (B = 2, H = 4) pairs rows with the wrong heads' masks."""
    args = bmm_inputs() + [(4, 2)]
    args[5] = args[5].expand(2, 4, 2, 7).transpose(0, 1).contiguous()  # a per-head mask, shaped [H, B, T, S]
    assert "splits B * H into other factors" in unchanged_reason(bart_attention, args, kv="none")


def test_bmm_of_tensors_that_are_not_merged_heads_is_left_unchanged():
    def flat(q3, k3, v3):
        return torch.bmm(F.softmax(torch.bmm(q3, k3.transpose(1, 2)), dim=-1), v3)

    reason = unchanged_reason(flat, [torch.randn(8, 3, 4) for _ in range(3)], kv="none")
    assert "not a 4-D tensor [B, H, S, D] viewed as [B * H, S, D]" in reason


# ---- softcapping (Gemma-2) and one KV head broadcast by SDPA (Falcon) -------------------------------

def softcapped_attention(q, past_k, past_v, k, v, mask, cap=30.0, inner_cap=30.0):
    """Gemma-2's eager attention: scale, tanh(s / c) * c, then the additive mask."""
    k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
    att = torch.matmul(q, k.transpose(2, 3)) * 4.0
    att = torch.tanh(att / inner_cap) * cap + mask
    return torch.matmul(F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype), v), k, v


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_softcapped_attention_is_rewritten(kv):
    args = bmm_inputs(batch=1)
    plan, found = rewritten(softcapped_attention, args, kv)
    assert [(s.pattern, s.rewritten) for s in plan.sites] == [("manual+none, softcap, mask, cat cache", True)]
    assert torch.tanh not in found
    attend = [a for a in found if a is torch.ops.kvfx.attend.default]
    assert len(attend) == 1
    compiled_matches_eager(softcapped_attention, args, kv, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


def test_softcap_kvfx_cannot_prove_is_left_unchanged():
    caps = (30.0, 20.0)  # tanh(s / 20) * 30: no softcap
    def static_softcapped(q, k_cache, v_cache, pos, k, v, mask):
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        att = torch.tanh(torch.matmul(q, k_cache.transpose(2, 3)) / caps[1]) * caps[0]
        return torch.matmul(F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1), v_cache)

    assert "softmax input has an op kvfx does not model: tanh" in unchanged_reason(static_softcapped,
                                                                                   static_inputs(heads=2, d=32))


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_one_kv_head_broadcast_by_sdpa_is_rewritten(kv):
    """Falcon's multi-query attention: a [B, 1, S, D] cache that SDPA broadcasts over the query heads."""
    def falcon_step(q, k_cache, v_cache, pos, k, v, mask):
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)

    args = static_inputs(kv_heads=1)
    plan, _ = rewritten(falcon_step, args, kv)
    assert [(s.pattern, s.rewritten) for s in plan.sites] == [("sdpa+broadcast, mask, cache input, index_copy_", True)]
    compiled_matches_eager(falcon_step, args, kv, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


def test_one_kv_head_broadcast_over_the_batch_too_is_left_unchanged():
    def shared_cache(q, k_cache, v_cache):
        return F.scaled_dot_product_attention(q, k_cache, v_cache)

    q, k_cache, v_cache = torch.randn(2, 4, 1, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    assert "broadcast over the batch too" in unchanged_reason(shared_cache, (q, k_cache, v_cache), kv="none")


# ---- the row max subtracted before softmax (MiMo-V2); keys and values of different head dims -------

def max_shifted_attention(q, past_k, past_v, k, v, mask):
    k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
    att = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
    att = att - att.max(dim=-1, keepdim=True).values  # softmax subtracts it anyway
    return torch.matmul(F.softmax(att, dim=-1, dtype=torch.float32), v), k, v


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_row_max_shift_before_softmax_is_rewritten(kv):
    args = bmm_inputs(batch=1)
    plan, found = rewritten(max_shifted_attention, args, kv)
    assert [s.rewritten for s in plan.sites] == [True]
    assert "max" not in found and F.softmax not in found
    compiled_matches_eager(max_shifted_attention, args, kv, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


def test_int8_leaves_keys_and_values_of_different_head_dims_unchanged():
    q, past_k, past_v, k, v, mask = bmm_inputs(batch=1)
    args = [q, past_k, past_v[..., :4].contiguous(), k, v[..., :4].contiguous(), mask]
    assert rewritten(max_shifted_attention, args, "none")[0].sites[0].rewritten  # attend handles Dv != Dk
    assert "different head dims (8 and 4)" in unchanged_reason(max_shifted_attention, args, kv="int8")


def test_written_placeholders_follow_views_and_skip_read_only_inputs():
    """What cudagraphs=True marks static: every input written in place, through views, and no other."""
    from kvfx.passes.fx_utils import written_placeholders

    def step(keys, values, count, scratch, x, pos):
        keys.index_copy_(2, pos, x)
        values[:, :, pos] = x  # a slice assignment
        count.add_(1)
        torch.ops.aten.copy_.default(scratch.view(-1)[:4], x.reshape(-1)[:4])  # a schema write, via views
        return keys.sum() + x.sum()

    inputs = (torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4), torch.zeros(()), torch.zeros(8), torch.ones(1, 2, 1, 4),
              torch.tensor([3]))
    (gm,) = dynamo_graphs(step, *inputs)
    assert [n.name for n in written_placeholders(gm.graph)] == ["l_keys_", "l_values_", "l_count_", "l_scratch_"]
