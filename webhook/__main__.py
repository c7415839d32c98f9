"""``python -m webhook serve|inject``: the admission server and the offline injector.

``serve`` binds its socket itself so ``--port 0`` works (tests and benchmarks take a free port
from the kernel) and prints the address it really listens on, ``serving on
https://HOST:PORT``, once the pipeline is warm (``/readyz`` is 200 by then). ``--dev`` first
writes a throw-away CA and serving pair for ``localhost``/``127.0.0.1`` to a temporary
directory and prints ``dev CA certificate: PATH``, so a laptop with no cluster can ``curl
--cacert`` it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from webhook.config import Config, ConfigError, load_config
from webhook.logs import setup_logging

log = logging.getLogger("webhook")

DEFAULT_PORT = 8443
# Seconds in-flight requests get to finish after SIGTERM; the API server's webhook timeout
# (timeoutSeconds <= 5) bounds how long any of them can matter anyway.
SHUTDOWN_GRACE_SECONDS = 5.0


class ServeError(Exception):
    """The server cannot start (e.g. the address is taken); the message says why."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m webhook", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve POST /mutate over HTTPS (TLS 1.2+)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    serve.add_argument(
        "--host", default=None, help="address to bind (default 0.0.0.0; 127.0.0.1 with --dev)"
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain)")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key")
    serve.add_argument("--config", metavar="FILE", help="config YAML (defaults without)")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="make a throw-away CA and cert for localhost; prints the CA path",
    )
    serve.add_argument("--log-level", default="INFO")
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

    inject = sub.add_parser("inject", help="mutate the pods in YAML documents offline")
    inject.add_argument(
        "-f",
        "--filename",
        required=True,
        metavar="FILE|-",
        help="multi-document YAML; - reads stdin",
    )
    inject.add_argument("--config", metavar="FILE", help="config YAML (defaults without)")
    return parser


def _dev_certs() -> tuple[Path, Path, Path]:
    from certs.issue import CA_CERT_FILE, TLS_CERT_FILE, TLS_KEY_FILE, issue_bundle, write_bundle

    out = Path(tempfile.mkdtemp(prefix="modelcache-dev-"))
    bundle = issue_bundle(
        "modelcache-webhook", "modelcache-system", dns=["localhost"], ips=["127.0.0.1", "::1"]
    )
    write_bundle(bundle, out)
    return out / CA_CERT_FILE, out / TLS_CERT_FILE, out / TLS_KEY_FILE


async def _serve(
    config: Config, args: argparse.Namespace, host: str, cert: Path, key: Path
) -> None:
    from webhook.app import build_app, limits_of, serving
    from webhook.listener import describe as limits_fields
    from webhook.state import DEFAULT_OFFLOAD_BYTES, STATE
    from webhook.tls import CertReloader

    def limits(config: Config) -> dict[str, object]:
        return {
            **limits_fields(limits_of(config)),
            "body_timeout_s": config.body_timeout_seconds,
            "max_requests_in_flight": config.max_requests_in_flight,
        }

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
                extra={"host": host, "port": bound, "cert_file": str(cert), **limits(config)},
            )
        try:
            await stopped
        finally:
            log.info("shutting down")


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
        print(f"error: {e}", file=sys.stderr)
        return 2
    host = args.host or ("127.0.0.1" if args.dev else "0.0.0.0")
    if args.dev:
        ca, cert, key = _dev_certs()
        print(f"dev CA certificate: {ca}", flush=True)
    else:
        cert, key = Path(args.tls_cert), Path(args.tls_key)
    from webhook.tls import TLSError

    try:
        asyncio.run(_serve(config, args, host, cert, key))
    except TLSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_inject(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from webhook.inject import run_inject

    if args.filename == "-":
        return run_inject(sys.stdin, sys.stdout, sys.stderr, config)
    try:
        src = open(args.filename, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as e:
        print(f"error: cannot read {args.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    with contextlib.closing(src):
        return run_inject(src, sys.stdout, sys.stderr, config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _cmd_serve(args, parser)
    return _cmd_inject(args)


if __name__ == "__main__":
    sys.exit(main())
