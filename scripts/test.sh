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
# The deployment tests run the real nginx in front of the server. Install it
# when it is missing and we may (root with apt); otherwise say what to do.
if [ -z "${MAMBA_TEST_NGINX:-}" ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  else
    echo "scripts/test.sh: the deployment tests need nginx: install it (Debian: sudo apt-get install nginx-light)" \
      "or set MAMBA_TEST_NGINX to an nginx binary" >&2
    exit 1
  fi
fi
# The quick-start test runs the README's curl commands.
if ! command -v curl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
  else
    echo "scripts/test.sh: the quick-start test needs curl: install it" >&2
    exit 1
  fi
fi
exec cargo test --release "$@"
