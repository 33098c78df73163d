"""Structural matching and rewriting on dynamo graphs: positive cases (ops appear, sites counted)
and negative ones (a graph kvfx cannot prove it handles is left exactly as it was)."""
import functools

import pytest
import torch
import torch.nn.functional as F

import kvfx
from kvfx.config import KVConfig
from kvfx.passes.rewrite import rewrite_graph
from graphs import dynamo_graphs




def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def write_and_repeat_kv(heads, k_cache, v_cache, pos, k, v):
    """HF StaticCache's index_copy_ writes, then HF's repeat_kv (expand + reshape) to `heads` heads."""
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    b, hkv, s, d = k_cache.shape
    g = heads // hkv
    return (cache[:, :, None, :, :].expand(b, hkv, g, s, d).reshape(b, hkv * g, s, d) for cache in (k_cache, v_cache))


def cached_attention(q, k_cache, v_cache, pos, k, v, mask):
    """A static-cache decode step written the HF way: index_copy_, repeat_kv, SDPA."""
    key, value = write_and_repeat_kv(q.shape[1], k_cache, v_cache, pos, k, v)
    return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=0.5)


def decode_inputs():
    return (torch.randn(1, 4, 1, 8), torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8), torch.tensor([2]),
            torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.ones(1, 1, 1, 6, dtype=torch.bool))


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_hf_static_cache_site_is_rewritten(kv):
    (gm,) = dynamo_graphs(cached_attention, *decode_inputs())
    plan = rewrite_graph(gm, KVConfig(kv=kv), graph_index=0)
    assert [s.rewritten for s in plan.sites] == [True]
    assert "repeat_kv" in plan.sites[0].pattern
    found = targets(gm)
    assert torch.ops.kvfx.attend.default in found
    assert not any("scaled_dot_product" in str(t) for t in found)
    assert (torch.ops.kvfx.store_write.default in found) == (kv == "int8")
    assert len(plan.slots) == (kv == "int8")
    assert not any(n.target == "expand" for n in gm.graph.nodes)  # no repeat_kv copy left


def test_attention_not_over_a_cache_is_left_unchanged():
    def self_attention(x, w):
        q, k, v = (x @ w).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    (gm,) = dynamo_graphs(self_attention, torch.randn(1, 2, 5, 12), torch.randn(12, 36))
    before = gm.code
    plan = rewrite_graph(gm, KVConfig(kv="int8"), graph_index=0)
    assert gm.code == before
    assert not plan.sites[0].rewritten
    assert "not a cache buffer" in plan.sites[0].reason or "cache buffer" in plan.sites[0].reason


def test_cache_read_outside_attention_is_not_quantized():
    def leaky(q, k_cache, v_cache, pos, k, v, mask):
        return cached_attention(q, k_cache, v_cache, pos, k, v, mask), k_cache.sum()

    (gm,) = dynamo_graphs(leaky, *decode_inputs())
    before = gm.code
    plan = rewrite_graph(gm, KVConfig(kv="int8"), graph_index=0)
    assert gm.code == before
    assert "also read by sum" in plan.sites[0].reason


def test_no_attention_graph_is_untouched():
    (gm,) = dynamo_graphs(lambda x: torch.softmax(x @ x.T, -1), torch.randn(3, 3))
    before = gm.code
    plan = rewrite_graph(gm, KVConfig(kv="int8"), graph_index=0)
    assert plan.sites == [] and gm.code == before


def test_strict_mode_raises_naming_the_site():
    def self_attention(x):
        return F.scaled_dot_product_attention(x, x, x)

    compiled = torch.compile(self_attention, backend="kvfx", options={"kv": "int8", "strict": True})
    with pytest.raises(Exception, match="site 0 of graph 0 was not rewritten"):
        compiled(torch.randn(1, 2, 3, 4))


def test_unmatched_site_runs_unchanged_numerics():
    def self_attention(x):
        return F.scaled_dot_product_attention(x, x, x)

    compiled = torch.compile(self_attention, backend="kvfx", options={"kv": "int8"})
    x = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(compiled(x), self_attention(x))
    assert kvfx.report(compiled).rewritten == 0


def manual_attention(q, k_cache, v_cache, pos, k, v, mask, softcap=None):
    """HF's eager attention: index_copy_, repeat_kv, matmul, scale, additive mask, fp32 softmax, matmul."""
    key, value = write_and_repeat_kv(q.shape[1], k_cache, v_cache, pos, k, v)
    scores = torch.matmul(q, key.transpose(2, 3)) * 0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=0.0, training=False)
    return torch.matmul(probs, value)


def additive_decode_inputs():
    *rest, mask = decode_inputs()
    return (*rest, torch.zeros(1, 1, 1, 6).masked_fill(torch.arange(6) > 2, float("-inf")))


@pytest.mark.parametrize("kv", ["none", "int8"])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_manual_attention_is_rewritten_and_exact(kv, softcap):
    args = additive_decode_inputs()
    step = functools.partial(manual_attention, softcap=softcap)
    want = step(*[a.clone() for a in args])
    (gm,) = dynamo_graphs(step, *[a.clone() for a in args])
    plan = rewrite_graph(gm, KVConfig(kv=kv), graph_index=0)
    assert [s.rewritten for s in plan.sites] == [True] and plan.sites[0].pattern.startswith("manual+repeat_kv")
    assert ("softcap" in plan.sites[0].pattern) == (softcap is not None)
    found = targets(gm)
    assert torch.ops.kvfx.attend.default in found and torch.matmul not in found and F.softmax not in found
    assert torch.tanh not in found
    compiled = torch.compile(step, backend="kvfx", options={"kv": kv})
    got = compiled(*[a.clone() for a in args])
    torch.testing.assert_close(got, want, **({} if kv == "none" else dict(atol=0.05, rtol=0.05)))


def test_router_softmax_is_not_an_attention_site():
    (gm,) = dynamo_graphs(lambda x, w: F.softmax(F.linear(x, w), dim=-1), torch.randn(2, 8), torch.randn(4, 8))
    assert rewrite_graph(gm, KVConfig(kv="int8"), graph_index=0).sites == []
