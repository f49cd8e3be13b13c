"""The KV cache the slots share, with the service's defaults, on the real engine: one long
prompt near the context and other requests at once, or several long prompts at once, are all
answered (a cache of one context, shared by 32 slots, failed every one of them: the engine
ends all requests in progress when its cache is full)."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import requests

from ollama_server.models.store import ModelName, OllamaStore
from tests.engine.test_kv_cache_real import long_prompt
from tests.helpers import ServiceProcess

pytestmark = pytest.mark.e2e

MODEL = "smollm2-plain:latest"  # the smollm2 GGUF in a plain folder: no num_ctx of its own
CTX = 2048


@pytest.fixture(scope="module")
def service(tmp_path_factory, real_models, engine_binary):
    tmp = tmp_path_factory.mktemp("kvpool")
    store = OllamaStore(real_models)
    manifest = store.read_manifest(ModelName.parse("smollm2:135m").manifest_path(
        store.manifests_dir))
    (tmp / "gguf").mkdir()
    (tmp / "gguf" / "smollm2-plain.gguf").symlink_to(
        store.blob_path(store.layer(manifest, "model")["digest"]))
    svc = ServiceProcess(tmp, real_models,
                         args=["--context-size", str(CTX), "--gguf-dir", str(tmp / "gguf")])
    svc.ready_or_stopped()
    yield svc
    assert svc.stop() == 0, svc.log()


def ask_together(base_url: str, prompts: list[str]) -> list[object]:
    oai = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=600)

    def one(prompt: str) -> object:
        try:
            return oai.chat.completions.create(
                model=MODEL, max_tokens=4, temperature=0.0,
                messages=[{"role": "user", "content": prompt}]).usage.prompt_tokens
        except openai.APIError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_the_default_pool_holds_several_contexts(service):
    requests.post(service.base_url + "/api/generate", timeout=300,
                  json={"model": MODEL, "prompt": "Hi", "options": {"num_predict": 1}})
    ps = requests.get(service.base_url + "/api/ps", timeout=30).json()["models"]
    entry = next(m for m in ps if m["name"] == MODEL)
    # 4 contexts of 180 MiB / 4 per 2,048 tokens: this machine's memory holds them.
    assert (entry["context_length"], entry["kv_pool_size"]) == (CTX, 4 * CTX), entry


def context_now(service) -> int:
    ps = requests.get(service.base_url + "/api/ps", timeout=30).json()["models"]
    return next(m for m in ps if m["name"] == MODEL)["context_length"]


def test_four_long_prompts_at_once_are_all_answered(service):
    # 4 x about 1,040 tokens: twice the context, in a pool of four contexts.
    results = ask_together(service.base_url, [long_prompt(i, 60) for i in range(4)])
    assert all(isinstance(r, int) and 900 < r < CTX for r in results), results
    assert context_now(service) == CTX


def test_a_prompt_near_the_context_beside_other_requests(service):
    # About 1,936 of the 2,048 tokens, and three prompts of about 700 beside it.
    near = long_prompt(7, 112)
    results = ask_together(service.base_url, [near] + [long_prompt(i, 40) for i in range(3)])
    assert all(isinstance(r, int) for r in results), results
    assert 1800 < results[0] < CTX, results
    assert context_now(service) == CTX  # answered in the context it had, not a bigger one
