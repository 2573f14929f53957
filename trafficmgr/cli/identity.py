"""``trafficmgr identity``: a pod fetching (and renewing) its own workload certificate, for proxies the node
agent does not run (the ingress gateway): the same key/CSR/Sign RPC as the agent
(:mod:`trafficmgr.core.identity.client`), authenticated by the pod's own token (a projected
ServiceAccount token bound to the pod, audience of the signing service), written with
:func:`trafficmgr.core.identity.files.write` below ``--dir`` (Envoy's working directory, shared with the
Envoy container, e.g. a memory-backed emptyDir).

``--once`` (an init container): get one certificate and exit 0, or exit 1 saying why. Otherwise it loops:
renewal at half-life, failures retried with capped, jittered backoff (logged; the pod has no Events
permission), the current certificate kept meanwhile. ``--check --dir D`` (probes): exit 0 while the
certificate below D is valid for at least another 10 % of its lifetime.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from trafficmgr.cli import CliError, register_command

if TYPE_CHECKING:
    from trafficmgr.core.identity.client import Issued

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
#: ``--check``: unhealthy once less than this share of the certificate's lifetime is left.
CHECK_LEFT = 0.10


def _setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", metavar="DIR", required=True,
                        help="the proxy's working directory: the identity goes to DIR/identity/ (key, chain, bundle, SDS files)")
    parser.add_argument("--check", action="store_true",
                        help="only check: exit 0 while DIR's certificate is valid for at least another 10%% of its lifetime")
    parser.add_argument("--token-file", metavar="FILE",
                        help="the pod's own ServiceAccount token (projected, bound to the pod, audience of the signing "
                             "service); re-read for every request")
    parser.add_argument("--ca-address", metavar="HOST:PORT", help="the control plane's signing service")
    parser.add_argument("--ca-server-name", metavar="NAME",
                        help="the name the signing service's certificate must carry (default: the host of --ca-address)")
    parser.add_argument("--bundle-file", metavar="FILE",
                        help="the mesh trust bundle (PEM; the ConfigMap trafficmgr-trust-bundle's ca.crt mounted as a "
                             "file): verifies the signing service; re-read for every request")
    parser.add_argument("--pod", metavar="NS/NAME", help="this pod (e.g. from the downward API: $(POD_NAMESPACE)/$(POD_NAME))")
    parser.add_argument("--pod-uid", metavar="UID", help="this pod's uid (downward API metadata.uid)")
    parser.add_argument("--service-account", metavar="NAME", help="this pod's ServiceAccount (the SPIFFE ID's sa/)")
    parser.add_argument("--trust-domain", metavar="DOMAIN", default="cluster.local",
                        help="SPIFFE trust domain, as 'serve --trust-domain' (default cluster.local)")
    parser.add_argument("--once", action="store_true", help="get one certificate and exit (an init container)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="per request (default 10)")
    parser.add_argument("--min-backoff", type=float, default=1.0, metavar="SECONDS",
                        help="first retry delay after a failure, doubled up to --max-backoff (default 1)")
    parser.add_argument("--max-backoff", type=float, default=60.0, metavar="SECONDS", help="(default 60)")


def _check(directory: str) -> int:
    from trafficmgr.core.identity import client, files

    chain = files.read_chain(directory)
    if chain is None:
        raise CliError(f"no certificate in {os.path.join(directory, files.DIRECTORY)} (yet)")
    validity = client.validity(chain)
    if validity is None:
        raise CliError(f"{os.path.join(directory, files.DIRECTORY, files.CERT)}: not a PEM certificate")
    not_before, not_after = validity
    now = dt.datetime.now(dt.UTC)
    left = (not_after - now) / (not_after - not_before) if not_after > not_before else 0
    if left < CHECK_LEFT:
        raise CliError(f"the certificate expires at {not_after:%Y-%m-%dT%H:%M:%SZ}: "
                       f"{max(left, 0) * 100:.0f}% of its lifetime left (renewal failing?)")
    print(f"valid until {not_after:%Y-%m-%dT%H:%M:%SZ} ({left * 100:.0f}% of its lifetime left)")
    return 0


def _run(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    from trafficmgr.core.access import check_trust_domain
    from trafficmgr.core.identity import client, files, spiffe

    if args.check:
        return _check(args.dir)
    required = {"--token-file": args.token_file, "--ca-address": args.ca_address, "--bundle-file": args.bundle_file,
                "--pod": args.pod, "--pod-uid": args.pod_uid, "--service-account": args.service_account}
    missing = [flag for flag, value in required.items() if not value]
    if missing:
        raise CliError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (or use --check)")
    namespace, sep, name = args.pod.partition("/")
    if not sep or not _NAME.match(namespace) or not _NAME.match(name):
        raise CliError(f"--pod {args.pod!r}: use NAMESPACE/NAME (e.g. $(POD_NAMESPACE)/$(POD_NAME))")
    if not _NAME.match(args.service_account):
        raise CliError(f"--service-account {args.service_account!r}: not a ServiceAccount name")
    if "$(" in args.pod_uid or any(c.isspace() or c == "/" for c in args.pod_uid):
        raise CliError(f"--pod-uid {args.pod_uid!r}: not a pod uid (is the POD_UID env var set from metadata.uid?)")
    try:
        check_trust_domain(args.trust_domain)
    except ValueError as exc:
        raise CliError(f"--trust-domain: {exc}") from None
    try:
        signer = client.SignClient(args.ca_address, args.token_file, args.ca_server_name or None, args.timeout)
    except ValueError as exc:
        raise CliError(f"--ca-address: {exc}") from None
    if not 0 < args.timeout <= 300 or not 0 < args.min_backoff <= args.max_backoff:
        raise CliError("--timeout must be in (0, 300] s and 0 < --min-backoff <= --max-backoff")
    for flag, path in (("--token-file", args.token_file), ("--bundle-file", args.bundle_file)):
        if not os.path.isfile(path):
            raise CliError(f"{flag} {path}: no such file")
    try:
        os.makedirs(args.dir, exist_ok=True)
    except OSError as exc:
        raise CliError(f"--dir {args.dir}: {exc.strerror or exc}") from None
    if not os.access(args.dir, os.W_OK):
        raise CliError(f"--dir {args.dir}: not writable")
    spiffe_id = spiffe.spiffe_id(args.trust_domain, namespace, args.service_account)
    pod = (namespace, name, args.pod_uid)

    def once() -> client.Issued:
        bundle = client.read_file(args.bundle_file)
        client.load_certs(bundle, f"--bundle-file {args.bundle_file}")
        issued = signer.issue(spiffe_id, pod, bundle)
        files.write(args.dir, issued.key_pem, issued.chain_pem, bundle, None)
        print(f"{spiffe_id}: certificate valid until {issued.not_after:%Y-%m-%dT%H:%M:%SZ} in "
              f"{os.path.join(args.dir, files.DIRECTORY)}", file=sys.stderr)
        return issued

    if args.once:
        try:
            once()
        except client.IdentityError as exc:
            raise CliError(str(exc)) from None
        return 0
    return _loop(once, args, stop)


def _loop(once: Callable[[], Issued], args: argparse.Namespace, stop: threading.Event | None) -> int:
    """Renew at half-life until SIGTERM/SIGINT (or ``stop``); returns 0."""
    from trafficmgr.core.agent.identity import MIN_RENEWAL_S, backoff
    from trafficmgr.core.identity import client, files
    from trafficmgr.core.signals import stop_on_signals

    stop = stop_on_signals(stop)
    failures = 0
    wait = 0.0
    chain = files.read_chain(args.dir)
    validity = client.validity(chain) if chain else None
    if validity is not None:  # a restart (or the init container's): renew at the current one's half-life
        issued_at = dt.datetime.fromtimestamp(os.stat(os.path.join(args.dir, files.DIRECTORY, files.CERT)).st_mtime, dt.UTC)
        wait = max(0.0, (client.renew_at(*validity, issued_at) - dt.datetime.now(dt.UTC)).total_seconds())
    while not stop.wait(wait):
        try:
            issued = once()
        except client.IdentityError as exc:
            failures += 1
            wait = backoff(failures, args.min_backoff, args.max_backoff)
            log.warning("renewing the certificate failed: %s; the current one stays; retrying in %.1fs", exc, wait)
            continue
        failures = 0
        wait = max(MIN_RENEWAL_S, (issued.renew_at() - dt.datetime.now(dt.UTC)).total_seconds())
        log.info("next renewal in %.0fs", wait)
    return 0


register_command("identity", "get and renew this pod's own workload certificate (gateways; sidecars get theirs from the agent)",
                 _setup, _run)
