# Sourced by scripts/up and scripts/test: makes .venv at the repository root when it is missing
# and installs pagemesh into it. torch is pinned first so that a CPU machine takes the local CPU
# wheel instead of the registry's CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.pagemesh-installed-$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      python -m pip install -q torch
    else
      python -m pip install -q torch==2.13.0
    fi
  fi
  python -m pip install -q -e ".[$1]"
  touch "$stamp"
fi
