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


def export_onnx(model, path, options=None, max_cache_len: int = 256, batch_size: int = 1, **kwargs):
    """Export a HF causal LM's generation step with kvfx's cache `options` to ONNX (one graph for
    prefill and decode, the compressed cache as inputs/outputs); see `kvfx.lowering.onnx_export`.
    Needs the `onnx` extra (`pip install kvfx[onnx]`)."""
    from kvfx.lowering.onnx_export import export_onnx as export

    return export(model, path, options, max_cache_len=max_cache_len, batch_size=batch_size, **kwargs)


def export_tensorrt(model, path, options=None, max_cache_len: int = 256, batch_size: int = 1, **kwargs):
    """Build a TensorRT engine from kvfx's ONNX export; see `kvfx.lowering.tensorrt`. Needs the
    `tensorrt` extra (`pip install kvfx[tensorrt]`) and an NVIDIA GPU."""
    from kvfx.lowering.tensorrt import export_tensorrt as export

    return export(model, path, options, max_cache_len=max_cache_len, batch_size=batch_size, **kwargs)


__all__ = ["KVConfig", "KVConfigError", "KVFXError", "Report", "SiteReport", "export_onnx", "export_tensorrt",
           "report"]
