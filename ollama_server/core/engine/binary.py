"""The engine binary this machine runs: which build it needs and where a proven one is.

A build is named by everything that decides whether it runs here (the pinned llama.cpp, the
backend, the flavour, the build flags, the compiler and, for native builds, this CPU's
features); ``provision.engine`` builds and proves it into ``<cache>/<key>/bin``, and the
service finds it here at run time (``resolve_binary``), never a build made for another CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
BINARY = "llama-server"
RPC_BINARY = "ggml-rpc-server"
TARGETS = (BINARY, RPC_BINARY)
BUILD_INFO = "build-info.json"
FLAVOURS = ("native", "portable")

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # no web UI download at configure time (served with --no-webui)
    "-DGGML_RPC=ON",  # llama-server --rpc, and the ggml-rpc-server worker for other hosts
]
# One self-contained binary that can live anywhere.
NATIVE_FLAGS = ["-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON"]
# Loadable CPU variants beside the binary; $ORIGIN lets the folder move as a whole.
PORTABLE_FLAGS = ["-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON",
                  "-DGGML_CPU_ALL_VARIANTS=ON", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"]
NO_AMX = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
# The CPU features that decide which code a native build holds (what -march=native turns on).
X86_FEATURES = ("sse4_2", "avx", "f16c", "fma", "bmi2", "avx2", "avx_vnni", "avx512f",
                "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
ARM_FEATURES = ("asimd", "fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme")


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


def choose_flavour(flavour: str | None = None) -> str:
    """``native`` unless asked otherwise (``OLLAMA_SERVER_ENGINE_FLAVOUR`` or the argument)."""
    flavour = (flavour or os.environ.get("OLLAMA_SERVER_ENGINE_FLAVOUR") or "native").lower()
    if flavour not in FLAVOURS:
        raise SystemExit(f"the engine flavour must be one of {', '.join(FLAVOURS)}, "
                         f"not {flavour!r}")
    return flavour


# --- what a build is -------------------------------------------------------------------------

def cpu_features(cpuinfo: str | None = None, machine: str | None = None) -> list[str]:
    """The CPU features (from /proc/cpuinfo) that change what a native build holds."""
    machine = machine or platform.machine()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
            break  # every core lists the same flags
    if machine in ("x86_64", "amd64", "i686"):
        wanted: tuple[str, ...] = X86_FEATURES
    elif machine in ("aarch64", "arm64"):
        wanted = ARM_FEATURES
    else:
        return sorted(words)
    return [f for f in wanted if f in words]


def compiler_id() -> str:
    """The C compiler's version line (a new compiler is a new build)."""
    cc = os.environ.get("CC") or shutil.which("cc") or "cc"
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=20)
        return out.stdout.splitlines()[0].strip() if out.stdout else cc
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc


def cmake_flags(backend: str, flavour: str, machine: str | None = None) -> list[str]:
    """The CMake flags of a build of ``backend`` and ``flavour`` for ``machine``."""
    machine = machine or platform.machine()
    flags = list(CMAKE_FLAGS) + (NATIVE_FLAGS if flavour == "native" else PORTABLE_FLAGS)
    if backend == "cuda":
        flags.append("-DGGML_CUDA=ON")
    if flavour == "native" and machine in ("x86_64", "amd64"):
        cflags = " ".join(NO_AMX)
        flags += [f"-DCMAKE_C_FLAGS={cflags}", f"-DCMAKE_CXX_FLAGS={cflags}"]
    return flags


@dataclass(frozen=True)
class BuildPlan:
    """One engine build: what it is made of and where it is cached."""

    backend: str
    flavour: str
    machine: str
    flags: tuple[str, ...]
    features: tuple[str, ...]  # empty for the portable flavour: it does not depend on them
    compiler: str

    @property
    def fingerprint(self) -> str:
        """A hash of everything that decides whether the binary runs on a machine."""
        blob = json.dumps({"version": SDIST_VERSION, "sha256": SDIST_SHA256,
                           "flags": list(self.flags), "features": list(self.features),
                           "compiler": self.compiler}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def key(self) -> str:
        """The cache folder's name."""
        return (f"llama.cpp-{SDIST_VERSION}-{self.backend}-{self.flavour}-{self.machine}-"
                f"{self.fingerprint}")

    @property
    def root(self) -> Path:
        """``<cache>/<key>``: holds ``bin/`` and ``build-info.json`` once proven."""
        return cache_root() / self.key

    @property
    def bin_dir(self) -> Path:
        """The folder that holds ``llama-server`` and ``ggml-rpc-server``."""
        return self.root / "bin"


def make_plan(backend: str | None = None, flavour: str | None = None,
              cpuinfo: str | None = None, machine: str | None = None,
              compiler: str | None = None) -> BuildPlan:
    """The build this machine needs (arguments override what is read off the machine)."""
    backend = backend or choose_backend()
    flavour = choose_flavour(flavour)
    machine = machine or platform.machine()
    features = cpu_features(cpuinfo, machine) if flavour == "native" else []
    return BuildPlan(backend=backend, flavour=flavour, machine=machine,
                     flags=tuple(cmake_flags(backend, flavour, machine)),
                     features=tuple(features), compiler=compiler or compiler_id())


def engine_dir(backend: str | None = None, flavour: str | None = None) -> Path:
    """Where the proven binary for this machine lives (may not exist yet)."""
    return make_plan(backend, flavour).bin_dir


def cached_engine(backend: str | None = None, flavour: str | None = None) -> Path | None:
    """The cached, proven ``llama-server`` for this machine, or None."""
    plan = make_plan(backend, flavour)
    path = plan.bin_dir / BINARY
    if not (path.is_file() and os.access(path, os.X_OK)):
        return None
    try:
        info = json.loads((plan.root / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    return path if info.get("smoke", {}).get("ok") else None


def rpc_worker_binary(engine: Path) -> Path | None:
    """The ``ggml-rpc-server`` that belongs to an engine binary (same folder), if built."""
    path = Path(engine).parent / RPC_BINARY
    return path if path.is_file() and os.access(path, os.X_OK) else None


class EngineNotFound(RuntimeError):
    """No llama-server binary could be found; the message says what to do."""


def resolve_binary(llama_cpp_path: str | None) -> Path:
    """Find llama-server: the configured llama.cpp folder or binary, then PATH, then the cache.

    A llama.cpp build folder may hold the binary at ``bin/``, ``build/bin/`` or its top level.
    The cache is searched for this machine's native build first, then the portable one.
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
    for backend in dict.fromkeys((choose_backend(), "cpu")):
        for flavour in dict.fromkeys((choose_flavour(), *FLAVOURS)):
            found = cached_engine(backend, flavour)
            if found:
                return found
    raise EngineNotFound(
        f"no {BINARY} found: not configured (llama_cpp_path / --llama-cpp-dir), not on PATH, "
        f"and no proven build for this machine in {cache_root()} (a build made on another "
        f"CPU or with other flags does not count). Run `make engine` (or `make run`, which "
        f"builds it once, about 5-9 minutes on 2 cores).")
