"""benchmarks/e2e.py, the parts that decide what its numbers mean.

--fill random: the decode that follows reads every position the fill wrote. A fill that leaves HF's
count of written tokens (`cumulative_length`) behind makes the model write its next token, and kvfx
read its cache, only that far: decode steps that look many times faster than the memory allows. Here
a decode step must change when the filled positions it should read change. And the QuantizedCache
baseline's bytes are counted inside quanto's packed tensors."""
import pathlib

import pytest
import torch
from transformers import LlamaConfig, StaticCache

BENCHMARKS = pathlib.Path(__file__).parents[2] / "benchmarks"


@pytest.mark.parametrize("config", ["kvfx-int8", "kvfx-int4", "kvfx-int4-snapkv-20%"])  # int8, KIVI, a policy's store
def test_decode_after_a_random_fill_reads_the_filled_positions(monkeypatch, config):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import e2e

    import kvfx
    from kvfx.decode import prefill

    model = e2e.build_model(LlamaConfig(**e2e.TINY), "cpu", torch.float32)
    model.forward = torch.compile(model.forward, **e2e.CONFIGS[config])
    options = kvfx.KVConfig(**e2e.CONFIGS[config]["options"]).to_json()
    batch, context, chunk = 2, 600, 256
    prompt = torch.randint(0, 1024, (batch, chunk), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=context + 8)
    at = torch.tensor([context])

    def decode():
        return model(token, past_key_values=cache, cache_position=at, position_ids=at.expand(batch, 1)).logits

    with torch.no_grad():
        token = prefill(model, prompt, cache, chunk).argmax(-1, keepdim=True)
        e2e.fill_random(cache, chunk, context, chunk, torch.Generator().manual_seed(1), options)
        assert all(int(layer.cumulative_length) == context for layer in cache.layers)
        first = decode()
        e2e.fill_random(cache, 400, context, chunk, torch.Generator().manual_seed(2), options)  # only positions 400..599
        assert (decode() - first).abs().max() > 1e-3


def test_quantized_cache_row_counts_quantos_packed_tensors(monkeypatch):
    """The transformers QuantizedCache baseline: its KV bytes are the storages inside quanto's packed
    tensors plus its full-precision residual, and a random fill (which it has no write path for) is a
    clear row error, not a silent prefill."""
    pytest.importorskip("optimum.quanto")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import e2e

    model = e2e.build_model(LlamaConfig(**e2e.TINY), "cpu", torch.float32)
    row = e2e.run_config(model, model.forward, "transformers-quanto-int4", 2, 600, 2, "cpu", chunk=256)
    assert "error" not in row and 0 < row["kv_bytes"] < row["fp_kv_bytes"] / 2
    filled = e2e.run_config(model, model.forward, "transformers-quanto-int4", 2, 600, 2, "cpu", fill="random")
    assert "no write path" in filled["error"]
