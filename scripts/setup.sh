# Sourced by scripts/main.sh and scripts/test.sh: create .venv and install seqdsl into it.
# torch is installed first and pinned: 2.13.0 is a CPU build on local disk; an unpinned torch
# could pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SEQDSL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install setuptools wheel
$PIP install -e "$ROOT${SEQDSL_EXTRAS:-}"
