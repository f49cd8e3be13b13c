"""vLLM's extensions to the OpenAI wire format ⇄ internal types. Pure: no Flask, no I/O.

vLLM's OpenAI server accepts extra fields on ``/v1/chat/completions`` and ``/v1/completions``
(sampling knobs, guided decoding in its older ``guided_*`` and newer ``structured_outputs``
forms, reasoning switches). ``apply_vllm_extras`` reads them onto an ``InternalRequest`` that the
OpenAI adapter built; the rest of this module shapes vLLM's own routes (``/tokenize``,
``/detokenize``, ``/version``, the legacy demo ``/generate``).

llama-server constrains output with GBNF grammars and JSON schemas, so guided choices become a
GBNF alternation and guided regexes are translated to GBNF (``regex_to_gbnf``); what cannot be
translated is a clear 400, never an unconstrained answer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from ..core.errors import InvalidRequest, Unsupported
from ..core.min_tokens import check_min_tokens
from ..core.schemas import Event, InternalRequest, ReasoningDelta, TextDelta
from .fields import get_bool, get_number
from .openai_fields import common_sampling, parse_messages

log = logging.getLogger(__name__)

VLLM_VERSION = "0.11.0"  # the vLLM release whose OpenAI server this dialect follows

# Fields vLLM accepts that change nothing here (defaults, or backend choices of vLLM itself).
_IGNORED = ("guided_decoding_backend", "guided_whitespace_pattern", "priority",
            "return_token_ids", "add_special_tokens", "spaces_between_special_tokens",
            "documents", "mm_processor_kwargs", "cache_salt", "kv_transfer_params",
            "vllm_xargs", "disable_any_whitespace", "whitespace_pattern")


# --- regular expressions → GBNF ------------------------------------------------------------

_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r\\x0C\\x0B"}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


def _gbnf_char(ch: str, in_class: bool = False) -> str:
    """One character escaped for a GBNF string literal or character class."""
    # llama.cpp's GBNF knows the escapes \\ \" \[ \] \t \r \n \xHH \uHHHH only.
    if ch in ('\\]-^[' if in_class else '\\"'):
        return "\\" + ch if ch in '\\"[]' else f"\\x{ord(ch):02X}"
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\x{ord(ch):02X}"
    return ch


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return '"' + "".join(_gbnf_char(c) for c in text) + '"'


class _RegexToGbnf:
    """Recursive-descent translation of a regex subset into one GBNF expression.

    Supported: literals, ``.``, escapes (``\\d \\w \\s \\D \\W \\S \\n \\t \\xHH \\uHHHH`` and
    escaped punctuation), character classes with ranges and negation, groups (capturing,
    ``(?:…)``, ``(?P<name>…)``), alternation, and the quantifiers ``* + ? {n} {n,} {n,m}``
    (lazy forms too: a whole-output match has the same language). ``^`` and ``$`` are accepted
    only at the ends. Everything else (look-around, back-references, word boundaries, flags)
    raises Unsupported naming the construct.
    """

    def __init__(self, pattern: str) -> None:
        self.p = pattern
        self.i = 0

    def fail(self, what: str) -> Unsupported:
        return Unsupported(f"the regex construct {what} at position {self.i} of the guided "
                           f"regex cannot be turned into a grammar; use guided_grammar "
                           f"(GBNF) instead", param="guided_regex")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        ch = self.p[self.i]
        self.i += 1
        return ch

    def parse(self) -> str:
        if self.peek() == "^":
            self.i += 1
        expr = self.alternation()
        if self.peek() is not None:
            raise self.fail(repr(self.p[self.i:]))
        return expr

    def alternation(self) -> str:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        if len(branches) == 1:
            return branches[0]
        return "(" + " | ".join(b or '""' for b in branches) + ")"

    def sequence(self) -> str:
        items: list[str] = []
        while True:
            ch = self.peek()
            if ch is None or ch in "|)":
                break
            if ch == "$":
                self.i += 1
                if self.peek() not in (None, ")", "|"):
                    raise self.fail("'$' before the end")
                continue
            if ch == "^":
                raise self.fail("'^' after the start")
            atom = self.atom()
            items.append(self.quantified(atom))
        return " ".join(i for i in items if i)

    def quantified(self, atom: str) -> str:
        ch = self.peek()
        if ch in ("*", "+", "?"):
            self.i += 1
            out = f"{atom}{ch}"
        elif ch == "{" and self._is_repeat():
            self.i += 1
            end = self.p.index("}", self.i)
            spec = self.p[self.i:end].replace(" ", "")
            self.i = end + 1
            lo, _, hi = spec.partition(",")
            out = f"{atom}{{{lo}{',' if ',' in spec else ''}{hi}}}"
        else:
            return atom
        if self.peek() == "?":  # lazy: same set of complete matches
            self.i += 1
        elif self.peek() == "+":
            raise self.fail("possessive quantifier")
        if self.peek() in ("*", "+", "{") and (self.peek() != "{" or self._is_repeat()):
            raise self.fail("stacked quantifiers")
        return out

    def _is_repeat(self) -> bool:
        end = self.p.find("}", self.i)
        if end < 0:
            return False
        spec = self.p[self.i + 1:end]
        lo, comma, hi = spec.partition(",")
        return lo.isdigit() and (not comma or hi == "" or hi.isdigit())

    def atom(self) -> str:
        ch = self.take()
        if ch == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i) or self.p.startswith("?<", self.i) and \
                    self.p[self.i + 2:self.i + 3] not in ("=", "!"):
                self.i = self.p.index(">", self.i) + 1
            elif self.peek() == "?":
                raise self.fail(f"'(?{self.p[self.i + 1:self.i + 2]}'")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("an unclosed group")
            self.i += 1
            return f"({inner or chr(34) * 2})"
        if ch == "[":
            return self.char_class()
        if ch == ".":
            return "[^\\n]"
        if ch == "\\":
            return self.escape()
        if ch in "*+?":
            raise self.fail(f"a quantifier {ch!r} with nothing before it")
        if ch == "{" and self.i - 1 > 0 and self._is_repeat():
            raise self.fail("a repeat with nothing before it")
        return gbnf_literal(ch)

    def _escaped_char(self, ch: str) -> str:
        """The character of a single-character escape (``\\n``, ``\\x41``, ``\\.``)."""
        if ch in _CHAR_ESCAPES:
            return _CHAR_ESCAPES[ch]
        if ch in ("x", "u"):
            n = 2 if ch == "x" else 4
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"'\\{ch}{digits}'")
            self.i += n
            return chr(int(digits, 16))
        if ch.isalnum():
            raise self.fail(f"'\\{ch}'")
        return ch

    def escape(self) -> str:
        if self.peek() is None:
            raise self.fail("a trailing backslash")
        ch = self.take()
        if ch.lower() in _CLASS_ESCAPES:
            neg = "^" if ch.isupper() else ""
            return f"[{neg}{_CLASS_ESCAPES[ch.lower()]}]"
        return gbnf_literal(self._escaped_char(ch))

    def char_class(self) -> str:
        neg = ""
        if self.peek() == "^":
            self.i += 1
            neg = "^"
        parts: list[str] = []
        first = True
        while True:
            ch = self.peek()
            if ch is None:
                raise self.fail("an unclosed character class")
            if ch == "]" and not first:
                self.i += 1
                break
            first = False
            self.i += 1
            if ch == "\\":
                esc = self.take() if self.peek() is not None else ""
                if esc in _CLASS_ESCAPES:
                    parts.append(_CLASS_ESCAPES[esc])
                    continue
                if esc.lower() in _CLASS_ESCAPES:
                    raise self.fail(f"'\\{esc}' inside a character class")
                ch = self._escaped_char(esc)
            elif ch == "[" and self.peek() == ":":
                raise self.fail("a POSIX class")
            if self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.take()
                if hi == "\\":
                    hi = self._escaped_char(self.take())
                if ord(hi) < ord(ch):
                    raise InvalidRequest(f"bad range {ch}-{hi} in the guided regex",
                                         param="guided_regex")
                parts.append(f"{_gbnf_char(ch, True)}-{_gbnf_char(hi, True)}")
            else:
                parts.append(_gbnf_char(ch, True))
        return f"[{neg}{''.join(parts)}]"


def regex_to_gbnf(pattern: str) -> str:
    """A GBNF grammar whose language is the (full-match) language of ``pattern``.

    Raises Unsupported for constructs a context-free grammar of this form cannot express.
    """
    if not isinstance(pattern, str) or not pattern:
        raise InvalidRequest("the guided regex must be a non-empty string", param="guided_regex")
    return f"root ::= {_RegexToGbnf(pattern).parse() or chr(34) * 2}\n"


def choice_to_gbnf(choices: Any) -> str:
    """A GBNF grammar that matches exactly one of ``choices``."""
    if not isinstance(choices, list) or not choices or not all(
            isinstance(c, str) for c in choices):
        raise InvalidRequest("guided_choice must be a non-empty list of strings",
                             param="guided_choice")
    return "root ::= " + " | ".join(gbnf_literal(c) for c in choices) + "\n"


# --- the extra request fields ----------------------------------------------------------------

def _schema(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequest(f"'{key}' is not valid JSON: {exc}", param=key) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{key}' must be a JSON schema (object or JSON text)", param=key)
    return value


def _guided(body: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The guided-decoding requests of a body as (kind, field name, value)."""
    found: list[tuple[str, str, Any]] = []
    for kind in ("json", "regex", "choice", "grammar"):
        if body.get(f"guided_{kind}") is not None:
            found.append((kind, f"guided_{kind}", body[f"guided_{kind}"]))
    if body.get("guided_json_object"):
        found.append(("json_object", "guided_json_object", True))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidRequest("'structured_outputs' must be an object",
                                 param="structured_outputs")
        for kind in ("json", "regex", "choice", "grammar", "json_object", "structural_tag"):
            value = so.get(kind)
            if value is not None and value is not False:
                found.append((kind, f"structured_outputs.{kind}", value))
    return found


def apply_guided(body: dict[str, Any], req: InternalRequest) -> None:
    """guided_* / structured_outputs → ``req.json_schema`` or ``req.grammar`` (GBNF)."""
    found = _guided(body)
    if not found:
        return
    if len(found) > 1:
        raise InvalidRequest("You can only use one kind of guided decoding ('json', 'regex', "
                             "'choice', 'grammar', 'json_object'); got "
                             + ", ".join(f for _, f, _ in found), param=found[1][1])
    kind, key, value = found[0]
    if kind == "json":
        req.json_schema = _schema(value, key)
        req.grammar = None
    elif kind == "json_object":
        req.json_schema = {}
        req.grammar = None
    elif kind == "choice":
        req.grammar = choice_to_gbnf(value)
    elif kind == "regex":
        try:
            req.grammar = regex_to_gbnf(value)
        except InvalidRequest as exc:
            exc.param = key
            raise
    elif kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(f"'{key}' must be a non-empty grammar (GBNF)", param=key)
        req.grammar = value
    else:
        raise Unsupported(f"'{key}' is not supported: llama.cpp has no structural tags",
                          param=key)


def apply_vllm_extras(body: dict[str, Any], req: InternalRequest) -> None:
    """Read vLLM's extra fields of a chat or completions body onto ``req``.

    The sampling fields shared with other dialects (``top_k``, ``min_p``,
    ``repetition_penalty``, ``ignore_eos``) are parsed by the OpenAI adapter already.
    """
    min_tokens = _int(body, "min_tokens", 0)
    if min_tokens:
        if req.max_tokens is not None and min_tokens > req.max_tokens:
            raise InvalidRequest(f"min_tokens must be less than or equal to max_tokens="
                                 f"{req.max_tokens}, got {min_tokens}.", param="min_tokens")
        req.min_tokens = min_tokens
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise InvalidRequest("'stop_token_ids' must be a list of token ids",
                                 param="stop_token_ids")
        req.stop_token_ids = list(ids)
    req.include_stop_str_in_output = get_bool(body, "include_stop_str_in_output", False)
    if not get_bool(body, "skip_special_tokens", True):
        raise Unsupported("'skip_special_tokens': false is not supported: llama-server never "
                          "renders special tokens in generated text", param="skip_special_tokens")
    if body.get("prompt_logprobs") not in (None, 0):
        raise Unsupported("'prompt_logprobs' is not supported: llama-server does not score "
                          "prompt tokens", param="prompt_logprobs")
    if get_bool(body, "use_beam_search", False):
        raise Unsupported("'use_beam_search' is not supported by this engine",
                          param="use_beam_search")
    if body.get("echo") is True and req.is_chat:
        raise Unsupported("'echo' is not supported on chat completions", param="echo")
    for key in ("add_generation_prompt", "continue_final_message"):
        if body.get(key) is not None:
            setattr(req, key, get_bool(body, key, getattr(req, key)))
    if body.get("include_reasoning") is False:
        req.reasoning = False
    apply_guided(body, req)
    check_min_tokens(req)
    unknown = [k for k in _IGNORED if k in body]
    if unknown:
        log.debug("vLLM fields accepted and ignored: %s", ", ".join(unknown))


def _int(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"'{key}' must be a non-negative integer, got "
                             f"{json.dumps(value)}", param=key)
    return value


# --- vLLM's own routes -----------------------------------------------------------------------

@dataclass
class TokenizeRequest:
    """A parsed vLLM ``/tokenize`` body: either ``prompt`` text or a chat ``request``."""

    model: str | None
    prompt: str | None
    chat: InternalRequest | None
    add_special_tokens: bool
    return_token_strs: bool


def vllm_tokenize_request(body: dict[str, Any], default_model: str) -> TokenizeRequest:
    """A ``/tokenize`` body (``prompt`` or ``messages``) → TokenizeRequest."""
    model = body.get("model") or default_model
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", param="model")
    strs = get_bool(body, "return_token_strs", False)
    if "messages" in body:
        chat = InternalRequest(model=model, dialect="vllm",
                               messages=parse_messages(body.get("messages")))
        chat.add_generation_prompt = get_bool(body, "add_generation_prompt", True)
        chat.continue_final_message = get_bool(body, "continue_final_message", False)
        if chat.add_generation_prompt and chat.continue_final_message:
            raise InvalidRequest("Cannot set both `continue_final_message` and "
                                 "`add_generation_prompt` to True.",
                                 param="continue_final_message")
        kwargs = body.get("chat_template_kwargs")
        if isinstance(kwargs, dict):
            chat.chat_template_kwargs = dict(kwargs)
        return TokenizeRequest(model, None, chat, get_bool(body, "add_special_tokens", False), strs)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' (a string) or 'messages' is required", param="prompt")
    return TokenizeRequest(model, prompt, None, get_bool(body, "add_special_tokens", True), strs)


def internal_to_vllm_tokenize(tokens: list[dict[str, Any]], max_model_len: int,
                              return_token_strs: bool) -> dict[str, Any]:
    """``{count, max_model_len, tokens, token_strs}`` from engine ``{id, piece}`` tokens."""
    return {"count": len(tokens), "max_model_len": max_model_len,
            "tokens": [t["id"] for t in tokens],
            "token_strs": [_piece(t) for t in tokens] if return_token_strs else None}


def _piece(token: dict[str, Any]) -> str:
    piece = token.get("piece", "")
    if isinstance(piece, list):  # llama-server gives bytes for pieces that are not UTF-8
        return bytes(piece).decode("utf-8", errors="replace")
    return piece


def vllm_detokenize_tokens(body: dict[str, Any]) -> list[int]:
    """The ``tokens`` of a ``/detokenize`` body."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidRequest("'tokens' must be a list of token ids", param="tokens")
    return tokens


def vllm_generate_to_internal(body: dict[str, Any], model: str) -> InternalRequest:
    """The legacy demo server's ``/generate`` body (``prompt``, ``stream``, sampling) →
    InternalRequest (raw prompt). vLLM's SamplingParams defaults: 16 new tokens."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' is required and must be a string", param="prompt")
    req = InternalRequest(model=model, dialect="vllm", prompt=prompt, raw=True)
    common_sampling(body, req)
    max_tokens = get_number(body, "max_tokens", 1, integer=True)
    req.max_tokens = 16 if max_tokens is None else max_tokens
    apply_vllm_extras(body, req)
    return req


class VLLMGenerateStream:
    """Internal events → the legacy ``/generate`` stream: one JSON per line holding the whole
    text so far of every choice (``n`` of them), as vLLM's demo server streams."""

    def __init__(self, prompt: str, n: int = 1) -> None:
        self.texts = [prompt] * n

    def process(self, event: Event) -> list[dict[str, Any]]:
        """Objects for one internal event (once per new text)."""
        if not isinstance(event, (TextDelta, ReasoningDelta)) or not event.text:
            return []
        self.texts[event.choice] += event.text
        return [{"text": list(self.texts)}]
