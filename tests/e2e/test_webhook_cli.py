"""``python -m webhook serve|inject`` as a user runs them: exit codes and messages."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
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


# --- several inputs, directories, one-line errors, --version, help, --dev cleanup ----------


def _pod_yaml(name: str) -> str:
    return yaml.safe_dump(model_pod(name=name))


def _names(stdout: str) -> list[str]:
    return [d["metadata"]["name"] for d in yaml.safe_load_all(stdout) if d]


def test_inject_takes_several_files_either_way(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.yaml" for n in "abc")
    for path in (a, b, c):
        path.write_text(_pod_yaml(f"llm-{path.stem}"))
    repeated = _run("inject", "-f", str(a), "-f", str(b), "-f", str(c))
    listed = _run("inject", "-f", str(a), str(b), "-f", str(c))
    assert repeated.returncode == 0, repeated.stderr
    assert _names(repeated.stdout) == ["llm-a", "llm-b", "llm-c"]
    assert listed.stdout == repeated.stdout
    for doc in yaml.safe_load_all(repeated.stdout):
        assert doc["metadata"]["labels"]["modelcache.io/injected"] == "true"


def test_inject_reads_a_directory_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.yml").write_text(_pod_yaml("llm-b"))
    (tmp_path / "a.yaml").write_text(_pod_yaml("llm-a"))
    (tmp_path / "c.json").write_text(json.dumps(model_pod(name="llm-c")))
    (tmp_path / "README.md").write_text("not a manifest: [")
    (tmp_path / "sub.yaml").mkdir()  # a directory named like a manifest is not read
    (tmp_path / "z.yaml").write_text("")  # an empty manifest adds no document
    proc = _run("inject", "-f", str(tmp_path), "-f", "-", stdin=_pod_yaml("llm-stdin"))
    assert proc.returncode == 0, proc.stderr
    assert _names(proc.stdout) == ["llm-a", "llm-b", "llm-c", "llm-stdin"]


def test_inject_writes_nothing_when_a_later_input_is_denied(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(_pod_yaml("llm-good"))
    pod = model_pod(name="llm-bad")
    pod["metadata"]["annotations"]["modelcache.io/affinity"] = "always"
    bad.write_text(yaml.safe_dump(pod))
    proc = _run("inject", "-f", str(good), str(bad))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "modelcache.io/affinity" in proc.stderr


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing", "cannot read {dir}/missing.yaml: No such file or directory"),
        ("bad_yaml", "{dir}/bad.yaml: not valid YAML: "),
        ("empty_dir", "{dir}/empty: no *.yaml, *.yml or *.json files in the directory"),
        ("binary", "{dir}/bin.yaml: not UTF-8 text"),
    ],
)
def test_inject_input_errors_are_one_line_without_traceback(
    tmp_path: Path, setup: str, expected: str
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(_pod_yaml("llm"))
    target = {
        "missing": tmp_path / "missing.yaml",
        "bad_yaml": tmp_path / "bad.yaml",
        "empty_dir": tmp_path / "empty",
        "binary": tmp_path / "bin.yaml",
    }[setup]
    if setup == "bad_yaml":
        target.write_text("kind: Pod\nmetadata: {name: [unclosed\n")
    elif setup == "empty_dir":
        target.mkdir()
    elif setup == "binary":
        target.write_bytes(b"\xff\xfe\x00kind")
    proc = _run("inject", "-f", str(good), str(target))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: " + expected.format(dir=tmp_path))
    assert "Traceback" not in proc.stderr


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\nspec:\n  containers: [\n")
    proc = _run("inject", "-f", str(bad))
    assert proc.returncode == 2
    assert re.search(r"not valid YAML: .* at line \d+, column \d+$", proc.stderr.strip())


@pytest.mark.parametrize("module", ["webhook", "certs"])
def test_version(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert re.fullmatch(rf"python -m {module} \(modelcache\) \d+\.\d+\.\d+\S*\n", proc.stdout)


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["--help"], ["serve", "inject", "examples:", "inject -f a.yaml b.yaml"]),
        (["serve", "--help"], ["--dev", "deletes it all on exit", "docs/webhook-server.md"]),
        (["inject", "--help"], ["a directory", "- for stdin", "Deployment"]),
    ],
)
def test_help_is_written_for_users(args: list[str], wanted: list[str]) -> None:
    proc = _run(*args)
    assert proc.returncode == 0
    for text in wanted:
        assert text in " ".join(proc.stdout.split()), text


def test_certs_generate_unwritable_out_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "certs",
            "generate",
            "--service",
            "s",
            "--namespace",
            "n",
            "--out",
            str(blocker / "tls"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: cannot write to {blocker / 'tls'}: Not a directory"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_dev_removes_its_tls_directory_on_exit(
    webhook_process: Any, sig: signal.Signals
) -> None:
    wp = webhook_process(["--dev"])
    line = next(x for x in wp.stdout_lines if x.startswith("dev CA certificate: "))
    directory = Path(line.removeprefix("dev CA certificate: ")).parent
    assert (directory / "tls.key").exists()
    wp.proc.send_signal(sig)
    assert wp.proc.wait(timeout=30) == 0
    assert not directory.exists()
