"""Engine provisioning without building: flags, cache key, progress lines, the smoke test's
verdict on a binary that crashes, and the words for a signal death."""

from __future__ import annotations

import os
import signal
import stat
import tarfile
from pathlib import Path

import pytest

from ollama_server.core.engine import binary
from ollama_server.core.engine.exits import REBUILD_COMMAND, describe_exit, signal_name
from ollama_server.provision import engine
from ollama_server.provision.smoke import SmokeFailed, smoke_test

AMX_CPU = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512bw " \
          "avx512_vnni amx_tile amx_int8 amx_bf16 ht\n"
AVX2_CPU = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 ht\n"


def plan(**kw):
    args = {"backend": "cpu", "flavour": "native", "cpuinfo": AMX_CPU, "machine": "x86_64",
            "compiler": "cc 12.2.0"}
    args.update(kw)
    return engine.make_plan(**args)


def test_native_x86_build_keeps_amx_out_and_builds_rpc():
    flags = plan().flags
    for flag in ("-DGGML_RPC=ON", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"):
        assert flag in flags
    for lang in ("C", "CXX"):
        value = next(f for f in flags if f.startswith(f"-DCMAKE_{lang}_FLAGS="))
        assert all(x in value for x in ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"))


def test_portable_build_loads_cpu_variants_and_does_not_depend_on_this_cpu():
    p = plan(flavour="portable")
    for flag in ("-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF",
                 "-DBUILD_SHARED_LIBS=ON", "-DGGML_RPC=ON"):
        assert flag in p.flags
    assert p.features == ()
    assert plan(flavour="portable", cpuinfo=AVX2_CPU).key == p.key
    assert "sapphirerapids" in engine.AMX_VARIANTS


def test_cuda_backend_adds_cuda_and_keeps_amx_out():
    flags = plan(backend="cuda").flags
    assert "-DGGML_CUDA=ON" in flags
    assert any("-mno-amx-int8" in f for f in flags)


def test_cache_key_changes_with_cpu_features_flags_compiler_and_backend(monkeypatch):
    base = plan()
    assert plan().key == base.key  # stable
    assert plan(cpuinfo=AVX2_CPU).key != base.key  # cache copied to another CPU
    assert plan(compiler="cc 13.1").key != base.key
    assert plan(backend="cuda").key != base.key
    assert plan(flavour="portable").key != base.key
    monkeypatch.setattr(binary, "NO_AMX", ["-mno-amx-tile"])  # flags changed in the code
    assert plan().key != base.key
    assert base.key.startswith(f"llama.cpp-{engine.SDIST_VERSION}-cpu-native-x86_64-")


def test_cpu_features_are_the_ones_that_change_the_build():
    assert engine.cpu_features(AMX_CPU, "x86_64") == [
        "sse4_2", "avx", "f16c", "fma", "bmi2", "avx2", "avx512f", "avx512bw", "avx512_vnni",
        "amx_tile", "amx_int8", "amx_bf16"]
    arm = "processor : 0\nFeatures : fp asimd asimddp sve i8mm cpuid\n"
    assert engine.cpu_features(arm, "aarch64") == ["asimd", "asimddp", "i8mm", "sve"]


def test_cached_engine_needs_a_proven_build(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_SERVER_CACHE", str(tmp_path))
    monkeypatch.setenv("OLLAMA_SERVER_ENGINE_BACKEND", "cpu")
    p = engine.make_plan()
    p.bin_dir.mkdir(parents=True)
    binary = p.bin_dir / engine.BINARY
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert engine.cached_engine() is None  # no build-info: never proven
    (p.root / engine.BUILD_INFO).write_text('{"smoke": {"ok": false}}')
    assert engine.cached_engine() is None
    (p.root / engine.BUILD_INFO).write_text('{"smoke": {"ok": true}}')
    assert engine.cached_engine() == binary


def test_progress_prints_a_few_lines_not_the_compiler_wall():
    lines: list[str] = []
    progress = engine.Progress(lines.append)
    for i in range(1, 201):
        progress.feed(f"[{i}/200] Building CXX object x{i}.o".encode())
    progress.feed(b"[200/200] Linking CXX executable bin/llama-server")
    assert 10 <= len(lines) <= 13
    assert lines[0].startswith("compile ") and "1/200" in lines[0]
    assert any(line == "link llama-server (200/200)" for line in lines)
    make_lines: list[str] = []
    progress = engine.Progress(make_lines.append)
    for pct in range(0, 101):
        progress.feed(f"[{pct:3d}%] Building C object y.o".encode())
    assert len(make_lines) == 11


def fake_sdist(path: Path) -> Path:
    """A stand-in sdist: ``vendor/llama.cpp`` with a CMakeLists.txt and one source file."""
    name = f"llama_cpp_python-{engine.SDIST_VERSION}"
    tree = path.parent / "sdist-src" / name / "vendor" / "llama.cpp"
    tree.mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text("project(llama)\n")
    (tree / "ggml.c").write_text("int x;\n")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(path.parent / "sdist-src" / name, arcname=name)
    return path


def fake_cmake(calls: list[list[str]]):
    """run_logged for compile_tree: records each command; the build step makes the binaries."""
    def run(cmd, logfile, stage, on_line=None, cwd=None):
        calls.append(cmd)
        if stage == "compile":
            out_bin = Path(cmd[cmd.index("--build") + 1]) / "bin"
            out_bin.mkdir(parents=True, exist_ok=True)
            for name in engine.TARGETS:
                (out_bin / name).write_text("#!/bin/sh\n")
    return run


def test_compile_tree_builds_an_unpacked_tree_without_fetching(tmp_path, monkeypatch):
    """A tree already in <work>/src (an offline machine, a resumed build): no download."""
    monkeypatch.setenv("OLLAMA_SERVER_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    src = work / "src" / f"llama_cpp_python-{engine.SDIST_VERSION}" / "vendor" / "llama.cpp"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("project(llama)\n")

    def no_fetch(dest):
        raise AssertionError("the sdist was fetched although its tree was unpacked")

    monkeypatch.setattr(engine, "fetch_sdist", no_fetch)
    calls: list[list[str]] = []
    monkeypatch.setattr(engine, "run_logged", fake_cmake(calls))
    out_bin = engine.compile_tree(plan(), work, 2, tmp_path / "build.log")
    assert calls[0][:3] == ["cmake", "-S", str(src)]
    assert out_bin == work / "tree" / "bin" and (out_bin / engine.BINARY).is_file()


def test_compile_tree_fetches_and_unpacks_when_no_tree_is_there(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_SERVER_CACHE", str(tmp_path / "cache"))
    fetched: list[Path] = []

    def fetch(dest):
        fetched.append(dest)
        return fake_sdist(tmp_path / engine.SDIST_FILE)

    monkeypatch.setattr(engine, "fetch_sdist", fetch)
    calls: list[list[str]] = []
    monkeypatch.setattr(engine, "run_logged", fake_cmake(calls))
    work = tmp_path / "work"
    engine.compile_tree(plan(), work, 2, tmp_path / "build.log")
    src = work / "src" / f"llama_cpp_python-{engine.SDIST_VERSION}" / "vendor" / "llama.cpp"
    assert fetched and calls[0][:3] == ["cmake", "-S", str(src)]
    assert (src / "ggml.c").is_file()
    assert not any(p.name.endswith("-unpacking") for p in work.iterdir())


def test_an_unpack_cut_short_is_not_taken_for_a_tree(tmp_path, monkeypatch):
    """Unpacking stops after CMakeLists.txt (disk full, a kill): the next run must not build
    the half tree (it would reuse it now that a tree in place means no fetch)."""
    sdist = fake_sdist(tmp_path / engine.SDIST_FILE)
    dest = tmp_path / "work" / "src"
    real = tarfile.TarFile.extractall

    def cut_short(self, path=".", members=None, **kw):
        members = [m for m in (members or self.getmembers())
                   if not m.name.endswith("ggml.c")]
        real(self, path, members=members, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", cut_short)
    with pytest.raises(OSError):
        engine.extract_llama_cpp(sdist, dest)
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)
    tree = engine.extract_llama_cpp(sdist, dest)  # the next run: unpacks again, whole
    assert (tree / "ggml.c").is_file()

def sigill_engine(tmp_path: Path) -> Path:
    """An "engine" that dies like an AMX build on an AMX CPU: killed by SIGILL."""
    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\necho 'load_tensors: loading model'\nkill -ILL $$\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_smoke_test_rejects_a_binary_killed_by_sigill(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(SmokeFailed) as err:
        smoke_test(sigill_engine(tmp_path), model, log=lambda _m: None, timeout=20)
    message = str(err.value)
    assert "SIGILL" in message and "illegal instruction" in message
    assert REBUILD_COMMAND in message
    assert "loading the model" in message
    assert "load_tensors" in err.value.output


def test_a_failed_smoke_test_publishes_nothing(tmp_path, monkeypatch):
    """A build whose binaries crash: an error naming the signal and the log; nothing cached."""
    monkeypatch.setenv("OLLAMA_SERVER_CACHE", str(tmp_path / "cache"))
    p = plan()
    out_bin = tmp_path / "tree" / "bin"
    out_bin.mkdir(parents=True)
    for name in engine.TARGETS:
        (out_bin / name).symlink_to(sigill_engine(tmp_path))
    logfile = tmp_path / "build.log"
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(SystemExit) as err:
        engine.prove_and_publish(p, out_bin, model, logfile, 0.0)
    text = str(err.value)
    assert "SIGILL" in text and str(logfile) in text and "Nothing was cached" in text
    assert "smoke test failed" in logfile.read_text()
    assert not p.root.exists() and engine.cached_engine("cpu", "native") is None


@pytest.mark.parametrize("code,words", [
    (-signal.SIGILL, ("SIGILL", "illegal instruction", "another CPU", REBUILD_COMMAND)),
    (-signal.SIGSEGV, ("SIGSEGV", "segmentation fault")),
    (-signal.SIGBUS, ("SIGBUS", "bus error", "disk")),
    (-signal.SIGKILL, ("SIGKILL", "out-of-memory", "context")),
    (-signal.SIGABRT, ("SIGABRT", "aborted")),
    (1, ("exited with code 1",)),
])
def test_exit_descriptions(code, words):
    text = describe_exit(code)
    for word in words:
        assert word in text


def test_signal_names():
    assert signal_name(-4) == "SIGILL" and signal_name(0) is None and signal_name(None) is None
    assert signal_name(-63) in ("signal 63", "SIGRTMAX-1")
    assert os.EX_OK == 0
