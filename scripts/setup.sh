#!/usr/bin/env bash
# Makes a venv with sdtune installed editable, with its test tools.
#
#   bash scripts/setup.sh            .venv from requirements/lock.txt: the exact versions CI tests, torch's CPU build
#                                    included, each checked against its hash
#   bash scripts/setup.sh --latest   .venv-latest from the newest versions pyproject.toml allows (torch stays the
#                                    lock's CPU build), then the test suite: the drift check before
#                                    `bash scripts/lock.sh --upgrade`
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") venv=.venv ;;
    --latest) venv=.venv-latest ;;
    *) echo "usage: bash scripts/setup.sh [--latest]" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "pip==26.3"

# torch first, on its own: pip takes the CPU build from a local wheel folder where pip is set up with one, else from
# PyTorch's CPU index (PyPI's torch for Linux is the multi-GB CUDA build).
lock=requirements/lock.txt
torch_lines=$(awk '/^torch==/ {on=1} on {print} on && !/\\$/ {exit}' "$lock")
"${pip[@]}" --no-deps --require-hashes -r /dev/stdin <<<"$torch_lines" 2>/dev/null \
    || "${pip[@]}" --no-deps --require-hashes --index-url https://download.pytorch.org/whl/cpu -r /dev/stdin <<<"$torch_lines"

if [ "$venv" = .venv ]; then
    "${pip[@]}" --require-hashes -r "$lock"
    "${pip[@]}" --no-deps -e ".[test]"
    exit 0
fi
# The lock's torch as a constraint: the newest torch pyproject.toml allows is a CUDA build of several GB here.
"${pip[@]}" --upgrade --upgrade-strategy eager -e ".[test]" -c /dev/stdin <<<"${torch_lines%% *}"
echo "newest allowed versions that differ from the lock:"
normalise() { tr 'A-Z_' 'a-z-' | sort; }
"$venv/bin/python" -m pip freeze --exclude-editable | normalise > "$venv/resolved.txt"
grep -oE '^[A-Za-z0-9_.-]+==[^ ]+' "$lock" | normalise | comm -13 - "$venv/resolved.txt" | sed 's/^/  /'
"$venv/bin/python" -m pytest -q -n auto
