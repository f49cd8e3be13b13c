"""HuggingFace TGI wire format ⇄ internal types. Pure: no Flask, no I/O.

Requests: ``tgi_generate_to_internal`` validates a ``{inputs, parameters}`` body the way TGI's
router does (same checks, same order, same messages) and ``check_tgi_lengths`` applies the
token-count rules once the engine has tokenized the inputs. Answers: ``internal_to_tgi_generate``
(``/generate``), the stream converter ``TGIStream`` (``/generate_stream``), ``tgi_info`` and
``internal_to_tgi_tokenize``. Errors: ``tgi_error``.

Token ids, texts and logprobs in ``details`` are the engine's own (``TextDelta.tokens`` of the
raw-prompt path), never a re-tokenization of the answer.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import (
    AuthenticationError,
    Cancelled,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServiceError,
)
from ..core.grammar import GrammarError, apply_tgi_grammar
from ..core.schemas import Event, Finish, InternalRequest, ReasoningDelta, TextDelta, TokenInfo

TGI_VERSION = "3.3.6"  # the TGI release whose router this dialect follows
MAX_BEST_OF = 1  # best_of > 1 (several sampled answers, best kept) is not implemented
MAX_STOP_SEQUENCES = 4
MAX_TOP_N_TOKENS = 5
DEFAULT_GENERATION_LENGTH = 1024  # TGI's cap when max_new_tokens is not given

FINISH_REASONS = {"stop": "eos_token", "stop_sequence": "stop_sequence", "length": "length",
                  "tool_calls": "eos_token"}


class TGIValidation(InvalidRequest):
    """A TGI validation error (422, ``error_type: validation``); the message is TGI's."""


@dataclass
class TGIRequest:
    """A validated TGI generate request: the internal request and what the answer needs."""

    req: InternalRequest
    inputs: str
    max_new_tokens: int | None  # None: TGI's default, decided once the input length is known
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    truncate: int | None = None
    top_n_tokens: int = 0
    seed: int | None = None  # reported in details (None when decoding greedily)
    sampling: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _param(params: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise TGIValidation(f"Failed to deserialize the JSON body into the target type: "
                            f"parameters.{key}: invalid type: boolean `{str(value).lower()}`")
    if not isinstance(value, kind):
        raise TGIValidation(f"Failed to deserialize the JSON body into the target type: "
                            f"parameters.{key}: invalid type: {json.dumps(value)}")
    return value


def apply_grammar(grammar: Any, req: InternalRequest) -> None:
    """TGI's ``grammar`` parameter → ``req``; TGIValidation in TGI's words."""
    try:
        apply_tgi_grammar(grammar, req)
    except GrammarError as exc:
        raise TGIValidation(exc.message) from None


def tgi_generate_to_internal(body: dict[str, Any], model: str,
                             stream: bool = False) -> TGIRequest:
    """A ``{inputs, parameters}`` body → TGIRequest, validated as TGI's router does.

    A body without ``parameters`` samples (TGI's ``default_parameters``: ``do_sample: true``);
    inside a ``parameters`` object a missing boolean is false. ``stream`` is the route's.
    """
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise TGIValidation("Failed to deserialize the JSON body into the target type: "
                            "missing field `inputs`" if inputs is None else
                            "Failed to deserialize the JSON body into the target type: "
                            "inputs: invalid type, expected a string")
    raw = body.get("parameters")
    if raw is None:
        params: dict[str, Any] = {"do_sample": True}
    elif isinstance(raw, dict):
        params = raw
    else:
        raise TGIValidation("Failed to deserialize the JSON body into the target type: "
                            "parameters: invalid type, expected struct GenerateParameters")
    number = (int, float)
    best_of = _param(params, "best_of", int)
    temperature = _param(params, "temperature", number)
    repetition_penalty = _param(params, "repetition_penalty", number)
    frequency_penalty = _param(params, "frequency_penalty", number)
    top_k = _param(params, "top_k", int)
    top_p = _param(params, "top_p", number)
    typical_p = _param(params, "typical_p", number)
    do_sample = bool(_param(params, "do_sample", bool))
    max_new_tokens = _param(params, "max_new_tokens", int)
    stop = params.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise TGIValidation("Failed to deserialize the JSON body into the target type: "
                            "parameters.stop: invalid type, expected a sequence of strings")
    truncate = _param(params, "truncate", int)
    seed = _param(params, "seed", int)
    top_n_tokens = _param(params, "top_n_tokens", int)
    details = bool(_param(params, "details", bool))
    decoder_input_details = bool(_param(params, "decoder_input_details", bool))
    return_full_text = bool(_param(params, "return_full_text", bool))

    # The checks below follow router/src/validation.rs and server.rs in order.
    if best_of is not None and best_of != 1:
        if stream:
            raise TGIValidation("`best_of` != 1 is not supported when streaming tokens")
        if MAX_BEST_OF == 1:
            raise TGIValidation("`best_of` != 1 is not allowed for this endpoint")
    if stream and decoder_input_details:
        raise TGIValidation("`decoder_input_details` == true is not supported when streaming "
                            "tokens")
    sampling = (do_sample or temperature is not None or top_k is not None
                or top_p is not None or typical_p is not None)
    if temperature is not None and temperature <= 0.0:
        raise TGIValidation("`temperature` must be strictly positive")
    if repetition_penalty is not None and repetition_penalty <= 0.0:
        raise TGIValidation("`repetition_penalty` must be strictly positive")
    if frequency_penalty is not None and not -2.0 <= frequency_penalty <= 2.0:
        raise TGIValidation("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if top_p is not None and not 0.0 < top_p < 1.0:
        raise TGIValidation("`top_p` must be > 0.0 and < 1.0")
    if typical_p is not None and not 0.0 < typical_p < 1.0:
        raise TGIValidation("`typical_p` must be > 0.0 and < 1.0")
    if top_k is not None and top_k <= 0:
        raise TGIValidation("`top_k` must be strictly positive")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise TGIValidation("`max_new_tokens` must be strictly positive")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise TGIValidation(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. "
                            f"Given: {len(stop)}")
    if seed is not None and seed < 0:
        raise TGIValidation("Failed to deserialize the JSON body into the target type: "
                            "parameters.seed: invalid value, expected u64")
    if top_n_tokens is not None and not 0 <= top_n_tokens <= MAX_TOP_N_TOKENS:
        raise TGIValidation(f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. "
                            f"Given: {top_n_tokens}")
    if not inputs:
        raise TGIValidation("`inputs` cannot be empty")
    if params.get("watermark"):
        raise TGIValidation("`watermark` is not supported by this server")
    if params.get("adapter_id"):
        raise TGIValidation(f"adapter `{params['adapter_id']}` is not loaded (this server has "
                            f"no LoRA adapters)")

    req = InternalRequest(model=model, dialect="tgi", prompt=inputs, raw=True, stream=stream,
                          prompt_field="inputs")
    if sampling:
        req.temperature = float(temperature) if temperature is not None else 1.0
        req.top_k = top_k if top_k is not None else 0
        req.top_p = float(top_p) if top_p is not None else 1.0
        req.typical_p = float(typical_p) if typical_p is not None else 1.0
        req.min_p = 0.0
        # TGI draws a seed when none is given and reports it; llama.cpp seeds are 32-bit.
        seed = seed if seed is not None else random.randrange(2**32 - 1)
        req.seed = seed % (2**32 - 1)
    else:
        req.temperature = 0.0  # greedy, as TGI decodes without do_sample or warpers
        seed = None
    if repetition_penalty is not None:
        req.repeat_penalty = float(repetition_penalty)
    if frequency_penalty is not None:
        req.frequency_penalty = float(frequency_penalty)
    req.stop = [s for s in stop if s]
    req.include_stop_str_in_output = True  # TGI's generated text ends with the stop sequence
    # The engine reports each token's id, text and logprob only when asked for probabilities.
    req.logprobs = True
    req.top_logprobs = max(1, top_n_tokens or 0)
    req.max_tokens = max_new_tokens
    if params.get("grammar") is not None:
        apply_grammar(params["grammar"], req)
    return TGIRequest(req=req, inputs=inputs, max_new_tokens=max_new_tokens, details=details,
                      decoder_input_details=decoder_input_details,
                      return_full_text=return_full_text, truncate=truncate,
                      top_n_tokens=top_n_tokens or 0, seed=seed, sampling=sampling)


def check_tgi_lengths(tgi: TGIRequest, input_tokens: int, max_total_tokens: int) -> int:
    """Apply TGI's length rules once the input is tokenized; set and return max_new_tokens.

    ``input_tokens`` is the length before truncation; ``max_input_tokens`` is
    ``max_total_tokens - 1``, as TGI derives it by default.
    """
    max_input = max_total_tokens - 1
    if tgi.truncate is not None and (tgi.truncate == 0 or tgi.truncate > max_input):
        raise TGIValidation(f"`truncate` must be strictly positive and less than {max_input}. "
                            f"Given: {tgi.truncate}")
    length = min(input_tokens, tgi.truncate) if tgi.truncate else input_tokens
    if tgi.max_new_tokens is not None:
        new = tgi.max_new_tokens
    else:
        new = min(max(max_total_tokens - length, 0), DEFAULT_GENERATION_LENGTH)
    if length + new > max_total_tokens:
        raise TGIValidation(f"`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. "
                            f"Given: {length} `inputs` tokens and {new} `max_new_tokens`")
    if length > max_input:
        raise TGIValidation(f"`inputs` must have less than {max_input} tokens. "
                            f"Given: {length}")
    tgi.req.max_tokens = new
    return new


# --- answers ---------------------------------------------------------------------------------

def _lp(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def token_dict(t: TokenInfo) -> dict[str, Any]:
    """A TGI ``Token`` from an engine token (llama-server never emits special tokens' text)."""
    return {"id": int(t.id) if t.id is not None else 0, "text": t.text,
            "logprob": _lp(t.logprob), "special": False}


def top_tokens(t: TokenInfo, n: int) -> list[dict[str, Any]]:
    """TGI ``top_tokens`` of one position: the engine's alternatives, most likely first."""
    return [{"id": int(i) if i is not None else 0, "text": s, "logprob": _lp(lp),
             "special": False} for s, lp, i in t.top[:n]]


def prefill_tokens(pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TGI ``prefill`` from the engine tokenizer's ``{id, piece}``; llama-server does not score
    prompt tokens, so every ``logprob`` is null (TGI's own first one is too)."""
    out = []
    for p in pieces:
        piece = p.get("piece", "")
        if isinstance(piece, list):
            piece = bytes(piece).decode("utf-8", errors="replace")
        out.append({"id": int(p["id"]), "text": piece, "logprob": None})
    return out


def _finish(finish: Finish | None) -> str:
    return FINISH_REASONS.get(finish.reason if finish else "stop", "eos_token")


def internal_to_tgi_generate(result: Any, tgi: TGIRequest,
                             prefill: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``/generate`` body from a collected Result (``details`` only when asked)."""
    text = result.reasoning + result.text if result.reasoning else result.text
    body: dict[str, Any] = {"generated_text": (tgi.inputs + text) if tgi.return_full_text
                            else text}
    if tgi.details:
        tokens = [t for t in result.tokens if t.id is not None]
        details: dict[str, Any] = {
            "finish_reason": _finish(result.finish),
            "generated_tokens": (result.finish.usage.completion_tokens
                                 if result.finish and result.finish.usage.completion_tokens
                                 else len(tokens)),
            "seed": tgi.seed,
            "prefill": prefill if tgi.decoder_input_details and prefill is not None else [],
            "tokens": [token_dict(t) for t in tokens],
        }
        if tgi.top_n_tokens:
            details["top_tokens"] = [top_tokens(t, tgi.top_n_tokens) for t in tokens]
        body["details"] = details
    return body


class TGIStream:
    """Internal events → ``/generate_stream`` objects: one per token, the last one carrying
    ``generated_text`` and (with ``details``) the stream details.

    The last token is only known at the Finish, so each token's object is held back until the
    next token (or the Finish) arrives.
    """

    def __init__(self, tgi: TGIRequest, input_length: int = 0) -> None:
        self.tgi = tgi
        self.input_length = input_length
        self.index = 0
        self.text: list[str] = []
        self._held: dict[str, Any] | None = None

    def _token_obj(self, t: TokenInfo) -> dict[str, Any]:
        self.index += 1
        obj: dict[str, Any] = {"index": self.index, "token": token_dict(t)}
        if self.tgi.top_n_tokens:
            obj["top_tokens"] = top_tokens(t, self.tgi.top_n_tokens)
        obj["generated_text"] = None
        obj["details"] = None
        return obj

    def process(self, event: Event) -> list[dict[str, Any]]:
        """Objects ready to send for one internal event."""
        out: list[dict[str, Any]] = []
        if isinstance(event, (TextDelta, ReasoningDelta)):
            self.text.append(event.text)
            tokens = event.tokens if isinstance(event, TextDelta) else []
            for t in tokens:
                if t.id is None:
                    continue
                if self._held is not None:
                    out.append(self._held)
                self._held = self._token_obj(t)
        elif isinstance(event, Finish):
            last = self._held or self._token_obj(TokenInfo(id=0, text=""))
            self._held = None
            text = "".join(self.text)
            last["generated_text"] = (self.tgi.inputs + text) if self.tgi.return_full_text \
                else text
            if self.tgi.details:
                last["details"] = {"finish_reason": _finish(event),
                                   "generated_tokens": (event.usage.completion_tokens
                                                        or self.index),
                                   "seed": self.tgi.seed,
                                   "input_length": event.usage.prompt_tokens
                                   or self.input_length}
            out.append(last)
        return out


def tgi_info(model: str, max_total_tokens: int, max_concurrent: int, version: str,
             max_client_batch_size: int = 4) -> dict[str, Any]:
    """The ``/info`` body for the default model."""
    return {"model_id": model, "model_sha": None, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": max_concurrent, "max_best_of": MAX_BEST_OF,
            "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": max_total_tokens - 1,
            "max_total_tokens": max_total_tokens, "validation_workers": 1,
            "max_client_batch_size": max_client_batch_size,
            "router": "text-generation-router", "version": TGI_VERSION, "sha": version,
            "docker_label": None}


def internal_to_tgi_tokenize(inputs: str, pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TGI ``/tokenize``: ``[{id, text, start, stop}]``, offsets in characters of ``inputs``.

    Offsets are found by locating each piece in the input after the previous one; a piece not
    found verbatim (a BOS token, bytes of a split character) gets an empty span there.
    """
    out = []
    pos = 0
    for p in pieces:
        piece = p.get("piece", "")
        if isinstance(piece, list):
            piece = bytes(piece).decode("utf-8", errors="replace")
        start = inputs.find(piece, pos) if piece else -1
        if start < 0 or (start > pos and inputs[pos:start].strip()):
            start = stop = pos
        else:
            stop = start + len(piece)
            pos = stop
        out.append({"id": int(p["id"]), "text": piece, "start": start, "stop": stop})
    return out


# --- errors ----------------------------------------------------------------------------------

def tgi_error(exc: ServiceError) -> tuple[dict[str, Any], int]:
    """``{"error", "error_type"}`` and the status TGI uses for ``exc``."""
    if isinstance(exc, InvalidRequest):
        status = 405 if exc.status == 405 else 422
        return ({"error": f"Input validation error: {exc.message}" if status == 422
                 else exc.message, "error_type": "validation"}, status)
    if isinstance(exc, Overloaded):
        return {"error": "Model is overloaded", "error_type": "overloaded"}, 429
    if isinstance(exc, (ModelNotFound, NotFound)):
        return {"error": exc.message, "error_type": "not_found"}, 404
    if isinstance(exc, AuthenticationError):
        return {"error": exc.message, "error_type": "authentication"}, 401
    if isinstance(exc, PayloadTooLarge):
        return {"error": exc.message, "error_type": "payload_too_large"}, 413
    if isinstance(exc, Cancelled):
        return {"error": exc.message, "error_type": "incomplete_generation"}, 500
    if isinstance(exc, RateLimited):  # text_generation raises RateLimitExceededError on 429
        return {"error": exc.message, "error_type": "rate_limit"}, 429
    if isinstance(exc, RequestTimeout):  # ... and ShardTimeoutError on 504
        return {"error": exc.message, "error_type": "timeout"}, 504
    return ({"error": f"Request failed during generation: {exc.message}",
             "error_type": "generation"}, 424)
