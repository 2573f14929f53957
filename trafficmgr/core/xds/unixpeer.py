"""Who is on the other end of a Unix-socket xDS connection (``SO_PEERCRED``), which grpcio does not tell.

grpcio gives a Unix-socket stream only ``context.peer() == "unix:"`` and no credentials. So when the xDS
server listens on ``unix:/path``, :class:`UnixPeerRelay` owns that path instead: it accepts each
connection, reads the kernel's ``SO_PEERCRED`` (pid, uid, gid of the connecting process), and copies the
bytes (TLS included, untouched) to the gRPC server's private socket over a connection whose own end is
bound to a fresh path. gRPC reports that path as the stream's peer (``unix:<dir>/c<n>``), and
:meth:`UnixPeerRelay.peer_of` maps it back to the credentials: :func:`describe` makes them the
stream's peer text, ``unix:uid=<uid>,gid=<gid>,pid=<pid>``, which access control reads with :func:`parse`.

Why this is safe: the private socket and the bound client paths live in a ``0700`` directory of the
server's own uid, so only that uid (and root) can reach the gRPC server directly or bind a path there; a
direct connection has a peer path the relay never recorded, so it gets no credentials (refused, not
trusted). The credentials are the kernel's, taken at ``connect()``: a client cannot choose them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import socket
import struct
import tempfile
from typing import Any

import attrs

log = logging.getLogger(__name__)

PREFIX = "unix:"
#: Bytes a relayed connection may buffer towards a slow side before reading from the other pauses.
HIGH_WATER = 1 << 20
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@attrs.frozen(slots=True)
class PeerCred:
    """The kernel's credentials of a Unix-socket peer (pid 0: not visible from this pid namespace)."""

    pid: int
    uid: int
    gid: int


def describe(cred: PeerCred) -> str:
    """The stream's peer text for ``cred``: ``unix:uid=<uid>,gid=<gid>,pid=<pid>``."""
    return f"{PREFIX}uid={cred.uid},gid={cred.gid},pid={cred.pid}"


def parse(peer: str) -> PeerCred | None:
    """:func:`describe`'s text back to credentials; None for anything else (an IP, ``""``, garbage)."""
    if not peer.startswith(PREFIX + "uid="):
        return None
    try:
        fields = dict(part.split("=", 1) for part in peer[len(PREFIX):].split(","))
        return PeerCred(pid=int(fields["pid"]), uid=int(fields["uid"]), gid=int(fields["gid"]))
    except (KeyError, ValueError):
        return None


def peer_cred(sock: socket.socket) -> PeerCred:
    """``SO_PEERCRED`` of a connected Unix socket."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCred(pid=pid, uid=uid, gid=gid)


class UnixPeerRelay:
    """Listens on ``path`` (the public socket) and relays every connection to :attr:`inner` (the gRPC
    server's private socket), recording each connection's :class:`PeerCred` (see the module docstring).

    Run on the xDS server's asyncio loop: ``await start()`` (after the gRPC server listens on
    ``unix:`` + :attr:`inner`), ``peer_of(context.peer())``, ``await stop()``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.dir = _private_dir()
        self.inner = os.path.join(self.dir, "xds.sock")
        self._peers: dict[str, PeerCred] = {}  # "unix:<bound path>" -> credentials, while connected
        self._ids = itertools.count()
        self._server: asyncio.AbstractServer | None = None
        self._listening = False  # the public path is ours to remove
        self._pipes: set[_Pipe] = set()

    async def start(self) -> None:
        """Listen on :attr:`path` (a stale socket file there is replaced, as gRPC does)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Pipe(self), self.path)
        self._listening = True

    def peer_of(self, grpc_peer: str) -> str:
        """The peer text (:func:`describe`) of the relayed connection gRPC reports as ``grpc_peer``;
        ``""`` for a connection that did not come through the relay."""
        cred = self._peers.get(grpc_peer)
        return describe(cred) if cred is not None else ""

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for pipe in list(self._pipes):
            pipe.close()
        if self._listening:
            self._listening = False
            try:
                os.unlink(self.path)
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- used by _Pipe ---------------------------------------------------------------------------

    def _client_path(self) -> str:
        return os.path.join(self.dir, f"c{next(self._ids)}")


def _private_dir() -> str:
    """A fresh ``0700`` directory for the private sockets, short enough for a socket path (108 bytes)."""
    directory = tempfile.mkdtemp(prefix="tm-xds-")
    if len(directory) > 80:  # a long $TMPDIR
        shutil.rmtree(directory, ignore_errors=True)
        directory = tempfile.mkdtemp(prefix="tm-xds-", dir="/tmp")
    os.chmod(directory, 0o700)
    return directory


class _Half(asyncio.Protocol):
    """The gRPC server's side of one relayed connection."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.pipe.to_client(data)

    def eof_received(self) -> bool:
        return self.pipe.half_close(from_client=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.close()

    def pause_writing(self) -> None:  # the gRPC server reads slower than the client writes
        self.pipe.pause_client()

    def resume_writing(self) -> None:
        self.pipe.resume_client()


class _Pipe(asyncio.Protocol):
    """One accepted client connection and its relay to the gRPC server."""

    def __init__(self, relay: UnixPeerRelay) -> None:
        self.relay = relay
        self.client: asyncio.Transport | None = None
        self.server: _Half | None = None
        self.key = ""
        self.pending: list[bytes] = []
        self.closed = False
        self.client_paused = False
        self.eofs: set[bool] = set()  # the sides that sent EOF (True: the client)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]
        self.relay._pipes.add(self)
        transport.pause_reading()  # type: ignore[attr-defined]
        transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[attr-defined]
        asyncio.ensure_future(self._connect(transport.get_extra_info("socket")))

    async def _connect(self, client_sock: Any) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            cred = peer_cred(client_sock)
            path = self.relay._client_path()
            sock.bind(path)
            self.key = PREFIX + path
            self.relay._peers[self.key] = cred  # before connecting: gRPC may look it up at once
            sock.setblocking(False)
            await loop.sock_connect(sock, self.relay.inner)
            os.unlink(path)  # the name stays the socket's address; the file is not needed
            _, half = await loop.create_unix_connection(lambda: _Half(self), sock=sock)
        except (OSError, RuntimeError) as exc:
            sock.close()
            log.warning("xDS Unix-socket relay: cannot reach the gRPC server: %s", exc)
            self.close()
            return
        if self.closed:
            if half.transport is not None:
                half.transport.close()
            return
        self.server = half
        assert half.transport is not None
        half.transport.set_write_buffer_limits(HIGH_WATER)
        for data in self.pending:
            half.transport.write(data)
        self.pending.clear()
        if self.client is not None and not self.client_paused:
            self.client.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.write(data)
        else:
            self.pending.append(data)

    def to_client(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)

    def eof_received(self) -> bool:
        return self.half_close(from_client=True)

    def half_close(self, from_client: bool) -> bool:
        """One side finished sending: pass the EOF on and keep the other direction open until it
        finishes too (the return value of ``eof_received``: True keeps the transport open)."""
        self.eofs.add(from_client)
        other = self.server.transport if from_client and self.server is not None else (None if from_client else self.client)
        if len(self.eofs) == 2 or other is None or not other.can_write_eof():
            self.close()
            return False
        other.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_writing(self) -> None:  # the client reads slower than the gRPC server writes
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()

    def pause_client(self) -> None:
        self.client_paused = True
        if self.client is not None:
            self.client.pause_reading()

    def resume_client(self) -> None:
        self.client_paused = False
        if self.client is not None and self.server is not None:
            self.client.resume_reading()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay._pipes.discard(self)
        if self.key:
            self.relay._peers.pop(self.key, None)
        if self.client is not None:
            self.client.close()
        if self.server is not None and self.server.transport is not None:
            self.server.transport.close()


__all__ = ["PeerCred", "UnixPeerRelay", "describe", "parse", "peer_cred"]
