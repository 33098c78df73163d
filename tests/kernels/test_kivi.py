"""KIVI store: layout and bytes, quantization round trip, Triton write == reference write.

On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py); with a
GPU they run on it (set TRITON_INTERPRET=0 and KVFX_HYPOTHESIS_EXAMPLES for more cases).
"""
import hypothesis.strategies as st
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import assume, given

from kvfx.kernels.kivi import (KiviStore, _round_e4m3_outward, dequantize_reference, pack_codes,
                               quantize_asym_reference, quantize_fp8_reference, quantized_length,
                               round_e4m3_outward, store_write_reference, store_write_triton, unpack_codes)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (bits, fp8): the formats of one store class; 16 = no quantization
FORMATS = ((2, False), (4, False), (8, False), (8, True), (16, False))
# dtype rounding of a stored value, relative to the row's magnitude (on top of the scale / 2 bound)
ROUNDING = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def make_kv(shape, kind, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if kind == "constant":
        x = torch.full(shape, 3.25)
    elif kind == "outlier":  # a few huge key channels, as in real keys
        x[..., 1] *= 1000.0
        x[..., -1] -= 50.0
    return x.to(dtype).to(DEVICE)


@st.composite
def store_case(draw):
    """A store, ragged rows, and the writes that fill it: one prefill then a few single tokens."""
    bits, fp8 = draw(st.sampled_from(FORMATS))
    g = draw(st.sampled_from([16, 32]))
    r = g * draw(st.integers(0, 2))
    b, h, d = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.sampled_from([64, 128]))
    prefill = [draw(st.integers(0, 4 * g + 5)) for _ in range(b)]
    steps = draw(st.integers(0, 4))
    # bf16 stores are written by the interpreter too (only tl.dot in bf16 is wrong there)
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["normal", "constant", "outlier"]))
    total = max(prefill) + steps
    k = make_kv((b, h, total, d), kind, dtype, draw(st.integers(0, 2**16)))
    v = make_kv((b, h, total, d), kind, dtype, draw(st.integers(0, 2**16)))
    store = KiviStore.allocate(b, h, total + g, d, dtype, DEVICE, bits, g, r, fp8)
    return store, k, v, torch.tensor(prefill, dtype=torch.int32, device=DEVICE), steps


def write_all(write, store, k, v, prefill, steps):
    """Prefill row b with its first prefill[b] tokens (ragged: the rest of k is padding), then `steps`
    single-token writes per row. Returns the final lengths."""
    write(store, k, v, 0, prefill)
    for i in range(steps):
        idx = (prefill + i).long()[:, None, None, None].expand(-1, k.shape[1], 1, k.shape[3])
        write(store, k.gather(2, idx), v.gather(2, idx), prefill + i)
    return prefill + steps


def assert_same_store(got: KiviStore, want: KiviStore, lengths):
    """Equal content over the valid positions. Under the interpreter bit-exact; on the GPU, fp32
    division may differ in the last bit, so a code may land one step off at a rounding tie."""
    for a, b in zip(dequantize_reference(got, lengths), dequantize_reference(want, lengths)):
        if b.numel() == 0:  # every row empty
            continue
        if DEVICE == "cpu":
            assert torch.equal(a, b)
        else:
            step = (b.float().amax() - b.float().amin()).item() / 3 + 1e-6  # int2: range / 3
            assert (a.float() - b.float()).abs().max().item() <= step


@pytest.mark.parametrize("bits,fp8", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 100, 64), (3, 2, 257, 128)])
def test_nbytes_matches_the_formula(bits, fp8, dtype, shape):
    b, h, s, d = shape
    store = KiviStore.allocate(b, h, s, d, dtype, "cpu", bits, 32, 64, fp8)
    assert store.nbytes() == KiviStore.expected_nbytes(b, h, s, d, dtype, bits, 32, 64, fp8)


def test_int2_store_is_smaller_than_fp16():
    """The point of the format, at the paper's defaults (G=32, R=128) over 4K tokens: 96 bytes per token
    and head instead of 512 (0.1875x) plus the 160-token fp ring."""
    fp = KiviStore.expected_nbytes(1, 8, 4096, 128, torch.float16, 16, 32, 0)
    int2 = KiviStore.expected_nbytes(1, 8, 4096, 128, torch.float16, 2, 32, 128)
    assert int2 < 0.23 * fp


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 64), dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)
    # little end first: code 0 of a byte in its lowest bits
    assert pack_codes(torch.tensor([1] + [0] * (8 // bits - 1)), bits).item() == 1


@given(st.sampled_from([2, 4, 8]), st.sampled_from(DTYPES), st.sampled_from(["normal", "constant", "outlier"]),
       st.integers(0, 2**16))
def test_round_trip_within_half_a_step(bits, dtype, kind, seed):
    x = make_kv((2, 3, 32, 64), kind, dtype, seed).cpu()
    for dim in (-2, -1):  # keys reduce over tokens, values over channels
        codes, scale, zero = quantize_asym_reference(x, dim, bits, dtype)
        assert scale.dtype == dtype and (scale > 0).all()
        back = codes.float() * scale.float() + zero.float()
        magnitude = x.float().abs().amax(dim, keepdim=True)
        bound = scale.float() / 2 + 3 * ROUNDING[dtype] * magnitude + 1e-12
        assert ((back - x.float()).abs() <= bound).all()
        if kind == "constant":
            assert torch.equal(back, x.float())


def test_fp8_saturates_instead_of_overflowing():
    x = torch.tensor([1.0, -1000.0, 1000.0])
    assert quantize_fp8_reference(x, torch.tensor(1.0)).float().tolist() == [1.0, -448.0, 448.0]


@pytest.mark.parametrize("length,want", [(0, 0), (127, 0), (128, 0), (159, 0), (160, 32), (161, 32), (192, 64)])
def test_quantized_length_keeps_between_r_and_r_plus_g_residual(length, want):
    assert quantized_length(torch.tensor([length]), 32, 128).item() == want


@given(store_case())
def test_triton_write_equals_reference(case):
    store, k, v, prefill, steps = case
    want = KiviStore(*(t.clone() for t in store.tensors()), store.bits, store.group_size, store.residual, store.fp8)
    lengths = write_all(store_write_triton, store, k, v, prefill, steps)
    write_all(store_write_reference, want, k, v, prefill, steps)
    assert_same_store(store, want, lengths)
    if store.fp8:  # each row's scales, set by its first write (the Triton kernel's div_rn = torch's /)
        assert torch.equal(store.k_scale, want.k_scale) and torch.equal(store.v_scale, want.v_scale)


@given(store_case())
def test_stored_values_within_half_a_step(case):
    """dequantize(store) vs what was written: residual tokens exact, quantized ones within scale / 2."""
    store, k, v, prefill, steps = case
    lengths = write_all(store_write_reference, store, k, v, prefill, steps)
    keys, values = dequantize_reference(store, lengths, torch.float32)
    s = keys.shape[2]
    assume(s > 0)
    pos = torch.arange(s, device=DEVICE)
    # fp8: only the prefill's tokens, which set the per-head scale; later ones may saturate
    checked = prefill if store.fp8 else lengths
    valid = (pos < checked[:, None])[:, None, :, None]
    for got, x in ((keys, k[:, :, :s]), (values, v[:, :, :s])):
        x = torch.where(valid, x.float(), 0.0)
        got = torch.where(valid, got, 0.0)
        magnitude = x.abs().amax(dim=(2, 3), keepdim=True)
        if store.fp8:  # relative: 3 mantissa bits (half a step: 1/16), subnormals below 2^-6 * scale
            bound = x.abs() / 16 + 2 ** -9 * magnitude
        elif store.bits == 16:
            bound = torch.zeros_like(magnitude)
        else:  # scale / 2 <= range / levels / 2 <= magnitude / levels, plus rounding of scale and zero
            bound = magnitude / (2 ** store.bits - 1) + 3 * ROUNDING[store.dtype] * magnitude
        assert ((got - x).abs() <= bound + 1e-12).all()


@given(store_case())
def test_prefill_then_single_tokens_equals_one_write(case):
    """The store content depends only on the tokens, not on how the writes were split. (fp8 excluded:
    its per-head scale is set by a row's first write, so there it does depend on the split.)"""
    store, k, v, prefill, steps = case
    assume(not store.fp8)
    once = KiviStore(*(t.clone() for t in store.tensors()), store.bits, store.group_size, store.residual, store.fp8)
    lengths = write_all(store_write_triton, store, k, v, prefill, steps)
    store_write_triton(once, k, v, 0, lengths)
    assert_same_store(store, once, lengths)
    qlen = quantized_length(lengths, store.group_size, store.residual)
    for a, b in ((store.k_codes, once.k_codes), (store.v_codes, once.v_codes)):
        for row, n in enumerate(qlen.tolist()):
            if DEVICE == "cpu":
                assert torch.equal(a[row, :, :n], b[row, :, :n])


def test_fp8_codes_round_like_torch_across_the_e4m3_range():
    """Every e4m3 value, the midpoints between neighbours (ties go to even) and values just off them,
    subnormals included. The write's amax is 448, so the per-head scale is 1 and codes = values."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mid, mid * (1 + 2**-20), mid * (1 - 2**-20)])
    x = torch.cat([x, -x])
    x = torch.cat([x, x[:1].expand((-x.numel()) % (16 * 64))]).view(1, 1, -1, 64).to(DEVICE)
    store = KiviStore.allocate(1, 1, x.shape[2], 64, torch.float32, DEVICE, 8, 16, 0, fp8=True)
    store_write_triton(store, x, x, 0)
    assert store.k_scale.item() == 1.0
    assert torch.equal(store.k_codes.float(), x.to(torch.float8_e4m3fn).float())


@triton.jit
def _outward_kernel(x_ptr, up_ptr, down_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    tl.store(up_ptr + tl.arange(0, N), _round_e4m3_outward(x, True).to(tl.float8e4nv))
    tl.store(down_ptr + tl.arange(0, N), _round_e4m3_outward(x, False).to(tl.float8e4nv))


def test_outward_e4m3_rounding_is_the_nearest_bound_in_torch_and_triton():
    """Quest's fp8 page bounds: x rounded up is the smallest e4m3 value >= x, rounded down the largest <= x
    (x saturated to +-448), in the reference and the kernels' helper alike: every e4m3 value, values just
    off each one, midpoints, subnormals, zeros of both signs and values past the range."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()  # ascending
    mid = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, grid * (1 + 2**-20), grid * (1 - 2**-20), mid, torch.tensor([-0.0, 1e-30, -1e-30, 500.0,
                                                                                     -1e4, 448.1, -448.1])])
    x = torch.cat([x, x[:1].expand(triton.next_power_of_2(x.numel()) - x.numel())])
    clamped = x.clamp(-448, 448)
    want_up = grid[torch.searchsorted(grid, clamped, right=False)]
    want_down = grid[torch.searchsorted(grid, clamped, right=True) - 1]
    for up, want in ((True, want_up), (False, want_down)):
        assert torch.equal(round_e4m3_outward(x, up).float(), want)
    up, down = (torch.empty(x.numel(), dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(2))
    _outward_kernel[(1,)](x.to(DEVICE), up, down, N=x.numel())
    assert torch.equal(up.float().cpu(), want_up) and torch.equal(down.float().cpu(), want_down)


def test_constant_input_is_exact_for_every_format():
    for bits, fp8 in FORMATS:
        store = KiviStore.allocate(2, 2, 128, 64, torch.float32, DEVICE, bits, 16, 16, fp8)
        x = torch.full((2, 2, 100, 64), -7.5, device=DEVICE)
        store_write_triton(store, x, x, 0)
        keys, values = dequantize_reference(store, 100)
        assert torch.equal(keys, x) and torch.equal(values, x), (bits, fp8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits=3"), (dict(group_size=24), "group_size=24"), (dict(group_size=256), "divide"),
    (dict(residual=40), "residual=40"), (dict(bits=4, fp8=True), "fp8 needs bits=8")])
def test_invalid_store_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KiviStore.allocate(1, 1, 64, 128, torch.float32, "cpu", **{"bits": 2, "group_size": 32, "residual": 32,
                                                                  **kwargs})


@given(store_case(), st.data())
def test_dropping_whole_groups_shifts_what_follows(case, data):
    """A sliding window's store forgets whole groups of its oldest tokens (`drop_front`): the tokens left, and
    the tokens written after, read as the store that kept everything reads them, `count` positions later."""
    store, k, v, _, _ = case
    g, total = store.group_size, k.shape[2]
    assume(total > 1)
    n = data.draw(st.integers(1, total - 1), label="written before")
    count = g * data.draw(st.integers(0, (n - 1) // g), label="groups dropped")  # a token stays: fp8 keeps its scale
    kept = KiviStore(*(t.clone() for t in store.tensors()), store.bits, g, store.residual, store.fp8)
    store_write_reference(kept, k[:, :, :n], v[:, :, :n], 0)
    dropped = KiviStore(*(t.clone() for t in kept.tensors()), store.bits, g, store.residual, store.fp8)
    dropped.drop_front(count)
    for start in range(n, total):
        store_write_reference(kept, k[:, :, start:start + 1], v[:, :, start:start + 1], start)
        store_write_reference(dropped, k[:, :, start:start + 1], v[:, :, start:start + 1], start - count)
        for a, b in zip(dequantize_reference(kept, start + 1), dequantize_reference(dropped, start + 1 - count)):
            assert torch.equal(a[:, :, count:], b)
