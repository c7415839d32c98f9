"""Property: whatever a client sends to /mutate, the answer is never a 5xx and always
well-formed (400/413 with a reason, or a valid AdmissionReview whose patch applies).

The server runs once per module on a background loop (port 0) and hypothesis drives it with a
plain keep-alive HTTP client, so examples are cheap; the example counts keep the module well
under a minute on a shared 2-core machine.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import jsonpatch
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.webhook_server import make_app, make_review, model_pod
from webhook.config import Config

MAX_BYTES = 256 * 1024


class ThreadServer:
    """The app on its own event loop in a daemon thread, bound to 127.0.0.1:0."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._call(self.runner.setup())
        self._call(web.SockSite(self.runner, self.sock).start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    srv = ThreadServer(make_app(Config(max_request_bytes=MAX_BYTES)))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def conn(server: ThreadServer) -> Iterator[http.client.HTTPConnection]:
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    yield c
    c.close()


def _send(
    conn: http.client.HTTPConnection, body: bytes, content_type: str | None
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        conn.request("POST", "/mutate", body=body, headers=headers)
        resp = conn.getresponse()
    except (ConnectionError, http.client.HTTPException):
        # The server may close a connection after refusing a body it did not read (413);
        # that is allowed, so reconnect and ask again.
        conn.close()
        conn.request("POST", "/mutate", body=body, headers=headers)
        resp = conn.getresponse()
    data = resp.read()
    if resp.getheader("Connection", "").lower() == "close":
        conn.close()
    return resp.status, json.loads(data)


def _check(status: int, payload: Any, sent: Any) -> None:
    assert status in (200, 400, 413), (status, payload)
    if status != 200:
        assert isinstance(payload["reason"], str)
        assert payload["reason"]
        return
    request = sent["request"]
    assert payload["apiVersion"] == sent["apiVersion"]
    assert payload["kind"] == sent["kind"]
    response = payload["response"]
    assert response["uid"] == request["uid"]
    assert isinstance(response["allowed"], bool)
    assert set(response) <= {"uid", "allowed", "patchType", "patch", "warnings", "status"}
    if "warnings" in response:
        assert all(isinstance(w, str) for w in response["warnings"])
    if not response["allowed"]:
        assert response["status"]["message"]
        assert "patch" not in response
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"], validate=True))
        assert ops
        jsonpatch.apply_patch(copy.deepcopy(request["object"]), ops)
    else:
        assert "patchType" not in response


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "modelcache.io/model",
        "modelcache.io/warmup",
        "modelcache.io/warmup-timeout",
        "modelcache.io/warmup-include",
        "modelcache.io/affinity",
        "modelcache.io/rewrite",
        "modelcache.io/containers",
        "modelcache.io/sidecar",
        "modelcache.io/mount-path",
        "modelcache.io/status",
        "modelcache.io/bogus",
        "other.io/x",
    ]
)
_values = st.sampled_from(
    [
        "hf://org/model",
        "hf://org/model@main",
        "s3://bucket/prefix",
        "https://host/path/",
        "pvc://claim/sub",
        "base=hf://a/b,lora=s3://c/d",
        "block",
        "async",
        "off",
        "prefer",
        "require",
        "native",
        "classic",
        "auto",
        "/models",
        "10",
        "-1",
        "app,other",
        "*.json",
        "",
    ]
) | st.text(max_size=40)
_args = st.lists(
    st.sampled_from(
        [
            "vllm",
            "serve",
            "--model",
            "--model=org/m",
            "org/m",
            "-m",
            "--model-path",
            "--model-id",
            "--hf-repo",
            "hf://a/b",
            "/models/x",
            "--served-model-name",
            "--port",
            "8000",
        ]
    )
    | st.text(max_size=15),
    max_size=8,
)
_env = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["MODEL_ID", "NIM_MODEL_PATH", "HF_TOKEN", "X"])
            | st.text(max_size=8)
        },
        optional={"value": st.text(max_size=20) | json_values},
    ),
    max_size=3,
)
_container = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["app", "vllm", "modelcache-sidecar", "istio-proxy"])
        | st.text(max_size=10)
    },
    optional={
        "image": st.sampled_from(["vllm/vllm-openai", "ghcr.io/ggerganov/llama.cpp", "nginx"]),
        "args": _args | json_values,
        "command": st.just(["sh", "-c"]) | _args,
        "env": _env | json_values,
        "volumeMounts": st.lists(
            st.fixed_dictionaries({"name": st.text(max_size=8), "mountPath": st.text(max_size=12)}),
            max_size=2,
        ),
        "restartPolicy": st.sampled_from(["Always", "Never"]),
    },
)
_pods = st.fixed_dictionaries(
    {"apiVersion": st.just("v1"), "kind": st.just("Pod")},
    optional={
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "name": st.text(max_size=12),
                "generateName": st.just("llm-"),
                "namespace": st.text(max_size=8),
                "annotations": st.none()
                | st.dictionaries(_keys, _values, max_size=5)
                | json_values,
                "labels": st.none()
                | st.dictionaries(st.sampled_from(["modelcache.io/inject", "app"]), _values),
            },
        )
        | json_values,
        "spec": st.fixed_dictionaries(
            {},
            optional={
                "containers": st.lists(_container | json_values, max_size=3),
                "initContainers": st.lists(_container, max_size=2) | json_values,
                "hostNetwork": st.booleans(),
                "volumes": st.lists(
                    st.fixed_dictionaries({"name": st.text(max_size=8)}), max_size=2
                ),
                "affinity": json_values,
                "nodeSelector": st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
            },
        )
        | json_values,
    },
)


@st.composite
def reviews(draw: st.DrawFn) -> dict[str, Any]:
    pod = draw(_pods | st.just(model_pod()) | json_values)
    doc = make_review(
        pod,
        operation=draw(st.sampled_from(["CREATE", "CREATE", "CREATE", "UPDATE", "DELETE", ""])),
        namespace=draw(st.none() | st.sampled_from(["ml", ""]) | st.text(max_size=8)),
        uid=draw(st.text(min_size=1, max_size=40)),
        dry_run=draw(st.none() | st.booleans()),
    )
    damage = draw(st.sampled_from(["none", "none", "drop", "retype", "huge"]))
    target = draw(st.sampled_from([doc, doc["request"]]))
    key = draw(st.sampled_from(sorted(target)))
    if damage == "drop":
        del target[key]
    elif damage == "retype":
        target[key] = draw(json_values)
    elif damage == "huge":
        target[key] = "x" * draw(st.sampled_from([10_000, MAX_BYTES - 100, MAX_BYTES + 10]))
    return doc


_settings = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


@_settings
@given(doc=reviews())
def test_random_reviews_get_a_well_formed_answer(
    conn: http.client.HTTPConnection, doc: dict[str, Any]
) -> None:
    status, payload = _send(conn, json.dumps(doc).encode(), "application/json")
    if status == 200:
        _check(status, payload, doc)
    else:
        _check(status, payload, None)


@_settings
@given(
    body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
    content_type=st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            None,
            "text/plain",
            "application/x-yaml",
        ]
    ),
)
def test_random_bodies_never_5xx(
    conn: http.client.HTTPConnection, body: bytes, content_type: str | None
) -> None:
    status, payload = _send(conn, body, content_type)
    assert status in (400, 413), (status, payload)
    assert payload["reason"]
