"""Validation of single request fields, shared by every dialect's adapter (pure).

Each helper returns the checked value (None or a default when absent) or raises InvalidRequest
naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.errors import InvalidRequest
from ..core.schemas import Tool


def get_number(body: dict[str, Any], key: str, lo: float | None = None, hi: float | None = None,
               integer: bool = False) -> Any:
    """``body[key]`` checked as a number in [lo, hi]; None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"'{key}' must be a number, got {json.dumps(value)}", param=key)
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidRequest(f"'{key}' must be an integer, got {value}", param=key)
        value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo:g} and {hi:g}" if hi is not None else f"at least {lo:g}"
        raise InvalidRequest(f"'{key}' must be {bounds}, got {value}", param=key)
    return value


def get_bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    """``body[key]`` checked as a boolean."""
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{key}' must be a boolean, got {json.dumps(value)}", param=key)
    return value


def get_stop(body: dict[str, Any], key: str = "stop") -> list[str]:
    """A stop field: a string or a list of strings."""
    value = body.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise InvalidRequest(f"'{key}' must be a string or a list of strings", param=key)


def require_model(body: dict[str, Any]) -> str:
    """The ``model`` field, which must be a non-empty string."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    return model


def get_str(body: dict[str, Any], key: str) -> str | None:
    """``body[key]`` checked as a string; None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{key}' must be a string, got {json.dumps(value)}", param=key)
    return value


def parse_function_tools(raw: Any) -> list[Tool]:
    """An OpenAI-shaped ``tools`` list (``[{type: "function", function: {name, description,
    parameters}}]``, which Ollama takes too) → internal tools; [] when absent."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be a list", param="tools")
    tools = []
    for t in raw:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest("each tool must be {type: \"function\", function: {name, "
                                 "description, parameters}}", param="tools")
        tools.append(Tool(name=fn["name"], description=fn.get("description") or "",
                          parameters=fn.get("parameters") or {"type": "object",
                                                              "properties": {}}))
    return tools
