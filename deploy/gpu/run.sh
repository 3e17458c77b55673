#!/usr/bin/env bash
# tokenmill's GPU run, on one NVIDIA GPU machine with no network:
#
#   deploy/gpu/run.sh RESULTS          (from the repository root; RESULTS: a folder for everything it writes)
#
# It needs what `make gpu-bundle` prepared in deploy/gpu/bundle/ (see deploy/gpu/bundle.py). A run may carry
# 64 MiB and the bundle is about 140 MiB, so it comes in loads (load1/, load2/, load3/), each carried by one
# call of this script on the same machine; what a call unpacks, builds and installs stays in deploy/gpu/work/
# for the next. Each call does every step it has the files for, and skips a step done before:
#
#   1. install tokenmill and its dependencies from the bundled wheels into a venv; llama-cpp-python's Python
#      part loads the libraries of step 2 through LLAMA_CPP_LIB_PATH;
#   2. build llama.cpp's shared libraries and llama-server with CUDA for this GPU's architecture only
#      (deploy/gpu/build_llama.sh, the same flags as deploy/Dockerfile.cuda); a build that is not done after
#      GPU_RUN_BUILD_LIMIT seconds (480) stops and goes on at the next call;
#   3. `tokenmill sysinfo`, `tokenmill models recommend --json` and checks of what they say (NVML sees the
#      GPU, the offload probe says yes, a GPU variant with every layer offloaded);
#   4. the tests marked `gpu` (those that need the model skip until its last part has come);
#   5. once the model is whole: `tokenmill run` of 128 generation rows with its defaults, timed from launch to
#      exit, then benchmarks/vs_llama_server.py: the same 128 rows through tokenmill and the CUDA llama-server
#      -np 64, alternating; then the host-cost benchmark, if its script is in the tree;
#   nvidia-smi before and after.
#
# Each step prints its duration; RESULTS/steps.tsv lists them, RESULTS/summary.txt says what passed.
#
# A rehearsal on a machine without a GPU runs the same steps on a CPU build, smaller:
#   GPU_RUN_BACKEND=cpu GPU_RUN_ROWS=4 GPU_RUN_ROUNDS=1 PYTHON=python3.12 deploy/gpu/run.sh RESULTS
# (the GPU checks and tests then fail or skip, as they should there).
set -uo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: $0 RESULTS" >&2
    exit 2
fi
repo=$(cd "$(dirname "$0")/../.." && pwd)
results=$(mkdir -p "$1" && cd "$1" && pwd)
here=$repo/deploy/gpu
bundle=$here/bundle
work=$here/work
python=${PYTHON:-python3}
jobs=$(nproc)
backend=${GPU_RUN_BACKEND:-cuda}
rows=${GPU_RUN_ROWS:-128}
rounds=${GPU_RUN_ROUNDS:-2}
build_limit=${GPU_RUN_BUILD_LIMIT:-480}
mkdir -p "$work"
exec > >(tee -a "$results/run.log") 2>&1
started=$(date +%s)
failed=0

note() { printf '%s\n' "$*" | tee -a "$results/summary.txt"; }

# step NAME COMMAND...: run it, print and record its duration and exit status.
step() {
    local name=$1
    shift
    local t0 t1 rc
    echo "=== $name"
    t0=$(date +%s.%N)
    "$@"
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    echo "--- $name: ${secs} s (exit $rc)"
    printf '%s\t%s\t%s\n' "$name" "$secs" "$rc" >>"$results/steps.tsv"
    if [ "$rc" -ne 0 ]; then
        failed=$((failed + 1))
        note "FAILED: $name (exit $rc)"
    fi
    return "$rc"
}

preflight() {
    {
        date -u
        uname -a
        nproc
        free -g
        "$python" --version
        command -v nvcc && nvcc --version
        cmake --version | head -1
        command -v ninja && ninja --version
        nvidia-smi --query-gpu=name,uuid,compute_cap,memory.total,memory.used,driver_version --format=csv
    } >"$results/machine.txt" 2>&1
    cat "$results/machine.txt"
    if [ "$backend" = cuda ] && ! command -v nvidia-smi >/dev/null; then
        echo "no nvidia-smi: not a GPU machine (GPU_RUN_BACKEND=cpu rehearses on a CPU)"
        return 1
    fi
    if [ "$backend" = cuda ] && ! find_cublas; then
        echo "no cuBLAS (cublas_v2.h) in \$CUDA_HOME, /usr/local/cuda* or /usr/include: llama.cpp's CUDA backend links it"
        return 1
    fi
    "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' ||
        echo "warning: $python is not CPython 3.12, which the bundled wheels are built for"
}

find_cublas() {
    local dir
    for dir in ${CUDA_HOME:-} /usr/local/cuda /usr/local/cuda-* /usr; do
        [ -f "$dir/include/cublas_v2.h" ] && { echo "cuBLAS: $dir/include/cublas_v2.h"; return 0; }
        compgen -G "$dir/targets/*/include/cublas_v2.h" >/dev/null && { echo "cuBLAS: $dir/targets"; return 0; }
    done
    return 1
}

# Copy what this call carried into work/: the sources and wheels, the model's parts (each checked).
collect() {
    local load
    for load in "$bundle"/load*/; do
        [ -d "$load" ] || continue
        echo "found ${load#"$repo"/}: $(ls "$load" | tr '\n' ' ')"
        cp -f "$load/manifest.json" "$work/manifest.json"
        [ -f "$load/llama.cpp-src.tar.xz" ] && cp -f "$load/llama.cpp-src.tar.xz" "$work/"
        [ -d "$load/wheels" ] && mkdir -p "$work/wheels" && cp -f "$load"/wheels/*.whl "$work/wheels/"
        mkdir -p "$work/parts"
        find "$load" -maxdepth 1 -name '*.part*' -exec cp -f {} "$work/parts/" \;
    done
    [ -f "$work/manifest.json" ] || { echo "no deploy/gpu/bundle/load*/manifest.json: run make gpu-bundle"; return 1; }
    "$python" "$here/model_parts.py" "$work/manifest.json" "$work/parts" "$work/models"
}

build() {
    if [ -f "$work/build/bin/libllama.so" ] && [ -x "$work/build/bin/llama-server" ]; then
        echo "already built: $work/build/bin"
        return 0
    fi
    [ -f "$work/llama.cpp-src.tar.xz" ] || { echo "no llama.cpp sources yet (load1)"; return 1; }
    local arch=- rc
    if [ "$backend" = cuda ]; then
        arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
        echo "CUDA architecture of this GPU: $arch"
    fi
    if [ ! -f "$work/src/.unpacked" ]; then
        rm -rf "$work/src" && mkdir -p "$work/src"
        "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
            "$work/llama.cpp-src.tar.xz" "$work/src" || return 1
        touch "$work/src/.unpacked"
    fi
    # Stopped in time, a build goes on where it was at the next call (ninja keeps what it compiled), rather
    # than the whole call being cut off at the machine's limit.
    timeout "$build_limit" "$here/build_llama.sh" "$work/src/llama.cpp" "$work/build" "$backend" "$arch" "$jobs"
    rc=$?
    [ "$rc" -eq 124 ] && note "build not finished after ${build_limit} s: call again to go on with it"
    return "$rc"
}

install() {
    if [ -x "$work/venv/bin/tokenmill" ]; then
        echo "already installed: $work/venv"
        return 0
    fi
    [ -d "$work/wheels" ] || { echo "no wheels yet (load1)"; return 1; }
    rm -rf "$work/venv"
    if ! "$python" -m venv "$work/venv"; then
        # No ensurepip (a Debian python3 without python3-venv): a bare venv, and pip from its own wheel.
        "$python" -m venv --without-pip "$work/venv" || return 1
        local pipwhl
        pipwhl=$(ls "$work"/wheels/pip-*.whl | head -1)
        "$work/venv/bin/python" "$pipwhl/pip" install --no-index "$pipwhl" || return 1
    fi
    # --no-deps: the wheels are the whole set; the few left out to fit the carry limit (bundle.py) are
    # named by pip check below and never imported on this run's path.
    "$work/venv/bin/python" -m pip install --no-index --no-deps --disable-pip-version-check \
        "$work"/wheels/*.whl || return 1
    "$work/venv/bin/python" -m pip check >"$results/pip-check.txt" 2>&1
    cat "$results/pip-check.txt"
}

env_ready() { [ -x "$work/venv/bin/tokenmill" ] && [ -f "$work/build/bin/libllama.so" ]; }

probe() {
    tokenmill sysinfo --json >"$results/sysinfo.json" &&
        COLUMNS=200 tokenmill sysinfo >"$results/sysinfo.txt" &&
        COLUMNS=200 tokenmill models recommend >"$results/recommend.txt" &&
        tokenmill models recommend --json >"$results/recommend.json" || return 1
    cat "$results/sysinfo.txt" "$results/recommend.txt"
    python "$here/check_gpu.py" "$results/sysinfo.json" "$results/recommend.json" | tee "$results/checks.txt"
    return "${PIPESTATUS[0]}"
}

gpu_tests() {
    (cd "$repo" && python -m pytest -m gpu -p no:cacheprovider -q -rs tests/workers/test_capacity.py \
        tests/engines/test_llama.py tests/cli/test_run.py --junitxml "$results/gpu-tests.xml")
}

model_ready() { [ -f "$TOKENMILL_MODELS_DIR/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" ]; }

run_default() {
    local data=$work/gen$rows.jsonl
    (cd "$repo/benchmarks" && python -c 'import sys, pathlib, throughput
throughput.build("gen", int(sys.argv[2]), pathlib.Path(sys.argv[1]))' "$data" "$rows") || return 1
    local t0 t1
    t0=$(date +%s.%N)
    TOKENMILL_DATA_DIR=$work/data-run COLUMNS=200 tokenmill run "$data" --model smollm2-135m-instruct:q4_1 \
        --no-cache -o "$results/run.results.jsonl" || return 1
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v n="$rows" 'BEGIN { printf "tokenmill run, %d rows, launch to exit: %.1f s\n", n, b - a }' |
        tee -a "$results/summary.txt"
    TOKENMILL_DATA_DIR=$work/data-run tokenmill workers --all --json >"$results/run.workers.json"
    cat "$results/run.workers.json"
    python - "$results/run.results.jsonl" <<'EOF' | tee -a "$results/summary.txt"
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
gen = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in rows)
print(f"tokenmill run: {len(rows)} rows, {gen} generated tokens")
EOF
    rm -rf "$work/data-run"
}

vs_llama_server() {
    (cd "$repo" && python benchmarks/vs_llama_server.py --sets gen --rows "$rows" --rounds "$rounds" --no-sequential \
        --bin-dir "$work/build/bin" --n-seq 64 --gpu-layers 99 --threads "$jobs" --goal 0.9 \
        --model smollm2-135m-instruct:q4_1) | tee "$results/vs_llama_server.txt"
    return "${PIPESTATUS[0]}"
}

# The host-cost benchmark (tokenmill's host seconds per generated token, on a tiny random model) belongs to
# another piece of work; when its script is in the tree, this runs it on the GPU too.
host_cost() {
    local script=${HOST_COST_SCRIPT:-$repo/benchmarks/host_cost.py}
    if [ ! -f "$script" ]; then
        echo "no $script in this tree: the host-cost benchmark is not run"
        return 0
    fi
    (cd "$repo" && python "$script" ${HOST_COST_ARGS:-}) | tee "$results/host_cost.txt"
    return "${PIPESTATUS[0]}"
}

note "GPU run started $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi >"$results/nvidia-smi-before.txt" 2>&1
step preflight preflight || exit 1
step collect collect
step install install
step build build
if env_ready; then
    export PATH=$work/venv/bin:$PATH
    export VIRTUAL_ENV=$work/venv
    export PYTHONPATH=$repo
    export LLAMA_CPP_LIB_PATH=$work/build/bin
    export TOKENMILL_MODELS_DIR=$work/models
    export TOKENMILL_DATA_DIR=$work/data
    export HF_HUB_OFFLINE=1
    step probe probe
    step gpu-tests gpu_tests
    if model_ready; then
        step "tokenmill run ($rows rows)" run_default
        step "vs llama-server -np 64" vs_llama_server
        step host-cost host_cost
    else
        note "the model is not whole yet: carry the next load and run again"
    fi
else
    note "not built or not installed: nothing to measure in this call"
fi
nvidia-smi >"$results/nvidia-smi-after.txt" 2>&1
note "GPU run ended after $(($(date +%s) - started)) s with $failed failed step(s)"
exit $((failed > 0))
