"""vLLM's extensions to the OpenAI wire format ⇄ internal types. Pure: no Flask, no I/O.

vLLM's OpenAI server accepts extra fields on ``/v1/chat/completions`` and ``/v1/completions``
(sampling knobs, guided decoding in its older ``guided_*`` and newer ``structured_outputs``
forms, reasoning switches). ``openai_fields.apply_vllm_extras`` reads them onto an
``InternalRequest`` that the OpenAI adapter built; this module shapes vLLM's own routes
(``/tokenize``, ``/detokenize``, ``/version``, the legacy demo ``/generate``).

Guided choices and regexes become GBNF grammars in ``core.grammar``; what cannot be translated
is a clear 400, never an unconstrained answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..core.errors import InvalidRequest
from ..core.schemas import Event, InternalRequest, ReasoningDelta, TextDelta
from .fields import get_bool, get_number
from .openai_fields import apply_vllm_extras, common_sampling, parse_messages

log = logging.getLogger(__name__)

VLLM_VERSION = "0.11.0"  # the vLLM release whose OpenAI server this dialect follows

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
