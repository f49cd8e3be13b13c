"""Podman for the deployment tests, as this project's machines need it (README, Deployment):
the runc runtime and explicit ulimits (container/containers.conf), a Debian base image made
locally (container/base-image.sh), and pip's CA bundle for builds (container/pip-cert.sh).

Images are tagged per checkout, so that two checkouts testing at once never share a tag.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT

BASE_IMAGE = "localhost/debian:bookworm"
TAG = "test-" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]
APP_IMAGE = f"localhost/llm-inference-app:{TAG}"
TEST_IMAGE = f"localhost/llm-inference:{TAG}"
SYSTEMD_IMAGE = f"localhost/llm-inference-systemd:{TAG}"


def env() -> dict[str, str]:
    """The environment podman and podman-compose run with here."""
    return {**os.environ, "CONTAINERS_CONF": str(ROOT / "container" / "containers.conf")}


def run(*cmd: str, timeout: float = 1800, check: bool = True,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with the podman environment; on failure, the test fails with its output."""
    proc = subprocess.run(list(cmd), cwd=ROOT, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc


def podman(*args: str, **kw) -> subprocess.CompletedProcess:
    """``podman ARGS``."""
    return run("podman", *args, **kw)


def require_tools() -> None:
    """podman, podman-compose and debootstrap are installed by `make container-tools`."""
    missing = [t for t in ("podman", "runc", "podman-compose", "debootstrap")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make container-tools` (make test "
                    f"does)")


def base_image() -> str:
    """The local Debian base image (made once, from the cached debootstrap tarball)."""
    require_tools()
    run(str(ROOT / "container" / "base-image.sh"), BASE_IMAGE, timeout=900)
    return BASE_IMAGE


def build_args() -> list[str]:
    """``--build-arg`` words: the base image and, where pip needs one, its CA bundle."""
    cert = run(str(ROOT / "container" / "pip-cert.sh")).stdout.split()
    return ["--build-arg", f"BASE_IMAGE={base_image()}", *cert]


def build(tag: str, containerfile: Path, context: Path, *extra: str) -> None:
    """``podman build`` (layers cached by podman: a second build of the same inputs is quick)."""
    podman("build", "--format", "docker", *build_args(), *extra, "-t", tag,
           "-f", str(containerfile), str(context), timeout=1800)


def image_size(tag: str) -> int:
    """An image's size in bytes, as podman reports it."""
    return int(podman("image", "inspect", tag, "--format", "{{.Size}}").stdout.strip())


def wait_healthy(base_url: str, timeout: float = 180) -> dict:
    """/health's body once it answers 200."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            resp = requests.get(base_url + "/health", timeout=5)
            if resp.status_code == 200:
                return resp.json()
            last = resp.text
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{base_url}/health did not answer 200 in {timeout:.0f}s: {last}")
