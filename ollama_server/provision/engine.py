"""Build llama.cpp's ``llama-server`` (and its RPC worker) once, prove it runs, cache it.

The source is the llama.cpp tree vendored in the ``llama-cpp-python`` sdist on the package index,
checked by sha256. Two build flavours:

- ``native`` (default): tuned for this machine's CPU (``-march=native``), one static binary.
- ``portable`` (container images): CPU code for every x86-64 generation in loadable variants
  (``GGML_BACKEND_DL`` + ``GGML_CPU_ALL_VARIANTS``); at run time ggml picks the best variant
  this CPU supports.

AMX stays out of both. The pinned llama.cpp's AMX kernels (``ggml-cpu/amx``) run tile
instructions on worker threads that never asked the kernel for AMX state
(``arch_prctl(ARCH_REQ_XCOMP_PERM)``), so the first matrix multiply dies with SIGILL on
``tilezero`` on every AMX Xeon (upstream ggml-org/llama.cpp PR #26954, issues #28756, #13678).
``-march=native`` on such a CPU turns them on; ``-mno-amx-*`` keeps them off (explicit ISA flags
win over ``-march`` in GCC and clang whatever their order), and the portable build drops the one
variant that is compiled with AMX (``sapphirerapids``); the AVX-512 variants below it serve that
CPU instead. Lift this when the pinned source carries the upstream fix.

Every build is proven before it is cached: the new binary loads the smallest default model,
generates, embeds, and serves the model through its own RPC worker (``provision.smoke``). Only
then is it moved into ``<cache>/<key>/bin``. The key names the llama.cpp version, backend,
flavour and machine, plus a hash of the build flags, the compiler and (native only) the CPU
features the build was tuned for: a cache copied to another CPU, or flags changed here, is a
rebuild, never a crash.

``python -m ollama_server.provision.engine [--portable] [--rebuild]`` builds (or finds) it and
prints the folder that holds ``llama-server`` on its last line of stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.engine.binary import (  # noqa: F401 (the build's names, used by the tests too)
    BINARY,
    BUILD_INFO,
    FLAVOURS,
    RPC_BINARY,
    SDIST_FILE,
    SDIST_PACKAGE,
    SDIST_SHA256,
    SDIST_VERSION,
    TARGETS,
    BuildPlan,
    EngineNotFound,
    cache_root,
    cached_engine,
    cpu_features,
    engine_dir,
    make_plan,
    resolve_binary,
    rpc_worker_binary,
)
from ..models.store import sha256_file

AMX_VARIANTS = ("sapphirerapids",)  # GGML_CPU_ALL_VARIANTS entries compiled with AMX
# Instructions that only AMX code holds; a build in use must hold none of them.
AMX_MNEMONICS = ("tilezero", "tileloadd", "tileloaddt1", "tilestored", "ldtilecfg",
                 "sttilecfg", "tilerelease", "tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud",
                 "tdpbf16ps")

def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays the answer (the engine folder)."""
    print(f"[engine] {msg}", file=sys.stderr, flush=True)


class EngineBuildFailed(SystemExit):
    """A build step failed; the message says which, and where the full log is."""

    def __init__(self, message: str) -> None:
        super().__init__(f"[engine] error: {message}")


# --- AMX check -------------------------------------------------------------------------------

def amx_instructions(path: Path) -> int:
    """How many AMX tile instructions the machine code of ``path`` holds (objdump -d)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise RuntimeError("objdump (binutils) is needed to inspect the engine's machine code")
    pattern = re.compile(r"\t(" + "|".join(AMX_MNEMONICS) + r")\b")
    proc = subprocess.Popen([objdump, "-d", "--no-show-raw-insn", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    count = sum(1 for line in proc.stdout if pattern.search(line.decode(errors="replace")))
    proc.wait()
    return count


def engine_code_files(bin_dir: Path) -> list[Path]:
    """The files of a build folder that hold machine code (binaries and shared libraries)."""
    return sorted(p for p in bin_dir.iterdir() if (p.is_file() or p.is_symlink()) and (
        p.name in TARGETS or p.suffix == ".so" or ".so." in p.name))


# --- building --------------------------------------------------------------------------------

def fetch_sdist(dest: Path) -> Path:
    """Download the pinned sdist from the package index (or reuse it) and check its sha256."""
    sdist = dest / SDIST_FILE
    if not (sdist.is_file() and sha256_file(sdist) == SDIST_SHA256):
        log(f"downloading {SDIST_PACKAGE}=={SDIST_VERSION} sdist from the package index")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-q", "-d", str(dest), f"{SDIST_PACKAGE}=={SDIST_VERSION}"],
            check=True, stdout=sys.stderr,
        )
    got = sha256_file(sdist)
    if got != SDIST_SHA256:
        sdist.unlink(missing_ok=True)
        raise EngineBuildFailed(f"{SDIST_FILE}: sha256 {got} does not match the pinned "
                                f"{SDIST_SHA256}")
    return sdist


def extracted_llama_cpp(dest: Path) -> Path | None:
    """The ``<dest>/*/vendor/llama.cpp`` folder an earlier run unpacked, if there is one.

    Unpacking is all or nothing (``extract_llama_cpp``), so a folder with its top-level
    ``CMakeLists.txt`` is whole. A tree put there by hand (a machine with no package index,
    given the pinned source some other way) is used the same way: the cache is the user's.
    """
    found = next(dest.glob("*/vendor/llama.cpp"), None)
    if found is not None and (found / "CMakeLists.txt").is_file():
        return found
    return None


def extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Unpack only ``vendor/llama.cpp`` from the sdist (once); return its folder."""
    found = extracted_llama_cpp(dest)
    if found is not None:
        return found
    # Into a staging folder first, moved into place whole: an unpack that was cut short is
    # never mistaken for a tree to build from.
    staging = dest.parent / f".{dest.name}-unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        # The "data" filter (no links or paths out of dest) where this Python has it; Debian
        # 12's own python3 (3.11.2) predates it, and the sdist's sha256 is checked anyway.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, members=members, **safe)
    dest.mkdir(parents=True, exist_ok=True)
    for top in staging.iterdir() if staging.is_dir() else ():
        shutil.rmtree(dest / top.name, ignore_errors=True)
        os.replace(top, dest / top.name)
    shutil.rmtree(staging, ignore_errors=True)
    found = extracted_llama_cpp(dest)
    if found is None:
        raise EngineBuildFailed(f"{sdist.name} holds no vendor/llama.cpp/CMakeLists.txt")
    return found


_NINJA_STEP = re.compile(rb"^\[(\d+)/(\d+)\]")
_MAKE_STEP = re.compile(rb"^\[\s*(\d+)%\]")


class Progress:
    """Turns the build's output into a few lines: one per stage, compile in 10% steps."""

    def __init__(self, emit: Callable[[str], None] = log) -> None:
        self.emit = emit
        self.next_pct = 0
        self.linked: set[str] = set()

    def feed(self, line: bytes) -> None:
        """One line of the build's output."""
        m = _NINJA_STEP.match(line)
        if m:
            done, total = int(m.group(1)), int(m.group(2))
            pct = 100 * done // max(1, total)
            detail = f"{done}/{total}"
        else:
            m = _MAKE_STEP.match(line)
            if not m:
                return
            pct = int(m.group(1))
            detail = f"{pct}%"
        for name in TARGETS:
            if (b"Linking" in line and line.rstrip().endswith(f"bin/{name}".encode())
                    and name not in self.linked):
                self.linked.add(name)
                self.emit(f"link {name} ({detail})")
        if pct >= self.next_pct:
            self.emit(f"compile {pct:3d}% ({detail})")
            self.next_pct = (pct // 10 + 1) * 10


def run_logged(cmd: list[str], logfile: Path, stage: str,
               on_line: Callable[[bytes], None] | None = None,
               cwd: Path | None = None) -> None:
    """Run ``cmd`` with its output appended to ``logfile``; EngineBuildFailed on failure."""
    with open(logfile, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    if code != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-15:]
        errors = [t for t in tail if "error" in t.lower()] or tail[-5:]
        raise EngineBuildFailed(
            f"{stage} failed (exit code {code}): {' | '.join(e.strip() for e in errors)}\n"
            f"The full log is {logfile}.")


@contextmanager
def build_lock(key: str) -> Iterator[None]:
    """One build of a key at a time (two `make` runs at once wait for each other; builds of
    other keys, and runs that find their build cached, do not wait)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".build-{key}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another engine build is running; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def build(plan: BuildPlan, jobs: int, smoke_model: Path | None) -> Path:
    """Build ``plan``, prove it on ``smoke_model``, publish it; return the binary's path.

    The build tree stays in ``<cache>/build/<key>`` until the build is proven, so a run that
    was interrupted (or whose smoke test failed for a reason outside the binary) continues
    where it stopped instead of starting over.
    """
    began = time.monotonic()
    if smoke_model is None:
        raise EngineBuildFailed("no model to prove the build with: run `make models` first "
                                "(or pass --smoke-model PATH)")
    work = cache_root() / "build" / plan.key
    logfile = cache_root() / "logs" / f"build-{plan.key}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    logfile.write_text(f"engine build {plan.key}\nflags: {' '.join(plan.flags)}\n"
                       f"cpu features: {' '.join(plan.features) or '-'}\n"
                       f"compiler: {plan.compiler}\n")
    log(f"building llama.cpp {SDIST_VERSION} ({plan.backend}, {plan.flavour}) into "
        f"{plan.root}; full log: {logfile}")
    out_bin = compile_tree(plan, work, jobs, logfile)
    binary = prove_and_publish(plan, out_bin, smoke_model, logfile, began)
    shutil.rmtree(work, ignore_errors=True)
    return binary


def compile_tree(plan: BuildPlan, work: Path, jobs: int, logfile: Path) -> Path:
    """Steps 1-3: source, configure, compile; return the build's ``bin`` folder."""
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    # A tree already unpacked into the build folder (by a run that stopped before the end, or
    # put there for a machine without the package index) is built as it is: no download.
    src = extracted_llama_cpp(work / "src")
    if src is not None:
        log(f"[1/5] source: using the unpacked tree {src}")
    else:
        log("[1/5] source: fetching and checking the pinned sdist")
        src = extract_llama_cpp(fetch_sdist(downloads), work / "src")

    log("[2/5] configure")
    build_dir = work / "tree"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if generator and (build_dir / "Makefile").is_file():
        generator = []  # a tree configured without ninja keeps its generator
    run_logged(["cmake", "-S", str(src), "-B", str(build_dir), *generator, *plan.flags],
               logfile, "configure")

    log(f"[3/5] compile and link {', '.join(TARGETS)} with {jobs} jobs "
        f"(about 5-15 minutes on 2 cores the first time)")
    progress = Progress()
    run_logged(["cmake", "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs)],
               logfile, "compile", on_line=progress.feed)
    out_bin = build_dir / "bin"
    for name in TARGETS:
        if not (out_bin / name).is_file():
            raise EngineBuildFailed(f"the build finished but {out_bin / name} is missing; "
                                    f"the full log is {logfile}")
    if plan.flavour == "portable":
        for variant in AMX_VARIANTS:
            for lib in out_bin.glob(f"libggml-cpu-{variant}.so*"):
                log(f"dropping the AMX CPU variant {lib.name} (SIGILL in this llama.cpp)")
                lib.unlink()
    return out_bin


def prove_and_publish(plan: BuildPlan, out_bin: Path, smoke_model: Path, logfile: Path,
                      began: float) -> Path:
    """Steps 4-5: smoke-test the build in ``out_bin``; only if it passes, cache it."""
    from .smoke import SmokeFailed, smoke_test

    log("[4/5] smoke test: load, generate, embed, and serve through the RPC worker")
    try:
        smoke = smoke_test(out_bin / BINARY, smoke_model, rpc_binary=out_bin / RPC_BINARY,
                           log=log)
    except SmokeFailed as exc:
        with open(logfile, "a") as fh:
            fh.write(f"\nsmoke test failed: {exc}\n{exc.output}\n")
        raise EngineBuildFailed(f"{exc}\nNothing was cached. The engine's output is in "
                                f"{logfile}.") from None
    log("[5/5] publish")
    publish(plan, out_bin, {"smoke": smoke, "build_seconds": round(time.monotonic() - began),
                            "log": str(logfile)})
    log(f"built and proven in {time.monotonic() - began:.0f}s: {plan.bin_dir / BINARY}")
    return plan.bin_dir / BINARY


def publish(plan: BuildPlan, out_bin: Path, extra: dict) -> None:
    """Move a proven build into ``plan.root`` atomically (a half copy never looks cached)."""
    staging = cache_root() / f".publish-{plan.key}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "bin").mkdir(parents=True)
    for path in engine_code_files(out_bin):  # versioned .so links stay links
        shutil.copy2(path, staging / "bin" / path.name, follow_symlinks=False)
    info = {"version": SDIST_VERSION, "backend": plan.backend, "flavour": plan.flavour,
            "machine": plan.machine, "flags": list(plan.flags), "cpu_features":
            list(plan.features), "compiler": plan.compiler, "key": plan.key,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    old = None
    if plan.root.exists():
        old = cache_root() / f".old-{plan.key}-{os.getpid()}"
        os.replace(plan.root, old)
    os.replace(staging, plan.root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def default_smoke_model(models_dir: Path | None) -> Path | None:
    """The GGUF of the smallest default model in ``models_dir`` (an Ollama store), if there."""
    from ..models.store import ModelName, OllamaStore
    from .models import DEFAULT_MODELS

    if models_dir is None:
        return None
    store = OllamaStore(Path(models_dir).resolve())
    for pkg in DEFAULT_MODELS:  # smallest first
        path = ModelName.parse(pkg.name).manifest_path(store.manifests_dir)
        if not path.is_file():
            continue
        try:
            layer = store.layer(store.read_manifest(path), "model")
            blob = store.blob_path(layer["digest"]) if layer else None
        except (OSError, ValueError, KeyError):
            continue
        if blob is not None and blob.is_file():
            return blob
    return None


def ensure_engine(backend: str | None = None, jobs: int | None = None, *,
                  flavour: str | None = None, rebuild: bool = False,
                  smoke_model: Path | None = None) -> Path:
    """Return the cached, proven engine binary, building and proving it first when needed."""
    plan = make_plan(backend, flavour)
    found = None if rebuild else cached_engine(plan.backend, plan.flavour)
    if found:
        log(f"using cached {found}")
        return found
    with build_lock(plan.key):
        found = None if rebuild else cached_engine(plan.backend, plan.flavour)
        if found:
            log(f"using cached {found}")
            return found
        if rebuild:
            log(f"rebuilding {plan.key} (asked to)")
        elif (cache_root().exists() and any(p.name.startswith(
                f"llama.cpp-{SDIST_VERSION}-{plan.backend}-{plan.flavour}-")
                for p in cache_root().iterdir())):
            log("a cached engine exists, but for other build flags or another CPU; "
                "building one for this machine")
        return build(plan, jobs or os.cpu_count() or 2, smoke_model)


def main(argv: list[str] | None = None) -> int:
    """CLI: build or find the engine and print its folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--portable", action="store_true",
                        help="build for any x86-64 (CPU variants chosen at run time)")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--rebuild", action="store_true",
                        default=bool(os.environ.get("OLLAMA_SERVER_ENGINE_REBUILD")),
                        help="build again even when a proven build is cached")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="an Ollama store holding a default model for the smoke test")
    parser.add_argument("--smoke-model", type=Path, default=None,
                        help="a GGUF file for the smoke test")
    parser.add_argument("--print-dir", action="store_true",
                        help="print the folder the engine would be cached in and exit")
    args = parser.parse_args(argv)
    flavour = "portable" if args.portable else None
    if args.print_dir:
        print(engine_dir(args.backend, flavour))
        return 0
    model = args.smoke_model or default_smoke_model(args.models_dir)
    print(ensure_engine(args.backend, args.jobs, flavour=flavour, rebuild=args.rebuild,
                        smoke_model=model).parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
