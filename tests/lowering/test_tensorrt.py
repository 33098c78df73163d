"""kvfx.export_tensorrt without TensorRT: a clear error naming the package; nothing else imports it."""
import importlib.util
import subprocess
import sys

import pytest

import kvfx
from kvfx.models import tiny_model


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # the registry's tensorrt is a stub that fails at import without NVIDIA's libraries
        return False
    return True


@pytest.mark.skipif(tensorrt_importable(), reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_package(tmp_path):
    with pytest.raises(kvfx.KVFXError, match=r"pip install kvfx\[tensorrt\]"):
        kvfx.export_tensorrt(tiny_model(), tmp_path / "engine.plan", {"kv": "int8"})


def test_only_export_tensorrt_imports_tensorrt(tmp_path):
    code = ("import sys, kvfx, kvfx.backend, kvfx.lowering.onnx_export, kvfx.lowering.ort_loop, "
            "kvfx.lowering.tensorrt; "
            "print(sorted(m for m in ('tensorrt', 'torch_tensorrt') if m in sys.modules))")
    # Run outside the repo root, so that the installed package (not the folders) is imported.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
    assert importlib.util.find_spec("kvfx.lowering.tensorrt") is not None
