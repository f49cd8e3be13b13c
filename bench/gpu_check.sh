#!/usr/bin/env bash
# A one-shot check of the project's CUDA engine on a lent GPU machine with no network, in two
# calls made back to back (the machine stays warm between them):
#
#   bench/gpu_check.sh prepare   here, once, with the network: fills .dev1/ and .dev2/ (ignored
#                                through .git/info/exclude) with what the machine cannot fetch:
#                                .dev1: the pinned llama.cpp source (vendor/llama.cpp of the
#                                sdist, checked by sha256, trimmed to what a CUDA+CPU+RPC build
#                                of llama-server and ggml-rpc-server needs) as tar.xz, the first
#                                part of smollm2:135m's GGUF with its manifest, and the wheels of
#                                the service's dependencies the machine lacks (Python 3.12);
#                                .dev2: the rest of the GGUF. Each call carries under 64 MiB.
#   bench/gpu_check.sh stage1    there (carry .dev1; returns in seconds): unpacks into
#                                $GPU_CHECK_DIR (/root/dev), seeds the engine's build folder
#                                <cache>/build/<key>/src/.../vendor/llama.cpp with the source
#                                (key from make_plan("cuda") there), and starts, in a new session
#                                (setsid), `python3 -m ollama_server.provision.engine --backend
#                                cuda --jobs 16 --smoke-model $GPU_CHECK_DIR/smollm2.gguf`: the
#                                project's own build, proven by its smoke test before it is
#                                cached. The wheels go to /tmp/site meanwhile.
#   bench/gpu_check.sh stage2    there (carry .dev2): joins the GGUF and checks its sha256 (the
#                                build needs it only for its smoke test, at the end), waits for
#                                the build, then runs bench/gpu_check.py (GPU info and the smoke
#                                result, direct llama-server vs the service at 1/8/32 streams, a
#                                split over the GPU and an RPC worker, --fit) within the time
#                                left of GPU_CHECK_SECONDS (550) from its start: give the
#                                call a timeout_s some 30 s longer.
#
# What stage2 writes to $OUT (or /tmp/gpu-check-out): gpu-check.json (every step's figures and
# verdict, rewritten after each step), gpu-check.log (the same in words), stage2.log (this
# script's output), build.log (the build's progress, timed, with the machine's compiler, cmake,
# nvcc and GPU), engine-build-tail.log (the end of the full cmake/compiler log),
# build-info.json (the proven build), stage1.log.
#
# Dry run, on a machine without a GPU (tests this script and gpu_check.py end to end):
#   GPU_CHECK_DRY=1 bench/gpu_check.sh stage2
# uses the cached proven CPU build (make engine) and ./models, skips the build, and checks with
# small token counts; GPU placement is not required then.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=${GPU_CHECK_DIR:-/root/dev}
SDIST_TOP=llama_cpp_python-0.3.36  # the sdist's top folder (provision/engine.py's pin)
MODEL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # smollm2:135m
MANIFEST=manifests/registry.ollama.ai/library/smollm2/135m
PART1_BYTES=46000000  # the GGUF's first part rides with the source, so both calls weigh alike
JOBS=${GPU_CHECK_JOBS:-16}
SITE=${GPU_CHECK_SITE:-/tmp/site}  # where the carried wheels are installed
# Paths of the llama.cpp tree a CUDA+CPU+RPC build of the two targets never reads: other
# backends (each added only when its GGML_<NAME> option is on), models' vocab files, docs,
# examples, tests (off: LLAMA_BUILD_TESTS/EXAMPLES), Python packages, CI and the web UI's tests.
TRIM="docs models media .github .devops gguf-py examples tests pocs benches conversion
requirements ci skills .gemini .pi flake.nix build-xcframework.sh tools/ui/tests
ggml/src/ggml-cann ggml/src/ggml-et ggml/src/ggml-hexagon ggml/src/ggml-hip ggml/src/ggml-metal
ggml/src/ggml-musa ggml/src/ggml-opencl ggml/src/ggml-openvino ggml/src/ggml-sycl
ggml/src/ggml-virtgpu ggml/src/ggml-vulkan ggml/src/ggml-webgpu ggml/src/ggml-zdnn
ggml/src/ggml-zendnn"
WHEELS="flask==3.1.3 gunicorn==27.0.1 greenlet==3.5.6 orjson==3.13.0 itsdangerous==2.2.0
blinker==1.9.0 werkzeug==3.1.9 jinja2==3.1.6 markupsafe==3.0.4 click==8.5.1
prometheus-client==0.26.0 gguf==0.19.0"

say() { echo "[gpu-check $(date +%H:%M:%S)] $*"; }

prepare() {
  cd "$ROOT" || exit 1
  local cache=${OLLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ollama-server}
  local sdist=$cache/downloads/$SDIST_TOP.tar.gz py=python3 tmp
  [ -x .venv/bin/python ] && py=.venv/bin/python
  local want; want=$($py -c 'from ollama_server.provision.engine import SDIST_SHA256 as s; print(s)')
  [ -f "$sdist" ] || { say "no $sdist: run make engine first (it downloads it)"; exit 1; }
  [ "$(sha256sum "$sdist" | cut -d' ' -f1)" = "$want" ] || { say "$sdist: sha256 mismatch"; exit 1; }
  for d in /.dev1/ /.dev2/; do
    grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
  done
  rm -rf .dev1 .dev2 && mkdir -p .dev1/whl .dev1/store/blobs .dev2
  tmp=$(mktemp -d)
  tar -xzf "$sdist" -C "$tmp" --wildcards "$SDIST_TOP/vendor/llama.cpp/*" || exit 1
  mv "$tmp/$SDIST_TOP/vendor/llama.cpp" "$tmp/llama.cpp"
  for p in $TRIM; do rm -rf "${tmp:?}/llama.cpp/$p"; done
  tar -C "$tmp" -cJf .dev1/llama.cpp-src.tar.xz llama.cpp || exit 1
  rm -rf "$tmp"
  local store=${MODELS:-./models} digest
  mkdir -p ".dev1/store/$(dirname $MANIFEST)"
  cp "$store/$MANIFEST" ".dev1/store/$MANIFEST" || exit 1
  for digest in $($py -c 'import json,sys; m=json.load(open(sys.argv[1]))
print(m["config"]["digest"]); [print(l["digest"]) for l in m["layers"]]' "$store/$MANIFEST"); do
    [ "$digest" = "sha256:$MODEL_SHA" ] || cp "$store/blobs/${digest/:/-}" .dev1/store/blobs/
  done
  local blob=$store/blobs/sha256-$MODEL_SHA
  head -c $PART1_BYTES "$blob" > .dev1/smollm2.part1
  tail -c +$((PART1_BYTES + 1)) "$blob" > .dev2/smollm2.part2
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .dev1/whl $WHEELS || exit 1
  du -sh .dev1 .dev2
  say "prepared: stage1 carries .dev1, stage2 carries .dev2"
}

# The CUDA toolkit's cuBLAS and the driver's libcuda, for CMake (CMAKE_LIBRARY_PATH), nvcc
# (CPATH) and the binaries (LD_LIBRARY_PATH): from the toolkit where it has them, else from the
# nvidia-cublas wheel python3 holds, else the driver's libcuda.so.1. Writes $D/env.sh.
cuda_env() {
  local env=$D/env.sh.tmp shim=$D/cuda-shim/lib nvcc root f lib libdirs="" site
  mkdir -p "$shim" && : > "$env"
  if ! command -v nvcc >/dev/null; then
    for f in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
      [ -x "$f/nvcc" ] && { echo "export PATH=\$PATH:$f" >> "$env"; export PATH=$PATH:$f; break; }
    done
  fi
  nvcc=$(command -v nvcc) || { say "no nvcc on this machine"; return 1; }
  # The toolkit nvcc belongs to, as nvcc itself says (it may be a wrapper script elsewhere).
  root=$(cd /tmp && echo > gpu-check-probe.cu && nvcc --dryrun -c gpu-check-probe.cu 2>&1 |
         sed -n 's/^#\$ TOP=//p' | head -1)
  rm -f /tmp/gpu-check-probe.cu
  root=$(readlink -f "${root:-$(dirname "$(dirname "$(readlink -f "$nvcc")")")}")
  say "nvcc: $nvcc; its toolkit: $root"
  # Where else to look: python3's packages (nvidia-cublas), and GPU_CHECK_CUDA_SEARCH's folders.
  site="$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) \
${GPU_CHECK_CUDA_SEARCH:-}"
  for lib in cublas cublasLt; do
    if ! ls "$root"/lib64/lib$lib.so "$root"/targets/*/lib/lib$lib.so >/dev/null 2>&1; then
      # shellcheck disable=SC2086
      f=$(find $site -path '*nvidia*' -name "lib$lib.so*" 2>/dev/null | sort | head -1)
      if [ -n "$f" ]; then
        ln -sf "$f" "$shim/lib$lib.so"
        case ":$libdirs:" in *":$(dirname "$f"):"*) ;; *) libdirs=$libdirs:$(dirname "$f") ;; esac
      fi
      say "lib$lib.so not in the toolkit ($root): using ${f:-nothing found}"
    fi
  done
  if ! ls "$root"/include/cublas_v2.h "$root"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    f=$(find $site -path '*nvidia*' -name cublas_v2.h 2>/dev/null | head -1)
    [ -n "$f" ] && echo "export CPATH=$(dirname "$f")\${CPATH:+:\$CPATH}" >> "$env"
    say "cublas_v2.h not in the toolkit: using ${f:-nothing found}"
  fi
  if ! ls "$root"/lib64/stubs/libcuda.so "$root"/targets/*/lib/stubs/libcuda.so \
      /usr/lib/x86_64-linux-gnu/libcuda.so /usr/lib64/libcuda.so >/dev/null 2>&1; then
    f=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}')
    # shellcheck disable=SC2086
    [ -z "$f" ] && f=$(find /usr/local/nvidia/lib64 $site -name libcuda.so.1 2>/dev/null | head -1)
    [ -n "$f" ] && ln -sf "$f" "$shim/libcuda.so"
    say "no libcuda.so for linking: using ${f:-nothing found}"
  fi
  echo "export CMAKE_LIBRARY_PATH=$shim" >> "$env"
  [ -n "$libdirs" ] && echo "export LD_LIBRARY_PATH=${libdirs#:}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" >> "$env"
  echo "export OLLAMA_SERVER_CACHE=$D/cache" >> "$env"
  mv "$env" "$D/env.sh"  # whole or not at all: stage 2 may read it while this runs
}

stage1() {
  cd "$ROOT" || exit 1
  mkdir -p "$D" && rm -rf "$D/llama.cpp" "$D/proj" "$D/model.ok" "$D/build.pid" "$D/key" "$D/pip.rc"
  set -o pipefail
  {
    say "stage 1 in $ROOT; unpacking into $D"
    tar -xJf .dev1/llama.cpp-src.tar.xz -C "$D" &&
      cp .dev1/smollm2.part1 "$D/" && rm -rf "$D/store" "$D/whl" &&
      cp -r .dev1/store .dev1/whl "$D/" || { say "unpacking failed"; exit 1; }
    # The build runs from its own copy of the package: stage 2 re-syncs this checkout.
    mkdir -p "$D/proj" && cp -r ollama_server "$D/proj/" &&
      cp "$ROOT/bench/gpu_check.sh" "$D/gpu_check.sh" || exit 1
    GPU_CHECK_DIR=$D setsid nohup bash "$D/gpu_check.sh" build > "$D/build.log" 2>&1 < /dev/null &
    say "build started in the background (pid $!); log: $D/build.log"
    # Until the configure step is over (it runs meanwhile, so this costs no time): a failure
    # there shows in this call's output already.
    for _ in $(seq ${GPU_CHECK_STAGE1_WAIT:-60}); do
      grep -q '\[3/5\]\|^rc=' "$D/build.log" 2>/dev/null && break; sleep 1
    done
    cat "$D/build.log"
    local key; key=$(cat "$D/key" 2>/dev/null)
    grep -h -A2 "CMAKE_CUDA_ARCHITECTURES\|CUDA Toolkit\|CMake Error" \
      "$D/cache/logs/build-$key.log" 2>/dev/null | head -20 || true
  } 2>&1 | tee "$D/stage1.log"
}

build() {
  local t0 key rc
  t0=$(date +%s)
  echo $$ > "$D/build.pid"  # stage 2 stops waiting if this process is gone
  stamp() { while IFS= read -r line; do
    printf '%s +%ss %s\n' "$(date +%s)" $(( $(date +%s) - t0 )) "$line"; done; }
  {
    say "machine: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB"
    nvidia-smi -L 2>&1
    cuda_env 2>&1
    # shellcheck disable=SC1091
    . "$D/env.sh"
    cat "$D/env.sh"
    echo "cmake: $(cmake --version | head -1); nvcc: $(nvcc --version | tail -1); cc: $(cc --version | head -1); python3: $(python3 --version)"
  } 2>&1 | stamp
  # shellcheck disable=SC1091
  . "$D/env.sh"
  ( python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$D"/whl/*.whl > "$D/pip.log" 2>&1; echo $? > "$D/pip.rc" ) &
  cd "$D/proj" || exit 1
  key=$(python3 -c 'from ollama_server.provision.engine import make_plan; print(make_plan("cuda").key)')
  mkdir -p "$OLLAMA_SERVER_CACHE/build/$key/src/$SDIST_TOP/vendor"
  if [ -d "$D/llama.cpp" ]; then
    rm -rf "$OLLAMA_SERVER_CACHE/build/$key/src/$SDIST_TOP/vendor/llama.cpp"
    mv "$D/llama.cpp" "$OLLAMA_SERVER_CACHE/build/$key/src/$SDIST_TOP/vendor/llama.cpp"
  fi
  echo "$key" > "$D/key"
  echo "build key $key" | stamp
  # The smoke model is needed only after the compile (step 4): stage 2 brings it meanwhile.
  python3 -u -m ollama_server.provision.engine --backend cuda --jobs "$JOBS" \
    --smoke-model "$D/smollm2.gguf" 2>&1 | stamp
  rc=${PIPESTATUS[0]}
  local smoke_at; smoke_at=$(awk '/\[4\/5\]/ {print $1; exit}' "$D/build.log")
  if [ "$rc" != 0 ] && [ -n "$smoke_at" ] && { [ ! -f "$D/model.ok" ] ||
      [ "$(stat -c %Y "$D/model.ok")" -ge "$smoke_at" ]; }; then
    # The smoke test ran before stage 2 had joined the model: wait for it and go again (the
    # compiled tree is kept, so this is the smoke test and little more).
    echo "the model was not there yet; waiting for it, then proving the build again" | stamp
    for _ in $(seq 120); do [ -f "$D/model.ok" ] && break; sleep 2; done
    python3 -u -m ollama_server.provision.engine --backend cuda --jobs "$JOBS" \
      --smoke-model "$D/smollm2.gguf" 2>&1 | stamp
    rc=${PIPESTATUS[0]}
  fi
  echo "rc=$rc"
}

stage2() {
  local t0 end out py engine_dir model_dir budget key rc=0
  t0=$(date +%s); end=$((t0 + ${GPU_CHECK_SECONDS:-550}))
  out=${OUT:-/tmp/gpu-check-out}
  mkdir -p "$out"
  cd "$ROOT" || exit 1
  exec > >(tee -a "$out/stage2.log") 2>&1
  if [ -n "${GPU_CHECK_DRY:-}" ]; then
    py=python3; [ -x .venv/bin/python ] && py=$ROOT/.venv/bin/python
    engine_dir=$($py -c 'from ollama_server.provision.engine import cached_engine as c
e = c("cpu"); print(e.parent if e else "")')
    [ -n "$engine_dir" ] || { say "no proven CPU build cached: run make engine first"; exit 1; }
    model_dir=${MODELS:-$ROOT/models}
    say "dry run: engine $engine_dir, models $model_dir"
    $py bench/gpu_check.py --dry --engine-dir "$engine_dir" --model-dir "$model_dir" \
      --out "$out" --budget "${GPU_CHECK_BUDGET:-600}" --tokens 16 --concurrency 1 4 \
      --rounds 1 --ttft-samples 2
    return $?
  fi
  export OLLAMA_SERVER_CACHE=$D/cache
  py=python3
  say "stage 2: joining the model"
  local blob=$D/store/blobs/sha256-$MODEL_SHA
  if cat "$D/smollm2.part1" .dev2/smollm2.part2 > "$blob.tmp" &&
      [ "$(sha256sum "$blob.tmp" | cut -d' ' -f1)" = "$MODEL_SHA" ]; then
    mv "$blob.tmp" "$blob" && ln -f "$blob" "$D/smollm2.gguf.tmp" &&
      mv "$D/smollm2.gguf.tmp" "$D/smollm2.gguf" && touch "$D/model.ok"
    say "model joined, sha256 checked: $D/smollm2.gguf"
  else
    say "the model's parts do not join to sha256 $MODEL_SHA"; rc=1
  fi
  for _ in $(seq 60); do [ -f "$D/pip.rc" ] && break; sleep 1; done
  if [ "$(cat "$D/pip.rc" 2>/dev/null)" != 0 ]; then
    say "wheels not installed in stage 1 ($(tail -3 "$D/pip.log" 2>/dev/null)); installing now"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$D"/whl/*.whl
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  say "waiting for the build (until $((end - 75 - t0))s from now at most)"
  local last=""
  while ! grep -q '^rc=' "$D/build.log" 2>/dev/null && [ "$(date +%s)" -lt $((end - 75)) ]; do
    if ! kill -0 "$(cat "$D/build.pid" 2>/dev/null)" 2>/dev/null; then
      grep -q '^rc=' "$D/build.log" 2>/dev/null || say "the build is not running (stage 1 not run?)"
      break
    fi
    local now_line; now_line=$(grep -v '^rc=' "$D/build.log" 2>/dev/null | tail -1)
    [ "$now_line" != "$last" ] && { echo "  build: $now_line"; last=$now_line; }
    sleep 3
  done
  cp "$D/build.log" "$D/stage1.log" "$out/" 2>/dev/null
  # shellcheck disable=SC1091
  . "$D/env.sh" 2>/dev/null || say "no $D/env.sh: did stage 1 run on this machine?"
  key=$(cat "$D/key" 2>/dev/null)
  tail -n 150 "$OLLAMA_SERVER_CACHE/logs/build-$key.log" > "$out/engine-build-tail.log" 2>/dev/null
  if ! grep -q '^rc=0' "$D/build.log"; then
    say "no proven build: $(tail -3 "$D/build.log")"
    printf '{"ok": false, "build": "%s", "last_build_lines": %s}\n' \
      "$(grep -q '^rc=' "$D/build.log" && echo failed || echo 'not finished in time')" \
      "$($py -c 'import json,sys; print(json.dumps(sys.argv[1]))' \
         "$(grep -v '^rc=' "$D/build.log" | tail -3)")" \
      > "$out/gpu-check.json"
    return 1
  fi
  engine_dir=$OLLAMA_SERVER_CACHE/$key/bin
  cp "$OLLAMA_SERVER_CACHE/$key/build-info.json" "$out/" 2>/dev/null
  budget=$((end - $(date +%s) - 10))
  say "build proven; checks with ${budget}s left"
  PYTHONUNBUFFERED=1 timeout -k 5 $((budget + 5)) $py bench/gpu_check.py \
    --engine-dir "$engine_dir" --model-dir "$D/store" --out "$out" --budget "$budget" \
    --tokens 256 --concurrency 1 8 32 --rounds 2 --ttft-samples 20 || rc=1
  return $rc
}

case "${1:-}" in
  prepare) prepare ;;
  stage1) stage1 ;;
  build) build ;;
  stage2) stage2 ;;
  *) echo "usage: $0 prepare|stage1|stage2  (see the top of this file)" >&2; exit 2 ;;
esac
