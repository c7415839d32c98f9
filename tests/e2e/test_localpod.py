"""End to end on one machine: the vLLM example, injected by the real CLI, run as a local pod.

Real parts only: ``python -m webhook inject``, the node's CSI plugin (``python -m sidecar
csi``, called by the runner as the kubelet calls it), the warm-up and FUSE sidecar
(``python -m sidecar ...``) in their own mount namespaces as non-root users without
capabilities, nginx as a hub mirror on loopback (the plugin's hub, which also stands for the
Hub the app reaches by default), and the stand-in server loading the model with the real
``huggingface_hub.snapshot_download`` from the unchanged command line and reading every
tensor. Checked: hub-cache delivery: the app finds the model in its Hugging Face cache, laid
out by the sidecar with links through the FUSE view the plugin mounted, downloads nothing
itself and answers ``/v1/models`` with the original model name; a second pod on the same node
fetches no model bytes, the cold pod fetches each byte once (block and async), every volume
is unpublished and nothing (mount, process, created mountpoint) is left behind. The legacy
``nodeCache: hostPath`` output (privileged sidecar, root warm-up) still runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.modelgen import ModelInfo, generate_model
from tests.fixtures.nobody import open_to_others
from tests.localpod.example import VLLM_EXAMPLE, inject_example, mirror_secrets, plugin_env
from tests.localpod.mirror import Mirror, publish_hub_repo
from tests.localpod.runner import (
    HOST_MOUNTPOINTS,
    REPO_ROOT,
    LocalPod,
    Node,
    PodRun,
    RunnerError,
    mountpoints_under,
    scratch_node,
    uses_csi_driver,
)
from webhook.config import Config

EXAMPLE = Path(os.environ.get("MODELCACHE_LOCALPOD_EXAMPLE", VLLM_EXAMPLE))

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.nginx,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount namespaces and FUSE"),
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no /dev/fuse"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare(1)"),
    pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="no nginx (nginx-light)"),
]


def _inject(
    mode: str, example: Path = EXAMPLE, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return inject_example(example, {"modelcache.io/warmup": mode, **(annotations or {})})


def _kubelet(injected: dict[str, Any], node: Node, mirror: Mirror) -> dict[str, Any]:
    """How the runner runs ``injected`` on ``node``: with the node's CSI plugin (started
    here, the mirror as its hub) for the CSI output, with root allowed only for the legacy
    hostPath output."""
    csi = uses_csi_driver(injected)
    if csi and node.plugin is None:
        node.start_csi_plugin(env=plugin_env(mirror.url))
    return {
        "secrets": mirror_secrets(mirror.url),
        "hub_endpoint": mirror.url,
        "allow_root": not csi,
        "ready_timeout": 90,
    }


def _fuse_mount(lp: LocalPod) -> Path:
    """Where the FUSE view lives on the node: the CSI plugin's target (CSI output) or the
    emptyDir the privileged sidecar mounts on (legacy output)."""
    csi = "modelcache-fuse" in lp.volumes
    return lp.volume_path("modelcache-fuse" if csi else "modelcache-mnt")


def _assert_unprivileged_and_unpublished(lp: LocalPod, run: PodRun) -> None:
    """CSI output: no container ran as root, both volumes were published, then unpublished."""
    if "modelcache-fuse" not in lp.volumes:
        return
    assert all(i.uid != 0 and not i.privileged for i in lp.identities.values()), lp.identities
    ok = {(a.call, a.volume) for a in run.csi_calls if a.code == "OK"}
    for volume in ("modelcache-models", "modelcache-fuse"):
        assert {("publish", volume), ("unpublish", volume)} <= ok, run.csi_calls


def _assert_loaded_from_hub_cache(log: str, repo: str) -> None:
    """The stand-in's own lines: ``snapshot_download`` returned the snapshot the sidecar laid
    out (nothing downloaded by the client) and every tensor was read from there."""
    folder = "models--" + repo.replace("/", "--")
    assert f"snapshot_download({repo!r}) -> " in log, log
    assert "(0 bytes downloaded into the cache's blobs)" in log, log
    assert "weights loaded" in log and f"/{folder}/snapshots/" in log, log


def _status(injected: dict[str, Any]) -> dict[str, Any]:
    ann = injected["spec"]["template"]["metadata"]["annotations"]
    return dict(json.loads(ann["modelcache.io/status"]))


@pytest.fixture(autouse=True)
def _reachable_by_pod_users() -> Iterator[None]:
    """The pod's containers run as non-root users: they must reach the checkout and the
    virtual environment (the node is a ``scratch_node``, reachable already)."""
    with open_to_others(REPO_ROOT, Path(sys.prefix)):
        yield


@pytest.fixture
def node() -> Iterator[Node]:
    with scratch_node() as n:
        yield n


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    path = tmp_path_factory.mktemp("localpod-model") / "model"
    return generate_model(path, total_bytes=24 << 20, shards=3)


@pytest.fixture
def hub(tmp_path: Path, model: ModelInfo) -> Iterator[tuple[Path, Mirror]]:
    store = tmp_path / "store"
    store.mkdir()
    with Mirror(store) as mirror:
        yield store, mirror


@pytest.mark.parametrize("mode", ["block", "async"])
def test_injected_example_cold_then_warm_node(
    mode: str, node: Node, model: ModelInfo, hub: tuple[Path, Mirror]
) -> None:
    store, mirror = hub
    injected = _inject(mode)
    status = _status(injected)
    assert status["warmup"] == mode
    uri = status["models"][0]["uri"]
    assert uri.startswith("hf://"), f"the example should name a hub model, got {uri}"
    repo = uri.removeprefix("hf://").split("@", 1)[0]
    publish_hub_repo(store, repo, model)
    model_size = model.total_bytes
    init_names = [c["name"] for c in injected["spec"]["template"]["spec"]["initContainers"]]
    assert ("modelcache-warmup" in init_names) == (mode == "block")

    created_before = {p for p in ("/models", "/var/run/modelcache") if Path(p).exists()}
    pids: list[int] = []
    fetched = []
    for name in ("cold", "warm"):
        with LocalPod(
            injected,
            node,
            name=name,
            source_bytes=lambda: mirror.bytes_sent("/resolve/"),
            **_kubelet(injected, node, mirror),
        ) as lp:
            run = lp.run()
            # the app container reads through the FUSE view, which the plugin mounted on the
            # node (or, legacy, the privileged sidecar in its own namespace)
            mnt = _fuse_mount(lp)
            fstypes = [
                line.split(" - ")[1].split()[0]
                for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4] == str(mnt)
            ]
            assert any(t.startswith("fuse") for t in fstypes), fstypes
            assert run.served_models == [repo]
            app = next(c for c in run.containers if c.kind == "app")
            log = app.log.read_text()
            _assert_loaded_from_hub_cache(log, repo)
            pids += [c.pid for c in run.containers if c.pid is not None]
        _assert_unprivileged_and_unpublished(lp, run)
        fetched.append(run.bytes_fetched)
    assert fetched[0] == model_size, "the cold node fetches every byte exactly once"
    assert fetched[1] == 0, "the warm node fetches no model bytes"
    assert mountpoints_under(node.root) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} survived the pod"
    if not HOST_MOUNTPOINTS.others_running():  # else they are still in use elsewhere
        for p in ("/models", "/var/run/modelcache"):
            assert Path(p).exists() == (p in created_before), f"{p} left behind"


def test_tgi_example_loads_through_the_mount(
    node: Node, model: ModelInfo, hub: tuple[Path, Mirror]
) -> None:
    """The TGI example sets no command: the image's entrypoint (text-generation-launcher)
    runs with its own ``--model-id`` and finds the model in its hub cache."""
    store, mirror = hub
    injected = _inject("block", REPO_ROOT / "examples" / "tgi.yaml")
    repo = _status(injected)["models"][0]["uri"].removeprefix("hf://").split("@", 1)[0]
    publish_hub_repo(store, repo, model)
    with LocalPod(injected, node, name="tgi", **_kubelet(injected, node, mirror)) as lp:
        run = lp.run()
        app = next(c for c in run.containers if c.kind == "app")
        assert app.argv[0] == "text-generation-launcher"
        # hub-cache delivery: the arguments are the user's, byte for byte
        assert app.argv[app.argv.index("--model-id") + 1] == repo
        _assert_loaded_from_hub_cache(app.log.read_text(), repo)
        assert run.served_models == [repo]  # TGI names the model by its --model-id
    assert mountpoints_under(node.root) == []


def _fuse_mounted(path: Path) -> bool:
    """Is a FUSE filesystem mounted at ``path`` (seen from this, the host's, namespace)?"""
    return any(
        line.split()[4] == str(path) and line.split(" - ")[1].startswith("fuse")
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


@pytest.mark.parametrize("mode", ["block", "async"])
def test_classic_sidecar_blocks_the_app_until_its_post_start_passes(
    mode: str, node: Node, model: ModelInfo, hub: tuple[Path, Mirror]
) -> None:
    """``modelcache.io/sidecar: classic``: the sidecar is the first regular container and
    its postStart hook (``sidecar probe --wait``) holds the app back, as the kubelet does,
    until the mount answers; the app then loads every weight through it."""
    store, mirror = hub
    injected = _inject(mode, annotations={"modelcache.io/sidecar": "classic"})
    spec = injected["spec"]["template"]["spec"]
    assert not [c for c in spec.get("initContainers") or [] if c.get("restartPolicy")]
    first = spec["containers"][0]
    assert first["name"] == "modelcache-sidecar"
    assert "probe" in first["lifecycle"]["postStart"]["exec"]["command"]
    repo = _status(injected)["models"][0]["uri"].removeprefix("hf://").split("@", 1)[0]
    publish_hub_repo(store, repo, model)
    model_size = model.total_bytes
    with LocalPod(
        injected,
        node,
        name=f"classic-{mode}",
        source_bytes=lambda: mirror.bytes_sent("/resolve/"),
        **_kubelet(injected, node, mirror),
    ) as lp:
        run = lp.run()
        assert _fuse_mounted(_fuse_mount(lp))
        sidecar, app = run.container("modelcache-sidecar"), run.container("vllm")
        assert sidecar.hook_ok is not None and app.started is not None
        assert sidecar.hook_ok <= app.started, "the app started before postStart returned"
        assert run.served_models == [repo]
        log = app.log.read_text()
        _assert_loaded_from_hub_cache(log, repo)
        pids = [c.pid for c in run.containers if c.pid is not None]
    _assert_unprivileged_and_unpublished(lp, run)
    assert run.bytes_fetched == model_size, "the cold node fetches every byte exactly once"
    assert mountpoints_under(node.root) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} survived the pod"


def test_warmup_off_fetches_on_demand_through_the_mount(
    node: Node, model: ModelInfo, hub: tuple[Path, Mirror]
) -> None:
    """``modelcache.io/warmup: off``: no warm-up container; the app's reads through the
    mount fetch what they need, and it still serves the original name."""
    store, mirror = hub
    injected = _inject("off")
    spec = injected["spec"]["template"]["spec"]
    names = [c["name"] for c in [*(spec.get("initContainers") or []), *spec["containers"]]]
    assert "modelcache-warmup" not in names
    sidecar = next(c for c in spec.get("initContainers") or [] if c["name"] == "modelcache-sidecar")
    assert "--warmup" not in sidecar["command"]
    repo = _status(injected)["models"][0]["uri"].removeprefix("hf://").split("@", 1)[0]
    publish_hub_repo(store, repo, model)
    with LocalPod(
        injected,
        node,
        name="warmup-off",
        source_bytes=lambda: mirror.bytes_sent("/resolve/"),
        **_kubelet(injected, node, mirror),
    ) as lp:
        run = lp.run()
        assert run.served_models == [repo]
        log = run.container("vllm").log.read_text()
        _assert_loaded_from_hub_cache(log, repo)
    # the app read every tensor, so every weight file was fetched
    assert run.bytes_fetched is not None and run.bytes_fetched > 0
    _assert_unprivileged_and_unpublished(lp, run)
    assert mountpoints_under(node.root) == []


def test_legacy_hostpath_setting_still_runs_its_privileged_shape(
    node: Node, model: ModelInfo, hub: tuple[Path, Mirror], tmp_path: Path
) -> None:
    """``nodeCache: hostPath``: the legacy output (a privileged sidecar that mounts FUSE
    itself, a root warm-up, the cache as a hostPath) still starts; the runner lets exactly
    those containers be root, and the app still runs as a non-root user."""
    if "node_cache" not in Config.model_fields:
        pytest.skip("this webhook has no nodeCache setting (only the legacy shape)")
    store, mirror = hub
    config = tmp_path / "config.yaml"
    config.write_text("nodeCache: hostPath\n")
    injected = inject_example(EXAMPLE, {"modelcache.io/warmup": "block"}, config=config)
    assert not uses_csi_driver(injected)
    repo = _status(injected)["models"][0]["uri"].removeprefix("hf://").split("@", 1)[0]
    publish_hub_repo(store, repo, model)
    strict = {**_kubelet(injected, node, mirror), "allow_root": False}
    with LocalPod(injected, node, **strict) as lp, pytest.raises(RunnerError, match="runAsUser 0"):
        lp.run()
    with LocalPod(injected, node, name="legacy", **_kubelet(injected, node, mirror)) as lp:
        run = lp.run()
        assert _fuse_mounted(_fuse_mount(lp))
        assert run.served_models == [repo]
        assert lp.identities["modelcache-sidecar"].privileged
        assert lp.identities["vllm"].uid != 0
        _assert_loaded_from_hub_cache(run.container("vllm").log.read_text(), repo)
    assert mountpoints_under(node.root) == []
