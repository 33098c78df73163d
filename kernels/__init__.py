"""kvfx kernels: one module per op family, each Triton kernel beside the plain-PyTorch reference
that defines it. `kvfx.kernels.ops` registers them as `torch.ops.kvfx.*` (imported once, here)."""
from kvfx.kernels import ops  # noqa: F401  (registers torch.ops.kvfx.*)
