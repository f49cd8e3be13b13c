"""Thinking levels (issue 24, item 2): each dialect's way of saying how hard to think reaches
the engine as llama-server's own controls (``reasoning_effort`` for templates that read a
level, ``reasoning_budget_tokens`` that it enforces on any thinking template)."""

from __future__ import annotations

import pytest

from ollama_server.adapters import ollama as ol
from ollama_server.adapters.anthropic import anthropic_messages_to_internal
from ollama_server.adapters.openai import openai_chat_to_internal
from ollama_server.adapters.responses import responses_to_internal
from ollama_server.core.engine.payload import EFFORT_BUDGETS, build_chat_payload
from ollama_server.core.errors import InvalidRequest

MSGS = [{"role": "user", "content": "hi"}]


def engine_fields(req) -> dict:
    payload = build_chat_payload(req)
    return {k: payload[k] for k in ("reasoning_effort", "reasoning_budget_tokens")
            if k in payload}


@pytest.mark.parametrize("think,expected", [
    ("low", {"reasoning_effort": "low", "reasoning_budget_tokens": 1024}),
    ("medium", {"reasoning_effort": "medium", "reasoning_budget_tokens": 4096}),
    ("high", {"reasoning_effort": "high"}),
    ("max", {"reasoning_effort": "high"}),
    (True, {}),
    (False, {}),
])
def test_ollama_think_levels(think, expected):
    req = ol.ollama_chat_to_internal({"model": "m", "messages": MSGS, "think": think})
    assert req.reasoning is (think is not False)
    assert engine_fields(req) == expected


@pytest.mark.parametrize("effort,expected", [
    ("minimal", {"reasoning_effort": "minimal", "reasoning_budget_tokens": 256}),
    ("low", {"reasoning_effort": "low", "reasoning_budget_tokens": 1024}),
    ("xhigh", {"reasoning_effort": "xhigh"}),
    ("none", {}),
])
def test_openai_reasoning_effort(effort, expected):
    req = openai_chat_to_internal({"model": "m", "messages": MSGS, "reasoning_effort": effort})
    assert req.reasoning is (effort != "none")
    assert engine_fields(req) == expected


def test_openai_reasoning_effort_out_of_its_levels_is_a_400():
    with pytest.raises(InvalidRequest, match="Invalid value: 'extreme'") as err:
        openai_chat_to_internal({"model": "m", "messages": MSGS, "reasoning_effort": "extreme"})
    assert err.value.param == "reasoning_effort"


def test_responses_reasoning_effort():
    req = responses_to_internal({"model": "m", "input": "hi", "reasoning": {"effort": "low"}})
    assert engine_fields(req) == {"reasoning_effort": "low",
                                  "reasoning_budget_tokens": EFFORT_BUDGETS["low"]}


def test_anthropic_budget_tokens_is_the_engine_budget():
    req = anthropic_messages_to_internal({
        "model": "m", "max_tokens": 4000, "messages": MSGS,
        "thinking": {"type": "enabled", "budget_tokens": 2048}})
    assert engine_fields(req) == {"reasoning_budget_tokens": 2048}
    req = anthropic_messages_to_internal({"model": "m", "max_tokens": 4000, "messages": MSGS,
                                          "thinking": {"type": "adaptive"}})
    assert engine_fields(req) == {}
    req = anthropic_messages_to_internal({"model": "m", "max_tokens": 4000, "messages": MSGS,
                                          "thinking": {"type": "disabled"}})
    assert req.reasoning is False and engine_fields(req) == {}
