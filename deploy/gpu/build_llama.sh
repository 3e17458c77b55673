#!/usr/bin/env bash
# Builds llama.cpp's shared libraries (what llama-cpp-python loads) and llama-server from one source tree,
# with one set of cmake flags. deploy/gpu/run.sh, deploy/Dockerfile.cuda and `make gpu-build-cpu` all call
# this script, so the image, the GPU run and the CPU-side size check cannot drift apart.
#
#   deploy/gpu/build_llama.sh SRC BUILD cuda ARCHS [JOBS]   e.g. ... cuda 90 16   (90: H100/H200)
#   deploy/gpu/build_llama.sh SRC BUILD cpu  -     [JOBS]
#
# SRC is a llama.cpp tree (the one vendored in the pinned llama-cpp-python sdist); the libraries land in
# BUILD/bin, which is what LLAMA_CPP_LIB_PATH must name. The folder can be moved or copied whole (the
# libraries find each other through $ORIGIN), as the CUDA image's runtime stage does.
set -euo pipefail

if [ "$#" -lt 4 ]; then
    echo "usage: $0 SRC BUILD cuda|cpu ARCHS [JOBS]" >&2
    exit 2
fi
src=$1 build=$2 backend=$3 archs=$4 jobs=${5:-$(nproc)}

# Flags both backends share. No tests, examples or web UI (nothing is fetched: the GPU machine has no
# network); GGML_NATIVE=OFF so the CPU part does not depend on the machine that compiled it.
common_flags=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DGGML_NATIVE=OFF
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON
    -DGGML_CCACHE=OFF
)
# One architecture per build: each one more roughly doubles the CUDA compile time.
# --allow-shlib-undefined: an image builder has only the libcuda stub; the driver's libcuda.so.1 is there
# at run time.
cuda_flags=(
    -DGGML_CUDA=ON
    "-DCMAKE_CUDA_ARCHITECTURES=${archs}"
    -DGGML_CUDA_NCCL=OFF
    "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"
)
# The libraries llama-cpp-python loads (libllama pulls libggml*, libmtmd is loaded for multimodal chat
# formats), the server and the batched decode benchmark (benchmarks/vs_llama_server.py's peer and floor);
# the other tools are configured but not compiled.
targets=(llama mtmd llama-server llama-batched-bench)

case "$backend" in
    cuda) flags=("${common_flags[@]}" "${cuda_flags[@]}") ;;
    cpu) flags=("${common_flags[@]}" -DGGML_CUDA=OFF) ;;
    *) echo "backend must be cuda or cpu, not '$backend'" >&2; exit 2 ;;
esac

generator=()
if command -v ninja >/dev/null 2>&1; then
    generator=(-G Ninja)
fi

if [ "${PRINT_FLAGS:-0}" = 1 ]; then
    printf '%s\n' "${flags[@]}"
    exit 0
fi

cmake -S "$src" -B "$build" "${generator[@]}" "${flags[@]}"
cmake --build "$build" --parallel "$jobs" --target "${targets[@]}"
ls -la "$build/bin"
