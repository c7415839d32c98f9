"""Data affinity: steer the pod to nodes whose cache already holds its models.

The node agent labels a node ``cache.modelcache.io/<cache-key>=ready``. ``prefer`` adds one
preferred nodeAffinity term per model (weight 100 for the base model, 20 for the others: a
node with the base model matters most). ``require`` ANDs the expressions into every existing
required nodeSelectorTerm: terms are ORed, so appending a separate term would loosen the
user's scheduling instead of narrowing it. User affinity, nodeSelector and tolerations are
kept as they are.
"""

from __future__ import annotations

from typing import Any, Final

from webhook.annotations import NODE_LABEL_PREFIX
from webhook.mutations.context import Context, Pod

BASE_WEIGHT: Final = 100
EXTRA_WEIGHT: Final = 20


def node_label(cache_key: str) -> str:
    return f"{NODE_LABEL_PREFIX}{cache_key}"


def expression(cache_key: str) -> dict[str, Any]:
    return {"key": node_label(cache_key), "operator": "In", "values": ["ready"]}


def _dict_at(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        value = {}
        parent[key] = value
    return value


def _list_at(parent: dict[str, Any], key: str) -> list[Any]:
    value = parent.get(key)
    if not isinstance(value, list):
        value = []
        parent[key] = value
    return value


def add_affinity(pod: Pod, ctx: Context) -> Pod:
    mode = ctx.options.affinity
    if mode == "off":
        return pod
    spec = pod["spec"]
    node_aff = _dict_at(_dict_at(spec, "affinity"), "nodeAffinity")
    keys = [m.source.cache_key for m in ctx.named_models]
    if mode == "prefer":
        preferred = _list_at(node_aff, "preferredDuringSchedulingIgnoredDuringExecution")
        for i, key in enumerate(keys):
            term = {
                "weight": BASE_WEIGHT if i == 0 else EXTRA_WEIGHT,
                "preference": {"matchExpressions": [expression(key)]},
            }
            if term not in preferred:
                preferred.append(term)
        return pod
    required = _dict_at(node_aff, "requiredDuringSchedulingIgnoredDuringExecution")
    terms = _list_at(required, "nodeSelectorTerms")
    if not terms:
        terms.append({})
    for term in terms:
        if not isinstance(term, dict):
            continue
        exprs = _list_at(term, "matchExpressions")
        for key in keys:
            if expression(key) not in exprs:
                exprs.append(expression(key))
    if not ctx.config.agent_enabled:
        ctx.notes.warn(
            "modelcache.io/affinity=require but agentEnabled is false: no node gets "
            "cache.modelcache.io/* labels, so the pod stays Pending"
        )
    return pod
