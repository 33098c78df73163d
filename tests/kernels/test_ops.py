"""torch.ops.kvfx.* against their plain-PyTorch definitions, plus torch.library.opcheck."""
import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import kvfx
import kvfx.kernels  # noqa: F401  (registers the ops)
from kvfx.kernels.int8 import dequantize_int8_reference, quantize_int8_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def repeat_kv_sdpa(q, k, v, mask, kv_len, is_causal, scale):
    """The HF eager path: materialize repeat_kv, then SDPA (what kvfx must equal)."""
    g = q.shape[1] // k.shape[1]
    if kv_len >= 0:
        k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    k, v = (t.repeat_interleave(g, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


@st.composite
def attention_case(draw):
    b, hkv, g = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    t, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 12)), draw(st.sampled_from([8, 16, 64]))
    dtype = draw(st.sampled_from(list(TOL)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(b, hkv * g, t, d, generator=gen).to(dtype)
    k, v = (torch.randn(b, hkv, s, d, generator=gen).to(dtype) for _ in range(2))
    mask_kind = draw(st.sampled_from(["none", "causal", "bool", "bool-per-head", "additive"]))
    kv_len = draw(st.sampled_from([-1, min(s, t)])) if mask_kind in ("none", "causal") else -1
    n = s if kv_len < 0 else kv_len
    mask, is_causal = None, mask_kind == "causal"
    if mask_kind == "causal" and kv_len < 0 and s < t:
        is_causal = False
    if mask_kind.startswith("bool"):
        heads = hkv * g if mask_kind == "bool-per-head" else 1
        mask = torch.rand(b, heads, t, n, generator=gen) > 0.3
        mask[..., 0] = True
        if draw(st.booleans()):
            mask[:, :, 0] = False  # a query that sees no key (HF left padding): SDPA gives zeros
    elif mask_kind == "additive":
        mask = torch.randn(b, 1, t, n, generator=gen).to(dtype)
    return q, k, v, mask, kv_len, is_causal, 1.0 / d ** 0.5


@given(attention_case())
def test_attend_equals_repeat_kv_sdpa(case):
    q, k, v, mask, kv_len, is_causal, scale = case
    got = torch.ops.kvfx.attend(q, k, v, None, None, mask, kv_len, is_causal, scale)
    want = repeat_kv_sdpa(q.float(), k.float(), v.float(), mask if mask is None or mask.dtype == torch.bool
                          else mask.float(), kv_len, is_causal, scale)
    torch.testing.assert_close(got.float(), want, atol=TOL[q.dtype] * 4, rtol=TOL[q.dtype] * 4)


@given(attention_case())
def test_attend_int8_equals_attention_over_dequantized(case):
    q, k, v, mask, kv_len, is_causal, scale = case
    (kc, ks), (vc, vs) = quantize_int8_reference(k), quantize_int8_reference(v)
    got = torch.ops.kvfx.attend(q, kc, vc, ks, vs, mask, kv_len, is_causal, scale)
    deq = [dequantize_int8_reference(c, p, torch.float32) for c, p in ((kc, ks), (vc, vs))]
    want = repeat_kv_sdpa(q.float(), *deq, mask if mask is None or mask.dtype == torch.bool else mask.float(),
                          kv_len, is_causal, scale)
    torch.testing.assert_close(got.float(), want, atol=TOL[q.dtype] * 4, rtol=TOL[q.dtype] * 4)


def softcapped_eager(q, k, v, mask, kv_len, is_causal, scale, softcap):
    """Gemma-2's eager attention written out: scale, tanh(s / c) * c, mask, softmax (fp32)."""
    g = q.shape[1] // k.shape[1]
    if kv_len >= 0:
        k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    k, v = (t.float().repeat_interleave(g, dim=1) for t in (k, v))
    scores = torch.tanh(q.float() @ k.transpose(-1, -2) * scale / softcap) * softcap
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row that sees no key: zeros, as SDPA
    return probs @ v


@given(attention_case(), st.sampled_from([0.5, 5.0, 50.0]), st.booleans())
def test_attend_softcap_equals_eager_softcapping(case, softcap, quantized):
    q, k, v, mask, kv_len, is_causal, scale = case
    if quantized:
        (kc, ks), (vc, vs) = quantize_int8_reference(k), quantize_int8_reference(v)
        got = torch.ops.kvfx.attend(q, kc, vc, ks, vs, mask, kv_len, is_causal, scale, softcap)
        k, v = (dequantize_int8_reference(c, p, torch.float32) for c, p in ((kc, ks), (vc, vs)))
    else:
        got = torch.ops.kvfx.attend(q, k, v, None, None, mask, kv_len, is_causal, scale, softcap)
    want = softcapped_eager(q, k, v, mask, kv_len, is_causal, scale, softcap)
    torch.testing.assert_close(got.float(), want, atol=TOL[q.dtype] * 4, rtol=TOL[q.dtype] * 4)


def test_store_write_quantizes_at_positions():
    codes = torch.zeros(2, 3, 10, 8, dtype=torch.uint8)
    qparams = torch.zeros(2, 3, 10, 2)
    x = torch.randn(2, 3, 4, 8)
    pos = torch.tensor([2, 3, 4, 5])
    torch.ops.kvfx.store_write(codes, qparams, pos, x)
    want_codes, want_qparams = quantize_int8_reference(x)
    assert torch.equal(codes[:, :, 2:6], want_codes) and torch.equal(qparams[:, :, 2:6], want_qparams)
    assert (codes[:, :, :2] == 0).all() and (codes[:, :, 6:] == 0).all()


@pytest.mark.parametrize("quantized", [False, True])
def test_opcheck(quantized):
    q = torch.randn(2, 4, 3, 8)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.rand(2, 1, 3, 6) > 0.2
    mask[..., 0] = True
    if quantized:
        (k, ks), (v, vs) = quantize_int8_reference(k), quantize_int8_reference(v)
    else:
        ks = vs = None
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    torch.library.opcheck(torch.ops.kvfx.attend.default, (q, k, v, ks, vs, mask, -1, False, 0.35))
    torch.library.opcheck(torch.ops.kvfx.attend.default, (q, k, v, ks, vs, mask, -1, False, 0.35, 20.0))
    codes, qparams = torch.zeros(2, 2, 6, 8, dtype=torch.uint8), torch.zeros(2, 2, 6, 2)
    torch.library.opcheck(torch.ops.kvfx.store_write.default, (codes, qparams, torch.tensor([1, 4]), torch.randn(2, 2, 2, 8)))


@pytest.mark.parametrize("kv", ["int4", "int2", "fp8"])
def test_kivi_ops_opcheck_and_match_the_store_reference(kv):
    from kvfx.kernels.formats import format_for
    from kvfx.kernels.kivi import dequantize_reference

    fmt = format_for(kv, group_size=16, residual=16)
    shape = (2, 2, 40, 32)
    store = fmt.allocate(shape, torch.float32, torch.device("cpu"))
    constants = (fmt.bits, fmt.fp8, fmt.group_size, fmt.residual)
    k, v = torch.randn(2, 2, 37, 32), torch.randn(2, 2, 37, 32)
    pos = torch.arange(37)
    torch.ops.kvfx.kivi_write(*store.tensors(), pos, k, v, 40, *constants)
    keys, values = dequantize_reference(store, 37)
    assert (keys - k).abs().max() < (0.5 if kv != "int2" else 2.0)  # quantized, within the format's steps
    q = torch.randn(2, 4, 1, 32)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[..., 38:] = False
    k1, v1, p1 = torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32), torch.tensor([37])
    torch.ops.kvfx.kivi_write(*store.tensors(), p1, k1, v1, 40, *constants)
    got = torch.ops.kvfx.kivi_attend(q, k1, v1, p1, *store.tensors(), mask, -1, 40, False, 0.2, *constants)
    keys, values = dequantize_reference(store, 38)
    keys[:, :, 37:38], values[:, :, 37:38] = k1, v1  # the new token at full precision
    want = F.scaled_dot_product_attention(q, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), scale=0.2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # torch's schema check compares tensors with ops float8 lacks on CPU: run the other checks for fp8.
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") if kv == "fp8" else None
    torch.library.opcheck(torch.ops.kvfx.kivi_attend.default,
                          (q, k1, v1, p1, *store.tensors(), mask, -1, 40, False, 0.2, *constants),
                          **({"test_utils": checks} if checks else {}))
    fresh = fmt.allocate(shape, torch.float32, torch.device("cpu"))
    torch.library.opcheck(torch.ops.kvfx.kivi_write.default, (*fresh.tensors(), pos, k, v, 40, *constants),
                          **({"test_utils": checks} if checks else {}))
    options = kvfx.KVConfig(kv=kv, group_size=16, residual=16).to_json()
    torch.library.opcheck(torch.ops.kvfx.store_alloc.default, (list(shape), torch.float32, torch.device("cpu"),
                                                               options, 0, 1))


@pytest.mark.parametrize("kv", ["int4", "fp8"])
@pytest.mark.parametrize("softcap", [0.5, 50.0])
def test_kivi_attend_softcap_equals_eager_softcapping(kv, softcap):
    """Gemma-2's softcapped attention over a KIVI store: a causal prompt, a masked chunk, then a decode step,
    each the eager softcapping over the dequantized cache (the call's new tokens at full precision)."""
    from kvfx.kernels.formats import format_for
    from kvfx.kernels.kivi import dequantize_reference

    fmt = format_for(kv, group_size=16, residual=16)
    store = fmt.allocate((2, 2, 48, 32), torch.float32, torch.device("cpu"))
    constants = (fmt.bits, fmt.fp8, fmt.group_size, fmt.residual)
    step_mask = (torch.rand(2, 1, 1, 48) < 0.7) & (torch.arange(48) <= 30)
    for pos, mask, causal in ((torch.arange(21), None, True),  # (the slots after the call are unwritten: zeros)
                              (torch.arange(21, 30), torch.ones(9, 48, dtype=torch.bool).tril(21), False),
                              (torch.tensor([30]), step_mask, False)):
        t = pos.shape[0]
        q, k, v = torch.randn(2, 4, t, 32) * 3, torch.randn(2, 2, t, 32) * 3, torch.randn(2, 2, t, 32)
        torch.ops.kvfx.kivi_write(*store.tensors(), pos, k, v, 48, *constants)
        got = torch.ops.kvfx.kivi_attend(q, k, v, pos, *store.tensors(), mask, -1, 48, causal, 0.2, *constants,
                                         softcap)
        keys, values = (F.pad(x, (0, 0, 0, 48 - x.shape[2])) for x in dequantize_reference(store, int(pos[-1]) + 1))
        keys[:, :, pos], values[:, :, pos] = k, v
        want = softcapped_eager(q, keys, values, mask, -1, causal, 0.2, softcap)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kivi_prompt_attention_in_row_blocks_is_the_whole_batch_at_once(monkeypatch):
    """A prompt chunk over a KIVI store dequantizes the cache one block of batch rows at a time (bounded
    transient memory): one row per block gives what the whole batch at once gives, per-row masks
    (left padding) included."""
    import kvfx.kernels.ops as ops
    from kvfx.kernels.formats import format_for

    fmt = format_for("int4", group_size=16, residual=16)
    store = fmt.allocate((3, 2, 64, 32), torch.float32, torch.device("cpu"))
    constants = (fmt.bits, fmt.fp8, fmt.group_size, fmt.residual)
    torch.ops.kvfx.kivi_write(*store.tensors(), torch.arange(40), torch.randn(3, 2, 40, 32), torch.randn(3, 2, 40, 32),
                              64, *constants)
    q, k, v, pos = torch.randn(3, 4, 8, 32), torch.randn(3, 2, 8, 32), torch.randn(3, 2, 8, 32), torch.arange(40, 48)
    mask = torch.ones(8, 64, dtype=torch.bool).tril(40)[None, None].repeat(3, 1, 1, 1)
    mask[1, ..., :5] = mask[2, ..., :11] = False  # rows 1 and 2 left-padded
    torch.ops.kvfx.kivi_write(*store.tensors(), pos, k, v, 64, *constants)
    args = (q, k, v, pos, *store.tensors(), mask, -1, 64, False, 0.2, *constants)
    whole = torch.ops.kvfx.kivi_attend(*args)
    monkeypatch.setattr(ops, "PROMPT_BLOCK_BYTES", 1)
    torch.testing.assert_close(torch.ops.kvfx.kivi_attend(*args), whole, atol=1e-6, rtol=1e-6)
    assert not torch.equal(whole[1], torch.ops.kvfx.kivi_attend(q, k, v, pos, *store.tensors(), mask[[0, 0, 0]], -1, 64,
                                                                  False, 0.2, *constants)[1])  # row 1's own mask counted


def test_kivi_write_past_the_cache_is_a_clear_error():
    from kvfx.kernels.formats import format_for

    fmt = format_for("int4", group_size=16, residual=16)
    store = fmt.allocate((1, 1, 8, 32), torch.float32, torch.device("cpu"))
    with pytest.raises(kvfx.KVFXError, match="do not fit the KV cache of 8 slots"):
        torch.ops.kvfx.kivi_write(*store.tensors(), torch.arange(6, 10), torch.randn(1, 1, 4, 32),
                                  torch.randn(1, 1, 4, 32), 8, 4, False, 16, 16)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive-per-head", "one-row", "2-d"])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_long_prompts_attend_in_query_blocks_with_the_same_result(monkeypatch, mask_kind, softcap):
    """Query rows are attended in blocks (bounded mask and score memory); blocks change nothing."""
    from kvfx.kernels import attention

    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, t, s, d = 2, 4, 2, 37, 50, 16
    q, (k, v) = torch.randn(b, hq, t, d, generator=gen), torch.randn(2, b, hkv, s, d, generator=gen)
    mask = {"none": None, "causal": None, "bool": torch.rand(b, 1, t, s, generator=gen) > 0.3,
            "additive-per-head": torch.randn(b, hq, t, s, generator=gen),
            "one-row": torch.rand(b, 1, 1, s, generator=gen) > 0.2, "2-d": torch.rand(t, s, generator=gen) > 0.3}[mask_kind]
    args = (q, k, v, mask, -1, mask_kind == "causal", 0.3, softcap)
    whole = attention.attend_reference(*args)
    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", b * hq * s * 5)  # blocks of 5 query rows
    torch.testing.assert_close(attention.attend_reference(*args), whole, atol=1e-6, rtol=1e-6)
    want = repeat_kv_sdpa(q, k, v, mask, -1, mask_kind == "causal", 0.3) if softcap == 0 else whole
    torch.testing.assert_close(whole, want, atol=1e-5, rtol=1e-5)


def test_prompt_attention_skips_the_tail_no_query_sees():
    """A prompt chunk in a static cache: keys past the last visible position are not attended, and
    filling them with NaN changes nothing (kvfx::attend no longer reads them)."""
    from kvfx.kernels.attention import attend_reference, visible_prefix

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    mask = torch.ones(5, 32, dtype=torch.bool).tril(10)[None, None].expand(2, 1, 5, 32).clone()  # sees keys <= 14
    assert visible_prefix(mask, 32) == 15
    additive = torch.zeros(2, 1, 5, 32).masked_fill(~mask, float("-inf"))
    assert visible_prefix(additive, 32) == 15 and visible_prefix(torch.zeros(2, 1, 5, 32, dtype=torch.bool), 32) == -1
    expected = attend_reference(q, k, v, mask, -1, False, 0.25)
    k[:, :, 15:], v[:, :, 15:] = float("nan"), float("nan")
    for m in (mask, additive):
        torch.testing.assert_close(torch.ops.kvfx.attend(q, k, v, None, None, m, -1, False, 0.25), expected)
