"""RequestTracker: lookups of active and finished requests, the bounded history."""

from __future__ import annotations

from ollama_server.core.request_tracker import RequestTracker
from ollama_server.core.schemas import RequestState


def run(tracker: RequestTracker, rid: str, tokens: int = 1) -> None:
    tracker.start(rid, "m:latest", "openai")
    tracker.add_tokens(rid, tokens)
    tracker.finish(rid)


def test_get_finds_active_then_finished_requests() -> None:
    tracker = RequestTracker()
    tracker.start("a", "m:latest", "openai")
    assert tracker.get("a").state == RequestState.QUEUED
    tracker.finish("a", state=RequestState.FAILED, error="boom")
    status = tracker.get("a")
    assert status.state == RequestState.FAILED and status.error == "boom"
    assert tracker.get("nope") is None


def test_history_is_bounded_and_lookups_follow_it() -> None:
    tracker = RequestTracker(history=3)
    for i in range(5):
        run(tracker, f"r{i}")
    assert [s.id for s in tracker.recent()] == ["r4", "r3", "r2"]
    assert tracker.get("r0") is None and tracker.get("r1") is None
    assert tracker.get("r2").id == "r2"


def test_a_reused_id_finds_its_newest_run_until_that_one_leaves() -> None:
    tracker = RequestTracker(history=3)
    run(tracker, "same", tokens=1)
    run(tracker, "same", tokens=7)
    assert tracker.get("same").tokens_generated == 7
    run(tracker, "x")
    run(tracker, "y")  # the first "same" leaves the history; the second stays
    assert tracker.get("same").tokens_generated == 7
    run(tracker, "z")
    assert tracker.get("same") is None


def test_no_history() -> None:
    tracker = RequestTracker(history=0)
    run(tracker, "a")
    assert tracker.get("a") is None and tracker.recent() == []
