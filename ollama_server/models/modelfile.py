"""Ollama's model definitions, apart from the wire (pure): Modelfiles (parse and render, as
``ollama show --modelfile`` prints them), their PARAMETERs and kinds, the subset of Go templates
that a request's ``template`` uses, and Go durations (``keep_alive``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..core.errors import InvalidRequest

# --- Go durations ----------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
           "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Seconds of a Go duration string (``10m``, ``1h30m``, ``-1s``, ``250ms``, ``0``)."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("empty duration")
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(s):
        if match.start() != pos:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if pos != len(s):
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


# --- Go templates ----------------------------------------------------------------------------

def render_go_template(template: str, values: dict[str, str]) -> str:
    """Render the subset of Ollama's Go templates a request's ``template`` field uses.

    Supports ``{{ .Name }}``, ``{{ if .Name }}…{{ else }}…{{ end }}`` (nestable) and the ``{{-``
    / ``-}}`` whitespace trims. Like Ollama for generate, rendering stops at ``{{ .Response }}``
    (the model writes the response). Anything else is a 400.
    """
    tokens = re.split(r"({{-?\s*.*?\s*-?}})", template)
    # Apply whitespace trimming first.
    for i, tok in enumerate(tokens):
        if tok.startswith("{{-") and i > 0:
            tokens[i - 1] = tokens[i - 1].rstrip()
        if tok.endswith("-}}") and i + 1 < len(tokens):
            tokens[i + 1] = tokens[i + 1].lstrip()
    out: list[str] = []
    stack: list[tuple[bool, bool]] = []  # (parent active, this branch active)
    active = True
    for tok in tokens:
        if not (tok.startswith("{{") and tok.endswith("}}")):
            if active:
                out.append(tok)
            continue
        action = tok.strip("{}").strip("-").strip()
        if action.startswith("if "):
            field_name = action[3:].strip()
            if not field_name.startswith("."):
                raise InvalidRequest(f"template: unsupported condition {action!r}",
                                     param="template")
            cond = bool(values.get(field_name[1:]))
            stack.append((active, cond))
            active = active and cond
        elif action == "else":
            if not stack:
                raise InvalidRequest("template: {{ else }} without {{ if }}", param="template")
            parent, cond = stack[-1]
            active = parent and not cond
        elif action == "end":
            if not stack:
                raise InvalidRequest("template: {{ end }} without {{ if }}", param="template")
            active = stack.pop()[0]
        elif action == ".Response":
            break
        elif re.fullmatch(r"\.[A-Za-z]+", action):
            if active:
                out.append(values.get(action[1:], ""))
        else:
            raise InvalidRequest(f"template: unsupported action {action!r}", param="template")
    return "".join(out)


# --- Modelfiles (the legacy /api/create ``modelfile`` field, ``ollama show`` output) ---------

# Every PARAMETER a Modelfile (or /api/create's ``parameters``) may set, with its kind:
# "int" | "float" | "bool" | "stop" (a list of strings).
PARAMETER_KINDS: dict[str, str] = {
    "num_predict": "int", "num_ctx": "int", "temperature": "float", "top_k": "int",
    "top_p": "float", "min_p": "float", "typical_p": "float", "repeat_penalty": "float",
    "repeat_last_n": "int", "presence_penalty": "float", "frequency_penalty": "float",
    "seed": "int", "stop": "stop",
    "num_keep": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int",
    "num_thread": "int", "mirostat": "int", "mirostat_tau": "float", "mirostat_eta": "float",
    "tfs_z": "float", "use_mmap": "bool", "use_mlock": "bool", "numa": "bool",
    "penalize_newline": "bool", "low_vram": "bool"}


def coerce_parameter(key: str, value: Any) -> Any:
    """A Modelfile/create parameter in its proper type (400 for unknown keys or bad values)."""
    kind = PARAMETER_KINDS.get(key)
    if kind is None:
        raise InvalidRequest(f"unknown parameter '{key}'", param="parameters")
    try:
        if kind == "stop":
            return value if isinstance(value, list) else [str(value)]
        if kind == "bool":
            return value if isinstance(value, bool) else str(value).lower() == "true"
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        return float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"invalid value for parameter '{key}': {value!r}",
                             param="parameters") from None


def parse_modelfile(text: str) -> dict[str, Any]:
    """A Modelfile → ``{from, parameters, system, template, license[], messages[]}``.

    Values may be bare, ``"quoted"`` or ``\"\"\"multi-line\"\"\"``; comments start with ``#``.
    """
    out: dict[str, Any] = {"from": None, "parameters": {}, "system": None, "template": None,
                           "license": [], "messages": []}
    pos, n = 0, len(text)
    while pos < n:
        end = text.find("\n", pos)
        end = n if end < 0 else end
        raw_line = text[pos:end]
        line = raw_line.strip()
        line_start = pos + (len(raw_line) - len(raw_line.lstrip()))
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        command, _, rest = line.partition(" ")
        command = command.upper()
        rest = rest.strip()
        if rest.startswith('"""'):
            start = text.index('"""', line_start + len(command)) + 3
            close = text.find('"""', start)
            if close < 0:
                raise InvalidRequest('unterminated """ in modelfile', param="modelfile")
            value = text[start:close]
            nl = text.find("\n", close + 3)
            pos = n if nl < 0 else nl + 1
        elif len(rest) >= 2 and rest.startswith('"') and rest.endswith('"'):
            try:
                value = json.loads(rest)
            except ValueError:
                value = rest[1:-1]
        else:
            value = rest
        if command == "FROM":
            out["from"] = value
        elif command == "PARAMETER":
            key, _, raw_value = value.partition(" ")
            raw_value = raw_value.strip()
            if len(raw_value) >= 2 and raw_value[0] == raw_value[-1] == '"':
                try:
                    raw_value = json.loads(raw_value)
                except ValueError:
                    raw_value = raw_value[1:-1]
            key = key.strip().lower()
            if key == "stop":
                out["parameters"].setdefault("stop", []).append(raw_value)
            else:
                out["parameters"][key] = coerce_parameter(key, raw_value)
        elif command == "SYSTEM":
            out["system"] = value
        elif command == "TEMPLATE":
            out["template"] = value
        elif command == "LICENSE":
            out["license"].append(value)
        elif command == "MESSAGE":
            role, _, content = value.partition(" ")
            out["messages"].append({"role": role, "content": content.strip()})
        elif command == "ADAPTER":
            raise InvalidRequest("ADAPTER is not supported by this service", param="modelfile")
        else:
            raise InvalidRequest(f"unknown modelfile command {command!r}", param="modelfile")
    return out


def _go_quote(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parameters_text(params: dict[str, Any]) -> str:
    """``parameters`` of /api/show: one ``key<pad to 30> value`` line per value."""
    lines = []
    for key in sorted(params):
        value = params[key]
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {_go_quote(item)}")
    return "\n".join(lines)


def modelfile_text(info: Any, template: str | None, system: str | None,
                   params: dict[str, Any], license_text: str,
                   messages: list[dict[str, str]] | None = None) -> str:
    """The ``modelfile`` of /api/show, as ``ollama show --modelfile`` prints it."""
    lines = ['# Modelfile generated by "ollama show"',
             "# To build a new Modelfile based on this, replace FROM with:",
             f"# FROM {info.name}", "", f"FROM {info.path}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for key in sorted(params):
        value = params[key]
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_go_quote(item)}")
    for message in messages or []:
        lines.append(f"MESSAGE {message['role']} {_go_quote(message['content'])}")
    if license_text:
        lines.append(f'LICENSE """{license_text}"""')
    return "\n".join(lines) + "\n"
