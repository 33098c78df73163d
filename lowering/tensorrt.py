"""`kvfx.export_tensorrt`: a TensorRT engine from kvfx's standard-op ONNX export.

Road taken: kvfx's ONNX graph (lowering/onnx_export.py) uses standard ONNX ops only, so TensorRT's
ONNX parser is the path that needs no kvfx plugin. TensorRT is imported here only, when called;
without it (``pip install kvfx[tensorrt]``) the call fails with a KVFXError naming the package.
TensorRT needs an NVIDIA GPU and its libraries (downloaded by the ``tensorrt`` wheel from NVIDIA's
index): see docs/ARCHITECTURE.md for what could be run where.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

from kvfx.errors import KVFXError


def _import_tensorrt():
    try:
        import tensorrt
    except Exception as err:  # a stub wheel without its libraries fails with OSError, not ImportError
        raise KVFXError(f"kvfx.export_tensorrt needs TensorRT, which could not be imported ({err}); "
                        "install it with `pip install kvfx[tensorrt]` on a machine with an NVIDIA GPU") from err
    import torch

    if not torch.cuda.is_available():
        raise KVFXError("kvfx.export_tensorrt needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    return tensorrt


def export_tensorrt(model, path: str | os.PathLike, options: Mapping[str, Any] | None = None,
                    max_cache_len: int = 256, batch_size: int = 1, max_tokens: int | None = None) -> None:
    """Export `model` to ONNX with kvfx's cache `options`, parse it with TensorRT and write a
    serialized engine to `path` (profile: 1 .. max_tokens tokens per step, default max_cache_len)."""
    trt = _import_tensorrt()
    from kvfx.lowering.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "step.onnx")
        export_onnx(model, onnx_path, options, max_cache_len=max_cache_len, batch_size=batch_size)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(onnx_path):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise KVFXError(f"TensorRT's ONNX parser rejected kvfx's graph: {errors}")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        tokens = max_tokens or max_cache_len
        profile.set_shape("input_ids", (batch_size, 1), (batch_size, 1), (batch_size, tokens))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise KVFXError("TensorRT could not build an engine from kvfx's graph (see its log above)")
        with open(path, "wb") as f:
            f.write(engine)
