"""Thinking levels (issue 24, item 2) reach the real engine as its own controls. The test models
cannot reason: the engine must take the fields and answer, and Ollama's think level on them is
Ollama's 400."""

from __future__ import annotations

import anthropic
import ollama
import openai
import pytest

SMALL = "smollm2:135m"


def test_thinking_levels_reach_the_real_engine(base_url):
    oa = openai.OpenAI(base_url=base_url + "/v1", api_key="x")
    r = oa.chat.completions.create(model=SMALL, max_tokens=3, reasoning_effort="low",
                                   messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model=SMALL, max_tokens=3, reasoning_effort="extreme",
                                   messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["param"] == "reasoning_effort"
    claude = anthropic.Anthropic(base_url=base_url, api_key="x")
    m = claude.messages.create(model=SMALL, max_tokens=1025,
                               thinking={"type": "enabled", "budget_tokens": 1024},
                               messages=[{"role": "user", "content": "Hi"}])
    assert m.stop_reason in ("end_turn", "max_tokens")
    with pytest.raises(ollama.ResponseError) as err2:
        ollama.Client(host=base_url).chat(model=SMALL, think="low",
                                          messages=[{"role": "user", "content": "Hi"}])
    assert err2.value.status_code == 400 and "does not support thinking" in str(err2.value)
