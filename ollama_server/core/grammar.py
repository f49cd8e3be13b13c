"""Constrained output as llama-server takes it: GBNF grammars and JSON schemas (pure).

The dialects ask for constraints in several forms: vLLM's guided regex and choice, TGI's
``grammar`` parameter (json / json_object / json_schema / regex), OpenAI's and Anthropic's
JSON schemas. llama-server takes a JSON schema or a GBNF grammar, so regular expressions and
choices are translated to GBNF here; what cannot be translated is a clear error, never an
unconstrained answer. Each dialect words the error its own way (``GrammarError``).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidRequest, Unsupported
from .schemas import InternalRequest


class GrammarError(InvalidRequest):
    """A constraint that is not valid (the dialect rewords it: TGI's 422, OpenAI's 400)."""


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


# --- TGI's grammar parameter ------------------------------------------------------------

def apply_tgi_grammar(grammar: Any, req: InternalRequest) -> None:
    """TGI's ``grammar`` parameter (also the form of ``response_format`` its chat route
    takes, and that huggingface_hub sends) → ``req.json_schema`` / ``req.grammar``.
    GrammarError, in TGI's words."""
    if not isinstance(grammar, dict) or "type" not in grammar:
        raise GrammarError("Failed to deserialize the JSON body into the target type: "
                            "parameters.grammar: missing field `type`")
    kind, value = grammar.get("type"), grammar.get("value")
    if kind in ("json", "json_object"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise GrammarError(f"grammar is not valid: {exc}") from None
        if not isinstance(value, dict):
            raise GrammarError("grammar is not supported")
        req.json_schema = value
    elif kind == "json_schema":
        schema = value.get("schema") if isinstance(value, dict) else None
        if not isinstance(schema, dict):
            raise GrammarError("grammar is not valid: a json_schema grammar needs "
                                "`value.schema`")
        req.json_schema = schema
    elif kind == "regex":
        if not isinstance(value, str) or not value:
            raise GrammarError("grammar is not valid: `value` cannot be empty for `regex`")
        try:
            req.grammar = regex_to_gbnf(value)
        except InvalidRequest as exc:
            raise GrammarError(f"grammar is not valid: {exc.message}") from None
    else:
        raise GrammarError(f"Failed to deserialize the JSON body into the target type: "
                            f"parameters.grammar: unknown variant `{kind}`, expected one of "
                            f"`json`, `json_object`, `json_schema`, `regex`")
