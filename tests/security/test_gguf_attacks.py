"""Issue 25: crafted GGUF files (the shapes of CVE-2024-39720, CVE-2025-53630, CVE-2026-27940,
CVE-2026-33298 and kin) uploaded with ``POST /api/blobs`` and named in ``POST /api/create``.

The header reader must refuse each one with Ollama's ``{"error": "…"}`` and a 400 naming the
problem, well under a second, without leaking the store's path, without writing a model and
without starting an engine; the service stays healthy and its real models keep working.
The first half checks the reader itself (one error type, bounded time and allocations); the
second half the real service.
"""

from __future__ import annotations

import hashlib
import time
import tracemalloc

import ollama
import pytest
import requests

from ollama_server.models.gguf_meta import GGUFError, read_header
from tests.e2e.test_fuzz import clone_store
from tests.helpers import ServiceProcess
from tests.security.gguf_craft import ATTACKS, VALID, Layout, Tensor, build

NAMES = sorted(ATTACKS)


# --- the reader ------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", NAMES)
def test_the_reader_refuses_each_attack_with_its_one_error(attack, tmp_path):
    data, words = ATTACKS[attack]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(GGUFError) as refused:
            read_header(path)
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert words in refused.value.message, refused.value.message
    assert refused.value.status == 400 and str(tmp_path) not in refused.value.message
    assert elapsed < 1.0, f"{attack}: {elapsed:.2f}s"
    assert peak < 1 << 20, f"{attack}: {peak} bytes allocated for a {len(data)}-byte file"
    with pytest.raises(GGUFError):  # a refusal is cached, and stays the same error type
        read_header(path)


def test_lengths_are_checked_before_anything_is_allocated(tmp_path):
    """A 32 MiB file whose first key claims 31 MiB: refused from the length alone."""
    data = build(kvs=[], tensors=[])
    key = (31 << 20).to_bytes(8, "little") + b"k" * 64
    path = tmp_path / "big.gguf"
    path.write_bytes(data[:16] + (1).to_bytes(8, "little") + key + b"\0" * (32 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match="bytes are allowed"):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_the_ggml_type_table_is_the_gguf_packages():
    """The reader's table of tensor types (sizes) is gguf's GGML_QUANT_SIZES, copied."""
    from gguf.constants import GGML_QUANT_SIZES

    from ollama_server.models.gguf_meta import _GGML_TYPES

    assert _GGML_TYPES == {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}


def test_valid_crafted_files_are_read(tmp_path, tiny_gguf):
    """The builder's files are valid: what the attacks break is what they are refused for."""
    path = tmp_path / "valid.gguf"
    path.write_bytes(VALID)
    header = read_header(path)
    assert header.architecture == "llama" and header.arch_value("context_length") == 2048
    assert header.parameter_count == 32
    path.write_bytes(build(Layout(tensors=[Tensor("a", (32, 2)), Tensor("b", (64,), 2)])))
    assert read_header(path).parameter_count == 128
    assert read_header(tiny_gguf).arch_value("context_length") == 4096


def test_attention_free_architectures_keep_head_count_zero(tmp_path):
    """Mamba and RWKV converters write head_count 0 ("unused"): not a zero divisor there."""
    from tests.security.gguf_craft import U32, base_kvs

    path = tmp_path / "mamba.gguf"
    path.write_bytes(build(kvs=base_kvs("mamba", **{"ARCH.attention.head_count": (U32, 0)})))
    assert read_header(path).architecture == "mamba"


def test_the_real_models_are_read(real_models):
    for blob in (real_models / "blobs").iterdir():
        if blob.stat().st_size > 1 << 20:
            started = time.perf_counter()
            header = read_header(blob)
            assert header.architecture in ("llama", "gemma3")
            assert header.array_lengths["tokenizer.ggml.tokens"] > 1000
            assert time.perf_counter() - started < 2.0


# --- the real service ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def attack_service(tmp_path_factory, real_models, engine_binary):
    """The real service over a copy of the test store (the attacks write blobs into it)."""
    tmp = tmp_path_factory.mktemp("gguf-attacks")
    store = clone_store(real_models, tmp / "models")
    svc = ServiceProcess(tmp, store)
    svc.ready_or_stopped()
    svc.store = store
    yield svc
    assert svc.stop() == 0, svc.log()


def upload(base: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    resp = requests.post(f"{base}/api/blobs/{digest}", data=data, timeout=30)
    assert resp.status_code in (200, 201), resp.text
    return digest


def model_names(base: str) -> set[str]:
    resp = requests.get(base + "/api/tags", timeout=30)
    assert resp.status_code == 200, resp.text
    return {m["name"] for m in resp.json()["models"]}


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
@pytest.mark.parametrize("attack", NAMES)
def test_create_refuses_each_crafted_file_with_a_400(attack_service, attack, stream):
    base = attack_service.base_url
    data, words = ATTACKS[attack]
    digest = upload(base, data)
    name = f"attack-{NAMES.index(attack)}-{int(stream)}:latest"
    body = {"model": name, "files": {"model.gguf": digest}}
    if not stream:
        body["stream"] = False
    started = time.perf_counter()
    resp = requests.post(base + "/api/create", json=body, timeout=30)
    elapsed = time.perf_counter() - started
    assert resp.status_code == 400, (attack, resp.status_code, resp.text[:500])
    error = resp.json()
    if attack == "wrong magic":
        words = "not in GGUF format"  # Ollama's own words for a file that is not GGUF
    assert set(error) == {"error"} and words in error["error"], error
    assert str(attack_service.store) not in error["error"]
    assert elapsed < 1.0, f"{attack}: {elapsed:.2f}s"
    assert name not in model_names(base)
    assert not (attack_service.store / "manifests/registry.ollama.ai/library"
                / name.split(":")[0]).exists()
    assert attack_service.engines() == [], "an engine was started for a refused file"


@pytest.mark.e2e
def test_the_official_client_gets_the_refusal(attack_service):
    data, words = ATTACKS["deeply nested arrays"]
    digest = upload(attack_service.base_url, data)
    client = ollama.Client(host=attack_service.base_url)
    with pytest.raises(ollama.ResponseError) as refused:
        client.create(model="nested-client", files={"model.gguf": digest})
    assert refused.value.status_code == 400 and words in refused.value.error
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.create(model="nested-client", files={"model.gguf": digest}, stream=True))
    assert streamed.value.status_code == 400


@pytest.mark.e2e
def test_a_valid_crafted_file_is_created(attack_service):
    """The same route takes the builder's valid file: the refusals are the attacks'."""
    base = attack_service.base_url
    digest = upload(base, VALID)
    resp = requests.post(base + "/api/create", timeout=30, json={
        "model": "crafted-valid", "files": {"model.gguf": digest}, "stream": False})
    assert resp.status_code == 200 and resp.json() == {"status": "success"}, resp.text
    assert "crafted-valid:latest" in model_names(base)
    show = requests.post(base + "/api/show", json={"model": "crafted-valid"}, timeout=30)
    assert show.status_code == 200 and show.json()["model_info"][
        "llama.context_length"] == 2048
    assert requests.delete(base + "/api/delete", json={"model": "crafted-valid"},
                           timeout=30).status_code == 200


@pytest.mark.e2e
def test_the_service_is_healthy_and_serves_after_the_attacks(attack_service):
    base = attack_service.base_url
    assert requests.get(base + "/health", timeout=30).status_code == 200
    assert {"smollm2:135m", "gemma3:270m"} <= model_names(base)
    resp = requests.post(base + "/api/generate", timeout=300, json={
        "model": "smollm2:135m", "prompt": "Hi", "stream": False,
        "options": {"num_predict": 2}})
    assert resp.status_code == 200 and resp.json()["done"], resp.text
    assert "Traceback" not in attack_service.log_path.read_text()
