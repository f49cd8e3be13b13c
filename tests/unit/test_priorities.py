"""Priority classes (issue 24 item 5), one layer at a time: the admission queue's order, aging
and positions; the api_keys forms that carry a priority."""

from __future__ import annotations

import threading
import time

import pytest

from ollama_server.config import ConfigError, load_config
from ollama_server.models.admission import AGING_S, SlotQueue
from tests.helpers import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def waiter(queue: SlotQueue, order: list[str], name: str, priority: int) -> threading.Thread:
    def run() -> None:
        queue.enter("m", 1, 10, timeout=1e9, priority=priority, request_id=name)
        order.append(name)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_higher_classes_are_served_first_in_arrival_order_within_a_class():
    queue, order = SlotQueue(), []
    queue.enter("m", 1, 10, timeout=1)  # the one slot is busy
    threads = []
    for name, priority in (("low", -1), ("normal-1", 0), ("high", 1), ("normal-2", 0)):
        threads.append(waiter(queue, order, name, priority))
        wait_for(lambda n=name: n in queue.positions(), f"{name} in line", 5)
    places = {rid: p["position"] for rid, p in queue.positions().items()}
    assert places == {"high": 1, "normal-1": 2, "normal-2": 3, "low": 4}
    assert {p["waiting"] for p in queue.positions().values()} == {4}
    for expected in ("high", "normal-1", "normal-2", "low"):
        queue.leave("m")
        wait_for(lambda e=expected: order and order[-1] == e, f"{expected} admitted", 5)
    for thread in threads:
        thread.join(5)
    assert order == ["high", "normal-1", "normal-2", "low"]


def test_waiting_lifts_a_low_class_over_newer_high_ones():
    clock = Clock()
    queue, order = SlotQueue(clock), []
    queue.enter("m", 1, 10, timeout=1)
    waiter(queue, order, "low", -1)
    wait_for(lambda: "low" in queue.positions(), "low in line", 5)
    clock.now += 2.5 * AGING_S  # low has earned 2.5 classes: -1 + 2.5 > 1
    waiter(queue, order, "high", 1)
    wait_for(lambda: "high" in queue.positions(), "high in line", 5)
    assert queue.positions()["low"]["position"] == 1
    queue.leave("m")
    wait_for(lambda: order == ["low"], "the low request first", 5)
    queue.leave("m")
    wait_for(lambda: order == ["low", "high"], "then the high one", 5)


def test_a_request_that_leaves_the_line_leaves_its_place():
    queue = SlotQueue()
    queue.enter("m", 1, 10, timeout=1)
    gone = threading.Event()
    errors = []

    def run() -> None:
        try:
            queue.enter("m", 1, 10, timeout=1e9, abandoned=gone.is_set, request_id="r1")
        except Exception as exc:  # noqa: BLE001 - checked below
            errors.append(type(exc).__name__)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: "r1" in queue.positions(), "r1 in line", 5)
    gone.set()
    thread.join(5)
    assert errors == ["Cancelled"] and queue.positions() == {}


def test_api_keys_carry_priorities(tmp_path):
    config = load_config(overrides={"api_keys": {
        "ci": {"key": "k1", "priority": "low"}, "boss": {"key": "k2", "priority": 5},
        "plain": "k3"}}, environ={})
    assert config.api_key_entries() == {"ci": "k1", "boss": "k2", "plain": "k3"}
    assert [config.key_priority(n) for n in ("ci", "boss", "plain", None, "nobody")] == \
        [-1, 5, 0, 0, 0]
    keys = tmp_path / "keys"
    keys.write_text("alice: ka priority=high\nbob: kb\n")
    config = load_config(overrides={"api_keys": str(keys)}, environ={})
    assert config.api_key_entries() == {"alice": "ka", "bob": "kb"}
    assert config.key_priority("alice") == 1 and config.key_priority("bob") == 0
    keys.write_text("alice: ka urgent\n")
    time.sleep(0.01)
    keys.touch()
    with pytest.raises(ConfigError, match="priority=high"):
        load_config(overrides={"api_keys": str(keys)}, environ={})
    with pytest.raises(ConfigError, match="priority must be"):
        load_config(overrides={"api_keys": {"x": {"key": "k", "priority": "asap"}}},
                    environ={})
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(overrides={"api_keys": {"x": {"key": "k", "prio": 1}}}, environ={})
