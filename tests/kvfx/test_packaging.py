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
    """A bare `import kernels` must not reach the repo's kernels/ folder. It may find HuggingFace's
    `kernels` package (a dependency of transformers >= 5.25), in a virtual environment that can lie
    inside the repo (the Makefile's .venv), so the check is against the folder itself."""
    spec = importlib.util.find_spec("kernels")
    assert spec is None or pathlib.Path(spec.origin or "/").resolve().parent != REPO / "kernels"


def test_backend_is_found_without_importing_kvfx():
    code = ("import torch, sys; from torch._dynamo.backends.registry import lookup_backend; "
            "fn = lookup_backend('kvfx'); print(fn.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "kvfx.backend"


def test_wheel_installs_the_namespace_layout(tmp_path):
    """Built as a wheel (not the editable install the tests run from), the package still maps the
    top-level folders into kvfx.* and registers the backend entry point."""
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)], check=True)
    wheel = next(tmp_path.glob("kvfx-*.whl"))
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    code = ("import kvfx.kernels, kvfx.passes, kvfx.lowering, importlib.metadata as m; "
            "print(kvfx.kernels.__file__); "
            "print([e.value for e in m.entry_points(group='torch_dynamo_backends') if e.name == 'kvfx'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == str(target / "kvfx" / "kernels" / "__init__.py")
    assert "kvfx.backend:kvfx_backend" in out[1]
