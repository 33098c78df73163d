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
