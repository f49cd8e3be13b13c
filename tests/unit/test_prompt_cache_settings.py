"""kv_pool_size, cache_ram and slot_prompt_similarity (issue 24 item 6): validated, global and
per model, on the engine's command line and in /api/ps (pure: no engine)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ollama_server.adapters.ollama import ps_entry
from ollama_server.config import ConfigError, load_config
from ollama_server.core.engine import EngineSettings, LLAMAExecutor, kv_pool_cells
from ollama_server.models.kv_budget import auto_contexts, kv_bytes_per_token
from ollama_server.models.schemas import ModelInfo


def config(environ=None, **overrides):
    return load_config(overrides=overrides, environ=environ or {})


def command(ctx=8192, **settings):
    return LLAMAExecutor(Path("/m.gguf"), EngineSettings(binary=Path("/x"), **settings),
                         ctx).command(1)


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_defaults():
    c = config()
    assert (c.kv_pool_size, c.cache_ram, c.slot_prompt_similarity) == (0, 8192, 0.1)


def test_settings_left_to_the_engine_add_nothing():
    cmd = command()
    assert flag(cmd, "-c") == "8192"
    for name in ("--kv-unified-per-slot", "--cache-ram", "--slot-prompt-similarity"):
        assert name not in cmd


def test_a_pool_larger_than_the_context_is_shared_with_each_slot_capped():
    cmd = command(32768, kv_pool_size=262144)
    assert flag(cmd, "-c") == "262144"
    assert flag(cmd, "--kv-unified-per-slot") == "32768"
    assert "--kv-unified" in cmd


@pytest.mark.parametrize("pool", [0, 4096, 8192])
def test_a_pool_no_larger_than_the_context_is_the_context(pool):
    cmd = command(8192, kv_pool_size=pool)
    assert flag(cmd, "-c") == "8192" and "--kv-unified-per-slot" not in cmd


def test_cache_ram_and_similarity_reach_the_engine():
    cmd = command(cache_ram=-1, slot_prompt_similarity=0.5)
    assert flag(cmd, "--cache-ram") == "-1"
    assert flag(cmd, "--slot-prompt-similarity") == "0.5"
    assert flag(command(cache_ram=0, slot_prompt_similarity=0.0), "--slot-prompt-similarity") \
        == "0"


def test_environment_variables_set_them():
    c = config({"OLLAMA_SERVER_KV_POOL_SIZE": "163840", "OLLAMA_SERVER_CACHE_RAM": "-1",
                "OLLAMA_SERVER_SLOT_PROMPT_SIMILARITY": "0.25"})
    assert (c.kv_pool_size, c.cache_ram, c.slot_prompt_similarity) == (163840, -1, 0.25)


@pytest.mark.parametrize("overrides, words", [
    ({"kv_pool_size": -1}, r"kv_pool_size must be 0 \(auto\)"),
    ({"cache_ram": -2}, "cache_ram must be MiB"),
    ({"cache_ram": "lots"}, "invalid value for cache_ram"),
    ({"slot_prompt_similarity": 1.5}, "slot_prompt_similarity must be between 0 and 1"),
    ({"slot_prompt_similarity": -0.1}, "slot_prompt_similarity must be between 0 and 1"),
    ({"model_settings": {"m": {"cache_ram": -5}}}, "model_settings.m.cache_ram"),
    ({"model_settings": {"m": {"slot_prompt_similarity": 2}}},
     "model_settings.m.slot_prompt_similarity"),
    ({"model_settings": {"m": {"kv_pool_size": "big"}}}, "model_settings.m.kv_pool_size"),
])
def test_what_the_engine_cannot_take_is_a_configuration_error(overrides, words):
    with pytest.raises(ConfigError, match=words):
        config(**overrides)


def test_a_model_may_have_its_own_and_ps_shows_them():
    from ollama_server.models.pool import EnginePool

    c = config(cache_ram=4096, model_settings={"agent": {
        "kv_pool_size": 163840, "cache_ram": -1, "slot_prompt_similarity": "0.5"}})
    pool = EnginePool(c, engine_binary=Path("/x"))
    try:
        mine, other = pool.engine_settings("agent"), pool.engine_settings("other")
    finally:
        pool.shutdown()
    assert (mine.kv_pool_size, mine.cache_ram, mine.slot_prompt_similarity) == (163840, -1, 0.5)
    assert (other.kv_pool_size, other.cache_ram, other.slot_prompt_similarity) == (0, 4096, 0.1)
    info = SimpleNamespace(name="agent", size=1, digest="d", details=lambda: {})
    for settings, ctx, pool_size in ((mine, 32768, 163840), (other, 8192, 8192)):
        entry = SimpleNamespace(info=info, engine=SimpleNamespace(settings=settings, report=None),
                                expires_at=None, keep_alive=300.0, ctx_size=ctx)
        out = ps_entry(entry, 0.0, 0.0)
        assert out["kv_pool_size"] == pool_size
        assert out["cache_ram"] == settings.cache_ram
        assert out["slot_prompt_similarity"] == settings.slot_prompt_similarity


# --- kv_pool_size 0: as many contexts as memory holds (models/kv_budget.py) ----------------

def model(**meta):
    return ModelInfo(name="m:latest", path=Path("/m.gguf"), source="gguf", size=100 << 20,
                     architecture="llama", metadata={f"llama.{k}": v for k, v in meta.items()})


SMOLLM = {"block_count": 30, "embedding_length": 576, "attention.head_count": 9,
          "attention.head_count_kv": 3}


def test_kv_bytes_per_token_from_the_header():
    # smollm2:135m: 30 layers x 3 KV heads x (64 + 64) x 2 bytes; llama-server reports
    # 180 MiB for 8,192 cells.
    assert kv_bytes_per_token(model(**SMOLLM)) * 8192 == 180 << 20
    assert kv_bytes_per_token(model(**SMOLLM), "q8_0") == 30 * 3 * 128 * 34 // 32
    gemma = model(block_count=18, embedding_length=640, **{
        "attention.head_count": 4, "attention.head_count_kv": 1, "attention.key_length": 256,
        "attention.value_length": 256})
    assert kv_bytes_per_token(gemma) == 18 * 1 * 512 * 2
    assert kv_bytes_per_token(model(block_count=30)) is None  # no heads: unknown


@pytest.mark.parametrize(("available_mib", "parallel", "host_only", "contexts"), [
    (64 << 10, 32, True, 4),    # plenty: four contexts
    (64 << 10, 2, True, 2),     # never more contexts than slots
    (64 << 10, 1, True, 1),
    (1100 + 100 + 360, 32, True, 2),  # room for two contexts of 180 MiB (+ 1 GiB margin)
    (1100 + 100, 32, True, 1),  # not even two
    (64 << 10, 32, False, 1),   # a GPU or RPC workers may hold it: one, as before
])
def test_auto_contexts(available_mib, parallel, host_only, contexts):
    assert auto_contexts(model(**SMOLLM), 8192, parallel, "f16", host_only,
                         available_mib << 20) == contexts
    assert auto_contexts(model(), 8192, 32, "f16", True, 64 << 30) == 1  # header silent
    assert auto_contexts(model(**SMOLLM), 8192, 32, "f16", True, None) == 1  # memory unknown


def test_auto_contexts_reach_the_command_line_and_grow_with_the_context():
    cmd = command(8192, kv_pool_contexts=4)
    assert flag(cmd, "-c") == "32768" and flag(cmd, "--kv-unified-per-slot") == "8192"
    cmd = command(16384, kv_pool_contexts=4)  # restarted bigger for num_ctx
    assert flag(cmd, "-c") == "65536" and flag(cmd, "--kv-unified-per-slot") == "16384"
    cmd = command(8192, kv_pool_size=10000, kv_pool_contexts=4)  # a size set by hand wins
    assert flag(cmd, "-c") == "10000"
    assert kv_pool_cells(EngineSettings(binary=Path("/x"), kv_pool_contexts=2), 4096) == 8192


def test_the_pool_sizes_a_new_engine_by_the_memory_it_finds(tiny_store, monkeypatch):
    from ollama_server.models import pool as pool_module
    from ollama_server.models.manager import ModelManager

    mgr = ModelManager(config(models_dir=str(tiny_store)), engine_binary=Path("/bin/true"))
    try:
        info = mgr.resolve("tiny")
        monkeypatch.setattr(pool_module, "gpu_visible", lambda: False)
        monkeypatch.setattr(pool_module, "available_memory", lambda: 64 << 30)
        engine = mgr.pool._default_factory(info, 2048)
        assert engine.settings.kv_pool_contexts == (4 if kv_bytes_per_token(info) else 1)
        monkeypatch.setattr(pool_module, "gpu_visible", lambda: True)  # may go to a GPU
        assert mgr.pool._default_factory(info, 2048).settings.kv_pool_contexts == 1
    finally:
        mgr.shutdown()
