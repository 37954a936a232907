#!/usr/bin/env bash
# The main job: installs what is missing, then starts a server on the built-in demo models,
# sends it requests, prints the answers and stops it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
exec python "$root/scripts/quickstart.py" "$@"
