"""``python -m webhook serve|inject`` as a user runs them: exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.webhook_server import REPO, model_pod


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webhook", *args],
        cwd=REPO,
        input=stdin,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_needs_certs_or_dev() -> None:
    proc = _run("serve", "--port", "0")
    assert proc.returncode == 2
    assert "--tls-cert and --tls-key (or --dev)" in proc.stderr


def test_serve_reports_unusable_cert_files(tmp_path: Path) -> None:
    proc = _run(
        "serve",
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--tls-cert",
        str(tmp_path / "nope.crt"),
        "--tls-key",
        str(tmp_path / "nope.key"),
    )
    assert proc.returncode == 2
    assert "cannot load TLS pair" in proc.stderr
    assert "nope.crt" in proc.stderr


def test_serve_reports_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("onError: sometimes\n")
    proc = _run("serve", "--dev", "--port", "0", "--config", str(config))
    assert proc.returncode == 2
    assert "config" in proc.stderr
    assert "on_error" in proc.stderr or "onError" in proc.stderr


def test_serve_reports_a_taken_port(webhook_process: Any) -> None:
    first = webhook_process(["--dev"])
    proc = _run("serve", "--dev", "--host", "127.0.0.1", "--port", str(first.port))
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{first.port}" in proc.stderr


def test_serve_stops_cleanly_on_sigterm(webhook_process: Any) -> None:
    wp = webhook_process(["--dev"])
    assert wp.stop() == 0
    assert any('"shutting down"' in line for line in wp.stderr_lines)


def test_inject_file_and_stdin_give_the_same_pod(tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    pod = model_pod(name="llm")
    manifest.write_text(yaml.safe_dump(pod))
    from_file = _run("inject", "-f", str(manifest))
    from_stdin = _run("inject", "-f", "-", stdin=manifest.read_text())
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == from_stdin.stdout
    out = yaml.safe_load(from_file.stdout)
    assert out["metadata"]["labels"]["modelcache.io/injected"] == "true"


def test_inject_denial_exits_1_with_the_message(tmp_path: Path) -> None:
    pod = model_pod(name="llm")
    pod["metadata"]["annotations"]["modelcache.io/affinity"] = "always"
    proc = _run("inject", "-f", "-", stdin=yaml.safe_dump(pod))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "modelcache.io/affinity" in proc.stderr
    assert "always" in proc.stderr


def test_inject_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    proc = _run("inject", "-f", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr
    assert "missing.yaml" in proc.stderr
