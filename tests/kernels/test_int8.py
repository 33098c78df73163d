import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from kvfx.kernels.int8 import dequantize_int8_reference, quantize_int8_reference

# dtype rounding of the dequantized value, on top of the scale/2 quantization bound
ROUNDING = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@st.composite
def rows(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.sampled_from([1, 7, 64])))
    dtype = draw(st.sampled_from(list(ROUNDING)))
    kind = draw(st.sampled_from(["normal", "constant", "zero", "outlier"]))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    if kind == "constant":
        x = torch.full(shape, draw(st.floats(-50, 50)))
    elif kind == "zero":
        x = torch.zeros(shape)
    elif kind == "outlier":
        x[..., 0] *= 1000.0
    return x.to(dtype)


@given(rows())
def test_round_trip_within_half_a_step(x):
    codes, qparams = quantize_int8_reference(x)
    assert codes.dtype == torch.uint8 and qparams.shape == (*x.shape[:-1], 2) and qparams.dtype == x.dtype
    back = dequantize_int8_reference(codes, qparams, torch.float32)
    scale = qparams[..., :1].float()
    bound = scale / 2 + ROUNDING[x.dtype] * x.float().abs().amax(-1, keepdim=True) + 1e-12
    assert ((back - x.float()).abs() <= bound * (1 + 1e-3)).all()


@pytest.mark.parametrize("value", [0.0, -3.25, 1e4])
def test_constant_row_is_exact(value):
    x = torch.full((2, 3, 4), value)
    codes, qparams = quantize_int8_reference(x)
    assert torch.equal(dequantize_int8_reference(codes, qparams, torch.float32), x)
