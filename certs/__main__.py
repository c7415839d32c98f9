"""``python -m certs generate|install|ca``: the command-line edge of the certificate code.

Expected failures (an unwritable ``--out``, no cluster, an API error) print one line starting
with ``error:`` and exit non-zero, without a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from certs.issue import CertError, issue_bundle, issue_ca, write_bundle, write_ca
from sidecar.version import package_version

_EPILOG = """\
examples:
  python -m certs generate --service modelcache-webhook --namespace modelcache-system --out ./tls
  python -m certs install --service modelcache-webhook --namespace modelcache-system \\
      --secret modelcache-webhook-tls --webhook-config modelcache-webhook
  python -m certs ca --common-name modelcache-agents --out ./agents-ca"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m certs",
        description="Certificates for the modelcache webhook: a private CA and the serving "
        "pair the API server trusts through the webhook's caBundle.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s (modelcache) {package_version()}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="write a CA and serving pair as PEM files",
        description="Write ca.crt, tls.crt and tls.key (private key mode 0600) for the "
        "webhook Service's in-cluster names, plus any --dns/--ip you add.",
    )
    gen.add_argument("--service", required=True, help="Service name of the webhook")
    gen.add_argument("--namespace", required=True, help="namespace of the Service")
    gen.add_argument("--out", required=True, type=Path, help="directory for ca.crt/tls.*")
    gen.add_argument("--dns", action="append", default=[], help="extra DNS SAN (repeatable)")
    gen.add_argument("--ip", action="append", default=[], help="extra IP SAN (repeatable)")
    gen.add_argument("--days", type=int, default=365, help="leaf validity in days")

    ins = sub.add_parser(
        "install",
        help="keep the pair in a Secret and its CA in the webhook's caBundle",
        description="Create the Secret with a new CA and pair (or reuse it, renewing a "
        "pair close to expiry) and patch the CA into the MutatingWebhookConfiguration. Runs "
        "in a pod (service account) or with your kubeconfig; safe to run from every replica.",
    )
    ins.add_argument("--service", required=True, help="Service name of the webhook")
    ins.add_argument("--namespace", required=True, help="namespace of the Service and Secret")
    ins.add_argument("--secret", required=True, help="Secret that holds CA and pair")
    ins.add_argument(
        "--webhook-config", required=True, help="MutatingWebhookConfiguration to patch"
    )
    ins.add_argument("--days", type=int, default=365, help="leaf validity in days")
    ins.add_argument("--dns", action="append", default=[], help="extra DNS SAN (repeatable)")
    ins.add_argument(
        "--cert-dir", type=Path, default=None, help="also write ca.crt/tls.crt/tls.key here"
    )

    ca = sub.add_parser(
        "ca",
        help="write a new CA (ca.crt, ca.key) as PEM files",
        description="Write a self-signed CA and its key (mode 0600), e.g. the node agents' CA "
        "for peer fetch, from which each agent issues its own certificate at start. An "
        "existing ca.key in --out is never replaced.",
    )
    ca.add_argument("--common-name", required=True, help="the CA's subject common name")
    ca.add_argument("--out", required=True, type=Path, help="directory for ca.crt/ca.key")
    ca.add_argument("--days", type=int, default=3650, help="CA validity in days")
    return parser


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key in ("secret", "action"):
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        return json.dumps(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        if args.command == "generate":
            bundle = issue_bundle(
                args.service, args.namespace, dns=args.dns, ips=args.ip, days=args.days
            )
            try:
                write_bundle(bundle, args.out)
            except OSError as exc:
                print(f"error: cannot write to {args.out}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            print(f"wrote {args.out}/ca.crt, tls.crt, tls.key", file=sys.stderr)
            return 0
        if args.command == "ca":
            cert, key = issue_ca(args.common_name, days=args.days)
            try:
                write_ca(args.out, cert, key)
            except OSError as exc:
                print(f"error: cannot write to {args.out}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            print(f"wrote {args.out}/ca.crt, ca.key", file=sys.stderr)
            return 0
        return _install(args)
    except CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _install(args: argparse.Namespace) -> int:
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from certs.install import InstallError, describe_api_error, install

    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        # Outside a pod: the usual kubeconfig (read $KUBECONFIG now, not at import time).
        try:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=os.environ.get("KUBECONFIG") or None
            )
        except (k8s_config.ConfigException, OSError) as exc:
            print(f"error: not in a pod and no usable kubeconfig: {exc}", file=sys.stderr)
            return 1
    with k8s.ApiClient() as api:
        try:
            result = install(
                api,
                service=args.service,
                namespace=args.namespace,
                secret=args.secret,
                webhook_config=args.webhook_config,
                days=args.days,
                dns=args.dns,
                cert_dir=args.cert_dir,
            )
        except InstallError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except ApiException as exc:
            print(f"error: Kubernetes API: {describe_api_error(exc)}", file=sys.stderr)
            return 1
        except (HTTPError, OSError) as exc:
            print(f"error: cannot reach the Kubernetes API: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({"secret": result.secret_action, "caBundlePatched": result.ca_bundle_patched}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
