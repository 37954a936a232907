#!/usr/bin/env bash
# Creates .venv (once) and installs the project, its server, and the test clients with the exact
# CPU versions of constraints-cpu.txt and requirements-server.txt (and, in .venv/sglang-frontend,
# those of requirements-frontend.txt). Sourced by scripts/test.sh and scripts/quickstart.sh; a
# no-op when nothing changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
inputs=("$root/pyproject.toml" "$root/constraints-cpu.txt" "$root/requirements-server.txt")
stamp="$venv/.installed-$(cat "${inputs[@]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "setting up $venv (first run: a couple of minutes)" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    "${pip[@]}" -c "$root/constraints-cpu.txt" -e "$root[test,triton,bench]" \
        -r "$root/requirements-server.txt"
    # sglang is only a test client (frontend language, bench_serving); its own dependencies
    # (a CUDA torch, GPU kernels) are neither needed nor installable here.
    "${pip[@]}" --no-deps "sglang==0.5.9"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi
# SGLang's current frontend, apart (its bench_serving needs torchvision): see the file's header.
frontend="$venv/sglang-frontend"
frontend_stamp="$frontend/.installed-$(sha1sum < "$root/requirements-frontend.txt" | cut -c1-12)"
if [ ! -f "$frontend_stamp" ]; then
    rm -rf "$frontend"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        --target "$frontend" -r "$root/requirements-frontend.txt"
    touch "$frontend_stamp"
fi
export PATH="$venv/bin:$PATH"
