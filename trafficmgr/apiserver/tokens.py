"""ServiceAccount tokens for the local API server: TokenRequest and TokenReview (``authentication.k8s.io/v1``).

``POST /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token`` (a TokenRequest: ``spec.audiences``,
``spec.expirationSeconds``, ``spec.boundObjectRef``) answers ``status.token`` and
``status.expirationTimestamp``; ``POST /apis/authentication.k8s.io/v1/tokenreviews`` answers whether a
token is valid for the asked audiences and whose it is, with the ``extra`` keys Kubernetes 1.30+ fills
for bound tokens (``authentication.kubernetes.io/pod-name``, ``pod-uid``, ``node-name``, ``node-uid``,
``credential-id``). Both follow kube-apiserver: the same validation errors (422 for an expiration under
10 minutes, 404 for a missing ServiceAccount or bound object, 400 for a Pod that runs as another
ServiceAccount, 409 for a stale bound-object uid), the requested expiration capped at
:data:`MAX_EXPIRATION`, and a token bound to an object that was deleted or replaced (another uid), or
whose ServiceAccount was, reviews as not authenticated with an error. One difference: a pod-bound token
carries the pod's ``spec.nodeName`` even when no Node object exists (kube-apiserver adds the node only when
it finds the Node; local mode and tests seldom create Nodes); the node's uid, and the check at review that
the Node still exists, only when it does.

Tokens are JWT-shaped (HS256 over the claims kube-apiserver puts in its own tokens), signed with a
random key held in memory by :class:`TokenAuthority`; the key lives on the :class:`~.store.Store`, so a
server restarted on the same store still accepts its tokens. Nothing is stored per token (memory stays
bounded however many are issued); a review re-reads the ServiceAccount and the bound objects.

**These tokens never authenticate a request to this API server**: it has no RBAC and admits only its
own admin bearer token (see :mod:`.access`). They exist so that components which authenticate *their*
callers with TokenReview (the mesh CA's signing service) run against this server as against Kubernetes.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from .discovery import BY_KEY
from .errors import ApiError
from .store import Store

log = logging.getLogger(__name__)

#: The audience of a token requested without ``spec.audiences`` and of a review without them
#: (kube-apiserver's default ``--api-audiences`` is its issuer, this URL on most clusters).
DEFAULT_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
ISSUER = DEFAULT_AUDIENCE
DEFAULT_EXPIRATION = 3600  # seconds, as Kubernetes
MIN_EXPIRATION = 600  # kube-apiserver refuses less ("may not specify a duration less than 10 minutes")
MAX_EXPIRATION = 48 * 3600  # a longer request is capped (kube-apiserver's --service-account-max-token-expiration)
_MAX_VALID = 1 << 32  # kube-apiserver refuses more ("may not specify a duration larger than 2^32 seconds")
_DELETED_GRACE = 60  # a bound object being deleted invalidates tokens 60 s after its deletionTimestamp, as Kubernetes

GROUP = "authentication.k8s.io"
API_VERSION = f"{GROUP}/v1"
_PREFIX = "authentication.kubernetes.io/"
_BINDABLE = {"Pod": "pods", "Secret": "secrets", "Node": "nodes"}  # what kube-apiserver 1.32 binds tokens to
_SA = BY_KEY["serviceaccounts"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _rfc3339(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _invalid(field: str, value: Any, why: str) -> ApiError:
    details = {"group": GROUP, "kind": "TokenRequest",
               "causes": [{"reason": "FieldValueInvalid", "message": f"Invalid value: {value!r}: {why}",
                           "field": field}]}
    return ApiError(422, "Invalid", f'TokenRequest.{GROUP} is invalid: {field}: Invalid value: {value!r}: {why}',
                    details)


class Refused(Exception):
    """A token that does not authenticate; the message is TokenReview's ``status.error`` detail."""


class TokenAuthority:
    """Issues and reviews ServiceAccount tokens for one store (see the module docstring).

    ``clock`` (seconds since the epoch) is what expiry is measured against; tests move it to expire tokens.
    """

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._key = secrets.token_bytes(32)
        self._kid = _b64(hashlib.sha256(self._key).digest()[:12])

    # ---- TokenRequest ------------------------------------------------------------------------

    def request(self, namespace: str, name: str, body: Any, dry_run: bool = False) -> dict:
        """Answer a TokenRequest for ServiceAccount ``namespace/name`` (the object posted as ``body``):
        the request with ``spec`` defaulted and ``status`` filled; raises ``ApiError`` as kube-apiserver."""
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ApiError.bad_request("request body must be a TokenRequest object")
        kind = body.get("kind")
        if kind not in (None, "", "TokenRequest"):
            raise ApiError.bad_request(f"the kind of the object ({kind}) does not match the URL (TokenRequest)")
        spec = body.get("spec") or {}
        if not isinstance(spec, dict):
            raise ApiError.bad_request("spec must be an object")
        audiences = spec.get("audiences") or [DEFAULT_AUDIENCE]
        if not isinstance(audiences, list) or not all(isinstance(a, str) and a for a in audiences):
            raise _invalid("spec.audiences", audiences, "must be a list of non-empty strings")
        seconds = spec.get("expirationSeconds", DEFAULT_EXPIRATION)
        if seconds is None:
            seconds = DEFAULT_EXPIRATION
        if not isinstance(seconds, int) or isinstance(seconds, bool):
            raise _invalid("spec.expirationSeconds", seconds, "must be an integer number of seconds")
        if seconds < MIN_EXPIRATION:
            raise _invalid("spec.expirationSeconds", seconds, "may not specify a duration less than 10 minutes")
        if seconds > _MAX_VALID:
            raise _invalid("spec.expirationSeconds", seconds, "may not specify a duration larger than 2^32 seconds")
        seconds = min(seconds, MAX_EXPIRATION)
        sa = self.store.get_raw(_SA, name, namespace)  # 404 serviceaccounts "name" not found
        bound = self._bind(namespace, name, spec.get("boundObjectRef"))
        now = int(self.clock())
        claims: dict[str, Any] = {
            "aud": list(audiences), "exp": now + seconds, "iat": now, "nbf": now, "iss": ISSUER,
            "jti": str(uuid.uuid4()), "sub": f"system:serviceaccount:{namespace}:{name}",
            "kubernetes.io": {"namespace": namespace,
                              "serviceaccount": {"name": name, "uid": sa["metadata"]["uid"]}, **bound},
        }
        token = "" if dry_run else self._sign(claims)
        md = dict(body.get("metadata") or {})
        md.update(name=name, namespace=namespace, creationTimestamp=None)
        out_spec: dict[str, Any] = {"audiences": list(audiences), "expirationSeconds": seconds}
        if spec.get("boundObjectRef"):
            out_spec["boundObjectRef"] = spec["boundObjectRef"]
        return {"kind": "TokenRequest", "apiVersion": API_VERSION, "metadata": md, "spec": out_spec,
                "status": {"token": token, "expirationTimestamp": _rfc3339(now + seconds)}}

    def _bind(self, namespace: str, sa_name: str, ref: Any) -> dict:
        """The ``kubernetes.io`` claims of the bound object (``pod``/``secret``/``node``, a Pod's node)."""
        if ref is None:
            return {}
        if not isinstance(ref, dict):
            raise ApiError.bad_request("spec.boundObjectRef must be an object")
        kind, api_version, name = ref.get("kind") or "", ref.get("apiVersion") or "v1", ref.get("name") or ""
        if kind not in _BINDABLE or api_version != "v1":
            raise ApiError.bad_request(f"cannot bind token to object of type {api_version}, Kind={kind}")
        if not name:
            raise _invalid("spec.boundObjectRef.name", name, "a bound object needs a name")
        rt = BY_KEY[_BINDABLE[kind]]
        obj = self.store.get_raw(rt, name, namespace if rt.namespaced else None)  # 404 pods "name" not found
        uid = obj["metadata"]["uid"]
        if ref.get("uid") and ref["uid"] != uid:
            raise ApiError(409, "Conflict",
                           f'Operation cannot be fulfilled on {kind} "{name}": the UID in the bound object '
                           f'reference ({ref["uid"]}) does not match the UID in record. The object might have '
                           "been deleted and then recreated", {"name": name, "kind": kind})
        if kind == "Secret":
            return {"secret": {"name": name, "uid": uid}}
        if kind == "Node":
            return {"node": {"name": name, "uid": uid}}
        pod_sa = (obj.get("spec") or {}).get("serviceAccountName") or "default"
        if pod_sa != sa_name:
            raise ApiError.bad_request(f'cannot bind token for serviceaccount "{sa_name}" to pod running with '
                                       "different serviceaccount name.")
        claims: dict[str, Any] = {"pod": {"name": name, "uid": uid}}
        node = (obj.get("spec") or {}).get("nodeName") or ""
        if node:  # the pod's node at bind time; its uid too when the Node object exists (Kubernetes 1.30+)
            claims["node"] = {"name": node}
            try:
                claims["node"]["uid"] = self.store.get_raw(BY_KEY["nodes"], node)["metadata"]["uid"]
            except ApiError:
                pass
        return claims

    def _sign(self, claims: dict) -> str:
        header = _b64(json.dumps({"alg": "HS256", "kid": self._kid, "typ": "JWT"}, separators=(",", ":")).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(mac)}"

    # ---- TokenReview -------------------------------------------------------------------------

    def review(self, body: Any) -> dict:
        """Answer a TokenReview (the object posted as ``body``): ``status.authenticated`` and the user,
        or ``authenticated: false`` with ``status.error``; 400 without ``spec.token``."""
        if not isinstance(body, dict):
            raise ApiError.bad_request("request body must be a TokenReview object")
        kind = body.get("kind")
        if kind not in (None, "", "TokenReview"):
            raise ApiError.bad_request(f"the kind of the object ({kind}) does not match the URL (TokenReview)")
        spec = body.get("spec") or {}
        token = spec.get("token") if isinstance(spec, dict) else None
        if not token or not isinstance(token, str):
            raise ApiError.bad_request("token is required for TokenReview in authentication")
        wanted = spec.get("audiences") or [DEFAULT_AUDIENCE]
        if not isinstance(wanted, list) or not all(isinstance(a, str) for a in wanted):
            raise ApiError.bad_request("spec.audiences must be a list of strings")
        md = dict(body.get("metadata") or {})
        md["creationTimestamp"] = None
        out = {"kind": "TokenReview", "apiVersion": API_VERSION, "metadata": md,
               "spec": {"token": token, "audiences": spec.get("audiences") or []}}
        try:
            status = self.authenticate(token, wanted)
        except Refused as e:
            log.debug("token review refused: %s", e)
            status = {"authenticated": False, "user": {}, "error": f"[invalid bearer token, {e}]"}
        out["status"] = status
        return out

    def authenticate(self, token: str, audiences: list[str]) -> dict:
        """The TokenReview ``status`` of a valid token (``authenticated``, ``user``, ``audiences``: those
        of ``audiences`` the token carries); raises :class:`Refused` otherwise."""
        claims = self._verify(token)
        now = self.clock()
        if not isinstance(claims.get("exp"), int) or now >= claims["exp"]:
            raise Refused("service account token has expired")
        if isinstance(claims.get("nbf"), int) and now < claims["nbf"] - 60:  # kube-apiserver allows 60 s skew
            raise Refused("service account token is not valid yet")
        token_aud = claims.get("aud") or []
        matched = [a for a in audiences if a in token_aud]
        if not matched:
            raise Refused(f"token audiences {json.dumps(token_aud)} is invalid for the target audiences "
                          f"{json.dumps(audiences)}")
        kube = claims.get("kubernetes.io") or {}
        ns = kube.get("namespace") or ""
        sa = kube.get("serviceaccount") or {}
        self._check_live("serviceaccounts", sa, ns, "service account")
        extra: dict[str, list[str]] = {}
        if kube.get("pod"):
            self._check_live("pods", kube["pod"], ns, "bound pod")
            extra[_PREFIX + "pod-name"] = [kube["pod"]["name"]]
            extra[_PREFIX + "pod-uid"] = [kube["pod"]["uid"]]
        if kube.get("secret"):
            self._check_live("secrets", kube["secret"], ns, "bound secret")
        node = kube.get("node")
        if node:
            if node.get("uid"):  # bound to the Node, or the pod's Node existed at bind time: it must still
                self._check_live("nodes", node, "", "node")
                extra[_PREFIX + "node-uid"] = [node["uid"]]
            extra[_PREFIX + "node-name"] = [node["name"]]
        extra[_PREFIX + "credential-id"] = [f"JTI={claims.get('jti', '')}"]
        user = {"username": f"system:serviceaccount:{ns}:{sa['name']}", "uid": sa["uid"],
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
                "extra": extra}
        return {"authenticated": True, "user": user, "audiences": matched}

    def _verify(self, token: str) -> dict:
        parts = token.split(".")
        if len(parts) != 3:
            raise Refused("not a token issued by this API server")
        mac = hmac.new(self._key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        try:
            good = hmac.compare_digest(mac, _unb64(parts[2]))
            claims = json.loads(_unb64(parts[1])) if good else None
        except (ValueError, TypeError):
            good, claims = False, None
        if not good or not isinstance(claims, dict) or claims.get("iss") != ISSUER:
            raise Refused("not a token issued by this API server (bad signature)")
        return claims

    def _check_live(self, key: str, ref: Any, ns: str, what: str) -> None:
        """``ref`` (name, uid) still names a live object: not deleted, not replaced by another uid, not
        deleted more than a minute ago (a pod in its grace period still authenticates, as in Kubernetes)."""
        if not isinstance(ref, dict) or not ref.get("name"):
            raise Refused("service account token has been invalidated (malformed claims)")
        rt = BY_KEY[key]
        where = f"{ns}/{ref['name']}" if rt.namespaced else ref["name"]
        try:
            obj = self.store.get_raw(rt, ref["name"], ns if rt.namespaced else None)
        except ApiError:
            raise Refused(f"service account token has been invalidated ({what} {where} was deleted)") from None
        if obj["metadata"]["uid"] != ref.get("uid"):
            raise Refused(f"service account token has been invalidated ({what} {where} was replaced: "
                          f"uid {obj['metadata']['uid']}, the token names {ref.get('uid')})")
        deleted = obj["metadata"].get("deletionTimestamp")
        if deleted:
            when = _dt.datetime.strptime(deleted, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.UTC).timestamp()
            if when < self.clock() - _DELETED_GRACE:
                raise Refused(f"service account token has been invalidated ({what} {where} is being deleted)")


def authority(store: Store) -> TokenAuthority:
    """The store's token authority, made on first use (a server restarted on the store keeps its key)."""
    with store.lock:
        if store.tokens is None:
            store.tokens = TokenAuthority(store)
        return store.tokens


def route(parts: list[str]) -> tuple[str, str, str] | None:
    """``("request", ns, sa)`` for a ServiceAccount's ``token`` subresource, ``("review", "", "")`` for
    ``tokenreviews``, None for any other path (``parts``: the URL path's segments)."""
    if (len(parts) == 7 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "serviceaccounts"
            and parts[6] == "token"):
        return ("request", parts[3], parts[5])
    if parts == ["apis", GROUP, "v1", "tokenreviews"]:
        return ("review", "", "")
    return None


__all__ = ["DEFAULT_AUDIENCE", "DEFAULT_EXPIRATION", "MAX_EXPIRATION", "MIN_EXPIRATION", "Refused",
           "TokenAuthority", "authority", "route"]
