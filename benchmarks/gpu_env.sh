#!/usr/bin/env bash
# Source this on the GPU machine (torch/triton preinstalled, `pip install -e .` unavailable there):
# it exposes the working tree as the installed `kvfx` package (kvfx.passes/kernels/lowering and the
# torch_dynamo_backends entry point) under /tmp/pkg, and sets PYTHONPATH for `python -P`.
#   source benchmarks/gpu_env.sh && python -P -m pytest tests/kvfx/test_cuda.py
set -e
root=$(pwd)
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/kvfx-0.1.0.dist-info
cp -r "$root/kvfx" /tmp/pkg/kvfx
for sub in passes kernels lowering; do ln -s "$root/$sub" "/tmp/pkg/kvfx/$sub"; done
printf 'Metadata-Version: 2.1\nName: kvfx\nVersion: 0.1.0\n' > /tmp/pkg/kvfx-0.1.0.dist-info/METADATA
printf '[torch_dynamo_backends]\nkvfx = kvfx.backend:kvfx_backend\n' > /tmp/pkg/kvfx-0.1.0.dist-info/entry_points.txt
export PYTHONPATH=/tmp/pkg TRITON_INTERPRET=0
set +e
