"""State-of-the-world ADS (``StreamAggregatedResources``): requests, ACKs, NACKs and pushes of one stream.

Rules (the behaviour Envoy 1.40 was observed to expect of a management server):
- answer a request only if it is the first of its type on the stream, its names changed, or a newer
  version exists; a plain ACK gets no answer; a request with a stale nonce is ignored;
- a NACK (``error_detail`` set) is recorded and the rejected version is not resent for the same names;
  a newer version is;
- a push goes in ``cache.TYPE_ORDER``; after a cluster (listener) is sent, the endpoints (routes) follow
  even if unchanged, since a replaced cluster (listener) warms until it gets them again.

Every stream that gets the same version for the same reason shares one nonce and one encoded response.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from envoy.service.discovery.v3 import discovery_pb2

from trafficmgr.core.cache import NAMED_TYPES
from trafficmgr.core.xds.responder import DEPENDENT, Responder, ordered
from trafficmgr.core.xds.responses import intern_names, names_tag
from trafficmgr.core.xds.streams import MAX_NAMES_PER_TYPE, Stream, TypeState, too_many_names


def sotw_names(type_url: str, names: Iterable[str]) -> frozenset[str] | None:
    """Requested names; None means wildcard (CDS/LDS with no names, or ``*``)."""
    requested = frozenset(names)
    if "*" in requested or (not requested and type_url not in NAMED_TYPES):
        return None
    return intern_names(requested)


class SotwProtocol:
    """The SotW side of the server: called on the server loop for an identified stream."""

    def __init__(self, out: Responder) -> None:
        self.out = out

    async def on_request(self, stream: Stream, req: discovery_pb2.DiscoveryRequest) -> None:
        type_url = req.type_url
        if len(req.resource_names) > MAX_NAMES_PER_TYPE:
            raise too_many_names(len(req.resource_names))
        names = sotw_names(type_url, req.resource_names)
        st = stream.types.get(type_url)
        if st is None:
            st = stream.types[type_url] = TypeState(type_url)
            st.names = names
            # After a reconnect Envoy sends its last accepted version with an empty nonce: answer it.
            st.acked_version = req.version_info or None
            await self.send(stream, st, force=True)
            return
        if st.sent_nonce and req.response_nonce != st.sent_nonce:
            return  # stale: a newer response is on its way to the client
        names_changed = names != st.names
        st.names = names
        if req.HasField("error_detail"):
            if st.sent_nonce:
                ts = st.sent_typeset
                rejected = [r.name for r in ts.select(st.names)] if ts is not None else []
                self.out.record_nack(stream, st, req.response_nonce, st.sent_version, req.error_detail.message, rejected)
        elif st.sent_nonce:
            st.acked_version = req.version_info
            if req.version_info == st.sent_version:
                self.out.acked(st, st.sent_at)
        await self.send(stream, st, force=names_changed, tag=names_tag(names) if names_changed else "")

    async def on_change(self, stream: Stream) -> None:
        """The cache changed: push every type whose version is new, in push order."""
        forced: dict[str, str] = {}  # dependent type -> version of the type set that forces it
        for type_url in ordered(stream.types):
            st = stream.types[type_url]
            tag = forced.get(type_url)
            sent = await self.send(stream, st, force=tag is not None, tag=tag or "")
            if sent and type_url in DEPENDENT:
                # A replaced cluster (listener) warms until it gets its endpoints (routes) again,
                # and Envoy does not always ask: resend them right after, even if unchanged.
                forced[DEPENDENT[type_url]] = st.sent_version or ""

    async def send(self, stream: Stream, st: TypeState, force: bool, tag: str = "") -> bool:
        """Send the current version of ``st``'s type if it is new (or ``force``); True if sent.

        ``tag`` names why a forced resend happens (the forcing version, the new subscription), so that
        every stream forced for the same reason shares one nonce and one response too."""
        out = self.out
        snap = out.snapshot(stream)
        if snap is None:
            return False
        ts = snap.types.get(st.type_url)
        if ts is None:
            return False  # a type this control plane does not serve
        if ts.version == st.nacked_version and st.names == st.nacked_names:
            return False  # a rejected response is never sent again, forced or not
        if not force and ts.version == st.sent_version:
            return False
        # A nonce only has to be unique within a stream: every stream that gets this version for the
        # first time shares one nonce, so the whole response (often hundreds of KB) is one cached bytes
        # object for all of them instead of a copy per stream. A nonce this stream had lately (the same
        # version resent, a change undone) gets the publication generation added, which streams handling
        # the same push still share; only a repeat within one generation gets a per-stream nonce and copy.
        nonce = f"{out.nonces.prefix}.{ts.version}" + (f".{tag[:12]}" if tag else "")
        if nonce in st.recent_nonces:
            nonce = f"{nonce}.g{out.cache.generation}"
        if nonce in st.recent_nonces:
            nonce = out.nonces.fresh()
            data = ts.sotw_response(st.names, nonce, share=False)
        else:
            data = ts.sotw_response(st.names, nonce)
        st.sent_version = ts.version
        st.sent_nonce = nonce
        st.sent_names = st.names
        st.recent_nonces.append(nonce)
        st.sent_at = time.monotonic()
        st.sent_typeset = ts
        await out.write(stream, st, data)
        return True
