# Sourced by scripts/up, scripts/test and scripts/pagemesh: makes .venv at the repository root
# when it is missing and installs pagemesh into it, saying what it does (the first install takes
# minutes). torch is pinned first so that a CPU machine takes the local CPU wheel instead of the
# registry's CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { echo "pagemesh install: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating $ROOT/.venv"
  python3 -m venv .venv
fi
# This checkout's .venv first on PATH. Not .venv/bin/activate: it names the folder the venv was
# made in, so a venv copied or moved from another checkout would run that checkout's code.
export VIRTUAL_ENV="$ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
unset PYTHONHOME
extra="$1"
if [ "$extra" = any ]; then  # scripts/pagemesh: whichever install is there and up to date
  extra=gpu
  for made in .venv/.pagemesh-installed-*; do
    if [ -f "$made" ] && [ ! pyproject.toml -nt "$made" ]; then
      extra="${made##*-installed-}"
    fi
  done
fi
stamp=".venv/.pagemesh-installed-$extra"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing pagemesh[$extra] into .venv (the first time: several minutes, most of it torch)"
  say "upgrading pip"
  python -m pip install -q --upgrade pip
  if ! python -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      say "installing torch (CUDA build, about 2.5 GB)"
      python -m pip install -q torch
    else
      say "installing torch 2.13.0 (CPU)"
      python -m pip install -q torch==2.13.0
    fi
  fi
  say "installing pagemesh and its dependencies (pip install -e .[$extra])"
  python -m pip install -q -e ".[$extra]"
  touch "$stamp"
  say "done: $ROOT/.venv/bin/pagemesh"
fi
