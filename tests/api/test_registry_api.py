"""/api/pull and /api/push through the Flask test client: validation before the first byte,
and how failures are framed (no registry needed: a closed loopback port refuses)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import free_port


@pytest.fixture(autouse=True)
def loopback_registries_allowed(app):
    """These tests' registries are closed loopback ports: allowed explicitly (issue 25)."""
    app.extensions["ollama_server"].config.registry_allow_private = True


def lines(resp) -> list[dict]:
    return [json.loads(line) for line in resp.get_data(as_text=True).splitlines() if line]


@pytest.mark.parametrize("path", ["/api/pull", "/api/push"])
@pytest.mark.parametrize("body, words", [
    ({}, "model is required"),
    ({"model": "../../etc"}, "invalid model name"),
    ({"model": "tiny", "insecure": "yes"}, "'insecure' must be a boolean"),
    ({"model": "tiny", "stream": "no"}, "'stream' must be a boolean"),
])
def test_bad_requests_are_400_before_anything_happens(client, path, body, words):
    resp = client.post(path, json=body)
    assert resp.status_code == 400
    assert words in resp.get_json()["error"]


def test_push_of_a_model_that_is_not_here_is_404(client):
    resp = client.post("/api/push", json={"model": "127.0.0.1:1/library/absent"})
    assert resp.status_code == 404
    assert resp.get_json()["error"] == "model '127.0.0.1:1/library/absent' not found"


def test_unreachable_registry_streamed_and_whole(client):
    host = f"127.0.0.1:{free_port()}"
    streamed = client.post("/api/pull", json={"model": f"{host}/library/m", "insecure": True})
    assert streamed.status_code == 200
    assert streamed.mimetype == "application/x-ndjson"
    objects = lines(streamed)
    assert objects[0] == {"status": "pulling manifest"}
    assert objects[-1] == {"error": f'pull model manifest: Get "http://{host}/v2/library/m/'
                                    f'manifests/latest": dial tcp {host}: connect: connection '
                                    f'refused'}
    whole = client.post("/api/pull", json={"model": f"{host}/library/m", "insecure": True,
                                           "stream": False})
    assert whole.status_code == 500
    assert whole.get_json()["error"].startswith("pull model manifest: Get ")
    assert client.post("/api/copy", json={"source": "tiny",
                                          "destination": f"{host}/library/tiny"}).status_code == 200
    pushed = client.post("/api/push", json={"model": f"{host}/library/tiny", "insecure": True})
    objects = lines(pushed)
    assert objects[0] == {"status": "retrieving manifest"}
    assert "connect: connection refused" in objects[-1]["error"]
