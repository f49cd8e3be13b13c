"""The container image, built and run with podman: the Containerfile's runtime stage plus this
machine's engine build, started through docker-compose.yml (podman-compose) and called from the
host. The full image, with the portable engine compiled inside, is `make image` (too long for
make test; see README, Deployment)."""

from __future__ import annotations

import os
import shutil

import openai
import pytest
import requests
import yaml

from tests.deploy import podman as pm
from tests.helpers import ROOT, free_port, wait_for

# Image builds on a cold cache take minutes (warm: seconds).
pytestmark = [pytest.mark.deploy, pytest.mark.timeout(1800)]

COMPOSE = ["podman-compose", "-f", "docker-compose.yml", "-f", "tests/container/compose.test.yml"]
MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def test_image(tmp_path_factory, engine_binary) -> str:
    """The Containerfile's `app` stage with the engine this machine built (no compile)."""
    pm.build(pm.APP_IMAGE, ROOT / "Containerfile", ROOT, "--target", "app")
    context = tmp_path_factory.mktemp("engine-context")
    shutil.copytree(engine_binary.parent, context / "engine")
    pm.build(pm.TEST_IMAGE, ROOT / "tests/container/Containerfile.prebuilt-engine", context,
             "--build-arg", f"APP_IMAGE={pm.APP_IMAGE}")
    return pm.TEST_IMAGE


def test_compose_files_name_the_service_port_volume_and_gpus():
    main = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = main["services"]["llm-inference"]
    assert svc["container_name"] == "llm-inference"
    assert svc["ports"] == ["${LLM_PORT:-11435}:11435"]
    assert svc["volumes"][0].endswith(":/models")
    assert svc["restart"] == "unless-stopped" and svc["healthcheck"]["test"][0] == "CMD"
    assert svc["build"]["dockerfile"] == "Containerfile"
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    device = gpu["llm-inference"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["llm-inference"]["build"]["args"]["ENGINE_BACKEND"] == "cuda"


def test_image_runs_from_compose_and_serves_the_host(test_image, real_models, tmp_path):
    port = free_port()
    name = f"llm-inference-test-{os.getpid()}"
    project = ["-p", name]
    compose_env = {"LLM_PORT": str(port), "MODELS_DIR": str(real_models),
                   "TEST_IMAGE": test_image, "TEST_CONTAINER_NAME": name}
    pm.run(*COMPOSE[:1], *project, *COMPOSE[1:], "up", "-d", extra_env=compose_env)
    try:
        base_url = f"http://127.0.0.1:{port}"
        health = pm.wait_healthy(base_url)
        assert health["engine"] == "/opt/llm-inference/engine/llama-server"
        assert health["config"]["file"] == "/etc/llm-inference/service_config.yaml"
        assert health["default_model"] == "gemma3:270m"  # null in the image: the first model
        oai = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=180)
        answer = oai.chat.completions.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Say hi"}])
        assert answer.usage.completion_tokens > 0
        # Not root inside, and the image's health check passes.
        assert pm.podman("exec", name, "id", "-u").stdout.strip() == "10001"
        pm.podman("healthcheck", "run", name)
        # A reload (SIGHUP) reaches the service inside.
        pm.podman("kill", "-s", "HUP", name)
        wait_for(lambda: requests.get(base_url + "/health", timeout=5).json()["config"]
                 ["reloads"] == 1, "the reload")
        # A graceful stop: exit code 0 (the engines were stopped by the service itself).
        pm.podman("stop", "-t", "60", name, timeout=120)
        state = pm.podman("inspect", name, "--format",
                          "{{.State.ExitCode}} {{.State.OOMKilled}}").stdout.split()
        assert state == ["0", "false"]
        logs = pm.podman("logs", name).stdout + pm.podman("logs", name).stderr
        assert "serving on http://0.0.0.0:11435" in logs and "llama-server for" in logs
        size = pm.image_size(test_image)
        print(f"\ntest image {test_image}: {size / 1e6:.0f} MB")
        assert size < 600e6, f"the image grew to {size / 1e6:.0f} MB"
    finally:
        pm.run(*COMPOSE[:1], *project, *COMPOSE[1:], "down", check=False,
               extra_env=compose_env)
