"""kvfx: a KV-cache compiler for PyTorch.

    model.forward = torch.compile(model.forward, backend="kvfx", options={"kv": "int8"})
    model.generate(ids, max_new_tokens=64, cache_implementation="static")
    print(kvfx.report(model))

The backend is registered as ``kvfx`` through the ``torch_dynamo_backends`` entry point, so
``backend="kvfx"`` works without importing this package.
"""
from kvfx.config import KVConfig, KVConfigError
from kvfx.errors import KVFXError
from kvfx.reporting import Report, SiteReport, report

__all__ = ["KVConfig", "KVConfigError", "KVFXError", "Report", "SiteReport", "report"]
