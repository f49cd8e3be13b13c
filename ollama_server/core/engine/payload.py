"""InternalRequest → llama-server's JSON (pure).

Chat requests go to the engine's OpenAI-compatible ``/v1/chat/completions`` (Jinja templates,
tool parsing, reasoning); raw prompts to its native ``/completion`` (or ``/infill``), which
reports token ids. This is the engine's dialect: nothing above ``core.engine`` sees it.
"""

from __future__ import annotations

from typing import Any

from ..schemas import InternalRequest, Message


def _sampling_fields(req: InternalRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, key in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("min_p", "min_p"), ("typical_p", "typical_p"),
                      ("repeat_penalty", "repeat_penalty"), ("repeat_last_n", "repeat_last_n"),
                      ("presence_penalty", "presence_penalty"),
                      ("frequency_penalty", "frequency_penalty"), ("seed", "seed")):
        value = getattr(req, name)
        if value is not None:
            out[key] = value
    out["n_predict"] = req.max_tokens if req.max_tokens is not None else -1
    if req.stop:
        out["stop"] = list(req.stop)
    if req.ignore_eos:
        out["ignore_eos"] = True
    if req.logit_bias:
        # JSON has no -Infinity: llama-server reads false as "never this token".
        out["logit_bias"] = [[int(k), False if v == float("-inf") else float(v)]
                             for k, v in req.logit_bias.items()]
    if req.grammar:
        out["grammar"] = req.grammar
    elif req.json_schema is not None:
        out["json_schema"] = req.json_schema or {"type": "object"}
    return out


def message_to_engine(msg: Message) -> dict[str, Any]:
    """A neutral message in the OpenAI form llama-server's chat endpoint takes."""
    out: dict[str, Any] = {"role": msg.role}
    if msg.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": msg.content}]
        for image in msg.images:
            url = image if image.startswith("data:") else f"data:image/png;base64,{image}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        out["content"] = parts
    else:
        out["content"] = msg.content
    if msg.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in msg.tool_calls]
    if msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    if msg.name and msg.role == "tool":
        out["name"] = msg.name
    if msg.reasoning:
        out["reasoning_content"] = msg.reasoning
    return out


# Reasoning tokens per effort level when the request gives no budget of its own; "high" and
# above think as long as the model wants.
EFFORT_BUDGETS = {"minimal": 256, "low": 1024, "medium": 4096}


def _reasoning_fields(req: InternalRequest) -> dict[str, Any]:
    """The engine's thinking controls: ``reasoning_effort`` for templates that read a level
    (gpt-oss and the like) and ``reasoning_budget_tokens``, which llama-server enforces on any
    template with a thinking block by closing it when the budget is spent."""
    if req.reasoning is False:
        return {}
    out: dict[str, Any] = {}
    if req.reasoning_effort:
        out["reasoning_effort"] = req.reasoning_effort
    budget = req.reasoning_budget if req.reasoning_budget is not None else \
        EFFORT_BUDGETS.get(req.reasoning_effort or "")
    if budget is not None:
        out["reasoning_budget_tokens"] = budget
    return out


def build_chat_payload(req: InternalRequest) -> dict[str, Any]:
    """llama-server ``/v1/chat/completions`` body for a chat request (always streamed)."""
    payload: dict[str, Any] = {
        "messages": [message_to_engine(m) for m in req.messages or []],
        "stream": True,
        "stream_options": {"include_usage": True},
        # The prompt's size (and how much came from the cache) arrives before the first
        # token; per-token timings would double the size of every token's chunk.
        "return_progress": True,
        "cache_prompt": True,
        "reasoning_format": "none",  # <think> splitting is ours (utils.response_processing)
    }
    if req.stop or req.wants_context_full:
        # The last chunk then says which stop string matched and whether the context filled
        # up; it also repeats the whole answer, so it is asked for only when needed.
        payload["verbose"] = True
    payload.update(_sampling_fields(req))
    payload.update(_reasoning_fields(req))
    if req.tools:
        tools = req.tools
        choice = req.tool_choice
        if isinstance(choice, dict):
            # llama-server reads an object tool_choice as "auto": force the named tool by
            # offering only it, with a call required.
            tools = [t for t in tools if t.name == choice.get("name")] or tools
            choice = "required"
        payload["tools"] = [{"type": "function",
                             "function": {"name": t.name, "description": t.description,
                                          "parameters": t.parameters}} for t in tools]
        if choice is not None:
            payload["tool_choice"] = choice
        if req.parallel_tool_calls is not None:
            payload["parallel_tool_calls"] = req.parallel_tool_calls
    if req.chat_template_kwargs:
        payload["chat_template_kwargs"] = req.chat_template_kwargs
    if not req.add_generation_prompt:
        payload["add_generation_prompt"] = False
    if req.continue_final_message:
        payload["continue_final_message"] = True
    if req.logprobs or req.top_logprobs:
        # With top_logprobs 0, llama-server computes no probabilities at all: ask for one
        # alternative and drop it (ChatChunkParser's top_n).
        payload["logprobs"] = True
        payload["top_logprobs"] = max(1, req.top_logprobs)
    return payload


def build_completion_payload(req: InternalRequest) -> tuple[str, dict[str, Any]]:
    """(path, body) for a raw-prompt request: native ``/completion``, or ``/infill``."""
    payload: dict[str, Any] = {"stream": True, "cache_prompt": True,
                               "return_tokens": True}
    payload.update(_sampling_fields(req))
    if req.logprobs or req.top_logprobs:
        payload["n_probs"] = max(1, req.top_logprobs)
    if req.suffix is not None:
        payload["input_prefix"] = req.prompt or ""
        payload["input_suffix"] = req.suffix
        payload["prompt"] = ""
        return "/infill", payload
    payload["prompt"] = req.prompt if req.prompt is not None else ""
    return "/completion", payload
