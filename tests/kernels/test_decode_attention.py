"""Decode attention over a KIVI store: Triton == reference, reference == SDPA on an unquantized store.

Under TRITON_INTERPRET=1 (no GPU) the bf16 cases check the reference only: the interpreter's bf16
`tl.dot` is wrong (TOOLCHAIN.md), and the kernel computes in fp32 there. On a GPU every dtype runs the
kernel (set TRITON_INTERPRET=0).
"""
import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from kvfx.kernels.decode_attention import (decode_attention, decode_attention_reference,
                                           decode_attention_triton)
from kvfx.kernels.kivi import KiviStore, dequantize_reference, store_write

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton vs reference, max abs error on outputs of magnitude ~1. On the GPU the dots take the
# query's dtype (the reference rounds dequantized K, V to it too), fp32 dots run as tf32 (10-bit
# mantissa; measured up to 2.06e-3 on the H100), and the output is rounded to the query's dtype.
TOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 5e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FORMATS = ((2, False), (4, False), (8, False), (8, True), (16, False))


def kernel_runs(dtype) -> bool:
    return DEVICE == "cuda" or dtype != torch.bfloat16


@st.composite
def decode_case(draw):
    bits, fp8 = draw(st.sampled_from(FORMATS))
    g = draw(st.sampled_from([16, 32]))
    r = g * draw(st.integers(0, 2))
    b, hkv, group = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 8))
    d = draw(st.sampled_from([64, 128]))
    dtype = draw(st.sampled_from(list(TOL)))
    # ragged rows, 1 .. several groups past the residual, mostly not multiples of G
    lengths = torch.tensor([draw(st.integers(1, r + 5 * g + 7)) for _ in range(b)], dtype=torch.int32)
    kind = draw(st.sampled_from(["normal", "constant", "outlier"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    s = int(lengths.max())
    k, v = torch.randn(2, b, hkv, s, d, generator=gen)
    if kind == "constant":
        k, v = torch.full_like(k, 0.5), torch.full_like(v, -2.0)
    elif kind == "outlier":
        k[..., 3] *= 100.0
        v[..., 5] += 30.0
    q = torch.randn(b, hkv * group, 1, d, generator=gen)
    store = KiviStore.allocate(b, hkv, s + g, d, dtype, DEVICE, bits, g, r, fp8)
    lengths = lengths.to(DEVICE)
    store_write(store, k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), 0, lengths)
    splits = draw(st.sampled_from([None, 1, 3]))
    block_n = draw(st.sampled_from([None, g, 2 * g, 4 * g]))  # int kernel: 1, 2 or 4 groups per step
    vmode = draw(st.sampled_from([0, 1, 2]))  # int kernel: value params gathered, selected, reshaped
    return q.to(dtype).to(DEVICE), store, lengths, splits, block_n, vmode


@given(decode_case())
def test_triton_equals_reference(case):
    q, store, lengths, splits, block_n, vmode = case
    want = decode_attention_reference(q, store, lengths)
    assert want.shape == q.shape and want.dtype == q.dtype and torch.isfinite(want).all()
    if not kernel_runs(q.dtype):
        return
    got = decode_attention_triton(q, store, lengths, num_splits=splits, block_n=block_n, vmode=vmode)
    assert got.shape == q.shape and got.dtype == q.dtype
    scale = want.float().abs().amax().clamp(min=1.0)  # outlier values make outputs ~30
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[q.dtype] * scale.item(), rtol=0)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_reference_is_sdpa_on_an_unquantized_store(group):
    """The definition: an fp store (bits=16) gives exactly GQA SDPA over the first lengths[b] tokens."""
    gen = torch.Generator().manual_seed(group)
    b, hkv, s, d = 2, 2, 70, 64
    k, v = torch.randn(2, b, hkv, s, d, generator=gen)
    q = torch.randn(b, hkv * group, 1, d, generator=gen)
    lengths = torch.tensor([70, 33], dtype=torch.int32)
    store = KiviStore.allocate(b, hkv, s, d, torch.float32, "cpu", 16, 16, 32)
    store_write(store, k, v, 0, lengths)
    got = decode_attention_reference(q, store, lengths)
    for row, n in enumerate(lengths.tolist()):
        want = F.scaled_dot_product_attention(q[row:row + 1], k[row:row + 1, :, :n], v[row:row + 1, :, :n],
                                              enable_gqa=True)
        torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,fp8,max_err", [(8, False, 0.005), (8, True, 0.03), (4, False, 0.08), (2, False, 0.4)])
def test_quantized_attention_stays_close_to_full_precision(bits, fp8, max_err):
    """A sanity floor per format (random Gaussian K, V; outputs are ~0.1-1): the kernel attends over
    what was written, not over stale or misplaced tokens."""
    gen = torch.Generator().manual_seed(0)
    b, hkv, s, d = 1, 2, 200, 64
    k, v = torch.randn(2, b, hkv, s, d, generator=gen)
    q = torch.randn(b, 8, 1, d, generator=gen)
    lengths = torch.tensor([s], dtype=torch.int32)
    store = KiviStore.allocate(b, hkv, s, d, torch.float32, DEVICE, bits, 32, 32, fp8)
    store_write(store, k.to(DEVICE), v.to(DEVICE), 0, lengths.to(DEVICE))
    got = decode_attention(q.to(DEVICE), store, lengths.to(DEVICE)).cpu()
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert (got - want).abs().max() < max_err


def test_decoding_token_by_token_tracks_the_growing_store():
    """Write one token, attend, repeat across group and residual boundaries: each step equals the
    reference over the same store (the path a compiled model takes)."""
    gen = torch.Generator().manual_seed(1)
    b, hkv, d, g, r, steps = 2, 1, 64, 16, 16, 40
    k, v = torch.randn(2, b, hkv, steps, d, generator=gen)
    q = torch.randn(steps, b, 4, 1, d, generator=gen)
    store = KiviStore.allocate(b, hkv, steps, d, torch.float32, DEVICE, 4, g, r)
    for t in range(0, steps, 3):  # every 3rd step, to keep the interpreter fast
        store_write(store, k[:, :, t:t + 3].to(DEVICE), v[:, :, t:t + 3].to(DEVICE), t)
        lengths = torch.full((b,), min(t + 3, steps), dtype=torch.int32, device=DEVICE)
        got = decode_attention_triton(q[t].to(DEVICE), store, lengths, num_splits=2)
        torch.testing.assert_close(got, decode_attention_reference(q[t].to(DEVICE), store, lengths),
                                   atol=TOL[torch.float32], rtol=0)


def test_other_head_dims_raise_a_clear_error():
    store = KiviStore.allocate(1, 1, 64, 96, torch.float32, DEVICE, 2, 16, 16)
    q = torch.randn(1, 2, 1, 96, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim=96.*\(64, 128\)"):
        decode_attention_triton(q, store, torch.tensor([10], device=DEVICE))
    # the reference covers them
    assert decode_attention_reference(q, store, torch.tensor([10], device=DEVICE)).shape == q.shape


def test_dequantize_reference_zeroes_positions_past_each_row():
    store = KiviStore.allocate(2, 1, 64, 64, torch.float32, "cpu", 2, 16, 0)
    x = torch.randn(2, 1, 40, 64)
    lengths = torch.tensor([40, 17], dtype=torch.int32)
    store_write(store, x, x, 0, lengths)
    keys, _ = dequantize_reference(store, lengths)
    assert keys.shape == (2, 1, 40, 64) and (keys[1, :, 17:] == 0).all() and (keys[1, :, :17] != 0).any()
