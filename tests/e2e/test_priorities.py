"""Priority classes with the real engine (issue 24 item 5): a request of a high-priority key
overtakes a waiting low-priority one, each waiting request's place in line shows in
/api/progress, /api/requests and the dashboard's data, with one worker and with two (the
engine pool process admits for both)."""

from __future__ import annotations

import json
import threading

import openai
import pytest
import requests

from tests.helpers import ServiceProcess, wait_for

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
KEYS = {"batch": {"key": "key-batch", "priority": "low"},
        "chat": {"key": "key-chat", "priority": "high"}}


@pytest.fixture(scope="module", params=["1", "2"], ids=["one-worker", "two-workers"])
def service(request, tmp_path_factory, real_models, engine_binary):
    svc = ServiceProcess(tmp_path_factory.mktemp("priorities"), real_models,
                         args=["--parallel", "1"],
                         extra_env={"OLLAMA_SERVER_WORKERS": request.param,
                                    "OLLAMA_SERVER_API_KEYS": json.dumps(KEYS)})
    svc.ready_or_stopped()
    yield svc
    assert svc.stop() == 0, svc.log()


def progress(svc: ServiceProcess, rid: str) -> dict:
    return requests.get(f"{svc.base_url}/api/progress/{rid}", timeout=30,
                        headers={"Authorization": "Bearer key-chat"}).json()


def test_a_high_priority_request_overtakes_a_waiting_low_one(service):
    def client(key: str, rid: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=service.base_url + "/v1", api_key=key, max_retries=0,
                             default_headers={"X-Request-Id": rid}, timeout=300)

    # The model's one slot, held by a long stream.
    holder = client("key-batch", "holder").chat.completions.create(
        model=MODEL, stream=True, max_tokens=3000,
        messages=[{"role": "user", "content": "Write a very long story."}])
    next(iter(holder))
    answers: dict[str, str] = {}

    def ask(key: str, rid: str) -> None:
        answers[rid] = client(key, rid).chat.completions.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Say hi."}]
        ).choices[0].message.content or ""

    low = threading.Thread(target=ask, args=("key-batch", "low-1"), daemon=True)
    low.start()
    wait_for(lambda: progress(service, "low-1").get("queue_position") == 1,
             "the low request first in line", 60)
    high = threading.Thread(target=ask, args=("key-chat", "high-1"), daemon=True)
    high.start()
    wait_for(lambda: progress(service, "high-1").get("queue_position") == 1,
             "the high request ahead of the low one", 60)
    low_view, high_view = progress(service, "low-1"), progress(service, "high-1")
    assert (low_view["state"], low_view["queue_position"], low_view["queue_length"],
            low_view["priority"]) == ("queued", 2, 2, -1), low_view
    assert high_view["priority"] == 1 and high_view["queue_length"] == 2, high_view
    listed = requests.get(service.base_url + "/api/requests", timeout=30,
                          headers={"Authorization": "Bearer key-chat"}).json()["active"]
    assert {r["id"]: r.get("queue_position") for r in listed
            if r["id"] in ("low-1", "high-1")} == {"low-1": 2, "high-1": 1}
    board = requests.get(service.base_url + "/dashboard/data", timeout=30,
                         headers={"Authorization": "Bearer key-chat"}).json()["active"]
    assert {r["id"]: r.get("queue_position") for r in board
            if r["id"] in ("low-1", "high-1")} == {"low-1": 2, "high-1": 1}
    holder.close()  # the slot frees: the high request takes it, the low one waits on
    high.join(120)
    low.join(120)
    assert all(answers.get(rid) for rid in ("high-1", "low-1")), answers
    # One slot: the high request left the line first although it arrived second. (The order
    # the answers arrive in says less: the slot frees before the high answer reaches its
    # client, and the low one's four tokens may overtake it on a loaded machine.)
    left = {rid: view["created"] + view["queue_ms"] / 1000.0
            for rid, view in ((rid, progress(service, rid)) for rid in ("high-1", "low-1"))}
    assert left["high-1"] < left["low-1"], left
