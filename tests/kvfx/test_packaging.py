"""The top-level passes/, kernels/, lowering/ folders must install under the kvfx namespace only."""
import importlib.util
import pathlib
import subprocess
import sys

import kvfx.kernels
import kvfx.lowering
import kvfx.passes

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_subpackages_map_to_top_level_folders():
    for module, folder in ((kvfx.kernels, "kernels"), (kvfx.passes, "passes"), (kvfx.lowering, "lowering")):
        assert pathlib.Path(module.__file__).resolve().parent == REPO / folder


def test_no_bare_kernels_package_resolves_into_the_repo():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or REPO not in pathlib.Path(spec.origin or "/").resolve().parents


def test_backend_is_found_without_importing_kvfx():
    code = ("import torch, sys; from torch._dynamo.backends.registry import lookup_backend; "
            "fn = lookup_backend('kvfx'); print(fn.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "kvfx.backend"
