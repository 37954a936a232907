#!/usr/bin/env bash
# Downloads, into ./.whl of the current repo, the wheels that our offline GPU test machines
# (Python 3.12, x86-64; torch 2.11 + CUDA 13, triton 3.6, transformers 5.17, safetensors, uvloop,
# numpy, cupy, cuda-bindings) lack and the server needs: fastapi, uvicorn, pydantic, pyzmq, orjson.
# Usage, from the project root:   scripts/fetch_gpu_wheels.sh [--flashinfer] [EXTRA==VER ...]
# --flashinfer adds FlashInfer 0.5.3 (JIT build, no deps: apache-tvm-ffi, nvidia-cudnn-frontend;
# 22 MB together). Seen working on an H200 (2026-11-23): the first paged-decode plan+run, JIT
# compile included, took 7.4 s; error vs an fp32 reference 2.4e-3 in bf16.
# On the GPU machine, install them with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
gd=$(git rev-parse --git-dir); mkdir -p "$gd/info"
grep -qx '/.whl/' "$gd/info/exclude" 2>/dev/null || echo '/.whl/' >> "$gd/info/exclude"
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
tmp=$(mktemp -d)
if [ "${1:-}" = "--flashinfer" ]; then
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$tmp" flashinfer-python==0.5.3 apache-tvm-ffi nvidia-cudnn-frontend 2>&1 | grep -v "is ignored" || true
fi
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$tmp" fastapi uvicorn pyzmq orjson "$@" 2>&1 | grep -v "is ignored" || true
# drop what the GPU machine's image already has, so that one version of each is installed there
for have in typing_extensions anyio idna click h11 sniffio numpy torch triton; do rm -f "$tmp"/${have}-*.whl; done
mv "$tmp"/*.whl .whl/ && rmdir "$tmp"
ls -1 .whl; du -sh .whl
