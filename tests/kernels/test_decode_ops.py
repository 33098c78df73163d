"""Decode steps of `kvfx::attend` and `kvfx::kivi_attend` through the Triton kernels equal the ops' references.

On CUDA (fp16/bf16) a one-token call takes the kernels; here they are forced under TRITON_INTERPRET=1
(`ops._decode_kernels`) and compared with the same call on the reference path, over the masks a model
gives a decode step: causal rows, left padding, a fully masked row, additive biases, a one-column mask,
no mask at all over a static cache (unwritten slots then count as zeros), and kv_len < the buffer.
"""
import contextlib
import os

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import kvfx.kernels  # noqa: F401  (registers the ops)
from kvfx.kernels import ops
from kvfx.kernels.formats import format_for
from kvfx.kernels.int8 import quantize_int8_reference

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}
# CPU tensors through the interpreter; on the GPU machine tests/kvfx/test_cuda.py covers these paths.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def decode_mask(draw, gen, b: int, width: int, length: int) -> torch.Tensor | None:
    """A mask of one query at position length - 1 over `width` slots, as a model builds it."""
    kind = draw(st.sampled_from(["causal", "padded", "dead-row", "additive", "one-column", "none"]))
    if kind == "none":
        return None
    if kind == "one-column":
        return torch.randn(b, 1, 1, 1, generator=gen)
    if kind == "additive":
        return torch.randn(b, 1, 1, width, generator=gen)
    mask = (torch.arange(width) < length).expand(b, 1, 1, width).clone()
    if kind in ("padded", "dead-row"):
        for row in range(b):
            mask[row, ..., : draw(st.integers(0, length - 1))] = False  # left padding
    if kind == "dead-row":
        mask[0] = False  # a row that sees nothing: zeros, as SDPA gives
    return mask


@contextlib.contextmanager
def decode_kernels():
    """Route decode steps to the Triton kernels as on a GPU (here: the interpreter)."""
    routing = ops._decode_kernels
    ops._decode_kernels = lambda q: True
    try:
        yield
    finally:
        ops._decode_kernels = routing


def forced(op, *args):
    """`op(*args)` on the reference path, then through the Triton kernels."""
    want = op(*args)
    with decode_kernels():
        return op(*args), want


@settings(max_examples=25, deadline=None)
@given(data=st.data(), b=st.integers(1, 3), hkv=st.integers(1, 2), g=st.integers(1, 5),
       quantized=st.booleans(), dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 2**16))
def test_attend_decode_kernel_equals_reference(data, b, hkv, g, quantized, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    width = data.draw(st.integers(1, 150), label="width")
    length = data.draw(st.integers(1, width), label="length")
    k, v = torch.zeros(2, b, hkv, width, 64)
    k[:, :, :length], v[:, :, :length] = torch.randn(2, b, hkv, length, 64, generator=gen)
    mask = decode_mask(data.draw, gen, b, width, length)
    kv_len = data.draw(st.sampled_from([-1, width]) if mask is not None and mask.shape[-1] > 1
                       else st.sampled_from([-1, length]), label="kv_len")
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    q = torch.randn(b, hkv * g, 1, 64, generator=gen).to(dtype)
    if quantized:
        (k, kp), (v, vp) = quantize_int8_reference(k.to(dtype)), quantize_int8_reference(v.to(dtype))
    else:
        k, v, kp, vp = k.to(dtype), v.to(dtype), None, None
    got, want = forced(torch.ops.kvfx.attend, q, k, v, kp, vp, mask, kv_len, False, 0.125)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)


def test_attend_decode_kernel_reads_a_sliced_buffer_in_place():
    """A [:, :, :L] slice of a static cache (strided rows) goes to the kernel without a copy."""
    k, v = torch.randn(2, 2, 2, 100, 64)
    q = torch.randn(2, 4, 1, 64)
    got, want = forced(torch.ops.kvfx.attend, q, k[:, :, :70], v[:, :, :70], None, None, None, -1,
                       False, 0.125)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(data=st.data(), kv=st.sampled_from(["int4", "int2", "fp8"]), b=st.integers(1, 2), hkv=st.integers(1, 2),
       g=st.integers(1, 4), residual=st.sampled_from([16, 32]), seed=st.integers(0, 2**16))
def test_kivi_attend_decode_kernel_equals_reference(data, kv, b, hkv, g, residual, seed):
    gen = torch.Generator().manual_seed(seed)
    fmt = format_for(kv, group_size=16, residual=residual)
    width = data.draw(st.integers(2, 130), label="width")
    prompt = data.draw(st.integers(1, width - 1), label="prompt")
    store = fmt.allocate((b, hkv, width, 64), torch.float32, torch.device("cpu"))
    constants = (fmt.bits, fmt.fp8, fmt.group_size, fmt.residual)
    k, v = torch.randn(2, b, hkv, prompt, 64, generator=gen)
    if data.draw(st.booleans(), label="outliers"):
        k[..., 3] *= 50.0
    torch.ops.kvfx.kivi_write(*store.tensors(), torch.arange(prompt), k, v, width, *constants)
    k1, v1 = torch.randn(2, b, hkv, 1, 64, generator=gen)
    pos = torch.tensor([prompt])
    torch.ops.kvfx.kivi_write(*store.tensors(), pos, k1, v1, width, *constants)
    mask = decode_mask(data.draw, gen, b, width, prompt + 1)
    kv_len = -1 if mask is not None and mask.shape[-1] > 1 else data.draw(st.sampled_from([-1, prompt + 1]))
    q = torch.randn(b, hkv * g, 1, 64, generator=gen)
    got, want = forced(torch.ops.kvfx.kivi_attend, q, k1, v1, pos, *store.tensors(), mask, kv_len,
                       width, False, 0.125, *constants)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_attend_decode_kernel_skips_what_the_mask_hides(kv):
    """Slots the mask hides are never read: NaN there (memory the kernel must not touch) changes nothing."""
    k, v = torch.randn(2, 1, 2, 300, 64)
    mask = torch.zeros(1, 1, 1, 300, dtype=torch.bool)
    mask[..., 130:200] = True  # left padding before, an unwritten static cache after
    q = torch.randn(1, 4, 1, 64)
    if kv == "int8":
        (k, kp), (v, vp) = quantize_int8_reference(k), quantize_int8_reference(v)
        want = torch.ops.kvfx.attend(q, k, v, kp, vp, mask, -1, False, 0.125)
        kp[:, :, :128], vp[:, :, 256:] = float("nan"), float("nan")
    else:
        kp = vp = None
        want = torch.ops.kvfx.attend(q, k, v, None, None, mask, -1, False, 0.125)
        k[:, :, :128], v[:, :, 256:] = float("nan"), float("nan")
    with decode_kernels():
        got = torch.ops.kvfx.attend(q, k, v, kp, vp, mask, -1, False, 0.125)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_softcapped_decode_stays_on_the_reference():
    """The decode kernels have no softcap: such a call keeps the reference's result."""
    from kvfx.kernels.formats import format_for

    q, (k, v) = torch.randn(1, 4, 1, 64), torch.randn(2, 1, 2, 40, 64)
    got, want = forced(torch.ops.kvfx.attend, q, k, v, None, None, None, -1, False, 0.125, 5.0)
    assert torch.equal(got, want)
    fmt = format_for("int4", group_size=16, residual=16)
    store = fmt.allocate((1, 2, 40, 64), torch.float32, torch.device("cpu"))
    constants = (fmt.bits, fmt.fp8, fmt.group_size, fmt.residual)
    torch.ops.kvfx.kivi_write(*store.tensors(), torch.arange(40), k, v, 40, *constants)
    got, want = forced(torch.ops.kvfx.kivi_attend, q, k[:, :, -1:], v[:, :, -1:], torch.tensor([39]),
                       *store.tensors(), None, -1, 40, False, 0.125, *constants, 5.0)
    assert torch.equal(got, want)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), t=st.integers(1, 5), dtype=st.sampled_from(list(TOL)),
       kind=st.sampled_from(["normal", "constant", "ties", "outlier"]), seed=st.integers(0, 2**16))
def test_int8_store_write_kernel_equals_reference_bit_for_bit(b, h, t, dtype, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, 64, generator=gen)
    if kind == "constant":
        x = torch.full_like(x, 0.75)
    elif kind == "ties":  # (x - min) / scale lands on .5 for many elements
        x = torch.randint(0, 511, x.shape, generator=gen).float() / 2
        x[..., 0], x[..., 1] = 0.0, 255.0
    elif kind == "outlier":
        x[..., 7] *= 300.0
    x = x.to(dtype)
    pos = torch.randperm(12, generator=gen)[:t]
    stores = [(torch.zeros(b, h, 12, 64, dtype=torch.uint8), torch.zeros(b, h, 12, 2, dtype=dtype)) for _ in range(2)]
    torch.ops.kvfx.store_write(*stores[0], pos, x)
    with decode_kernels():
        torch.ops.kvfx.store_write(*stores[1], pos, x)
    assert torch.equal(stores[0][0], stores[1][0]) and torch.equal(stores[0][1], stores[1][1])
