#!/usr/bin/env bash
# Runs the whole test suite. Installs the Python test client into a virtual
# environment under target/ on first use, then runs `cargo test --release`
# (one build profile for running, testing and benchmarking).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/test-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
fi
export MAMBA_TEST_PYTHON="$PWD/$venv/bin/python"
exec cargo test --release "$@"
