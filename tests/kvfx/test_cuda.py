"""The compile path on a GPU (skipped without CUDA; run on the GPU machine): kvfx ops inside an
inductor-compiled CUDA graph, the Triton KIVI write kernel included."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import StaticCache

import kvfx
from kvfx.models import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kv, policy", [(kv, {}) for kv in ("none", "int8", "int4", "int2", "fp8")] + [
    ("none", {"policy": "h2o", "budget": 4096}), ("none", {"policy": "quest", "pages": 1.0}),
    ("int4", {"policy": "snapkv", "budget": 4096})])
def test_compiled_decode_on_cuda(kv, policy):
    model = tiny_model(hidden_size=256, num_attention_heads=4, num_key_value_heads=2).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (2, 48), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        eager = model.generate(ids, cache_implementation="static", **kw)
        # A short residual window: KIVI's default R = 128 alone outweighs a cache this small.
        options = {"kv": kv, **({"group_size": 32, "residual": 32} if kv in ("int4", "int2", "fp8") else {}), **policy}
        model.forward = torch.compile(model.forward, backend="kvfx", options=options)
        cache = StaticCache(config=model.config, max_cache_len=512)
        ours = model.generate(ids, past_key_values=cache, **kw)
    rep = kvfx.report(model)
    assert rep.found == rep.rewritten == 4
    torch.testing.assert_close(ours.logits[0].float(), eager.logits[0].float(), atol=0.05, rtol=0.05)
    if kv == "none":  # (budgets above keep every token: lossless too)
        assert torch.equal(ours.sequences, eager.sequences)
    else:
        assert rep.kv_bytes < rep.fp_kv_bytes


@pytest.mark.parametrize("kv, policy", [("none", {}), ("int8", {}), ("int4", {}), ("none", {"policy": "h2o", "budget": 4096})])
def test_decode_replays_as_cuda_graphs(kv, policy):
    """cudagraphs=True: decode graphs replay as CUDA graphs (kvfx stores as static inputs) with the same
    results, and the prompt graphs still run normally."""
    model = tiny_model(hidden_size=256, num_attention_heads=4, num_key_value_heads=2).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    options = {"kv": kv, **({"group_size": 32, "residual": 32} if kv == "int4" else {}), **policy}
    with torch.no_grad():
        model.forward = torch.compile(model.forward, backend="kvfx", options=options)
        plain = model.generate(ids, past_key_values=StaticCache(config=model.config, max_cache_len=256), **kw)
        torch._dynamo.reset()
        counters.clear()
        model.forward = torch.compile(model.forward._torchdynamo_orig_callable, backend="kvfx",
                                      options={**options, "cudagraphs": True})
        for _ in range(2):  # a second cache: new stores, re-recorded graphs
            graphed = model.generate(ids, past_key_values=StaticCache(config=model.config, max_cache_len=256), **kw)
            assert torch.equal(graphed.sequences, plain.sequences)
            torch.testing.assert_close(torch.stack(graphed.logits).float(), torch.stack(plain.logits).float(),
                                       atol=1e-2, rtol=1e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0  # the decode graphs did replay as CUDA graphs



def quest_steps_match(kv: str, device: str, dtype: torch.dtype, prompt: int, steps: int) -> None:
    """A Quest store holding `prompt` tokens, then `steps` decode steps through `decode_step` (the fused
    kernels where Triton runs) and `decode_step_reference`: the same slots, bit-equal page bounds."""
    import copy

    from kvfx.kernels.policies import decode_step, decode_step_reference

    gen = torch.Generator(device).manual_seed(0)
    b, hkv, hq, d = 2, 8, 32, 128
    fmt = kvfx.KVConfig(kv=kv, policy="quest", pages=0.125).format
    fast = fmt.allocate((b, hkv, prompt + steps, d), dtype, torch.device(device), layer=4, layers=8)
    c = fast.slot_pos.shape[-1]
    slots = torch.arange(c, device=device).expand(b, hkv, c)
    k, v = (torch.randn(b, hkv, prompt, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
    fast.write(torch.where(slots < prompt, slots + c, -1), k, v,  # slot i <- prompt token i (no old slots)
               torch.arange(prompt, device=device, dtype=torch.int32).expand(b, hkv, prompt),
               torch.zeros(b, hkv, prompt, device=device))
    slow = copy.deepcopy(fast)
    for t in range(prompt, prompt + steps):
        q, k1, v1 = (torch.randn(b, h, 1, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv))
        args = (q, k1, v1, torch.tensor([t], device=device))
        decode_step(*args, fast, None, False, d ** -0.5, fmt.spec, 4)
        decode_step_reference(*args, slow, None, False, d ** -0.5, fmt.spec, 4)
        assert torch.equal(fast.slot_pos, slow.slot_pos), t
        assert torch.equal(fast.page_min, slow.page_min) and torch.equal(fast.page_max, slow.page_max), t


@pytest.mark.parametrize("kv", ["none", "int4", "fp8"])
def test_fused_quest_steps_keep_the_reference_bounds_on_cuda(kv):
    """On the GPU at bf16: the finish kernel widens the page bounds exactly as `TokenStore.put`."""
    quest_steps_match(kv, "cuda", torch.bfloat16, 4000, 20)


@pytest.mark.parametrize("kv", ["int4", "fp8"])
def test_sliding_window_kivi_store_on_cuda(kv):
    """HF's sliding-window DynamicCache under a KIVI format on the GPU: the decode kernels take the mask moved
    onto the store (a bias row); the logits of the same format over HF's full DynamicLayer and sliding mask."""
    from transformers import DynamicCache

    model = tiny_model("mistral", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       sliding_window=100).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (2, 120), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, output_logits=True, return_dict_in_generate=True)
    options = {"kv": kv, "group_size": 32, "residual": 32 if kv == "int4" else 0}
    runs = []
    with torch.no_grad():
        pasts = (DynamicCache(config=model.config), DynamicCache())  # sliding layers; full layers
        for past in pasts:
            torch._dynamo.reset()
            compiled = copy.deepcopy(model)
            compiled.forward = torch.compile(compiled.forward, backend="kvfx", options=options)
            runs.append(torch.stack(compiled.generate(ids, past_key_values=past, **kw).logits, 1).float())
            assert kvfx.report(compiled).rewritten == kvfx.report(compiled).found
    assert [past.layers[0].keys.shape[2] for past in pasts] == [99, 159]  # (the last token is not fed back)
    torch.testing.assert_close(runs[0], runs[1], atol=0.05, rtol=0.05)


def test_sliding_window_policy_on_cuda():
    """H2O on a sliding-window layer on the GPU (the decode kernels read the mask at the renumbered positions):
    HF's static cache (rolled) and its DynamicCache (cropped) give the same logits."""
    model = tiny_model("mistral", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       sliding_window=100).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (2, 60), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=60, min_new_tokens=60, do_sample=False, output_logits=True, return_dict_in_generate=True)
    runs = []
    with torch.no_grad():
        for cache in ("static", "dynamic"):
            torch._dynamo.reset()
            compiled = copy.deepcopy(model)
            compiled.forward = torch.compile(compiled.forward, backend="kvfx", options={"policy": "h2o", "budget": 48})
            out = compiled.generate(ids, cache_implementation="static" if cache == "static" else None, **kw)
            runs.append(torch.stack(out.logits, 1).float())
            assert kvfx.report(compiled).rewritten == kvfx.report(compiled).found
    torch.testing.assert_close(runs[1], runs[0], atol=0.05, rtol=0.05)
