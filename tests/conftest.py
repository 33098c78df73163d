"""Test-wide settings: Triton kernels run on the CPU through the interpreter, hypothesis is bounded."""
import os

# Must be set before triton is imported anywhere: the CPU machines have no GPU driver.
os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "kvfx",
    max_examples=int(os.environ.get("KVFX_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("kvfx")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's caches would otherwise turn a second model with the
    same code into a dynamic-shape recompile and hide what a user sees on a first compile."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
