"""kv_cache_type and flash_attention: validated, read from Ollama's variables too, per model,
on the engine's command line and in /api/ps (pure: no engine)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ollama_server.adapters.ollama import ps_entry
from ollama_server.config import ConfigError, load_config
from ollama_server.core.engine import EngineSettings, LLAMAExecutor


def config(environ=None, **overrides):
    return load_config(overrides=overrides, environ=environ or {})


def test_defaults_leave_the_engine_command_as_it_was():
    c = config()
    assert (c.kv_cache_type, c.flash_attention) == ("f16", "auto")
    cmd = LLAMAExecutor(Path("/m.gguf"), EngineSettings(binary=Path("/x")), 512).command(1)
    assert "--cache-type-k" not in cmd and "-fa" not in cmd


@pytest.mark.parametrize("kv, flash, expected", [
    ("q8_0", "auto", ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0", "-fa", "on"]),
    ("q4_0", "on", ["--cache-type-k", "q4_0", "--cache-type-v", "q4_0", "-fa", "on"]),
    ("bf16", "off", ["--cache-type-k", "bf16", "--cache-type-v", "bf16", "-fa", "off"]),
    ("f16", "off", ["-fa", "off"]),
])
def test_the_engine_command_line(kv, flash, expected):
    settings = EngineSettings(binary=Path("/x"), kv_cache_type=kv, flash_attention=flash)
    cmd = LLAMAExecutor(Path("/m.gguf"), settings, 512).command(1)
    start = cmd.index(expected[0])
    assert cmd[start:start + len(expected)] == expected


def test_ollamas_variables_and_their_spellings_are_read():
    c = config({"OLLAMA_KV_CACHE_TYPE": "Q8_0", "OLLAMA_FLASH_ATTENTION": "1"})
    assert (c.kv_cache_type, c.flash_attention) == ("q8_0", "on")
    ours = config({"OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_SERVER_KV_CACHE_TYPE": "q4_0"})
    assert ours.kv_cache_type == "q4_0"
    assert config({"OLLAMA_FLASH_ATTENTION": "false"}).flash_attention == "off"


@pytest.mark.parametrize("overrides, words", [
    ({"kv_cache_type": "q3_k"}, "kv_cache_type must be one of"),
    ({"flash_attention": "sometimes"}, "flash_attention must be auto, on or off"),
    ({"kv_cache_type": "q8_0", "flash_attention": "off"}, "needs flash attention"),
    ({"flash_attention": "off", "model_settings": {"m": {"kv_cache_type": "q4_0"}}},
     "model_settings.m.kv_cache_type q4_0 needs flash attention"),
    ({"model_settings": {"m": {"kv_cache_type": "int3"}}}, "model_settings.m.kv_cache_type"),
])
def test_what_the_engine_cannot_run_is_a_configuration_error(overrides, words):
    with pytest.raises(ConfigError, match=words):
        config(**overrides)


def test_a_model_may_have_its_own_cache_type_and_ps_shows_it():
    from ollama_server.models.pool import EnginePool

    c = config(kv_cache_type="q8_0", model_settings={"big": {"kv_cache_type": "q4_0",
                                                             "flash_attention": "on"}})
    pool = EnginePool(c, engine_binary=Path("/x"))
    try:
        assert pool.engine_settings("big").kv_cache_type == "q4_0"
        assert pool.engine_settings("other").kv_cache_type == "q8_0"
        engine = SimpleNamespace(settings=pool.engine_settings("big"), report=None)
    finally:
        pool.shutdown()
    info = SimpleNamespace(name="big", size=1, digest="d", details=lambda: {})
    entry = SimpleNamespace(info=info, engine=engine, expires_at=None, keep_alive=300.0,
                            ctx_size=2048)
    out = ps_entry(entry, 0.0, 0.0)
    assert (out["kv_cache_type"], out["flash_attention"]) == ("q4_0", "on")
