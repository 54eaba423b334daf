#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU build of torch 2.13 and sdtune installed editable with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pinned so pip takes the CPU wheel; an unpinned torch resolves to a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
