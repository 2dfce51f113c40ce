#!/usr/bin/env bash
# Build llama.cpp's tools from the tree vendored in the pinned llama-cpp-python sdist.
#
#   bash benchmarks/peers/setup_llamacpp.sh        # -> .venvs/llamacpp (gitignored)
#
# The sdist of llama-cpp-python carries the whole llama.cpp tree (vendor/llama.cpp: the CMake
# build, tools/{quantize,perplexity,imatrix,llama-bench,cli}, convert_hf_to_gguf.py and gguf-py),
# so one pinned download gives both the converter moepress's GGUF export is checked against and
# the binaries that run the exported files. CPU only, no curl, no -march=native (the binaries may
# run on another machine of the same architecture). 872 s (14.5 minutes) measured on 2 cores
# shared with long benchmarks (less on idle cores). About 320 MB.
#
# Idempotent: the download, the extraction, the configure step and each built tool are skipped
# when they already exist. Set MOEPRESS_LLAMACPP to build elsewhere; moepress finds the binaries
# through the same variable (moepress/export/llamacpp_tools.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${MOEPRESS_LLAMACPP:-$ROOT/.venvs/llamacpp}"
VERSION="0.3.36"
TARGETS=(llama-quantize llama-perplexity llama-imatrix llama-bench llama-batched-bench llama-cli)
JOBS="${MOEPRESS_BUILD_JOBS:-2}"

started=$(date +%s)
mkdir -p "$DEST"
SDIST="$DEST/llama_cpp_python-$VERSION.tar.gz"
TREE="$DEST/llama.cpp"
BUILD="$TREE/build"

if [ ! -f "$SDIST" ]; then
    python3 -m pip download --disable-pip-version-check --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$DEST"
fi
if [ ! -f "$TREE/CMakeLists.txt" ]; then
    rm -rf "$TREE" "$DEST/unpack"
    mkdir -p "$DEST/unpack"
    tar -xzf "$SDIST" -C "$DEST/unpack" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    mv "$DEST/unpack/llama_cpp_python-$VERSION/vendor/llama.cpp" "$TREE"
    rm -rf "$DEST/unpack"
fi
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    cmake -S "$TREE" -B "$BUILD" -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
fi
missing=()
for target in "${TARGETS[@]}"; do
    [ -x "$BUILD/bin/$target" ] || missing+=("$target")
done
if [ "${#missing[@]}" -gt 0 ]; then
    cmake --build "$BUILD" -j"$JOBS" --target "${missing[@]}"
fi

echo "llama.cpp $(cd "$TREE" && git describe --tags 2>/dev/null || echo "from llama-cpp-python $VERSION")"
for target in "${TARGETS[@]}"; do
    echo "  $BUILD/bin/$target"
done
echo "  $TREE/convert_hf_to_gguf.py"
echo "built in $(( $(date +%s) - started )) s at $DEST"
