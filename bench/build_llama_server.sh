#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the llama.cpp source vendored in the llama-cpp-python
# sdist of the version installed in .venv, so that bench/concurrency.py compares thoxd with the
# very same llama.cpp. Everything lands under bench/.build/ (gitignored): never commit it.
# No network beyond the sdist download: no curl/OpenSSL (loopback only), no web UI assets (the
# prebuilt-UI download is off). LLAMA_CURL no longer exists in this llama.cpp (deprecated, ignored).
# Idempotent: each step is skipped when its output exists. Prints the binary path at the end.
# Usage: bench/build_llama_server.sh   (about 10 minutes on 2 cores; JOBS=N to change -j)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
build="$root/bench/.build"
jobs="${JOBS:-$(nproc)}"

version="$("$py" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")"
sdist="$build/llama_cpp_python-$version.tar.gz"
src="$build/llama_cpp_python-$version"
cmake_build="$build/llama-build-$version"
bin="$cmake_build/bin/llama-server"
mkdir -p "$build"

if [[ ! -f "$sdist" ]]; then
    echo "== downloading llama-cpp-python $version sdist" >&2
    "$py" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$version" -d "$build"
fi
if [[ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]]; then
    echo "== extracting $sdist" >&2
    tar -xzf "$sdist" -C "$build"
fi
if [[ ! -f "$cmake_build/CMakeCache.txt" ]]; then
    echo "== configuring" >&2
    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    cmake -S "$src/vendor/llama.cpp" -B "$cmake_build" "${generator[@]}" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
fi
if [[ ! -x "$bin" ]]; then
    echo "== building llama-server with -j $jobs" >&2
    cmake --build "$cmake_build" --target llama-server -j "$jobs" >&2
fi
echo "$bin"
