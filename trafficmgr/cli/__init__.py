"""The ``trafficmgr`` command line.

Subcommands are registered, not hard-coded::

    from trafficmgr.cli import register_command

    def setup(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--xds-port", type=int, default=18000)

    def run(args: argparse.Namespace) -> int:
        ...
        return 0

    register_command("serve", "run the control plane", setup, run)

A module that registers commands at import time is listed in :data:`COMMAND_MODULES`; :func:`main`
imports each one (a module that does not exist is skipped, one that fails to import shows up as a command
that reports the import error). ``run`` returns the exit status (None = 0). It raises :class:`CliError`
(or ``PluginError``/``AdminError``) for bad input: :func:`main` prints ``trafficmgr: error: <message>``
on stderr, one line, and returns non-zero; any other exception prints one line plus a hint to rerun
with ``--log-level debug``, which prints the traceback.

A command registered with ``plugin_options=True`` (``serve``, ``agent``, ``bootstrap``) also takes the
options of its selected plugins (hook ``trafficmgr_add_arguments``). Which plugins those are depends on
the command line itself, so :func:`build_parser` is given the argv it will parse: :func:`preparse` reads
the command being run and its ``--plugins`` from it, and only that command's parser gets the options.

This package is the top layer: the library (``trafficmgr.core``), the plugins and the apps never import
it (tests/test_layers.py checks that).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import socket
import sys
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import attrs

from trafficmgr import __version__
from trafficmgr.cli import replicas
from trafficmgr.core import render
from trafficmgr.core.admin import DEFAULT_PORT as ADMIN_PORT
from trafficmgr.core.admin import DEFAULT_URL, AdminError
from trafficmgr.core.argtypes import listen_port, positive_seconds
from trafficmgr.core.plugins import ENV_SELECTION, PluginError, PluginHost, PluginInfo, available, is_builtin

log = logging.getLogger(__name__)

PROG = "trafficmgr"
#: Environment variable with the default for ``--server``.
ENV_SERVER = "TRAFFICMGR_SERVER"
ENV_TOKEN_FILE = "TRAFFICMGR_TOKEN_FILE"
#: Modules imported by :func:`main` so that they can call :func:`register_command`.
COMMAND_MODULES: list[str] = ["trafficmgr.cli.serve", "trafficmgr.cli.agent", "trafficmgr.cli.apps", "trafficmgr.cli.demo",
                              "trafficmgr.cli.bench", "trafficmgr.cli.identity", "trafficmgr.cli.dashboard"]
LOG_LEVELS = ("debug", "info", "warning", "error")


class CliError(Exception):
    """Bad input or an unreachable dependency; ``main`` prints the message and returns 1.

    ``http_status`` is set when the admin endpoint answered with an error status.
    """

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


@attrs.frozen
class Command:
    """One subcommand: ``setup(parser)`` adds its arguments, ``run(args)`` returns the exit status;
    ``plugin_options``: the selected plugins add theirs too (see :func:`register_command`)."""

    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    plugin_options: bool = False


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str,
    help: str,  # noqa: A002 - mirrors argparse
    setup: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    *,
    replace: bool = False,
    plugin_options: bool = False,
) -> None:
    """Add subcommand ``name``. Registering a taken name is a ``ValueError`` unless ``replace``.

    ``setup`` may add nested subcommands with ``parser.add_subparsers(...)``; ``run`` then dispatches on
    the parsed arguments.

    ``plugin_options``: when ``name`` is the command being run, the plugins its ``--plugins`` selects
    (``setup`` adds that option) are loaded while the parser is built and add their options
    (``trafficmgr_add_arguments(parser, command=name)``); ``run`` gets them with :func:`plugins_of`.
    """
    if name in COMMANDS and not replace:
        raise ValueError(f"command {name!r} is already registered")
    COMMANDS[name] = Command(name, help, setup, run, plugin_options)


_loaded_modules: set[str] = set()


def load_command_modules() -> None:
    """Import every module of :data:`COMMAND_MODULES` once (see the module docstring)."""
    for module in COMMAND_MODULES:
        if module in _loaded_modules:
            continue
        _loaded_modules.add(module)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                continue  # not written/installed yet
            _register_broken(module, exc)
        except Exception as exc:  # noqa: BLE001 - a broken command must not break the others
            _register_broken(module, exc)


def _register_broken(module: str, exc: BaseException) -> None:
    name = module.rsplit(".", 1)[-1].replace("_", "-")
    message = f"{name!r} is unavailable: importing {module} failed: {type(exc).__name__}: {exc}"
    log.debug("importing %s failed", module, exc_info=exc)
    if name in COMMANDS:
        return

    def run(args: argparse.Namespace) -> int:
        raise CliError(message)

    register_command(name, "(unavailable: import error; run it to see why)", lambda p: None, run)


# -- argument parsing ------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <message> (see '<prog> --help')``, status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _common() -> ArgumentParser:
    # A parent parser only lends its arguments; it is an ArgumentParser because the subparsers (parser_class)
    # take parents of their own class.
    common = ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help="log level (default: warning); debug also prints tracebacks")
    return common


@attrs.frozen
class Invocation:
    """What :func:`preparse` reads from a command line before the parser exists: the command it runs
    and that command's ``--plugins`` (None: not given)."""

    command: str | None = None
    plugins: str | None = None


class _PreparseError(Exception):
    pass


class _Preparser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _PreparseError(message)


def preparse(argv: Sequence[str]) -> Invocation:
    """The command ``argv`` runs and its ``--plugins`` value (``--plugins X``, ``--plugins=X``), read with
    ``parse_known_args`` and nothing else known; a command line these parsers reject gives
    ``Invocation()`` (the real parser then reports the error)."""
    top = _Preparser(add_help=False)
    top.add_argument("--log-level")
    top.add_argument("command", nargs="?")
    selection = _Preparser(add_help=False)
    selection.add_argument("--plugins")
    try:
        command = top.parse_known_args(list(argv))[0].command
        plugins = selection.parse_known_args(list(argv))[0].plugins
    except _PreparseError:
        return Invocation()
    return Invocation(command, plugins)


def build_parser(argv: Sequence[str] = ()) -> ArgumentParser:
    """The full parser with every registered command (call :func:`load_command_modules` first).

    ``argv`` is the command line the parser is for: if it runs a command registered with
    ``plugin_options``, that command's parser also has the options of the plugins its ``--plugins``
    selects (default: ``$TRAFFICMGR_PLUGINS`` or all installed). Without it (``trafficmgr --help``, the
    README's CLI reference) no command has plugin options.
    """
    invocation = preparse(argv)
    parser = ArgumentParser(prog=PROG, description="A label-driven Envoy xDS control plane for Kubernetes.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="warning",
                        help="log level (default: warning); debug also prints tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    common = _common()
    for name in sorted(COMMANDS):
        cmd = COMMANDS[name]
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, parents=[common])
        cmd.setup(p)
        p.set_defaults(_run=cmd.run)
        if cmd.plugin_options:
            p.set_defaults(_plugins=None)
            if invocation.command == name:
                _add_selected_plugin_options(p, name, invocation.plugins)
    return parser


def _add_selected_plugin_options(parser: argparse.ArgumentParser, command: str, selection: str | None) -> None:
    """Load the plugins ``selection`` names and let them add their options for ``command``. A selection
    that does not load adds nothing: :func:`plugins_of` loads it again in ``run`` and reports the error,
    so the command's other options and ``--help`` keep working."""
    try:
        host = PluginHost.load(selection)
    except Exception:  # noqa: BLE001 - reported by plugins_of() in run()
        return
    host.call_all("trafficmgr_add_arguments", parser=parser, command=command)
    parser.set_defaults(_plugins=host)


def plugins_of(args: argparse.Namespace) -> PluginHost:
    """The plugins of a ``plugin_options`` command: those loaded while its parser was built, else
    (a parser built without the argv, a selection that failed) ``PluginHost.load(args.plugins)``."""
    host: PluginHost | None = getattr(args, "_plugins", None)
    return host if host is not None else PluginHost.load(args.plugins)


def command_paths(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Leaf commands by their full path (``"plugins list"``, ``"labels"``) -> their parser."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walker
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, child in action.choices.items():
                path = f"{prefix} {name}".strip()
                out.update(command_paths(child, path) or {path: child})
    return out


# -- shared helpers --------------------------------------------------------------------------------


def _add_plugins_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugins", metavar="SEL", default=None,
                        help=f"comma-separated plugins to load (default: ${ENV_SELECTION} or all installed)")


def _add_server_option(parser: argparse.ArgumentParser) -> None:
    """The options naming the replicas to ask (see :mod:`trafficmgr.cli.replicas`)."""
    parser.add_argument("--admin", metavar="URL", action="append", default=None,
                        help="admin endpoint of a 'trafficmgr serve' replica; repeat it or separate URLs with commas "
                             f"to ask several replicas and merge their answers (default: ${ENV_SERVER} or {DEFAULT_URL}; "
                             "in a cluster: --discover, or kubectl port-forward deploy/<release> 18080)")
    parser.add_argument("--server", metavar="URL", action="append", default=None,
                        help="the same as --admin (its older name)")
    parser.add_argument("--discover", metavar="[NS/]SERVICE", default=None,
                        help="ask every replica behind this control plane Service (found through its EndpointSlices), "
                             "each through the API server's port-forward to its pod (needs list endpointslices and "
                             "create pods/portforward in NS; NS defaults to the kubeconfig context's namespace)")
    parser.add_argument("--kubeconfig", metavar="FILE", default=None, help="kubeconfig for --discover (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", metavar="NAME", default=None, help="kubeconfig context for --discover")
    parser.add_argument("--admin-port", metavar="PORT", type=listen_port, default=None,
                        help=f"with --discover: the admin port inside each replica pod (default {ADMIN_PORT})")
    parser.add_argument("--timeout", metavar="SECONDS", type=positive_seconds, default=10.0,
                        help="how long to wait for each replica (default 10)")
    parser.add_argument("--token-file", metavar="FILE", default=os.environ.get(ENV_TOKEN_FILE) or None,
                        help=f"bearer token for admin endpoints started with --admin-token-file (default: ${ENV_TOKEN_FILE})")


def _replicas(args: argparse.Namespace) -> tuple[list[replicas.Target], replicas.Asker]:
    """The replicas the options name, and an :class:`~trafficmgr.cli.replicas.Asker` for them.
    Raises :class:`CliError` for bad values, an unreadable token, a failed discovery."""
    token = _read_token(args.token_file)
    asker = replicas.Asker(token, args.timeout, unreachable=_unreachable, not_admin=_not_admin)
    if args.discover is not None:
        if args.admin or args.server:
            raise CliError("--discover finds the replicas itself: give it or --admin/--server, not both")
        return _discover(args, asker), asker
    if args.admin_port is not None or args.kubeconfig is not None or args.context is not None:
        raise CliError("--admin-port, --kubeconfig and --context go with --discover")
    urls: list[str] = []
    try:
        for flag, values in (("--admin", args.admin), ("--server", args.server)):
            urls += [u for u in replicas.admin_urls(values or (), functools.partial(normalize_server, flag=flag), flag)
                     if u not in urls]
        if not urls:
            default = os.environ.get(ENV_SERVER) or DEFAULT_URL
            urls = replicas.admin_urls([default], normalize_server, f"${ENV_SERVER}")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return [replicas.Target(name=u, url=u) for u in urls], asker


def _discover(args: argparse.Namespace, asker: replicas.Asker) -> list[replicas.Target]:
    from kubernetes.config import ConfigException

    from trafficmgr.core.kube.client import ApiException, KubeClient, load_api_client

    try:
        api_client = load_api_client(args.kubeconfig, args.context)
    except (ConfigException, OSError, ValueError) as exc:
        raise CliError(f"--discover: cannot load the kubeconfig: {exc}") from None
    try:
        namespace, service = replicas.parse_service(args.discover, _context_namespace(args.kubeconfig, args.context))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        targets = replicas.discover(KubeClient(api_client), namespace, service, args.admin_port or ADMIN_PORT)
    except LookupError as exc:
        raise CliError(str(exc.args[0])) from None
    except ApiException as exc:
        raise CliError(f"--discover: listing the EndpointSlices of {namespace}/{service} failed: HTTP {exc.status} "
                       f"{exc.reason}") from None
    except Exception as exc:  # noqa: BLE001 - urllib3 errors: the API server is unreachable
        raise CliError(f"--discover: cannot reach the API server at {api_client.configuration.host}: "
                       f"{type(exc).__name__}: {exc}") from None
    asker.api_client = api_client
    return targets


def _context_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace of the kubeconfig's ``context`` (default: the current one), else ``default``."""
    from kubernetes import config as k8s_config

    try:
        contexts, current = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
    except Exception:  # noqa: BLE001 - in-cluster config or no kubeconfig: the default namespace
        return "default"
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


def _read_token(path: str | None) -> str | None:
    """The token in ``path`` (stripped), None without a path; :class:`CliError` when unreadable or empty."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"--token-file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise CliError(f"--token-file: {path} is empty")
    return token


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def normalize_server(server: str, flag: str = "--server") -> str:
    """``host:port`` -> ``http://host:port``; raises :class:`CliError` (naming ``flag``) for anything but
    http(s) URLs."""
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = "http://" + server
    parts = urllib.parse.urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or parts.fragment:
        raise CliError(f"{flag} must be an http(s) URL such as {DEFAULT_URL}, not {server!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise CliError(f"{flag} has an invalid port: {server!r}") from None
    return server


def _not_admin(server: str, path: str) -> str:
    return f"unexpected answer from {normalize_server(server)}{path}: is it a trafficmgr admin endpoint? (use --server)"


def _unreachable(server: str, reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(reason, (TimeoutError, socket.timeout)):
        why = "timed out"
    elif isinstance(reason, socket.gaierror):
        why = f"unknown host {urllib.parse.urlsplit(server).hostname!r}"
    elif isinstance(reason, OSError) and reason.strerror:
        why = reason.strerror.lower()
    else:
        why = str(reason)
    return f"cannot reach the trafficmgr admin endpoint at {server}: {why} (is 'trafficmgr serve' running? use --server)"


def installed_plugins(host: PluginHost) -> list[PluginInfo]:
    """The loaded plugins of ``host`` plus installed-but-unselected ones (``loaded=False``, not imported),
    sorted by name. Includes the ``core`` pseudo-plugin (source ``core``)."""
    infos = dict(host.infos)
    for name, ep in available().items():
        if name not in infos:
            dist = ep.dist
            infos[name] = PluginInfo(
                name, ep.value, getattr(dist, "version", "") or "", getattr(dist, "name", "") or "",
                is_builtin(ep), (), loaded=False,
            )
    return sorted(infos.values(), key=lambda i: i.name)


# -- commands --------------------------------------------------------------------------------------


def _setup_plugins(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plugins_command", metavar="ACTION", required=True, parser_class=ArgumentParser)
    p = sub.add_parser("list", help="list installed plugins", description="List installed plugins (built-in and third-party).",
                       parents=[_common()])
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--hooks", action="store_true", help="show hook names instead of a count")
    _add_plugins_option(p)
    from trafficmgr.cli import scaffold

    scaffold.setup_new(sub.add_parser("new", help="create a plugin project", parents=[_common()],
                                      description="Write a ready-to-install plugin project trafficmgr-NAME/ "
                                                  "(entry point, one label, one hook, a test using the kit)."))


def _run_plugins(args: argparse.Namespace) -> int:
    if args.plugins_command == "new":
        from trafficmgr.cli import scaffold

        try:
            return scaffold.run_new(args)
        except scaffold.ScaffoldError as exc:
            raise CliError(str(exc)) from None
    infos = installed_plugins(PluginHost.load(args.plugins))
    _write(render.to_json([render.plugin_row(i) for i in infos]) if args.json else render.plugins_table(infos, args.hooks))
    return 0


def _setup_labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    _add_plugins_option(parser)


def _run_labels(args: argparse.Namespace) -> int:
    specs = PluginHost.load(args.plugins).labels.specs
    _write(render.to_json([render.label_row(s) for s in specs]) if args.json else render.labels_table(specs))
    return 0


def _setup_proxy_status(parser: argparse.ArgumentParser) -> None:
    _add_server_option(parser)
    parser.add_argument("--json", action="store_true", help="print the streams as JSON (the admin endpoints' rows, merged)")


def _report_failures(answers: list[replicas.Answer], level: str = "error") -> bool:
    """One stderr line per replica that did not answer; True if there was any."""
    failed = [a for a in answers if a.error is not None]
    for a in failed:
        print(f"{PROG}: {level}: {replicas.failure_line(a)}", file=sys.stderr)
    return bool(failed)


def _ask_status(targets: list[replicas.Target], asker: replicas.Asker) -> list[replicas.Answer]:
    """``/debug/proxy-status`` of every target; an answer that is not a list of objects is an error. With
    one target its failure is the command's error (:class:`CliError`, one line, as before replicas)."""
    answers = []
    for a in asker.get_all(targets, "/debug/proxy-status"):
        if a.error is None and not (isinstance(a.data, list) and all(isinstance(s, dict) for s in a.data)):
            where = a.target.url or f"pod {a.target.namespace}/{a.target.pod}"
            a = replicas.Answer(a.target, a.replica, error=replicas.ReplicaError(_not_admin(where, "/debug/proxy-status")))
        answers.append(a)
    if len(answers) == 1 and answers[0].error is not None:
        raise CliError(str(answers[0].error), http_status=answers[0].error.http_status)
    return answers


def _run_proxy_status(args: argparse.Namespace) -> int:
    targets, asker = _replicas(args)
    answers = _ask_status(targets, asker)
    streams = replicas.merge_status(answers, fill=len(targets) > 1)
    if args.json:
        _write(render.to_json(streams))
    elif not streams:
        if any(a.error is None for a in answers):
            print("No proxies connected.", file=sys.stderr)
    else:
        _write(render.proxy_status_table(streams))
    return 1 if _report_failures(answers) else 0


def _setup_config_dump(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-id", required=True, metavar="ID", help="Envoy node id (see 'trafficmgr proxy-status')")
    parser.add_argument("--type", choices=render.TYPES, default=None, help="only this resource type")
    parser.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="output format (default: yaml)")
    _add_server_option(parser)


def _run_config_dump(args: argparse.Namespace) -> int:
    """Ask every replica which holds the node's stream, then that replica for the node's resources;
    a node with no stream anywhere (a pod whose Envoy is not connected) from the first replica that
    knows it (every replica serves the same config)."""
    node_id = args.node_id.strip()
    if not node_id:
        raise CliError("--node-id is empty; 'trafficmgr proxy-status' lists connected nodes")
    targets, asker = _replicas(args)
    answers = _ask_status(targets, asker)
    found = replicas.holder(answers, node_id)
    candidates = ([found] if found else []) + sorted((a for a in answers if a.error is None and a is not found),
                                                     key=lambda a: a.replica)
    params = {"node_id": node_id, **({"type": args.type} if args.type else {})}
    for candidate in candidates:
        answer = asker.get(candidate.target, "/debug/config-dump", params)
        if answer.error is not None and answer.error.http_status == 404:
            continue
        if answer.error is not None:
            if len(targets) == 1:
                raise CliError(str(answer.error), http_status=answer.error.http_status)
            answers.append(answer)
            continue
        dump = answer.data
        if not isinstance(dump, dict) or "resources" not in dump:
            raise CliError(_not_admin(answer.target.url or answer.replica, "/debug/config-dump"))
        if len(targets) > 1:
            dump.setdefault("replica", answer.replica)
        _write(render.to_json(dump) if args.output == "json" else render.to_yaml(dump))
        _report_failures(answers, "warning")
        return 0
    _report_failures(answers)
    raise CliError(f"unknown node id {node_id!r}; 'trafficmgr proxy-status' lists connected nodes")


register_command("plugins", "list installed plugins or create a new one", _setup_plugins, _run_plugins)
register_command("labels", "list every traffic.* label of the loaded plugins", _setup_labels, _run_labels)
register_command("proxy-status", "sync state of every connected Envoy", _setup_proxy_status, _run_proxy_status)
register_command("config-dump", "resources the control plane serves a node", _setup_config_dump, _run_config_dump)


# -- entry point -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _logging(level: str) -> Iterator[None]:
    """Configure root logging for one ``main`` call and restore it afterwards (main runs in-process in
    tests and in ``demo``)."""
    root = logging.getLogger()
    old_level = root.level
    handler: logging.Handler | None = None
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.setLevel(old_level)
        if handler is not None:
            root.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status (0 ok, 1 error, 2 usage
    error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    load_command_modules()
    try:
        parser = build_parser(argv)
    except PluginError as exc:  # a selected plugin's trafficmgr_add_arguments failed: one line, no traceback
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    with _logging(args.log_level):
        try:
            return int(run(args) or 0)
        except (CliError, PluginError, AdminError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # e.g. `trafficmgr labels | head -1`: stop quietly
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except Exception as exc:  # noqa: BLE001 - never a traceback unless asked
            if args.log_level == "debug":
                traceback.print_exc()
            print(f"{PROG}: error: unexpected {type(exc).__name__}: {exc} (rerun with --log-level debug for the traceback)",
                  file=sys.stderr)
            return 1
