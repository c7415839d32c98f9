"""Model auto-detection per framework and argument style."""

from __future__ import annotations

from typing import Any

import pytest

from webhook.mutations.detect import detect_container, detect_models, script_index

VLLM = "vllm/vllm-openai:v0.8.5"


def c(**kw: Any) -> dict[str, Any]:
    return {"name": "app", "image": "example.com/server:1", **kw}


@pytest.mark.parametrize(
    ("container", "framework", "uri"),
    [
        (c(command=["vllm", "serve", "org/m"]), "vllm", "hf://org/m@main"),
        (c(command=["vllm"], args=["serve", "org/m", "--port", "1"]), "vllm", "hf://org/m@main"),
        (c(image=VLLM, args=["--model", "org/m"]), "vllm", "hf://org/m@main"),
        (c(image=VLLM, args=["--model=org/m"]), "vllm", "hf://org/m@main"),
        (c(image=VLLM, args=["org/m", "--port", "8000"]), "vllm", "hf://org/m@main"),
        (
            c(command=["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "org/m"]),
            "vllm",
            "hf://org/m@main",
        ),
        (c(command=["sh", "-c", "exec vllm serve 'org/m' --port 8000"]), "vllm", "hf://org/m@main"),
        (c(command=["/bin/bash", "-lc", "vllm serve org/m"]), "vllm", "hf://org/m@main"),
        (
            c(command=["python3", "-m", "sglang.launch_server", "--model-path", "org/m"]),
            "sglang",
            "hf://org/m@main",
        ),
        (
            c(image="lmsysorg/sglang:v0.4", args=["--model-path", "s3://bkt/m"]),
            "sglang",
            "s3://bkt/m/",
        ),
        (c(command=["text-generation-launcher", "--model-id", "org/m"]), "tgi", "hf://org/m@main"),
        (
            c(
                image="ghcr.io/huggingface/text-generation-inference:3",
                env=[{"name": "MODEL_ID", "value": "org/m"}],
            ),
            "tgi",
            "hf://org/m@main",
        ),
        (
            c(command=["llama-server", "-m", "https://h.example/m/"]),
            "llama.cpp",
            "https://h.example/m/",
        ),
        (
            c(command=["llama-server", "--hf-repo", "org/m-GGUF:Q4_K_M"]),
            "llama.cpp",
            "hf://org/m-GGUF@main",
        ),
        (c(env=[{"name": "NIM_MODEL_PATH", "value": "hf://org/m@v2"}]), "nim", "hf://org/m@v2"),
    ],
)
def test_detected(container: dict[str, Any], framework: str, uri: str) -> None:
    found = detect_container(container)
    assert [(d.framework, d.uri) for d in found] == [(framework, uri)]


@pytest.mark.parametrize(
    "container",
    [
        c(command=["vllm", "serve", "/models/local"]),
        c(command=["vllm", "serve", "./rel"]),
        c(image=VLLM, args=["--port", "8000"]),
        c(command=["my-server", "--model", "org/m"]),  # unknown framework
        c(image="nginx", args=["--model", "org/m"]),
        c(command=["sh", "-c", "echo org/m"]),
        c(image=VLLM, command=["vllm", "serve", "gs://b/m"]),
    ],
)
def test_not_detected(container: dict[str, Any]) -> None:
    assert detect_container(container) == []


def test_detect_models_dedupes_and_names_uniquely() -> None:
    spec = {
        "containers": [
            {"name": "a", "image": VLLM, "args": ["--model", "org/m"]},
            {"name": "b", "image": VLLM, "args": ["--model", "org/m"]},
            {"name": "c", "image": VLLM, "args": ["--model", "other/m"]},
            {"name": "istio-proxy", "image": VLLM, "args": ["--model", "x/y"]},
        ]
    }
    models, detected = detect_models(spec)
    assert [(m.name, m.source.uri) for m in models] == [
        ("m", "hf://org/m@main"),
        ("m-2", "hf://other/m@main"),
    ]
    assert [d.container for d in detected] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("argv", "index"),
    [
        (["sh", "-c", "x"], 2),
        (["/bin/sh", "-ec", "x"], 2),
        (["bash", "-l", "-c", "x"], 3),
        (["sh", "script.sh"], None),
        (["vllm", "-c", "x"], None),
    ],
)
def test_script_index(argv: list[str], index: int | None) -> None:
    assert script_index(argv) == index
