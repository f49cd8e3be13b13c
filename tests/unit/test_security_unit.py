"""Issue 12 pieces without Flask or an engine: the route table, key handling, the key file,
edge validation, the slot queue, and the per-key limit."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ollama_server.api.security import (
    KEY,
    PUBLIC,
    ROUTE_ACCESS,
    caller_for,
    presented_keys,
    route_access,
)
from ollama_server.api.validation import check_json_values, nesting_exceeds, parse_json_body
from ollama_server.config import ConfigError, load_config
from ollama_server.core.engine import EngineSettings
from ollama_server.core.errors import Cancelled, InvalidRequest, QueueFull, RateLimited
from ollama_server.core.request_tracker import RequestTracker
from ollama_server.core.schemas import InternalRequest
from ollama_server.models.admission import SlotQueue
from ollama_server.models.manager import ModelManager
from ollama_server.models.schemas import ModelInfo
from ollama_server.service.fitting import fit_embedding_inputs, fit_request_to_engine


def _config(**overrides):
    return load_config(overrides=overrides, environ={})


# --- the route table ------------------------------------------------------------------------------

def _app_rules():
    from ollama_server.api.app import create_app

    config = _config(models_dir="/nonexistent")
    manager = ModelManager(config, engine_binary=Path("/bin/true"))
    try:
        app = create_app(config, manager)
        rules = set()
        for rule in app.url_map.iter_rules():
            methods = set(rule.methods) - {"OPTIONS"}
            if "GET" in methods:
                methods.discard("HEAD")  # Flask's automatic HEAD follows GET
            rules |= {f"{method} {rule.rule}" for method in methods}
        return rules
    finally:
        manager.shutdown()


def test_every_route_of_the_app_has_a_decision_in_the_table():
    rules = _app_rules()
    missing = sorted(rules - set(ROUTE_ACCESS))
    assert not missing, (f"routes without an access decision in security.ROUTE_ACCESS "
                         f"(add each, as PUBLIC only if it serves no data): {missing}")
    stale = sorted(set(ROUTE_ACCESS) - rules)
    assert not stale, f"ROUTE_ACCESS names routes the app does not have: {stale}"


def test_only_health_root_versions_and_the_dashboard_page_are_public():
    public = sorted(r for r, a in ROUTE_ACCESS.items() if a == PUBLIC)
    assert public == ["GET /", "GET /api/version", "GET /dashboard", "GET /dashboard/",
                      "GET /health", "GET /health/live", "GET /health/ready", "GET /ping",
                      "GET /version", "POST /ping"]


def test_route_access_defaults_to_key_and_metrics_follow_the_setting():
    config = _config()
    assert route_access("/some/new/route", "POST", config) == KEY
    assert route_access("/", "POST", config) == KEY  # TGI's compat generate
    assert route_access("/", "HEAD", config) == PUBLIC
    assert route_access("/api/blobs/<digest>", "HEAD", config) == KEY
    assert route_access("/metrics", "GET", config) == PUBLIC
    assert route_access("/metrics", "GET", _config(metrics_require_key=True)) == KEY


# --- keys -----------------------------------------------------------------------------------------

def test_keys_are_read_from_every_header_clients_use():
    assert presented_keys({"Authorization": "Bearer k1"}) == ["k1"]
    assert presented_keys({"authorization": "bearer k1"}) == []  # plain dict: case matters
    assert presented_keys({"x-api-key": "k2", "api-key": "k3"}) == ["k2", "k3"]
    assert presented_keys({"Authorization": "Basic abc"}) == []


def test_caller_is_the_key_name_and_every_key_is_compared():
    keys = {"alice": "sk-alice", "bob": "sk-bob"}
    assert caller_for(keys, ["sk-bob"]) == "bob"
    assert caller_for(keys, ["nope", "sk-alice"]) == "alice"
    assert caller_for(keys, ["sk-alic"]) is None
    assert caller_for(keys, ["\ud800"]) is None  # an unencodable header value is no key


def test_api_keys_from_yaml_mapping_list_env_and_file(tmp_path):
    assert _config(api_keys={"alice": 123}).api_key_entries() == {"alice": "123"}
    assert _config(api_keys=["ci: sk-ci"], api_key="one").api_key_entries() == {
        "default": "one", "ci": "sk-ci"}
    keyfile = tmp_path / "keys"
    keyfile.write_text("# callers\nalice: sk-a:with-colon\n\nbob:  sk-b\n")
    config = load_config(environ={"OLLAMA_SERVER_API_KEYS": str(keyfile)})
    assert config.auth_enabled
    assert config.api_key_entries() == {"alice": "sk-a:with-colon", "bob": "sk-b"}
    keyfile.write_text("carol: sk-c\n")  # read again when the file changes
    import os

    os.utime(keyfile, (1, 1))
    assert config.api_key_entries() == {"carol": "sk-c"}
    inline = load_config(environ={"OLLAMA_SERVER_API_KEYS": "{dave: sk-d}"})
    assert inline.api_key_entries() == {"dave": "sk-d"}


@pytest.mark.parametrize("text, message", [
    ("alice sk-a\n", "line 1"),
    ("alice: a\nalice: b\n", "appears twice"),
    ("a: same\nb: same\n", "share one key"),
])
def test_a_malformed_key_file_is_a_configuration_error(tmp_path, text, message):
    keyfile = tmp_path / "keys"
    keyfile.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"api_keys": str(keyfile)}, environ={})


def test_missing_key_file_and_an_empty_one():
    with pytest.raises(ConfigError, match="cannot read the key file"):
        _config(api_keys="/nonexistent/keys")
    assert not _config().auth_enabled


def test_ollama_max_queue_and_token_limits():
    assert load_config(environ={"OLLAMA_MAX_QUEUE": "7"}).max_queue == 7
    assert load_config(environ={"OLLAMA_MAX_QUEUE": "7",
                                "OLLAMA_SERVER_MAX_QUEUE": "3"}).max_queue == 3
    config = load_config(environ={"OLLAMA_SERVER_TOKEN_LIMITS":
                                  '{"*": {"cap": 100}, "smollm2:135m": {"default": 8}}'})
    assert config.token_limit("smollm2:135m") == (8, None)
    assert config.token_limit("other") == (None, 100)
    for bad in ({"m": {"cap": 0}}, {"m": {"max": 3}}, {"m": {"default": 9, "cap": 3}}):
        with pytest.raises(ConfigError, match="token_limits"):
            _config(token_limits=bad)
    with pytest.raises(ConfigError, match="max_queue"):
        _config(max_queue=-1)


# --- edge validation of bodies --------------------------------------------------------------------

def test_nesting_is_measured_without_recursion():
    deep = "[" * 200_000 + "]" * 200_000
    assert nesting_exceeds(deep, 64)
    assert not nesting_exceeds('{"a": "[[[[[[[[[[[[[[[[[["}', 4)  # brackets in strings
    assert not nesting_exceeds('{"a": [[1], [2], [3], [4], [5], [6]]}', 3)
    assert nesting_exceeds('{"a": [[[1]]]}', 3)


@pytest.mark.parametrize("raw, param", [
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"options": {"temperature": NaN}}', "options.temperature"),
    (b'{"top_p": Infinity}', "top_p"),
    (b'{"x": [1, -Infinity]}', "x[1]"),
    (b'{"temperature": 1e999}', "temperature"),
    (b'{"a\\udc00": 1}', "the body"),
])
def test_surrogates_and_non_finite_numbers_name_the_field(raw, param):
    with pytest.raises(InvalidRequest) as info:
        parse_json_body(raw, 64)
    assert info.value.param == param and param in info.value.message


def test_body_errors_say_what_is_wrong():
    with pytest.raises(InvalidRequest, match="nests arrays and objects more than 64"):
        parse_json_body(b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", 64)
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_json_body(b'{"a": 1', 64)
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_json_body(b'{"a": "\xff"}', 64)
    assert parse_json_body('{"a": "é 😀 \\ud83d\\ude00"}'.encode(), 64) == {"a": "é 😀 😀"}
    check_json_values({"fine": [1, 2.5, "text", None, True]})


# --- a request against its engine -----------------------------------------------------------------

def _info(context_length: int = 8192) -> ModelInfo:
    return ModelInfo(name="m", path=Path("/m.gguf"), source="gguf", size=1, modified_at=0,
                     context_length=context_length)


def test_token_default_cap_and_context():
    config = _config(token_limits={"m": {"default": 64, "cap": 128}})
    req = InternalRequest(model="m")
    fit_request_to_engine(req, _info(), config)
    assert req.max_tokens == 64
    req = InternalRequest(model="m", max_tokens=1000)
    fit_request_to_engine(req, _info(), config)
    assert req.max_tokens == 128
    req = InternalRequest(model="m", max_tokens=2**40)
    fit_request_to_engine(req, _info(4096), _config())
    assert req.max_tokens == 4096


def test_numbers_are_brought_into_the_engine_range_or_refused():
    req = InternalRequest(model="m", seed=2**40 + 5, top_k=2**33, repeat_last_n=2**35)
    fit_request_to_engine(req, _info(), _config())
    assert 0 <= req.seed < 2**32 - 1 and req.top_k == 0 and req.repeat_last_n == -1
    req = InternalRequest(model="m", seed=-1)
    fit_request_to_engine(req, _info(), _config())
    assert req.seed is None
    for bad, param in ((dict(repeat_last_n=-5), "repeat_last_n"),
                       (dict(top_logprobs=1000), "top_logprobs"),
                       (dict(temperature=1e300), "temperature"),
                       (dict(logit_bias={2**40: 1.0}), "logit_bias"),
                       (dict(stop_token_ids=[-3]), "stop_token_ids"),
                       (dict(prompt=[1, 2**40]), "prompt")):
        with pytest.raises(InvalidRequest) as info:
            fit_request_to_engine(InternalRequest(model="m", **bad), _info(), _config())
        assert info.value.param == param


class _Engine:
    settings = EngineSettings(binary=Path("/bin/true"), batch_size=512)
    ctx_size = 8192

    def tokenize(self, text, add_special=True):
        return list(range(len(text.split()) + 1))


def test_embedding_inputs_are_cut_to_the_batch_or_refused():
    long = "word " * 2000
    assert fit_embedding_inputs(["short"], _Engine(), truncate=False) == ["short"]
    cut = fit_embedding_inputs(["short", long], _Engine(), truncate=True)
    assert cut[0] == "short" and len(cut[1]) == 512
    with pytest.raises(InvalidRequest, match="2001 tokens, more than the 512"):
        fit_embedding_inputs([long], _Engine(), truncate=False)
    assert len(fit_embedding_inputs([list(range(600))], _Engine(), truncate=True)[0]) == 512


# --- the slot queue -------------------------------------------------------------------------------

def test_slot_queue_admits_in_order_and_refuses_past_max_queue():
    queue = SlotQueue()
    queue.enter("m", slots=1, max_queue=2, timeout=60)
    order: list[int] = []
    entered = [threading.Event(), threading.Event()]

    def waiter(i: int) -> None:
        queue.enter("m", slots=1, max_queue=2, timeout=60)
        order.append(i)
        entered[i].set()

    threads = []
    for i in range(2):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        while queue.snapshot()["m"]["waiting"] < i + 1:
            threading.Event().wait(0.01)
    with pytest.raises(QueueFull) as info:
        queue.enter("m", slots=1, max_queue=2, timeout=60)
    assert info.value.retry_after >= 1 and "maximum pending requests exceeded" in str(info.value)
    queue.leave("m")
    entered[0].wait(10)
    queue.leave("m")
    entered[1].wait(10)
    for t in threads:
        t.join(10)
    assert order == [0, 1]
    snap = queue.snapshot()["m"]
    assert snap["busy"] == 1 and snap["waiting"] == 0 and snap["refused"] == 1


def test_slot_queue_drops_an_abandoned_waiter_and_gives_up_after_the_timeout():
    queue = SlotQueue()
    queue.enter("m", slots=1, max_queue=5, timeout=60)
    with pytest.raises(Cancelled):
        queue.enter("m", slots=1, max_queue=5, timeout=60, abandoned=lambda: True)
    with pytest.raises(QueueFull):
        queue.enter("m", slots=1, max_queue=5, timeout=0)
    with pytest.raises(QueueFull):
        queue.enter("m", slots=1, max_queue=0, timeout=60)  # no waiting at all
    snap = queue.snapshot()["m"]
    assert snap == {**snap, "busy": 1, "waiting": 0, "abandoned": 1, "refused": 2}


def test_per_key_limit_in_the_tracker():
    tracker = RequestTracker()
    refused = []
    tracker.subscribe(lambda event, status: refused.append(status.caller)
                      if event == "refused" else None)
    tracker.start("a", "m", "openai", caller="alice", caller_limit=1)
    tracker.start("b", "m", "openai", caller="bob", caller_limit=1)
    with pytest.raises(RateLimited, match="'alice' already has 1"):
        tracker.start("c", "m", "openai", caller="alice", caller_limit=1)
    assert tracker.get("c") is None and refused == ["alice"]
    tracker.finish("a")
    tracker.start("d", "m", "openai", caller="alice", caller_limit=1)
    assert tracker.get("d").to_dict()["caller"] == "alice"


def test_stream_frames_stay_one_line_for_every_line_splitter():
    from ollama_server.api.common import dumps, ndjson_line, sse_data

    obj = {"text": "a\x85b\u2028c\u2029d\x0be é😀"}
    for frame in (ndjson_line(obj), sse_data(obj)):
        lines = [line for line in frame.splitlines() if line]
        assert len(lines) == 1, frame  # httpx's iter_lines() splits like str.splitlines()
    assert json.loads(dumps(obj)) == obj and "é😀" in dumps(obj)
