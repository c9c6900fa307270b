#!/usr/bin/env bash
# Create .venv/ in the repository root and install the project into it.
# torch goes first, pinned to the CPU wheel that lies on disk: a plain `torch` requirement with nothing
# installed would pull a multi-GB CUDA build. Re-running is cheap: the install is skipped while
# pyproject.toml is unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
stamp=.venv/.pcbmerge-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/pcbmerge ]; then
  exit 0
fi
echo "[setup] creating .venv with $($python --version)" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet "torch==2.13.0"
echo "[setup] installing pcbmerge and its dependencies (a few minutes the first time)" >&2
.venv/bin/pip install --quiet -e ".[test]"
echo "$want" > "$stamp"
echo "[setup] done: .venv/bin/pcbmerge" >&2
