"""The agent's own fetches through the Dragonfly daemon: a pre-warm entry filled through the
dfdaemon stand-in (``tests/fixtures/dragonfly.py``) counts its bytes as
``modelcache_fetch_bytes_total{via="dragonfly"}``, and a daemon that fails mid-stream leaves
the rest to the origin (``via="origin"``), the model complete either way."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.agent import Agent, AgentSettings, RetryPolicy, warm_can_wrap
from sidecar.modelsource import parse_model_arg
from tests.fixtures.dragonfly import dragonfly_daemon
from tests.fixtures.kube_nodes import FakeNodeAPI
from tests.fixtures.servers import ServedModel

pytestmark = pytest.mark.skipif(
    not warm_can_wrap(),
    reason="the fetch engine has no source wrapper yet (warm_models(wrap=...) comes with the "
    "peer-fetch routing); the Dragonfly source itself is tested in test_dragonfly.py",
)


def _bytes_by_via(agent: Agent) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(agent.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "modelcache_fetch_bytes_total":
                out[sample.labels["via"]] = sample.value
    return out


@pytest.mark.parametrize("abort_after", [None, 2])
async def test_prewarm_through_the_daemon(
    tmp_path: Path, kube_nodes: FakeNodeAPI, nginx_model: ServedModel, abort_after: int | None
):
    kube_nodes.add_node("n1")
    config = tmp_path / "prewarm.yaml"
    config.write_text(f"models:\n  - model: llm={nginx_model.url}\n")
    with dragonfly_daemon(piece=256 << 10) as daemon:
        daemon.faults.abort_after_pieces = abort_after
        agent = Agent(
            AgentSettings(
                cache_dir=tmp_path / "cache",
                node="n1",
                prewarm_config=config,
                dragonfly_socket=str(daemon.socket),
                retry=RetryPolicy(attempts=2, base=0.01, cap=0.05),
            ),
            kube_nodes.api_client(),
        )
        try:
            assert await agent.run(once=True) == 0
        finally:
            await agent.close()
    model = parse_model_arg(f"llm={nginx_model.url}")
    data = agent.cache.model_dir(model).data
    for rel, gen in nginx_model.info.files.items():
        assert hashlib.sha256((data / rel).read_bytes()).hexdigest() == gen.sha256
    total = nginx_model.info.total_bytes
    via = _bytes_by_via(agent)
    assert via["dragonfly"] + via["origin"] == total
    assert via["peer"] == 0
    if abort_after is None:
        assert via == {"origin": 0, "peer": 0, "dragonfly": total}
    else:
        assert via["origin"] > 0 and via["dragonfly"] > 0
    assert daemon.stats.tasks > 0
