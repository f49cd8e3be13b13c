"""The relay thread (core/relay.py) against the real engine: a service that relays its
streams on one thread (the default) and one with ``relay_thread: false``, which relays each on
its request thread, and the official SDKs must see the same streams from both."""

from __future__ import annotations

import re

import anthropic
import ollama
import openai
import pytest
import requests

from tests.helpers import ServiceProcess

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
PROMPT = "Write a short poem about the sea."


def _service(tmp_path_factory, real_models, relay: bool):
    svc = ServiceProcess(tmp_path_factory.mktemp("relay" if relay else "per-request"),
                         real_models,
                         extra_env={"OLLAMA_SERVER_RELAY_THREAD": "true" if relay else "false"})
    svc.ready_or_stopped()
    return svc


@pytest.fixture(scope="module")
def pair(tmp_path_factory, real_models, engine_binary):
    """Two fresh services, relay thread on and off, that get the same requests in the same
    order: their engines' caches stay alike, so greedy answers are the same token for token
    (a service that served other requests before may answer differently at temperature 0)."""
    services = [_service(tmp_path_factory, real_models, relay) for relay in (True, False)]
    yield services[0].base_url, services[1].base_url
    for svc in services:
        assert svc.stop() == 0, svc.log()


def relayed_streams(base_url: str) -> float:
    text = requests.get(base_url + "/metrics", timeout=10).text
    match = re.search(r"^ollama_server_relay_streams_total (\S+)$", text, re.M)
    assert match, "ollama_server_relay_streams_total missing from /metrics"
    return float(match.group(1))


def openai_chunks(base_url: str) -> list[tuple]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=32,
        temperature=0, seed=7, stream=True, stream_options={"include_usage": True})
    return [(tuple((c.delta.role, c.delta.content, c.finish_reason) for c in chunk.choices),
             chunk.usage.completion_tokens if chunk.usage else None) for chunk in stream]


def ollama_parts(base_url: str) -> list[tuple]:
    client = ollama.Client(host=base_url)
    out = []
    for part in client.chat(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                            stream=True, options={"temperature": 0, "seed": 7,
                                                  "num_predict": 32}):
        out.append((part.message.content, part.done, part.eval_count))
    return out


def anthropic_events(base_url: str) -> list[tuple]:
    client = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0)
    out = []
    with client.messages.stream(model=MODEL, max_tokens=32, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": PROMPT}]) as stream:
        for event in stream:
            delta = getattr(event, "delta", None)
            out.append((event.type, getattr(delta, "text", None),
                        getattr(delta, "stop_reason", None)))
    return out


@pytest.mark.parametrize("dialect", [openai_chunks, ollama_parts, anthropic_events],
                         ids=["openai", "ollama", "anthropic"])
def test_relayed_streams_equal_request_thread_streams(pair, dialect):
    base_url, per_request_url = pair
    before = relayed_streams(base_url)
    relayed = dialect(base_url)
    assert relayed_streams(base_url) == before + 1, "the stream was not handed to the relay"
    direct = dialect(per_request_url)
    assert relayed_streams(per_request_url) == 0
    assert len(relayed) > 8
    assert relayed == direct


def test_ollama_final_context_comes_through_the_relay(base_url):
    """/api/generate's last line carries ``context``, tokenized by the engine: a blocking
    call made from inside the relayed stream (run by the request thread, core/relay.py)."""
    before = relayed_streams(base_url)
    parts = list(ollama.Client(host=base_url).generate(
        model=MODEL, prompt=PROMPT, stream=True, options={"temperature": 0, "num_predict": 16}))
    assert relayed_streams(base_url) == before + 1
    assert parts[-1].done and len(parts[-1].context) > 16


def test_streams_with_several_choices_stay_on_their_thread(pair):
    """``n`` > 1: the choices meet in a queue the relay thread cannot wait on."""
    base_url, _ = pair
    before = relayed_streams(base_url)
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, n=2,
        stream=True))
    assert {c.index for chunk in chunks for c in chunk.choices} == {0, 1}
    assert relayed_streams(base_url) == before
