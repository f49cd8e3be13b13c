#!/usr/bin/env python3
"""The peer for the benchmarks: llama-cpp-python's OpenAI server, built from the same pinned
llama.cpp (the llama-cpp-python 0.3.36 sdist the engine comes from) with the same AMX-safe
native flags, in a virtual environment of its own under the engine cache.

    .venv/bin/python bench/peer.py        # builds once (about 10 minutes on 2 cores), prints
                                          # the peer's python

The wheel is cached in ``<cache>/peer/wheels``; nothing of it is used by the service.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ollama_server.provision.engine import (  # noqa: E402
    NO_AMX,
    SDIST_PACKAGE,
    SDIST_VERSION,
    cache_root,
    log,
)

PEER_EXTRAS = f"{SDIST_PACKAGE}[server]=={SDIST_VERSION}"


def peer_python() -> Path:
    """The peer venv's python, built and installed once."""
    home = cache_root() / "peer"
    py = home / "venv" / "bin" / "python"
    stamp = home / "venv" / f".installed-{SDIST_VERSION}"
    if stamp.is_file():
        return py
    wheels = home / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob(f"llama_cpp_python-{SDIST_VERSION}-*.whl")):
        flags = " ".join(NO_AMX)
        env = dict(os.environ, FORCE_CMAKE="1", CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count()),
                   CMAKE_ARGS=f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{flags}' "
                              f"-DCMAKE_CXX_FLAGS='{flags}' -DLLAMA_CURL=OFF")
        log(f"building the peer {SDIST_PACKAGE}=={SDIST_VERSION} from source with "
            f"{env['CMAKE_ARGS']} (about 10 minutes on 2 cores, once)")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary",
                        SDIST_PACKAGE, "-w", str(wheels), f"{SDIST_PACKAGE}=={SDIST_VERSION}"],
                       check=True, env=env, stdout=sys.stderr)
    if not py.is_file():
        venv.create(home / "venv", with_pip=True)
    wheel = sorted(wheels.glob(f"llama_cpp_python-{SDIST_VERSION}-*.whl"))[-1]
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--find-links", str(wheels),
                    f"{wheel}[server]"], check=True, stdout=sys.stderr)
    stamp.touch()
    return py


if __name__ == "__main__":
    print(peer_python())
