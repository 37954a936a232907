#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole CPU suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
export TRITON_INTERPRET=1
exec python -m pytest -q "$@"
