import pytest
import torch

import kvfx
from kvfx.models import tiny_model


def test_defaults_are_lossless():
    assert kvfx.KVConfig() == kvfx.KVConfig(kv="none", policy="none", strict=False)


@pytest.mark.parametrize("options, words", [
    ({"kv": "int3"}, ["'kv'", "'int3'", "'none'", "'int8'"]),
    ({"policy": "lru"}, ["'policy'", "'lru'", "'none'"]),
    ({"kvv": "int8"}, ["'kvv'", "valid options", "kv"]),
    ({"strict": "yes"}, ["'strict'", "'yes'"]),
    ({"cudagraphs": 1}, ["'cudagraphs'", "got 1", "True or False"]),
])
def test_bad_options_name_option_value_and_choices(options, words):
    with pytest.raises(kvfx.KVConfigError) as err:
        kvfx.KVConfig.from_options(options)
    for word in words:
        assert word in str(err.value)


def test_bad_option_fails_at_compile_time_and_model_still_runs():
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 5))
    expected = model(ids).logits
    compiled = torch.compile(model.forward, backend="kvfx", options={"kv": "int3"})
    with pytest.raises(Exception) as err:
        compiled(ids)
    # dynamo wraps backend errors; the kvfx error is the one inside, raised before tracing ran the model
    assert isinstance(getattr(err.value, "inner_exception", err.value), kvfx.KVConfigError)
    assert "valid choices" in str(err.value)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
