"""benchmarks/decode_attention.py, the figures derived from bytes and times: each format's speedup at
SDPA's bandwidth (sdpa_bytes / its bytes) is what KIVI's layout predicts, and a shape's rows get their
GB/s, share of the copy bandwidth and speedup from the right rows. No GPU and no timing: synthetic times."""
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import decode_attention

    return decode_attention


# (B, S) -> format -> the interval its bytes_ratio_vs_sdpa must fall in. At G=32 with bf16 scales and zeros a
# K/V element costs bits/8 + 0.125 B against bf16's 2 (int8 1.78x, int4 3.2x, int2 5.33x, fp8 2x); the
# residual ring's 128 bf16 tokens pull the int formats down, by little at 64K and by much at 4K.
EXPECTED = {
    (8, 65536): {"none": (0.999, 1.0), "fp8": (1.99, 2.0), "int8": (1.77, 1.78), "int4": (3.0, 3.3),
                 "int2": (5.2, 5.34)},
    (1, 4096): {"none": (0.999, 1.0), "fp8": (1.99, 2.0), "int8": (1.73, 1.78), "int4": (2.9, 3.2),
                "int2": (4.5, 5.34)},
}


@pytest.mark.parametrize("shape", list(EXPECTED))
def test_bytes_ratio_vs_sdpa_is_the_layouts_byte_saving(bench, shape):
    b, s = shape
    ratios = {name: bench.sdpa_bytes(b, s) / bench.kvfx_bytes(name, b, s) for name in bench.FORMATS}
    for name, (low, high) in EXPECTED[shape].items():
        assert low <= ratios[name] <= high, (name, ratios[name])


def test_derived_fields_use_the_best_sdpa_row_and_the_copy_bandwidth(bench):
    b, s = 8, 65536
    base = dict(batch=b, seq=s)
    rows = [dict(base, impl="sdpa-flash", bytes=bench.sdpa_bytes(b, s), median_us=1000.0),
            dict(base, impl="sdpa-cudnn", bytes=bench.sdpa_bytes(b, s), median_us=800.0),
            dict(base, impl="kvfx-int4", bytes=bench.kvfx_bytes("int4", b, s), median_us=400.0),
            dict(base, impl="kvfx-int2", bytes=bench.kvfx_bytes("int2", b, s), error="no config ran")]
    flash, cudnn, int4, int2 = bench.derived_fields(rows, copy_gb_s=3000.0)
    assert cudnn["gb_per_s"] == pytest.approx(bench.sdpa_bytes(b, s) / 800e3)
    assert int4["copy_fraction"] == pytest.approx(int4["gb_per_s"] / 3000.0)
    assert int4["speedup_vs_best_sdpa"] == pytest.approx(2.0) and flash["speedup_vs_best_sdpa"] == pytest.approx(0.8)
    # at equal GB/s int4 would take best SDPA's time over its byte ratio
    assert int4["bytes_ratio_vs_sdpa"] == pytest.approx(
        cudnn["median_us"] / (int4["bytes"] / (cudnn["gb_per_s"] * 1e3)))
    assert "bytes_ratio_vs_sdpa" not in cudnn
    assert "bytes_ratio_vs_sdpa" in int2 and "copy_fraction" not in int2  # a ratio needs no time
