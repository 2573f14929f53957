"""The signing service of the control plane: gRPC ``/trafficmgr.identity.v1.Identity/Sign`` over TLS.

Request (UTF-8 JSON): ``{"csr": "<PEM>", "pod": {"namespace": ..., "name": ..., "uid": ...}}`` with metadata
``authorization: Bearer <ServiceAccount token>``. Response: ``{"certificate_chain": "<PEM>",
"trust_bundle": "<PEM>", "expires": "<RFC 3339>"}``.

Who gets a certificate (after a TokenReview of the token with audience ``--identity-audience``):

1. the **node agent** (username ``system:serviceaccount:<ns>:<sa>`` of ``--identity-agent-service-account``)
   for a pod on *its* node: the token's ``authentication.kubernetes.io/node-name`` extra (a token bound
   to the agent's pod carries its node) equals the pod's ``spec.nodeName``;
2. **the pod itself** (gateways, ``trafficmgr identity``): a token bound to that pod (pod-name and pod-uid
   extras equal the request's) of the pod's ServiceAccount.

In both cases the pod is read with a GET (never from a cache: a deleted or replaced pod gets nothing even
while a TokenReview result is cached), must have the request's uid and be live (not terminating, not
finished, not on the host network), and the CSR's one URI SAN must be the pod's SPIFFE ID.

Refusals: ``UNAUTHENTICATED`` (no or invalid token), ``PERMISSION_DENIED`` (with the precise reason),
``INVALID_ARGUMENT`` (bad JSON or CSR), ``UNAVAILABLE`` (CA not loaded, API server failing),
``RESOURCE_EXHAUSTED`` (a request over :data:`MAX_REQUEST_BYTES`, or over :data:`MAX_CONCURRENT` at once;
gRPC refuses those before this code runs). Each is counted in
``trafficmgr_certificate_requests_refused_total{reason}`` and logged once per (caller, reason) with the
reason, never with the token or the CSR.

Safety of the listener (``--identity-address``/``--identity-port``, default ``0.0.0.0:15012``): every pod
can reach it, and that is fine: it serves this one method and nothing else (no reflection, no health, no
admin), it signs only after the API server authenticated the caller's token and the checks above bound
the identity to a pod the caller runs (its node) or is, and it returns only public material (a
certificate chain for the caller's own key and the public trust bundle). Workload keys are made on the
nodes and never reach it; the CA key never leaves this process. Requests are bounded in size and
concurrency; TokenReview results are cached briefly (:data:`REVIEW_CACHE_SECONDS`, as the API server's
own token cache) and only when authenticated.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import attrs
import grpc

from trafficmgr.core import metrics
from trafficmgr.core.identity import DEFAULT_PORT, SERVICE
from trafficmgr.core.identity.ca import CAError, CSRError, MeshCA, ServingCredentials, check_csr
from trafficmgr.core.identity.spiffe import pod_service_account, spiffe_id
from trafficmgr.core.once import Seen

if TYPE_CHECKING:
    from trafficmgr.core.kube.client import KubeClient

log = logging.getLogger(__name__)

DEFAULT_AUDIENCE = "trafficmgr"
DEFAULT_AGENT_SERVICE_ACCOUNT = "trafficmgr-agent"
DEFAULT_TTL = datetime.timedelta(hours=24)
MIN_TTL = datetime.timedelta(seconds=60)
MAX_TTL = datetime.timedelta(days=365)
MAX_REQUEST_BYTES = 64 * 1024
MAX_CONCURRENT = 64
WORKERS = 4
REVIEW_CACHE_SECONDS = 10.0
REVIEW_CACHE_SIZE = 4096
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
_SA_PREFIX = "system:serviceaccount:"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> datetime.timedelta:
    """``24h``, ``90m``, ``60s``, ``1h30m``, ``1d`` (a plain number is seconds); raises ValueError."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return datetime.timedelta(seconds=float(text))
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m[1]) * _UNITS[m[2]]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"{text!r} is not a duration (examples: 24h, 90m, 60s, 1h30m)")
    return datetime.timedelta(seconds=total)


def check_ttl(text: str) -> datetime.timedelta:
    """A workload certificate lifetime, :data:`MIN_TTL` .. :data:`MAX_TTL`; raises ValueError."""
    ttl = parse_duration(text)
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError(f"{text} is outside 60s..{MAX_TTL.days}d")
    return ttl


def check_name(text: str, what: str = "name") -> str:
    if not _NAME.match(text):
        raise ValueError(f"{text!r} is not a valid {what} (lowercase letters, digits, '-' and '.')")
    return text


def check_namespace(text: str) -> str:
    if not _NAMESPACE.match(text):
        raise ValueError(f"{text!r} is not a namespace name (lowercase letters, digits and '-', at most 63)")
    return text


@attrs.frozen(slots=True)
class Review:
    """What a TokenReview said about a token."""

    authenticated: bool
    username: str = ""
    extra: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    audiences: tuple[str, ...] = ()
    error: str = ""

    def first(self, key: str) -> str:
        values = self.extra.get(key) or ()
        return values[0] if values else ""


class Refusal(Exception):
    """A request refused: the gRPC ``code``, the metric ``reason`` and the message for the caller (and log)."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.caller = ""  # the authenticated username, once known (for the log)


def _denied(reason: str, message: str) -> Refusal:
    return Refusal(grpc.StatusCode.PERMISSION_DENIED, reason, message)


@attrs.frozen(slots=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_request(body: bytes) -> tuple[str, PodRef]:
    """``(csr PEM, pod)`` of a Sign request; raises :class:`Refusal` INVALID_ARGUMENT."""

    def bad(message: str) -> Refusal:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, "bad_request", message)

    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("request is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise bad("request is not a JSON object")
    csr, pod = data.get("csr"), data.get("pod")
    if not isinstance(csr, str) or not csr:
        raise bad('request needs "csr": a PEM certificate signing request')
    if not isinstance(pod, dict):
        raise bad('request needs "pod": {"namespace", "name", "uid"}')
    ns, name, uid = pod.get("namespace"), pod.get("name"), pod.get("uid")
    if not isinstance(ns, str) or not _NAMESPACE.match(ns):
        raise bad(f"pod.namespace {ns!r} is not a namespace name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad(f"pod.name {name!r} is not a pod name")
    if not isinstance(uid, str) or not uid or len(uid) > 128:
        raise bad("pod.uid missing (the uid binds the request to one pod: a replaced pod gets nothing)")
    return csr, PodRef(ns, name, uid)


def authorize(review: Review, pod: Mapping[str, Any] | None, ref: PodRef, agent_username: str,
              trust_domain: str) -> tuple[str, str]:
    """Decide a Sign request from an authenticated TokenReview and the pod as the API server has it now
    (None: not found). Returns ``(the pod's SPIFFE ID, caller kind "agent" or "pod")``; raises
    :class:`Refusal` PERMISSION_DENIED with the precise reason."""
    if not review.username.startswith(_SA_PREFIX):
        raise _denied("not_authorized", f"{review.username or 'the caller'} is not a ServiceAccount")
    caller_ns, _, caller_sa = review.username[len(_SA_PREFIX):].partition(":")
    agent = review.username == agent_username
    if pod is None:
        raise _denied("pod_not_signable", f"pod {ref} does not exist")
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    if meta.get("uid") != ref.uid:
        raise _denied("pod_not_signable", f"pod {ref} has uid {meta.get('uid')}, not {ref.uid} (replaced)")
    if meta.get("deletionTimestamp"):
        raise _denied("pod_not_signable", f"pod {ref} is terminating")
    if status.get("phase") in ("Succeeded", "Failed"):
        raise _denied("pod_not_signable", f"pod {ref} has finished ({status.get('phase')})")
    if spec.get("hostNetwork"):
        raise _denied("pod_not_signable", f"pod {ref} runs on the host network (no workload identity there)")
    node = spec.get("nodeName") or ""
    if agent:
        token_node = review.first(EXTRA_NODE_NAME)
        if not token_node:
            raise _denied("not_authorized", "the agent's token names no node (use a projected token, which is "
                                            "bound to the agent's pod and carries its node)")
        if token_node != node:
            raise _denied("not_authorized", f"agent on {token_node} asked for pod {ref} on {node or 'no node'}")
    else:
        bound_name, bound_uid = review.first(EXTRA_POD_NAME), review.first(EXTRA_POD_UID)
        if not bound_name:
            raise _denied("not_authorized", f"{review.username} is not the node agent and its token is not bound "
                                            f"to pod {ref}")
        if (caller_ns, bound_name, bound_uid) != (ref.namespace, ref.name, ref.uid):
            raise _denied("not_authorized", f"token bound to pod {caller_ns}/{bound_name} (uid {bound_uid}) asked "
                                            f"for pod {ref} (uid {ref.uid})")
        if caller_sa != pod_service_account(pod):
            raise _denied("not_authorized", f"token of sa/{caller_sa} asked for pod {ref}, which runs as "
                                            f"sa/{pod_service_account(pod)}")
    return spiffe_id(trust_domain, ref.namespace, pod_service_account(pod)), "agent" if agent else "pod"


@attrs.frozen(slots=True)
class SignOptions:
    """The service's settings (``serve --identity-*``, ``--workload-cert-ttl``, ``--trust-domain``)."""

    trust_domain: str = "cluster.local"
    audience: str = DEFAULT_AUDIENCE
    agent_namespace: str = "trafficmgr"
    agent_service_account: str = DEFAULT_AGENT_SERVICE_ACCOUNT
    ttl: datetime.timedelta = DEFAULT_TTL

    @property
    def agent_username(self) -> str:
        return f"{_SA_PREFIX}{self.agent_namespace}:{self.agent_service_account}"


class IdentityService:
    """The Sign method (no transport): TokenReview, pod GET, :func:`authorize`, :meth:`MeshCA.sign`."""

    def __init__(self, ca: MeshCA, kube: KubeClient, options: SignOptions) -> None:
        self.ca = ca
        self.kube = kube
        self.options = options
        self._reviews: OrderedDict[bytes, tuple[float, Review]] = OrderedDict()
        self._reviews_lock = threading.Lock()
        self._logged = Seen(1024)

    # -- TokenReview -----------------------------------------------------------------------------

    def review(self, token: str) -> Review:
        """The TokenReview of ``token`` (authenticated results cached :data:`REVIEW_CACHE_SECONDS`)."""
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        with self._reviews_lock:
            hit = self._reviews.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        result = self._token_review(token)
        if result.authenticated:
            with self._reviews_lock:
                self._reviews[key] = (now + REVIEW_CACHE_SECONDS, result)
                self._reviews.move_to_end(key)
                while len(self._reviews) > REVIEW_CACHE_SIZE:
                    self._reviews.popitem(last=False)
        return result

    def _token_review(self, token: str) -> Review:
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        body = k8s.V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                                 spec=k8s.V1TokenReviewSpec(token=token, audiences=[self.options.audience]))
        try:
            answer = k8s.AuthenticationV1Api(self.kube.api).create_token_review(body, _request_timeout=10)
        except ApiException as exc:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "unavailable",
                          f"TokenReview failed: HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # noqa: BLE001 - connection errors come in many types
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "unavailable",
                          f"TokenReview failed: {type(exc).__name__}") from None
        status = answer.status
        if status is None:
            return Review(False, error="TokenReview returned no status")
        user = status.user
        extra = {k: tuple(v or ()) for k, v in ((user.extra if user else None) or {}).items()}
        return Review(bool(status.authenticated), username=(user.username if user else "") or "", extra=extra,
                      audiences=tuple(status.audiences or ()), error=status.error or "")

    # -- the method ------------------------------------------------------------------------------

    def get_pod(self, ref: PodRef) -> dict[str, Any] | None:
        from trafficmgr.core.kube.client import ApiException

        try:
            return self.kube.request("GET", f"/api/v1/namespaces/{ref.namespace}/pods/{ref.name}", timeout=10)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "unavailable",
                          f"cannot read pod {ref}: HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # noqa: BLE001
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "unavailable",
                          f"cannot read pod {ref}: {type(exc).__name__}") from None

    def sign(self, body: bytes, token: str | None) -> tuple[dict[str, str], str]:
        """Handle one request: ``(response, caller)``; raises :class:`Refusal` (``.caller`` set)."""
        caller = ""
        try:
            if not self.ca.ready:
                raise Refusal(grpc.StatusCode.UNAVAILABLE, "unavailable", f"mesh CA not ready: "
                              f"{self.ca.error or 'waiting for ' + self.ca.where}")
            if not token:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                              "no token (metadata authorization: Bearer <ServiceAccount token>)")
            csr_pem, ref = parse_request(body)
            review = self.review(token)
            if not review.authenticated:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                              f"token not accepted: {review.error or 'not authenticated'}"[:300])
            if self.options.audience not in review.audiences:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                              f"token is not for audience {self.options.audience}")
            caller = review.username
            try:
                checked = check_csr(csr_pem)
            except CSRError as exc:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "bad_csr", str(exc)) from None
            identity, _ = authorize(review, self.get_pod(ref), ref, self.options.agent_username,
                                        self.options.trust_domain)
            if checked.uri != identity:
                raise _denied("identity_mismatch", f"CSR asks for {checked.uri}, pod {ref} runs as "
                                                   f"sa/{identity.rpartition('/')[2]} ({identity})")
            try:
                chain, expires = self.ca.sign(checked, identity, self.options.ttl)
                bundle = self.ca.trust_bundle()
            except CAError as exc:
                raise Refusal(grpc.StatusCode.UNAVAILABLE, "unavailable", str(exc)) from None
            except CSRError as exc:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "bad_csr", str(exc)) from None
        except Refusal as refusal:
            refusal.caller = caller
            raise
        metrics.CERTIFICATES_SIGNED.inc()
        return {"certificate_chain": chain, "trust_bundle": bundle,
                "expires": expires.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}, caller

    def handle(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        """The gRPC handler (raw bytes in and out)."""
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                token = value[7:].strip()
        try:
            response, caller = self.sign(body, token)
        except Refusal as refusal:
            metrics.CERTIFICATE_REQUESTS_REFUSED.labels(refusal.reason).inc()
            who = refusal.caller or _peer_host(context.peer())
            if self._logged.first((who, refusal.message)):
                log.warning("certificate request refused (%s, %s): %s", who, refusal.code.name, refusal.message)
            context.abort(refusal.code, refusal.message)
        except Exception:  # a bug must not be reported as the client's fault
            metrics.CERTIFICATE_REQUESTS_REFUSED.labels("unavailable").inc()
            log.exception("Sign failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by the control plane)")
        log.debug("signed a certificate for %s", caller)
        return json.dumps(response).encode()


def _peer_host(peer: str) -> str:
    """``ipv4:10.0.0.5:41000`` -> ``10.0.0.5`` (the port changes per connection: log once per host)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host.strip("[]") or peer
    return peer


def serving_sans(dns_names: list[str], address: str) -> tuple[list[str], list[str]]:
    """The serving certificate's ``(DNS names, IPs)``: ``dns_names``, plus ``address`` when it is a
    specific IP, plus ``127.0.0.1`` when it listens on loopback or on every address."""
    import ipaddress

    ips: list[str] = []
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return list(dns_names), ips
    if not ip.is_unspecified:
        ips.append(str(ip))
    if (ip.is_loopback or ip.is_unspecified) and "127.0.0.1" not in ips:
        ips.append("127.0.0.1")
    return list(dns_names), ips


class IdentityServer:
    """The Sign service on its own gRPC server (TLS with a serving certificate from the mesh CA)."""

    def __init__(self, ca: MeshCA, kube: KubeClient, options: SignOptions, address: str = "0.0.0.0",
                 port: int = DEFAULT_PORT, dns_names: list[str] | None = None) -> None:
        self.ca = ca
        self.service = IdentityService(ca, kube, options)
        self.address = address
        self.requested_port = port
        self.port = 0
        dns, ips = serving_sans(dns_names or [], address)
        self.serving = ServingCredentials(ca, dns, ips)
        self._server: grpc.Server | None = None

    def start(self) -> IdentityServer:
        """Bind and serve (the CA must be loaded: :meth:`MeshCA.wait_ready`). Raises OSError when the
        address cannot be bound."""
        server = grpc.server(
            ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="identity"),
            maximum_concurrent_rpcs=MAX_CONCURRENT,
            options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0)],
        )
        handler = grpc.unary_unary_rpc_method_handler(self.service.handle)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Sign": handler}),))
        host = f"[{self.address}]" if ":" in self.address else self.address
        try:
            self.port = server.add_secure_port(f"{host}:{self.requested_port}", self.serving.credentials())
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.address}:{self.requested_port}: {exc}") from None
        if not self.port:
            raise OSError(f"cannot listen on {self.address}:{self.requested_port}")
        server.start()
        self._server = server
        log.info("mesh identity: Sign service on %s:%d (TLS), workload certificates for %s", self.address, self.port,
                 self.service.options.ttl)
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait(grace + 5)
            self._server = None
