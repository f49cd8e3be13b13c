"""kv_pool_size, cache_ram and slot_prompt_similarity (issue 24 item 6): validated, global and
per model, on the engine's command line and in /api/ps (pure: no engine)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ollama_server.adapters.ollama import ps_entry
from ollama_server.config import ConfigError, load_config
from ollama_server.core.engine import EngineSettings, LLAMAExecutor


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
    ({"kv_pool_size": -1}, "kv_pool_size must be 0"),
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
