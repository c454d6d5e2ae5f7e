#!/usr/bin/env bash
# Quick start, command 2: set up with the test dependencies, then run the test suite.
set -euo pipefail
SEQDSL_EXTRAS="[test]"
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# Independent references used as test oracles only (never runtime dependencies):
# fla's pure-PyTorch naive functions and transformers' CPU models.
$PIP install --no-deps fla-core==0.6.0
$PIP install einops  # imported by fla's naive modules (fla itself is installed without deps)
$PIP install transformers
cd "$ROOT"
"$VENV/bin/python" -m pytest -q "$@"
