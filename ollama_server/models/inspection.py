"""Optional enrichment of a model from the ``ollama`` CLI (``ollama show --modelfile``).

When ``enable_model_inspection`` is on and an ``ollama`` binary is on PATH, a real Ollama may
know a model better than its store entry here (a Go template, a system prompt, parameters,
a license). Its answer only fills what the store lacks; the GGUF header stays the truth for
context length and every other ``model_info`` key. Any failure (no binary, no Ollama server,
unknown model, timeout) means "no enrichment", never an error for the client.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from typing import Any
from urllib.parse import urlparse

from ..core.errors import InvalidRequest
from .modelfile import parse_modelfile

log = logging.getLogger(__name__)

_cache: dict[tuple[str, str], dict[str, Any]] = {}
_lock = threading.Lock()


def _points_at_us(own_port: int | None) -> bool:
    """True when OLLAMA_HOST names this service's port: asking it would ask ourselves."""
    host = os.environ.get("OLLAMA_HOST", "")
    if not host or own_port is None:
        return own_port == 11434
    url = urlparse(host if "://" in host else f"http://{host}")
    port = url.port or (443 if url.scheme == "https" else 11434)
    return port == own_port


def inspect_model(name: str, digest: str = "", enabled: bool = True,
                  own_port: int | None = None, binary: str | None = None,
                  timeout: float = 5.0) -> dict[str, Any]:
    """``{template?, system?, parameters?, license?}`` from ``ollama show --modelfile name``.

    Cached per (name, digest); an empty dict when inspection is off or unavailable.
    """
    if not enabled:
        return {}
    exe = binary or shutil.which("ollama")
    if exe is None or _points_at_us(own_port):
        return {}
    key = (name, digest)
    with _lock:
        if key in _cache:
            return _cache[key]
    result: dict[str, Any] = {}
    try:
        proc = subprocess.run([exe, "show", "--modelfile", name], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode == 0 and proc.stdout.strip():
            parsed = parse_modelfile(proc.stdout)
            for field in ("template", "system"):
                if parsed.get(field):
                    result[field] = parsed[field]
            if parsed.get("parameters"):
                result["parameters"] = parsed["parameters"]
            if parsed.get("license"):
                result["license"] = "\n".join(parsed["license"])
        else:
            log.debug("ollama show %s: exit %s: %s", name, proc.returncode,
                      proc.stderr.strip()[:200])
    except (OSError, subprocess.TimeoutExpired, InvalidRequest) as exc:
        log.debug("ollama show %s failed: %s", name, exc)
    with _lock:
        _cache[key] = result
    return result


def clear_cache() -> None:
    """Forget earlier answers (tests, or after the store changed)."""
    with _lock:
        _cache.clear()
