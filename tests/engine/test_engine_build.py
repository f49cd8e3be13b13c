"""The engine binary in use: AMX-free machine code, proven on this machine, RPC worker beside it."""

from __future__ import annotations

import json

import pytest

from ollama_server.models.store import ModelName, OllamaStore
from ollama_server.provision import engine as provision
from ollama_server.provision.smoke import smoke_test

pytestmark = pytest.mark.engine


def test_engine_in_use_holds_no_amx_instructions(engine_binary):
    """ggml's AMX kernels die with SIGILL in the pinned llama.cpp: none may be in the build.

    (A -march=native build on an AMX Xeon held 373 tile instructions: tilezero, tileloadd,
    tdpbssd, ldtilecfg...; the project's build holds none.)
    """
    files = provision.engine_code_files(engine_binary.parent)
    assert engine_binary in files
    counts = {f.name: provision.amx_instructions(f) for f in files}
    assert counts and all(n == 0 for n in counts.values()), counts


def test_engine_in_use_was_proven_on_this_machine(engine_binary):
    info_file = engine_binary.parent.parent / provision.BUILD_INFO
    if not info_file.is_file():
        pytest.fail(f"{engine_binary} is not the project's proven build (no {info_file}); "
                    "CI must use the engine `make engine` built")
    info = json.loads(info_file.read_text())
    assert info["smoke"]["ok"] and info["smoke"]["rpc"]["ok"]
    assert "-DGGML_RPC=ON" in info["flags"]
    if info["flavour"] == "native":
        assert info["cpu_features"] == provision.cpu_features()
        assert info["key"] == provision.make_plan(info["backend"], "native").key


def test_smoke_test_passes_on_the_engine_and_its_rpc_worker(engine_binary, real_models):
    store = OllamaStore(real_models)
    manifest = store.read_manifest(ModelName.parse("smollm2:135m").manifest_path(
        store.manifests_dir))
    model = store.blob_path(store.layer(manifest, "model")["digest"])
    rpc = provision.rpc_worker_binary(engine_binary)
    assert rpc is not None, "ggml-rpc-server must be built beside llama-server"
    result = smoke_test(engine_binary, model, rpc_binary=rpc, log=lambda _m: None)
    assert result["ok"] and result["embedding_dim"] == 576
    assert result["tokens_per_s"] > 0 and result["rpc"]["tokens_per_s"] > 0
