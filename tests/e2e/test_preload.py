"""preload (issue 24, item 4): the models it names are loaded at start and after a reload,
before /health says ready, with one worker (it owns the engines) and with two (the engine pool
process does), against the real engine."""

from __future__ import annotations

import datetime
import os
import signal
import time

import pytest
import requests

from tests.helpers import ServiceProcess, wait_for

SMALL, OTHER = "smollm2:135m", "gemma3:270m"


def write_config(path, preload: list[str]) -> None:
    path.write_text("max_loaded_models: 3\npreload:\n" + "".join(f"  - {n}\n" for n in preload))


def health(svc: ServiceProcess) -> requests.Response:
    return requests.get(svc.base_url + "/health", timeout=30, headers={"Connection": "close"})


def loaded(svc: ServiceProcess) -> dict[str, dict]:
    models = requests.get(svc.base_url + "/api/ps", timeout=30).json()["models"]
    return {m["name"]: m for m in models}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_preloaded_models_are_loaded_before_ready_and_after_a_reload(
        tmp_path, real_models, engine_binary, workers):
    cfg = tmp_path / "config.yaml"
    write_config(cfg, [SMALL, "no-such-model:1b"])
    svc = ServiceProcess(tmp_path, real_models, args=["--config", str(cfg)],
                         extra_env={"OLLAMA_SERVER_WORKERS": workers})
    try:
        answers = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert svc.proc.poll() is None, svc.log()
            try:
                r = health(svc)
            except requests.ConnectionError:
                time.sleep(0.1)
                continue
            answers.append(r.status_code)
            if r.status_code == 200:
                break
            # Until then: 503 "starting", naming what is still to load.
            assert r.status_code == 503 and r.json()["status"] == "starting", r.text
            assert set(r.json()["preloading"]) <= {SMALL, "no-such-model:1b"}, r.text
            time.sleep(0.05)
        assert answers and answers[-1] == 200, svc.log()
        # Ready means loaded: no request has asked for the model.
        ps = loaded(svc)
        assert list(ps) == [SMALL], ps
        # Kept loaded (keep_alive forever): Ollama shows a far date.
        expires = datetime.datetime.fromisoformat(ps[SMALL]["expires_at"])
        assert expires.year > datetime.date.today().year + 50, ps
        log = (tmp_path / "service.out").read_text()
        assert f"preload 1/2: {SMALL} is ready" in log, svc.log()
        assert "preload 2/2: no-such-model:1b could not be loaded" in log, svc.log()
        assert health(svc).json()["status"] in ("ok", "degraded")

        # A reload that names another model loads it; the first stays.
        write_config(cfg, [SMALL, OTHER])
        os.kill(svc.proc.pid, signal.SIGHUP)
        wait_for(lambda: OTHER in loaded(svc), f"the reload to preload {OTHER}", 120)
        assert SMALL in loaded(svc)
        assert health(svc).status_code == 200
        r = requests.post(svc.base_url + "/api/generate", timeout=300, json={
            "model": OTHER, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
        assert r.status_code == 200, r.text
        assert r.json()["load_duration"] < 1e9, r.json()  # it was loaded already
    finally:
        svc.stop()

