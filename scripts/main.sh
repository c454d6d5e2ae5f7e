#!/usr/bin/env bash
# Quick start, command 1: set up, then run the main job on a bundled spec.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
"$VENV/bin/python" -m seqdsl demo "${@:-specs/mamba.seq}"
