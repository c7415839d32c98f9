"""The linear patch: applying it to the original always gives the mutated document."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.patch import make_patch

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text("ab/~", max_size=3))
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text("ab/~c", max_size=3), inner, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_JSON, _JSON)
def test_any_two_documents(old: Any, new: Any) -> None:
    ops = make_patch(old, new)
    assert jsonpatch.apply_patch(copy.deepcopy(old), ops) == new


@settings(max_examples=200, deadline=None)
@given(st.lists(_JSON, max_size=6), st.integers(0, 6), st.lists(_JSON, min_size=1, max_size=3))
def test_inserted_items_are_adds(items: list[Any], at: int, extra: list[Any]) -> None:
    at = min(at, len(items))
    new = items[:at] + extra + items[at:]
    ops = make_patch({"l": items}, {"l": new})
    assert jsonpatch.apply_patch({"l": copy.deepcopy(items)}, ops) == {"l": new}
    assert all(op["op"] == "add" for op in ops)
    assert len(ops) == len(extra)


def test_keys_are_escaped_and_equal_documents_give_no_ops() -> None:
    old = {"metadata": {"annotations": {"a/b": "1"}}}
    new = {"metadata": {"annotations": {"a/b": "1", "modelcache.io/x~y": "2"}}}
    assert make_patch(old, new) == [
        {"op": "add", "path": "/metadata/annotations/modelcache.io~1x~0y", "value": "2"}
    ]
    assert make_patch(new, copy.deepcopy(new)) == []
    assert make_patch({"a": 1}, {"a": True}) == [{"op": "replace", "path": "/a", "value": True}]
