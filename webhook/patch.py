"""The RFC 6902 patch between a pod and its mutated copy, in time linear in the pod's size.

A general JSON diff (``jsonpatch.make_patch``) looks for moved list items, which costs more
than the mutations themselves on a pod with thousands of containers. The mutations only add
keys, change values, append to lists and insert our containers at one place, so this diff
needs three list cases: same length (item by item), items inserted or appended between a
common head and tail (one ``add`` each), anything else (one ``replace`` of the list). Parts
that the working copy shares with the original (``managedFields`` and everything no
mutation touches) are the same objects and cost nothing.

``jsonpatch.JsonPatch(ops).apply(original)`` gives the mutated pod; the pipeline's tests and
the HTTP tests check exactly that.
"""

from __future__ import annotations

from typing import Any


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: ``1`` and ``true`` differ (Python's ``==`` says they are equal)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _pointer(path: str, key: str | int) -> str:
    token = str(key).replace("~", "~0").replace("/", "~1")
    return f"{path}/{token}"


def _diff_list(old: list[Any], new: list[Any], path: str, ops: list[dict[str, Any]]) -> None:
    if len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if not _equal(a, b):
                _diff(a, b, _pointer(path, i), ops)
        return
    head = 0
    limit = min(len(old), len(new))
    while head < limit and (old[head] is new[head] or old[head] == new[head]):
        head += 1
    tail = 0
    while tail < limit - head and (
        old[-1 - tail] is new[-1 - tail] or old[-1 - tail] == new[-1 - tail]
    ):
        tail += 1
    if head + tail == len(old) and len(new) > len(old):
        for i in range(head, len(new) - tail):
            ops.append({"op": "add", "path": _pointer(path, i), "value": new[i]})
        return
    ops.append({"op": "replace", "path": path, "value": new})


def _diff(old: Any, new: Any, path: str, ops: list[dict[str, Any]]) -> None:
    if old is new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": _pointer(path, key)})
        for key, value in new.items():
            if key not in old:
                ops.append({"op": "add", "path": _pointer(path, key), "value": value})
            elif not _equal(old[key], value):
                _diff(old[key], value, _pointer(path, key), ops)
        return
    if isinstance(old, list) and isinstance(new, list):
        _diff_list(old, new, path, ops)
        return
    if not _equal(old, new):
        ops.append({"op": "replace", "path": path, "value": new})


def make_patch(original: Any, mutated: Any) -> list[dict[str, Any]]:
    """The operations that turn ``original`` into ``mutated`` (empty when equal)."""
    ops: list[dict[str, Any]] = []
    _diff(original, mutated, "", ops)
    return ops
