"""JSON in and out, fast: orjson where it gives exactly what the standard library gives.

Used by the engine's transport (engine chunks in, payloads out) and by the HTTP layer (frames
out), so it lives at the bottom of the layers.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps_compact(obj: Any) -> bytes:
    """Compact UTF-8 JSON: orjson, or the standard encoder for what orjson refuses (an integer
    beyond 64 bits)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes) -> Any:
    """JSON from the engine: orjson, or the standard parser for what orjson refuses (an
    escaped lone surrogate)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
