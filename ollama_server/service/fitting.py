"""A request against its model and engine: everything the engine cannot take is refused (400
naming the field) or brought into the engine's range before any work starts (pure).

- ``fit_request_to_engine`` (from ``generation.start_generation``): the configured token
  default and cap, ``max_tokens`` beyond the model's context, and numbers outside what the
  engine's C types hold (seed, top_k, repeat_last_n, n_probs, token ids, 32-bit floats).
- ``fit_embedding_inputs`` (from ``generation.run_embeddings``): inputs longer than the engine
  can embed in one batch are cut where the API allows it (Ollama's ``truncate``), else a 400
  that names the limit.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..core.errors import InvalidRequest
from ..core.schemas import InternalRequest
from ..models.schemas import ModelInfo

INT32_MAX = 2**31 - 1
SEED_RANGE = 2**32 - 1  # llama.cpp seeds are uint32; 0xFFFFFFFF means "random"
FLOAT32_MAX = 3.4028234663852886e38
MAX_TOP_LOGPROBS = 20  # what OpenAI, vLLM and Ollama allow
# llama.cpp's default physical batch (-ub): an embedding input must fit in one.
DEFAULT_UBATCH = 512


# --- a generation request against its model and engine --------------------------------------------

def _int_field(name: str, value: int | None, lo: int, hi: int) -> int | None:
    if value is not None and not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}, got {value}", param=name)
    return value


def _check_float32(req: InternalRequest) -> None:
    for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                 "presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and abs(value) > FLOAT32_MAX:
            raise InvalidRequest(f"{name} is {value}, beyond what the engine can hold (a 32-bit "
                                 f"float, at most {FLOAT32_MAX:.3g})", param=name)
    for token, bias in (req.logit_bias or {}).items():
        _int_field("logit_bias", token, 0, INT32_MAX)
        if abs(bias) > FLOAT32_MAX:
            raise InvalidRequest(f"logit_bias of token {token} is {bias}, beyond a 32-bit "
                                 f"float", param="logit_bias")


def fit_request_to_engine(req: InternalRequest, info: ModelInfo, config: Config) -> None:
    """Apply the configured token default and cap, and bring every number into the engine's
    range: clamp what has one meaning beyond it, refuse (400 naming the field) what has none.
    """
    default, cap = config.token_limit(info.name)
    if req.max_tokens is None and default is not None:
        req.max_tokens = default
    if cap is not None and (req.max_tokens is None or req.max_tokens > cap):
        req.max_tokens = cap
    # The engine stops at the end of the context anyway: more than that means "up to it".
    context = info.context_length or INT32_MAX
    if req.max_tokens is not None and req.max_tokens > context:
        req.max_tokens = context
    _int_field("min_tokens", req.min_tokens, 0, context)
    if req.seed is not None:
        # -1 is "random" in llama.cpp (and Ollama's default); other seeds fold into uint32.
        req.seed = None if req.seed == -1 else req.seed % SEED_RANGE
    if req.top_k is not None and not 0 <= req.top_k <= INT32_MAX:
        req.top_k = 0  # beyond the vocabulary (or negative) means no top-k limit
    if req.repeat_last_n is not None and req.repeat_last_n > INT32_MAX:
        req.repeat_last_n = -1  # the whole context
    _int_field("repeat_last_n", req.repeat_last_n, -1, INT32_MAX)
    _int_field("top_logprobs", req.top_logprobs, 0, MAX_TOP_LOGPROBS)
    _int_field("num_ctx", req.num_ctx, 0, INT32_MAX)
    _check_float32(req)
    check_token_ids(req.stop_token_ids, info, "stop_token_ids")
    if isinstance(req.prompt, list):
        check_token_ids(req.prompt, info, "prompt")


def check_token_ids(tokens: Any, info: ModelInfo, name: str) -> list[int]:
    """``tokens`` as a list of ids of ``info``'s vocabulary, or InvalidRequest naming
    ``name`` (llama-server fails with a 500 on an id outside its vocabulary)."""
    if not isinstance(tokens, list) or any(
            isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise InvalidRequest(f"{name} must be a list of token ids (integers)", param=name)
    top = (info.vocab_size or INT32_MAX + 1) - 1
    for token in tokens:
        if not 0 <= token <= top:
            raise InvalidRequest(f"{name} holds the token id {token}, outside the vocabulary "
                                 f"of {info.name} (ids 0 to {top})", param=name)
    return tokens


# --- embeddings -----------------------------------------------------------------------------------

def embedding_token_limit(engine: Any) -> int:
    """The most tokens one input may have: it must fit in one physical batch of the engine."""
    settings = engine.settings
    ubatch = getattr(settings, "ubatch_size", None) or DEFAULT_UBATCH
    return max(1, min(settings.batch_size, ubatch, engine.ctx_size))


def fit_embedding_inputs(inputs: list[Any], engine: Any, truncate: bool) -> list[Any]:
    """``inputs`` with each one longer than the engine's limit cut to it (``truncate``), or
    InvalidRequest naming the input and the limit."""
    limit = embedding_token_limit(engine)
    out: list[Any] = []
    for i, item in enumerate(inputs):
        if isinstance(item, list):
            tokens = item
            for token in tokens:
                _int_field("input", token, 0, INT32_MAX)
        elif len(item.encode("utf-8")) + 4 <= limit:
            out.append(item)  # a token is at least one byte: it fits without counting
            continue
        else:
            tokens = engine.tokenize(item, add_special=True)
        if len(tokens) <= limit:
            out.append(item)
        elif truncate:
            out.append(list(tokens[:limit]))
        else:
            raise InvalidRequest(
                f"input {i} is {len(tokens)} tokens, more than the {limit} tokens this "
                f"model can embed at once (batch_size); shorten or split it", param="input")
    return out
