"""The pod ``log`` subresource (``kubectl logs``): container output from files the pod runtime names.

The API server reads only files its :class:`~trafficmgr.apiserver.controllers.PodRuntime` reports for a
pod it runs (``log_file(pod, container)``: local mode's kubelet returns the file it writes that
container's output to). Nothing in the request is ever turned into a path: the request names a pod that
must exist and one of its spec's containers, and the runtime looks up its own record by the pod's uid.
Reading a log is as sensitive as reading the pod (both need the server's bearer token).

What is supported and how errors read (the texts are the kubelet's / kube-apiserver's):

- ``container`` (kubectl ``-c``; kubectl picks the default container itself), ``tailLines``
  (``--tail``), ``limitBytes`` (``--limit-bytes``), ``follow`` (``-f``: new output is streamed until the
  pod is deleted or the client goes away);
- a container that has not started (no output file yet, or a Pending pod): 400 ``container "c" in pod
  "p" is waiting to start: ContainerCreating`` (or its waiting reason, e.g. local mode's ImageNotLocal);
- ``previous`` (``-p``): 400 ``previous terminated container "c" in pod "p" not found`` (a restarted
  container appends to the same file);
- ``timestamps``, ``sinceSeconds``, ``sinceTime``: 400 (the files hold no per-line times);
- a Running pod no runtime here keeps logs for (a plain API server's pods, or local mode's Pods not
  created by a ReplicaSet, e.g. the gateway's): 400 saying so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import attrs

from .errors import ApiError

_BLOCK = 64 * 1024
_TRUE = ("true", "1", "True", "TRUE")


@attrs.frozen
class LogRequest:
    """A validated log request: the file and what to send from it."""

    path: str
    follow: bool
    tail_lines: int | None
    limit_bytes: int | None


def _int_param(query: dict[str, str], name: str, minimum: int) -> int | None:
    raw = query.get(name)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)  # type: ignore[arg-type]
    except ValueError:
        raise ApiError.bad_request(f"{name}: Invalid value: {raw!r}: must be an integer") from None
    if value < minimum:
        raise ApiError(422, "Invalid", f"PodLogOptions is invalid: {name}: Invalid value: {value}: "
                                       f"must be greater than or equal to {minimum}")
    return value


def resolve(pod: dict[str, Any], runtime: Any, query: dict[str, str]) -> LogRequest:
    """Check ``query`` against ``pod`` and find the log file through ``runtime``; ApiError as the real
    server answers otherwise (see the module docstring)."""
    name = pod["metadata"]["name"]
    names = [c.get("name", "") for c in (pod.get("spec") or {}).get("containers") or []]
    container = query.get("container") or ""
    if not container:
        if len(names) != 1:
            raise ApiError.bad_request(f"a container name must be specified for pod {name}, "
                                       f"choose one of: [{' '.join(names)}]")
        container = names[0]
    if container not in names:
        raise ApiError.bad_request(f"container {container} is not valid for pod {name}")
    for unsupported, flag in (("timestamps", "--timestamps"), ("sinceSeconds", "--since"), ("sinceTime", "--since-time")):
        if query.get(unsupported) not in (None, "", "false", "0", "False"):
            raise ApiError.bad_request(f"{flag} is not supported by this API server: its container logs "
                                       "hold no per-line times")
    tail = _int_param(query, "tailLines", 0)
    limit = _int_param(query, "limitBytes", 1)
    if query.get("previous") in _TRUE:
        raise ApiError.bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
    log_file = getattr(runtime, "log_file", None)
    path = log_file(pod, container) if log_file is not None else None
    status = pod.get("status") or {}
    if path is None and status.get("phase") == "Running":
        raise ApiError.bad_request(f'container "{container}" in pod "{name}" has no logs on this API server: '
                                   "only pods that local mode's kubelet runs (pods of Deployments) have logs")
    if path is None or not os.path.exists(path):
        raise ApiError.bad_request(f'container "{container}" in pod "{name}" is waiting to start: '
                                   f"{_waiting_reason(status, container)}")
    return LogRequest(path, query.get("follow") in _TRUE, tail, limit)


def _waiting_reason(status: dict[str, Any], container: str) -> str:
    """Why a container has not started: its waiting reason, the pod's Ready reason (local mode:
    ImageNotLocal), else ContainerCreating."""
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if cs.get("name") == container and waiting.get("reason"):
            return str(waiting["reason"])
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") != "True" and cond.get("reason"):
            return str(cond["reason"])
    return "ContainerCreating"


def tail_offset(f: Any, lines: int) -> int:
    """Offset in the open binary file ``f`` where its last ``lines`` lines start (a last line without a
    newline counts), reading backwards block by block."""
    end = f.seek(0, os.SEEK_END)
    if lines == 0:
        return end
    pos, seen = end, 0
    f.seek(max(0, end - 1))
    if end and f.read(1) == b"\n":
        seen = -1  # the final newline ends the last line, it does not start a new one
    while pos > 0:
        start = max(0, pos - _BLOCK)
        f.seek(start)
        block = f.read(pos - start)
        i = len(block)
        while True:
            i = block.rfind(b"\n", 0, i)
            if i < 0:
                break
            seen += 1
            if seen == lines:
                return start + i + 1
        pos = start
    return 0


def chunks(req: LogRequest, alive: Any, poll_s: float = 0.2) -> Iterator[bytes]:
    """The bytes to send, in blocks. With ``follow``, keeps yielding what is appended while ``alive()``
    is true (``b""`` between polls so the caller can check its client); a truncated file is read anew."""
    import time

    sent = 0
    with open(req.path, "rb") as f:
        pos = tail_offset(f, req.tail_lines) if req.tail_lines is not None else 0
        f.seek(pos)
        while True:
            block = f.read(_BLOCK)
            if block:
                if req.limit_bytes is not None:
                    block = block[:req.limit_bytes - sent]
                sent += len(block)
                pos += len(block)
                yield block
                if req.limit_bytes is not None and sent >= req.limit_bytes:
                    return
                continue
            if not req.follow or not alive():
                return
            try:
                if os.path.getsize(req.path) < pos:
                    pos = 0
                    f.seek(0)
            except OSError:
                return
            yield b""
            time.sleep(poll_s)
