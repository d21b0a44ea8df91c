#!/usr/bin/env bash
# The test command: every test of the project, on a fresh machine.
#
# 1. Installs what the tests need: the official `openai` Python client into a
#    virtual environment under target/, and (as root, from the system's
#    packages) nginx and curl when they are missing.
# 2. Runs `cargo test --release` (one build profile for running, testing and
#    benchmarking): unit tests and the integration binary.
# 3. Checks the deployment files (hadolint, Kubernetes schemas, cross-file
#    consistency), unless arguments narrowed the run to some tests.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/test-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
fi
export MAMBA_TEST_PYTHON="$PWD/$venv/bin/python"

# nginx for the deployment tests, curl for the README quick-start test.
missing=()
if [ -z "${MAMBA_TEST_NGINX:-}" ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  missing+=(nginx-light)
fi
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    # Run the suite anyway: the tests that need these fail and say so.
    echo "scripts/test.sh: the tests need ${missing[*]} (Debian: sudo apt-get install ${missing[*]});" \
      "or set MAMBA_TEST_NGINX to an nginx binary" >&2
  fi
fi

echo "+ cargo test --release $*"
cargo test --release "$@"
if [ $# -eq 0 ]; then
  scripts/check-deploy.sh
fi
