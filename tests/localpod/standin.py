"""Stand-in for an inference server process: ``python -m tests.localpod.standin FRAMEWORK ARGS``.

A test double for the vLLM/SGLang/TGI/llama.cpp process only (there is no GPU here): it
parses the framework's own arguments (so the webhook's rewrites are what it acts on), loads
every ``*.safetensors`` file under the model path with the ``safetensors`` library, copying
every tensor so all the bytes are really read, reads the other files (config, tokenizer)
whole, and only then listens and answers ``GET /v1/models`` with the served model name and
``GET /health``. The loading is real; the serving is not.

A hub id ``org/name`` is loaded the way the real servers load it, with the real Hugging Face
client: ``huggingface_hub.snapshot_download(org/name, revision=--revision,
cache_dir=--download-dir)``, which honours the container's ``HF_ENDPOINT``, ``HF_TOKEN`` and
cache variables (``HF_HUB_CACHE``, ``HF_HOME``) and returns the snapshot directory of the
Hugging Face cache: served from the cache when the files are there (modelcache's hub-cache
delivery), downloaded from the hub otherwise (the baseline of the cold-start benchmark).
Without ``HF_ENDPOINT`` it refuses, so it never reaches out of the machine. An
``http(s)://.../`` directory (nginx JSON autoindex) is downloaded file by file over one
connection into ``--download-dir`` (default ``$HF_HOME`` or ``~/.cache/huggingface``).

Under the local pod runner ``LOCALPOD_PORT_FILE`` is set: then it binds a free loopback port
instead of the one in its args (pods share the host network here) and writes
``{"requested": P, "port": ACTUAL}`` there once it listens.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_PORTS = {"vllm": 8000, "vllm-api": 8000, "sglang": 30000, "tgi": 80, "llama": 8080}


class UsageError(ValueError):
    """The framework arguments name no model or are malformed."""


@dataclass
class ServerArgs:
    model: str
    served_name: str
    host: str
    port: int
    download_dir: str | None
    revision: str | None = None


def _flag(argv: Sequence[str], *names: str) -> str | None:
    """Value of the last ``--name VALUE`` / ``--name=VALUE`` among ``names``."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def parse_server_args(framework: str, argv: Sequence[str]) -> ServerArgs:
    """Read model path, served name and port the way each framework's CLI does."""
    if framework not in DEFAULT_PORTS:
        raise UsageError(f"unknown framework {framework!r}; known: {', '.join(DEFAULT_PORTS)}")
    model: str | None = None
    served: str | None = None
    if framework == "vllm":
        if argv and argv[0] == "serve" and len(argv) > 1 and not argv[1].startswith("-"):
            model = argv[1]
        model = _flag(argv, "--model") or model
        served = _flag(argv, "--served-model-name")
    elif framework == "vllm-api":
        model = _flag(argv, "--model")
        served = _flag(argv, "--served-model-name")
    elif framework == "sglang":
        model = _flag(argv, "--model-path", "--model")
        served = _flag(argv, "--served-model-name")
    elif framework == "tgi":
        model = _flag(argv, "--model-id") or os.environ.get("MODEL_ID")
    elif framework == "llama":
        model = _flag(argv, "-m", "--model")
        served = _flag(argv, "-a", "--alias")
    if not model:
        raise UsageError(f"{framework}: no model given in {list(argv)}")
    port = _flag(argv, "--port") or os.environ.get("PORT") or str(DEFAULT_PORTS[framework])
    try:
        port_n = int(port)
    except ValueError:
        raise UsageError(f"{framework}: --port {port!r} is not a number") from None
    return ServerArgs(
        model=model,
        served_name=served or model,
        host=_flag(argv, "--host") or "0.0.0.0",
        port=port_n,
        download_dir=_flag(argv, "--download-dir"),
        revision=_flag(argv, "--revision")
        or (os.environ.get("REVISION") if framework == "tgi" else None),
    )


def _list_http(url: str) -> list[tuple[str, int]]:
    """Walk an nginx JSON autoindex: (relative path, size) of every file."""
    out: list[tuple[str, int]] = []
    with urllib.request.urlopen(url, timeout=30) as resp:
        entries = json.load(resp)
    for e in entries:
        name = e["name"]
        if "/" in name or name in (".", ".."):
            raise UsageError(f"refusing listing entry {name!r} at {url}")
        if e["type"] == "directory":
            out += [(f"{name}/{p}", s) for p, s in _list_http(url + urllib.parse.quote(name) + "/")]
        elif e["type"] == "file":
            out.append((name, int(e.get("size", 0))))
    return out


def hub_snapshot(repo: str, revision: str | None, cache_dir: str | None) -> Path:
    """The snapshot directory of hub model ``repo``, through ``huggingface_hub`` exactly as
    the servers call it: from the Hugging Face cache when it holds the files, else
    downloaded from ``$HF_ENDPOINT`` into that cache."""
    if not os.environ.get("HF_ENDPOINT"):
        raise UsageError(f"{repo} is no local directory and HF_ENDPOINT is not set (offline)")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # one line per event in logs
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    t0 = time.monotonic()
    try:
        path = Path(huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UsageError(f"snapshot_download({repo!r}) failed: {exc}") from None
    blobs = path.parent.parent / "blobs"
    downloaded = sum(p.stat().st_size for p in blobs.iterdir()) if blobs.is_dir() else 0
    print(
        f"standin: snapshot_download({repo!r}) -> {path} in {time.monotonic() - t0:.2f}s "
        f"({downloaded} bytes downloaded into the cache's blobs)",
        flush=True,
    )
    return path


def download(model: str, dest_root: Path) -> Path:
    """Single-stream download of a whole ``http(s)://`` directory; returns the local one."""
    base = model if model.endswith("/") else model + "/"
    files = _list_http(base)
    dest = dest_root / "standin" / hashlib.sha256(model.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    total = 0
    for rel, _size in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        src = base + urllib.parse.quote(rel)
        with urllib.request.urlopen(src, timeout=60) as resp, open(target, "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                total += len(chunk)
    dt = time.monotonic() - t0
    print(f"standin: downloaded {total} bytes in {dt:.2f}s (one stream)", flush=True)
    return dest


def load_weights(path: Path) -> tuple[int, int]:
    """Read the model as a server would: every tensor of every shard. (files, bytes)."""
    from safetensors import safe_open

    if not path.is_dir():
        raise UsageError(f"model path {path} is not a directory")
    files = nbytes = 0
    for root, dirs, names in os.walk(path, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            files += 1
            if name.endswith(".safetensors"):
                with safe_open(str(p), framework="numpy") as st:
                    for key in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                        nbytes += st.get_tensor(key).nbytes  # a copy: every byte is read
            else:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        nbytes += len(chunk)
    if files == 0:
        raise UsageError(f"model path {path} holds no files")
    return files, nbytes


def _handler(served_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/v1/models":
                body = {"object": "list", "data": [{"id": served_name, "object": "model"}]}
                self._send(200, body)
            elif self.path in ("/health", "/healthz", "/ready"):
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": "not found"})

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # readiness polls would flood the container log

    return Handler


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m tests.localpod.standin FRAMEWORK ARGS...", file=sys.stderr)
        return 2
    try:
        args = parse_server_args(argv[0], argv[1:])
        t0 = time.monotonic()
        local = Path(args.model)
        if args.model.startswith("/") and not local.is_dir():
            raise UsageError(f"model path {args.model} is not a directory")
        if not local.is_dir() and args.model.startswith(("http://", "https://")):
            root = args.download_dir or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            local = download(args.model, Path(root).expanduser())
        elif not local.is_dir():
            local = hub_snapshot(args.model, args.revision, args.download_dir)
        files, nbytes = load_weights(local)
    except (UsageError, OSError) as exc:
        print(f"standin: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"standin: weights loaded in {time.monotonic() - t0:.2f} s, {nbytes} bytes, "
        f"{files} files from {local}",
        flush=True,
    )

    port_file = os.environ.get("LOCALPOD_PORT_FILE")
    bind = ("127.0.0.1", 0) if port_file else (args.host, args.port)
    server = ThreadingHTTPServer(bind, _handler(args.served_name))
    if port_file:
        tmp = f"{port_file}.tmp"
        Path(tmp).write_text(json.dumps({"requested": args.port, "port": server.server_port}))
        os.replace(tmp, port_file)
    print(f"standin: serving {args.served_name!r} on port {server.server_port}", flush=True)

    def _stop(_sig: int, _frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
