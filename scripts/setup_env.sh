#!/usr/bin/env bash
# Creates .venv (once) and installs the project with the exact CPU versions of constraints-cpu.txt.
# Sourced by scripts/test.sh and scripts/quickstart.sh; safe to run again (a no-op when current).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed-$(cat "$root/pyproject.toml" "$root/constraints-cpu.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -c "$root/constraints-cpu.txt" -e "$root[test,triton]"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
