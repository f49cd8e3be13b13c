"""Build llama.cpp's ``llama-server`` once from pinned source and cache it outside the checkout.

The source is the llama.cpp tree vendored in the ``llama-cpp-python`` sdist on the package index,
checked by sha256. The build lands in ``<cache>/llama.cpp-<version>-<backend>-<arch>/bin`` and is
reused by every later run (``make run``, ``make test``, CI on the same machine).

Run ``python -m ollama_server.provision.engine`` to build (or find) it; it prints the folder that
holds ``llama-server`` on its last line of stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..models.store import sha256_file

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
BINARY = "llama-server"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary that can live anywhere
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # no web UI download at configure time (served with --no-webui)
]


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays the answer (the engine folder)."""
    print(f"[engine] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """The cache folder outside the checkout (``OLLAMA_SERVER_CACHE`` overrides it)."""
    env = os.environ.get("OLLAMA_SERVER_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ollama-server"


def gpu_visible() -> bool:
    """True when an NVIDIA GPU is visible to this machine."""
    if Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir():
        return True
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def choose_backend() -> str:
    """``cuda`` when nvcc is present and a GPU is visible, else ``cpu``.

    ``OLLAMA_SERVER_ENGINE_BACKEND=cuda|cpu`` forces it. A CUDA build on a machine with nvcc but
    no GPU would take hours on two cores and give nothing this machine can use.
    """
    forced = os.environ.get("OLLAMA_SERVER_ENGINE_BACKEND", "").strip().lower()
    if forced in ("cuda", "cpu"):
        return forced
    if forced:
        raise SystemExit(f"OLLAMA_SERVER_ENGINE_BACKEND must be 'cuda' or 'cpu', not {forced!r}")
    return "cuda" if shutil.which("nvcc") and gpu_visible() else "cpu"


def engine_dir(backend: str | None = None) -> Path:
    """Where the built binary for this version and backend lives (may not exist yet)."""
    backend = backend or choose_backend()
    return cache_root() / f"llama.cpp-{SDIST_VERSION}-{backend}-{platform.machine()}" / "bin"


def cached_engine(backend: str | None = None) -> Path | None:
    """The cached ``llama-server`` binary, or None when it has not been built."""
    path = engine_dir(backend) / BINARY
    return path if path.is_file() and os.access(path, os.X_OK) else None


def fetch_sdist(dest: Path) -> Path:
    """Download the pinned sdist from the package index (or reuse it) and check its sha256."""
    sdist = dest / SDIST_FILE
    if not (sdist.is_file() and sha256_file(sdist) == SDIST_SHA256):
        log(f"downloading {SDIST_PACKAGE}=={SDIST_VERSION} sdist from the package index")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", str(dest), f"{SDIST_PACKAGE}=={SDIST_VERSION}"],
            check=True, stdout=sys.stderr,
        )
    got = sha256_file(sdist)
    if got != SDIST_SHA256:
        sdist.unlink(missing_ok=True)
        raise SystemExit(f"{SDIST_FILE}: sha256 {got} does not match the pinned {SDIST_SHA256}")
    log(f"{SDIST_FILE} sha256 verified")
    return sdist


def extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Unpack only ``vendor/llama.cpp`` from the sdist; return its folder."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tar.extractall(dest, members=members, filter="data")
    found = next(dest.glob("*/vendor/llama.cpp"), None)
    if found is None or not (found / "CMakeLists.txt").is_file():
        raise SystemExit(f"{sdist.name} holds no vendor/llama.cpp/CMakeLists.txt")
    return found


def build(backend: str, jobs: int) -> Path:
    """Build ``llama-server`` for ``backend`` into the cache; return the binary's path."""
    target = engine_dir(backend)
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = fetch_sdist(downloads)
    with tempfile.TemporaryDirectory(prefix="llama-build-", dir=cache_root()) as tmp:
        src = extract_llama_cpp(sdist, Path(tmp))
        build_dir = Path(tmp) / "build"
        flags = CMAKE_FLAGS + (["-DGGML_CUDA=ON"] if backend == "cuda" else [])
        log(f"configuring llama.cpp ({backend}): cmake {' '.join(flags)}")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *flags],
                       check=True, stdout=sys.stderr)
        log(f"building target {BINARY} with {jobs} jobs (about 9 minutes on 2 cores)")
        subprocess.run(["cmake", "--build", str(build_dir), "--target", BINARY, "-j", str(jobs)],
                       check=True, stdout=sys.stderr)
        built = build_dir / "bin" / BINARY
        if not built.is_file():
            raise SystemExit(f"the build finished but {built} is missing")
        # Publish atomically: a half-copied binary must never look like a cached build.
        target.mkdir(parents=True, exist_ok=True)
        staging = target / f".{BINARY}.tmp"
        shutil.copy2(built, staging)
        os.replace(staging, target / BINARY)
    log(f"built {target / BINARY}")
    return target / BINARY


def ensure_engine(backend: str | None = None, jobs: int | None = None) -> Path:
    """Return the cached engine binary, building it first when it is missing."""
    backend = backend or choose_backend()
    found = cached_engine(backend)
    if found:
        log(f"using cached {found}")
        return found
    return build(backend, jobs or os.cpu_count() or 2)


class EngineNotFound(RuntimeError):
    """No llama-server binary could be found; the message says what to do."""


def resolve_binary(llama_cpp_path: str | None) -> Path:
    """Find llama-server: the configured llama.cpp folder or binary, then PATH, then the cache.

    A llama.cpp build folder may hold the binary at ``bin/``, ``build/bin/`` or its top level.
    """
    if llama_cpp_path:
        base = Path(llama_cpp_path).expanduser()
        candidates = [base] if base.is_file() else [
            base / BINARY, base / "bin" / BINARY, base / "build" / "bin" / BINARY]
        for candidate in candidates:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate.resolve()
        raise EngineNotFound(
            f"llama_cpp_path / --llama-cpp-dir is {base}, but no executable {BINARY} is there "
            f"(looked in {', '.join(str(c) for c in candidates)}). Point it at a llama.cpp "
            f"build folder, or leave it unset to use the project's own build (make engine).")
    on_path = shutil.which(BINARY)
    if on_path:
        return Path(on_path).resolve()
    for backend in (choose_backend(), "cpu"):
        found = cached_engine(backend)
        if found:
            return found
    raise EngineNotFound(
        f"no {BINARY} found: not configured (llama_cpp_path / --llama-cpp-dir), not on PATH, "
        f"and not built yet in {engine_dir()}. Run `make engine` (or `make run`, which builds "
        f"it once, about 9 minutes on 2 cores).")


def main(argv: list[str] | None = None) -> int:
    """CLI: build or find the engine and print its folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--print-dir", action="store_true",
                        help="print the folder the engine would be cached in and exit")
    args = parser.parse_args(argv)
    if args.print_dir:
        print(engine_dir(args.backend))
        return 0
    print(ensure_engine(args.backend, args.jobs).parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
