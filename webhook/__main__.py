"""``python -m webhook serve|inject``: the admission server and the offline injector.

``serve`` binds its socket itself so ``--port 0`` works (tests and benchmarks take a free port
from the kernel) and prints the address it really listens on, ``serving on
https://HOST:PORT``, once the pipeline is warm (``/readyz`` is 200 by then). ``--dev`` first
writes a throw-away CA and serving pair for ``localhost``/``127.0.0.1`` to a temporary
directory, prints ``dev CA certificate: PATH``, so a laptop with no cluster can ``curl
--cacert`` it, and removes the directory when the server exits (also on SIGTERM/SIGINT).

``inject`` reads any number of files and directories (``-f a.yaml -f b.yaml``, ``-f a.yaml
b.yaml``, ``-f manifests/``: every ``*.yaml``, ``*.yml`` and ``*.json`` inside, sorted) and
writes every document, in order, to stdout; nothing is written when any input is unreadable,
not YAML, or denied. Expected errors print one line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from sidecar.version import package_version
from webhook.config import Config, ConfigError, load_config
from webhook.logs import setup_logging

log = logging.getLogger("webhook")

DEFAULT_PORT = 8443
#: where ``serve`` and ``inject`` read the config file from when ``--config`` is not given
CONFIG_ENV = "MODELCACHE_CONFIG"
# Seconds in-flight requests get to finish after SIGTERM; the API server's webhook timeout
# (timeoutSeconds <= 5) bounds how long any of them can matter anyway.
SHUTDOWN_GRACE_SECONDS = 5.0
#: What ``inject -f DIR`` reads from a directory.
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

_EPILOG = """\
examples:
  python -m webhook serve --dev                      try it on a laptop (prints the CA path)
  python -m webhook serve --tls-cert tls.crt --tls-key tls.key --config config.yaml
  python -m webhook inject -f deployment.yaml        what the webhook would do, offline
  python -m webhook inject -f a.yaml b.yaml -f manifests/ > injected.yaml
  kubectl get deploy llm -o yaml | python -m webhook inject -f -

docs: docs/webhook-server.md (limits, metrics, logs, events)"""


class ServeError(Exception):
    """The server cannot start (e.g. the address is taken); the message says why."""


class InputError(Exception):
    """An ``inject`` input cannot be used; the message names it and says why."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m webhook",
        description="modelcache admission webhook: makes LLM inference pods start from a "
        "node-local model cache. Run it as a server for the cluster, or offline on manifests.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s (modelcache) {package_version()}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the admission server (HTTPS, POST /mutate)",
        description="Run the admission server: POST /mutate for the API server, GET /healthz, "
        "/readyz and /metrics. TLS 1.2+ only; the certificate files are reloaded when they "
        "change. Timeouts and connection limits come from the config file "
        "(docs/webhook-server.md).",
    )
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on; 0 picks a free one"
    )
    serve.add_argument(
        "--host", default=None, help="address to bind (default 0.0.0.0; 127.0.0.1 with --dev)"
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain) to serve")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    serve.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get(CONFIG_ENV) or None,
        help=f"config YAML (every setting has a default; env {CONFIG_ENV})",
    )
    serve.add_argument(
        "--dev",
        action="store_true",
        help="make a throw-away CA and certificate for localhost instead of --tls-*; "
        "prints the CA path and deletes it all on exit",
    )
    serve.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO (one line per review), WARNING, ERROR"
    )
    serve.add_argument(
        "--offload-bytes",
        type=int,
        default=None,
        metavar="N",
        help="tuning: admit request bodies of N bytes or more off the event loop "
        "(default: see docs/webhook-server.md)",
    )
    serve.add_argument(
        "--workers",
        choices=("process", "thread"),
        default="process",
        help="tuning: where large pods are admitted (default process)",
    )

    inject = sub.add_parser(
        "inject",
        help="show what the webhook does to manifests, offline",
        description="Mutate the pods and pod templates (Pod, Deployment, StatefulSet, "
        "DaemonSet, ReplicaSet, Job, CronJob, List) in YAML or JSON manifests exactly as the "
        "server would, and print the result as YAML. Other kinds pass through unchanged. "
        "Warnings go to stderr; a denial prints the reason and writes nothing.",
    )
    inject.add_argument(
        "-f",
        "--filename",
        required=True,
        action="extend",
        nargs="+",
        metavar="PATH",
        help="a file, a directory (its *.yaml, *.yml, *.json, sorted) or - for stdin; "
        "repeat -f or list several",
    )
    inject.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get(CONFIG_ENV) or None,
        help=f"config YAML (every setting has a default; env {CONFIG_ENV})",
    )
    return parser


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


@contextmanager
def _dev_certs() -> Iterator[tuple[Path, Path, Path]]:
    """A throw-away CA and serving pair in a private temporary directory, removed on exit
    (the caller turns SIGTERM into a normal exit so this runs then too)."""
    from certs.issue import CA_CERT_FILE, TLS_CERT_FILE, TLS_KEY_FILE, issue_bundle, write_bundle

    out = Path(tempfile.mkdtemp(prefix="modelcache-dev-"))
    try:
        bundle = issue_bundle(
            "modelcache-webhook", "modelcache-system", dns=["localhost"], ips=["127.0.0.1", "::1"]
        )
        write_bundle(bundle, out)
        yield out / CA_CERT_FILE, out / TLS_CERT_FILE, out / TLS_KEY_FILE
    finally:
        shutil.rmtree(out, ignore_errors=True)


async def _serve(
    config: Config, args: argparse.Namespace, host: str, cert: Path, key: Path
) -> None:
    from webhook.app import build_app, serving
    from webhook.state import DEFAULT_OFFLOAD_BYTES, STATE
    from webhook.tls import CertReloader

    port: int = args.port
    reloader = CertReloader(cert, key)
    offload = DEFAULT_OFFLOAD_BYTES if args.offload_bytes is None else args.offload_bytes
    app = build_app(config, reloader=reloader, offload_bytes=offload, workers=args.workers)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serving(app, sock, reloader.context, shutdown_timeout=SHUTDOWN_GRACE_SECONDS):
        # The port is open (liveness answers, early reviews are served); announce the
        # address once the pipeline is warm, so whoever waits for this line gets a ready
        # server.
        warmed = asyncio.ensure_future(app[STATE].warmed_event.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait((warmed, stopped), return_when=asyncio.FIRST_COMPLETED)
        warmed.cancel()
        if not stop.is_set():
            bound = sock.getsockname()[1]
            shown = f"[{host}]" if family == socket.AF_INET6 else host
            print(f"serving on https://{shown}:{bound}", flush=True)
            log.info(
                "serving",
                extra={
                    "host": host,
                    "port": bound,
                    "cert_file": str(cert),
                    "header_timeout_s": config.header_timeout_seconds,
                    "body_timeout_s": config.body_timeout_seconds,
                    "idle_timeout_s": config.idle_timeout_seconds,
                    "max_connections": config.max_connections,
                    "max_requests_in_flight": config.max_requests_in_flight,
                },
            )
        try:
            await stopped
        finally:
            log.info("shutting down")


def _serve_signals_to_exit(signum: int, frame: Any) -> None:
    # Until the event loop takes the signals over (and after it lets go), SIGTERM ends the
    # process through the normal unwinding, so --dev's directory is removed.
    raise SystemExit(128 + signum)


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.dev:
        if args.tls_cert or args.tls_key:
            parser.error("--dev makes its own certificate; drop --tls-cert/--tls-key")
    elif not (args.tls_cert and args.tls_key):
        parser.error("serve needs --tls-cert and --tls-key (or --dev)")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    if args.offload_bytes is not None and args.offload_bytes < 0:
        parser.error(f"--offload-bytes must be >= 0, got {args.offload_bytes}")
    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        return _error(str(e), 2)
    host = args.host or ("127.0.0.1" if args.dev else "0.0.0.0")
    signal.signal(signal.SIGTERM, _serve_signals_to_exit)
    if not args.dev:
        return _run_server(config, args, host, Path(args.tls_cert), Path(args.tls_key))
    with _dev_certs() as (ca, cert, key):
        print(f"dev CA certificate: {ca}", flush=True)
        return _run_server(config, args, host, cert, key)


def _run_server(config: Config, args: argparse.Namespace, host: str, cert: Path, key: Path) -> int:
    from webhook.tls import TLSError

    try:
        asyncio.run(_serve(config, args, host, cert, key))
    except (TLSError, ServeError) as e:
        return _error(str(e), 2)
    except KeyboardInterrupt:  # Ctrl-C before the loop took SIGINT over
        return 130
    return 0


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (PyYAML's own text spans lines)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{exc.problem or exc.context or 'cannot parse'}{where}"
    return " ".join(str(exc).split())


def _expand(paths: list[str]) -> Iterator[str]:
    """Files in the order given; a directory's manifests sorted by name."""
    for name in paths:
        path = Path(name)
        if name != "-" and path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file()
            )
            if not found:
                raise InputError(f"{name}: no *.yaml, *.yml or *.json files in the directory")
            yield from (str(p) for p in found)
        else:
            yield name


def _read_documents(paths: list[str]) -> list[Any]:
    """Every non-empty YAML document of every input, in order."""
    docs: list[Any] = []
    stdin_used = False
    for name in _expand(paths):
        if name == "-":
            if stdin_used:
                raise InputError("- (stdin) given twice")
            stdin_used = True
            label, text = "stdin", sys.stdin.read()
        else:
            label = name
            try:
                text = Path(name).read_text(encoding="utf-8")
            except OSError as e:
                raise InputError(f"cannot read {name}: {e.strerror or e}") from None
            except UnicodeDecodeError as e:
                raise InputError(f"{name}: not UTF-8 text (byte {e.start})") from None
        try:
            docs.extend(d for d in yaml.safe_load_all(text) if d is not None)
        except yaml.YAMLError as e:
            raise InputError(f"{label}: not valid YAML: {_yaml_problem(e)}") from None
    return docs


def _cmd_inject(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        return _error(str(e), 2)
    try:
        docs = _read_documents(args.filename)
    except InputError as e:
        return _error(str(e), 2)
    from webhook.inject import dump_yaml, inject_documents

    result, warnings, denial = inject_documents(docs, config)
    for w in warnings:
        print(f"Warning: {w}", file=sys.stderr)
    if denial is not None:
        return _error(f"denied: {denial}", 1)
    if result:
        sys.stdout.write(dump_yaml(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _cmd_serve(args, parser)
    return _cmd_inject(args)


if __name__ == "__main__":
    sys.exit(main())
