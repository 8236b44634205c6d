"""thoxd/api/conversations.py: stored responses, bounded by count and by size, LRU first out."""

from __future__ import annotations

from typing import Any

from thoxd.api.conversations import ResponseStore


def _response(rid: str, text: str = "hi") -> dict[str, Any]:
    message = {"id": f"msg_{rid}", "type": "message", "role": "assistant", "content": [text]}
    return {"id": rid, "object": "response", "output": [message]}


def _asked(text: str = "hello") -> list[dict[str, Any]]:
    return [{"id": "msg_in", "type": "message", "role": "user", "content": [text]}]


def test_a_stored_response_continues_its_whole_conversation() -> None:
    store = ResponseStore()
    assert store.put(_response("r1"), _asked())
    stored = store.get("r1")
    assert stored is not None
    assert [item["id"] for item in stored.conversation] == ["msg_in", "msg_r1"]
    assert stored.inputs == tuple(_asked())
    assert store.get("r2") is None


def test_the_least_recently_used_goes_first_past_the_count() -> None:
    store = ResponseStore(max_responses=2)
    store.put(_response("a"), _asked())
    store.put(_response("b"), _asked())
    assert store.get("a") is not None  # read: now more recent than b
    store.put(_response("c"), _asked())
    assert len(store) == 2
    assert store.get("b") is None
    assert store.get("a") is not None and store.get("c") is not None


def test_bytes_are_bounded_and_counted_back_on_delete() -> None:
    one = ResponseStore()
    one.put(_response("a", "x" * 1000), _asked())
    size = one.bytes
    store = ResponseStore(max_bytes=size * 2 + size // 2)
    for rid in "abc":
        store.put(_response(rid, "x" * 1000), _asked())
    assert len(store) == 2 and store.bytes == size * 2  # a went to make room for c
    assert store.get("a") is None
    assert store.delete("b") and not store.delete("b")
    assert store.bytes == size and len(store) == 1


def test_a_response_over_the_whole_bound_is_not_stored() -> None:
    store = ResponseStore(max_bytes=500)
    store.put(_response("small"), _asked())
    assert not store.put(_response("big", "x" * 1000), _asked())
    assert store.get("big") is None
    assert store.get("small") is not None  # nothing was evicted for it


def test_storing_an_id_again_replaces_it() -> None:
    store = ResponseStore()
    store.put(_response("a", "one"), _asked())
    first = store.bytes
    store.put(_response("a", "two!"), _asked())
    assert len(store) == 1 and store.bytes == first + 1
