#!/usr/bin/env bash
# Regenerates requirements/lock.txt, the exact tested versions scripts/setup.sh installs: every package sdtune and its
# test extra need (pyproject.toml), and the CPU build of torch (requirements/torch-cpu.in), each with its hashes.
#
#   bash scripts/lock.sh             re-resolve, keeping every locked version that still fits pyproject.toml
#   bash scripts/lock.sh --upgrade   the newest versions pyproject.toml allows (check them first: setup.sh --latest)
#
# pip-tools' pip-compile resolves with pip itself, with pip's own settings, so it takes torch's CPU build from where
# pip finds it; the result is a plain requirements file any pip installs with --require-hashes. The lock is made for
# the platform it runs on (CI's: Linux x86-64, CPython 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
upgrade=()
case "${1:-}" in
    "") ;;
    --upgrade) upgrade=(--upgrade) ;;
    *) echo "usage: bash scripts/lock.sh [--upgrade]" >&2; exit 2 ;;
esac
tools=.venv-lock
[ -x "$tools/bin/pip-compile" ] || {
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install -q --disable-pip-version-check "pip==26.3" "pip-tools==7.7.0"
}
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tools/bin/pip-compile" --quiet "${upgrade[@]}" --extra test --strip-extras --generate-hashes --allow-unsafe \
    --no-emit-index-url --no-emit-find-links \
    --output-file requirements/lock.txt pyproject.toml requirements/torch-cpu.in
echo "wrote requirements/lock.txt: $(grep -c '==' requirements/lock.txt) packages"
