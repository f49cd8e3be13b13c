"""How much KV cache a model's slots share when ``kv_pool_size`` is 0 (auto).

llama-server's slots share one KV cache (``--kv-unified``). Sized to one context, a single
prompt near the context plus any other request overflow it, and the engine then fails every
request in progress at once ("Context size has been exceeded"). Ollama gives each of its
parallel requests (four by default where memory allows) a whole context; so does this: the
pool holds ``min(parallel, 4)`` contexts, each slot still capped at one context
(``--kv-unified-per-slot``), when this host's free memory holds them next to the weights, else
two contexts, else one.

Where the KV cache may go to a GPU or to RPC workers, free host memory says nothing about
where it lands, so the pool stays one context there (set ``kv_pool_size`` by hand).
"""

from __future__ import annotations

from pathlib import Path

from .schemas import ModelInfo

CONTEXTS = (4, 2)  # the multiples of the context tried, largest first
MARGIN = 1 << 30  # bytes of memory left free, as llama-server's --fit leaves 1 GiB

# Bytes per element of each KV cache type (a q8_0 block: 32 values in 34 bytes; q4_0: 18).
BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32,
                   "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}


def kv_bytes_per_token(info: ModelInfo, kv_cache_type: str = "f16") -> int | None:
    """Bytes of KV cache one token takes, from the GGUF header; None when it does not say.

    Every layer counted as full attention: sliding-window layers (gemma3) take less, so
    this is an upper bound."""
    meta, arch = info.metadata, info.architecture

    def num(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        return value if isinstance(value, int) and value > 0 else None

    layers, heads = num("block_count"), num("attention.head_count")
    kv_heads = num("attention.head_count_kv") or heads
    width = num("embedding_length")
    head_dim = width // heads if width and heads else None
    k_dim = num("attention.key_length") or head_dim
    v_dim = num("attention.value_length") or head_dim
    if not (layers and kv_heads and k_dim and v_dim):
        return None
    return int(layers * kv_heads * (k_dim + v_dim) * BYTES_PER_VALUE.get(kv_cache_type, 2.0))


def available_memory() -> int | None:
    """Bytes of memory this host can still give (MemAvailable), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def auto_contexts(info: ModelInfo, ctx: int, parallel: int, kv_cache_type: str,
                  host_only: bool, available: int | None) -> int:
    """How many contexts of KV cache the slots of ``info`` share (1, 2 or 4). Pure.

    ``host_only``: the cache lives in this host's memory (no GPU, no RPC workers);
    ``available``: that memory's free bytes."""
    per_token = kv_bytes_per_token(info, kv_cache_type)
    if not host_only or available is None or per_token is None:
        return 1
    for n in CONTEXTS:
        if n <= parallel and info.size + n * ctx * per_token + MARGIN <= available:
            return n
    return 1
