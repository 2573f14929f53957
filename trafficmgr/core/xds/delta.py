"""Delta ADS (``DeltaAggregatedResources``): subscriptions, ACKs, per-resource NACKs and pushes of one stream.

Rules:
- a push sends only what the client lacks or has in another version (:class:`~trafficmgr.core.xds.streams.Known`
  tracks what it has); all additions/updates of a push (in ``cache.TYPE_ORDER``) go out before any
  ``removed_resources``;
- a NACK restores what the client had and the rejected versions are never resent; a newer one is;
- a replaced cluster (listener) gets the endpoints (routes) it references resent, even if unchanged.

Streams in sync with the same type set share the diff (:func:`~trafficmgr.core.xds.responses.transition`),
and streams in the same state share the nonce and the encoded message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from trafficmgr.core import wire
from trafficmgr.core.cache import NAMED_TYPES, Resource, TypeSet
from trafficmgr.core.xds.responder import DEPENDENT, Responder, ordered
from trafficmgr.core.xds.responses import DELTA_MESSAGES, intern_names, token, transition
from trafficmgr.core.xds.streams import MAX_NAMES_PER_TYPE, DeltaSent, Known, Stream, TypeState, too_many_names

#: Responses awaiting their ACK kept per stream and type (older ones are forgotten).
MAX_INFLIGHT = 64


class DeltaProtocol:
    """The delta side of the server: called on the server loop for an identified stream."""

    def __init__(self, out: Responder) -> None:
        self.out = out

    async def on_change(self, stream: Stream) -> None:
        """The cache changed: push what differs, for every type of the stream."""
        await self.push(stream, [stream.types[t] for t in ordered(stream.types)])

    async def on_request(self, stream: Stream, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        type_url = req.type_url
        st = stream.types.get(type_url)
        subscribe = list(req.resource_names_subscribe)
        unsubscribe = list(req.resource_names_unsubscribe)
        if len(req.initial_resource_versions) > MAX_NAMES_PER_TYPE:
            raise too_many_names(len(req.initial_resource_versions))
        if st is None:
            if len(subscribe) > MAX_NAMES_PER_TYPE:
                raise too_many_names(len(subscribe))
            st = stream.types[type_url] = TypeState(type_url)
            st.wildcard = type_url not in NAMED_TYPES and (not subscribe or "*" in subscribe)
            st.names = intern_names(frozenset(n for n in subscribe if n != "*"))
            st.known = Known(req.initial_resource_versions)
            early = stream.early_force.pop(type_url, None)
            if early:
                # Replaced clusters (listeners) were sent on this stream before the client asked for their
                # endpoints (routes): a reconnect to another replica, or after a restart, with a change made
                # meanwhile. They warm until their endpoints come again, which the client's versions alone
                # would not cause (it has them): resend those it has (the others differ anyway).
                st.force = {n for n in early if n in st.known}
                st.force_tag = "reconnect"
            await self.push(stream, [st])
            return
        if req.response_nonce:
            sent = st.inflight.pop(req.response_nonce, None)
            if sent is not None:
                if req.HasField("error_detail"):
                    self.nack(stream, st, req.response_nonce, sent, req.error_detail.message)
                else:
                    st.acked_version = sent.version
                    if req.response_nonce == st.sent_nonce:
                        # Delta NACKs are per resource: the NACK stands while a rejected one is served.
                        self.out.acked(st, sent.at, clear_nack=not st.rejected)
        if subscribe or unsubscribe:
            names = set(st.names or ())
            for name in subscribe:
                if name == "*":
                    st.wildcard = True
                else:
                    names.add(name)
            for name in unsubscribe:
                if name == "*":
                    st.wildcard = False
                else:
                    names.discard(name)
                    if not st.wildcard:
                        st.known.pop(name, None)
            if len(names) > MAX_NAMES_PER_TYPE:  # subscriptions add up over requests
                raise too_many_names(len(names))
            st.names = intern_names(frozenset(names))
            st.synced_version = None
        await self.push(stream, [st])

    def nack(self, stream: Stream, st: TypeState, nonce: str, sent: DeltaSent, error: str) -> None:
        # The client keeps what it had: restore our view of it, and never resend the rejected versions.
        names = []
        for name, version in sent.sent():
            names.append(name)
            if st.known.get(name) == version:
                previous = sent.previous.get(name)
                if previous is None:
                    st.known.pop(name, None)
                else:
                    st.known[name] = previous
            if version is not None:
                st.rejected[name] = version
        st.synced_version = None
        self.out.record_nack(stream, st, nonce, sent.version, error, sorted(names))

    async def push(self, stream: Stream, states: Iterable[TypeState]) -> None:
        """Send what differs for ``states``: every update first (in type order), then every removal."""
        snap = self.out.snapshot(stream)
        if snap is None:
            return
        plans: list[tuple[TypeState, TypeSet, list[Resource], list[str], Any]] = []
        pending = list(states)
        for st in pending:
            ts = snap.types.get(st.type_url)
            if ts is None:
                continue
            force, st.force = st.force, set()
            tag = st.force_tag if force else ""
            reconnected = not st.known.empty()  # the client had versions of this type before this push
            if ts.version == st.synced_version and not force:
                continue  # nothing changed since the last diff (subscription changes reset it)
            prev = st.synced_ts
            shared: Any = None
            scope = "*" if st.wildcard else st.names
            if prev is not None and st.synced_version == prev.version and not st.rejected:
                updates, removed = diff_from(st, transition(prev, ts)) if prev is not ts else ([], [])
                if force:
                    updates = with_forced(st, ts, updates, force)
                # Every stream in sync with ``prev`` and with the same subscription (and the same forced
                # names, which follow from the same cluster transition) gets the same message.
                shared = (st.type_url, prev.version, ts.version, scope, frozenset(force), tag)
            else:
                if not st.rejected and st.known.empty():
                    # A first answer: the same for every new stream with this subscription.
                    shared = (st.type_url, "", ts.version, scope)
                updates, removed = diff(st, ts)
                if force:
                    updates = with_forced(st, ts, updates, force)
                    shared = None
            st.synced_version = ts.version
            st.synced_ts = ts
            plans.append((st, ts, updates, removed, shared))
            dependent = stream.types.get(DEPENDENT.get(st.type_url, ""))
            if updates and dependent is not None:
                # A replaced cluster (listener) warms until it gets its endpoints (routes) again: resend
                # the ones it references even if the client has them. Only those names: the dependent's
                # diff stays O(changes) and shared between streams.
                for r in updates:
                    for ref_type, ref_name in r.refs:
                        if ref_type == dependent.type_url and ref_name in dependent.known:
                            dependent.force.add(ref_name)
                            dependent.force_tag = ts.version
                if dependent.force and dependent not in pending:
                    pending.append(dependent)
            elif updates and reconnected and st.type_url in DEPENDENT:
                # The client has not asked for the dependent type on this stream yet (Envoy asks for
                # clusters first after a reconnect): force the referenced names when it does.
                early = stream.early_force.setdefault(DEPENDENT[st.type_url], set())
                for r in updates:
                    early.update(ref_name for ref_type, ref_name in r.refs if ref_type == DEPENDENT[st.type_url])
            if (
                st.last_nack is not None
                and not st.rejected
                and not updates
                and not removed
                and st.sent_nonce not in st.inflight
            ):
                st.last_nack = None  # the rejected resources are no longer served; nothing to wait for
        for st, ts, updates, removed, shared in plans:
            # A wildcard type's first answer is always sent, even an empty one.
            if updates or (st.wildcard and not st.sent_nonce and not removed):
                await self.send(stream, st, ts, updates, [], shared and (*shared, "u"))
        for st, ts, _, removed, shared in plans:
            if removed:
                await self.send(stream, st, ts, [], removed, shared and (*shared, "r"))
        for st, ts, _, _, _ in plans:
            if not st.rejected:
                # The client now has exactly ``ts`` (optimistically): share it instead of a per-stream map.
                st.known.rebase(ts, None if st.wildcard else st.names)

    async def send(
        self, stream: Stream, st: TypeState, ts: TypeSet, updates: list[Resource], removed: list[str],
        shared: Any = None,
    ) -> None:
        """Send one delta response. With ``shared`` (a key that identifies the same message for every
        stream in the same state), the nonce and the encoded bytes are shared too (as in ``SotwProtocol.send``)."""
        # Equal keys, equal messages: the nonce is derived from the key (it need only be unique per stream).
        nonce = f"{self.out.nonces.prefix}.{ts.version}.{token(shared)}" if shared else ""
        # A version can come back (content-addressed: a change undone); its shared nonce must not
        # collide with a response of that version still awaiting its ACK.
        if not nonce or nonce == st.sent_nonce or nonce in st.inflight:
            nonce, shared = self.out.nonces.fresh(), None
        # What the client had of these names, for a NACK to restore (only names it had: none on a first
        # answer). Then ``known`` follows the send; not when :meth:`push` rebases it on ``ts`` right after
        # the sends anyway (nothing else runs on this stream in between): a first answer would otherwise
        # fill a dict of thousands of names per stream, just to drop it.
        known = st.known
        previous: dict[str, str] = {}
        update_known = bool(st.rejected)
        for r in updates:
            had = known.get(r.name)
            if had is not None:
                previous[r.name] = had
            if update_known:
                known[r.name] = r.version
        for name in removed:
            had = known.pop(name, None) if update_known else known.get(name)
            if had is not None:
                previous[name] = had
        st.inflight[nonce] = DeltaSent(ts.version, updates, removed, previous)
        while len(st.inflight) > MAX_INFLIGHT:
            st.inflight.popitem(last=False)
        st.sent_version = ts.version
        st.sent_nonce = nonce
        st.sent_at = time.monotonic()
        st.sent_typeset = ts
        data = DELTA_MESSAGES.get((shared, nonce)) if shared else None
        if data is None:
            data = b"".join(
                [
                    wire.field_str(1, ts.version),
                    *(wire.field(2, r.delta_bytes) for r in updates),
                    wire.field_str(4, st.type_url),
                    *(wire.field_str(6, name) for name in removed),
                    wire.field_str(5, nonce),
                ]
            )
            if shared:
                DELTA_MESSAGES.put((shared, nonce), data)
        await self.out.write(stream, st, data)



def diff_from(st: TypeState, changes: list[tuple[str, Resource | None]]) -> tuple[list[Resource], list[str]]:
    """:func:`diff` for a stream whose ``known`` matched the previous TypeSet exactly."""
    names = st.names or frozenset()
    updates: list[Resource] = []
    removed: list[str] = []
    for name, res in changes:
        if not st.wildcard and name not in names:
            continue
        if res is None:
            if name in st.known:
                removed.append(name)
        elif st.known.get(name) != res.version:
            updates.append(res)
    return updates, sorted(removed)


def with_forced(st: TypeState, ts: TypeSet, updates: list[Resource], force: set[str]) -> list[Resource]:
    """``updates`` plus the resources named in ``force`` that are in scope and not already updated."""
    have = {r.name for r in updates}
    extra = [ts.resources[n] for n in sorted(force)
             if n not in have and n in ts.resources and (st.wildcard or n in (st.names or ()))
             and st.rejected.get(n) != ts.resources[n].version]
    return updates + extra if extra else updates


def diff(st: TypeState, ts: TypeSet) -> tuple[list[Resource], list[str]]:
    """Resources the client lacks or has in another version, and names it has that are gone."""
    resources = ts.resources
    if st.wildcard:
        candidates: Iterable[Resource] = resources.values()
    else:
        candidates = [resources[n] for n in sorted(st.names or ()) if n in resources]
    known = st.known
    rejected = st.rejected
    for name in [n for n in rejected if n not in resources]:
        del rejected[name]
    if not rejected and known.empty():
        return list(candidates), []  # a first answer: everything in scope
    updates = []
    for r in candidates:
        if known.get(r.name) == r.version:
            continue
        bad = rejected.get(r.name)
        if bad is not None:
            if bad == r.version:
                continue
            del rejected[r.name]
        updates.append(r)
    in_scope: Callable[[str], bool] = (lambda n: True) if st.wildcard else (lambda n: n in (st.names or ()))
    removed = sorted(n for n in known if n not in resources and in_scope(n))
    return updates, removed
