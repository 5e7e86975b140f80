#!/usr/bin/env bash
# Provide a llama-server binary and print its path on stdout (progress goes to stderr).
#
# Order: $ZENOW_LLAMA_SERVER, then `llama-server` on PATH, then the per-machine cache,
# else build it from the llama.cpp tree vendored in the pinned llama-cpp-python sdist
# (PyPI only; nothing else is downloaded) and cache it.  GGML_NATIVE tunes the binary
# for this CPU, which is why it is cached per machine and never committed.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
# The build's flavour, part of the cache key: bump it whenever the build flags change, so every
# machine with an older binary builds once more.  b2: rpc-server too, and no AMX kernels.
LLAMA_SERVER_BUILD="b2"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/zenow-llama-server"
PREFIX="$CACHE_ROOT/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$LLAMA_SERVER_BUILD"
BIN="$PREFIX/bin/llama-server"
RPC_BIN="$PREFIX/bin/rpc-server"
PYTHON="${PYTHON:-python3}"

say() { printf 'ops/provide-llama-server: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [ -n "${ZENOW_LLAMA_SERVER:-}" ]; then
  [ -x "$ZENOW_LLAMA_SERVER" ] || die "ZENOW_LLAMA_SERVER=$ZENOW_LLAMA_SERVER is not an executable file"
  echo "$ZENOW_LLAMA_SERVER"; exit 0
fi
if found=$(command -v llama-server 2>/dev/null); then
  echo "$found"; exit 0
fi
if [ -x "$BIN" ] && [ -x "$RPC_BIN" ]; then
  echo "$BIN"; exit 0
fi

command -v cmake >/dev/null || die "cmake is missing: install it (Debian: apt-get install cmake) or set ZENOW_LLAMA_SERVER to an existing llama-server"
command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler: install one (Debian: apt-get install g++) or set ZENOW_LLAMA_SERVER"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip: it is needed to fetch the llama-cpp-python sdist"

mkdir -p "$CACHE_ROOT"
WORK=$(mktemp -d "$CACHE_ROOT/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

say "no llama-server found; building it from llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (once per machine, 4-10 minutes on 2 cores)"
say "fetching the sdist from PyPI"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$WORK/sdist" >&2 \
  || die "could not fetch llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from PyPI"
tar -xzf "$WORK"/sdist/llama_cpp_python-*.tar.gz -C "$WORK"
SRC=$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)
[ -f "$SRC/CMakeLists.txt" ] || die "the sdist has no vendor/llama.cpp tree"

# GGML_NATIVE tunes for this CPU, but its AMX matrix kernels crash (SIGSEGV in
# ggml_backend_amx_mul_mat, measured on a Xeon with AMX under this project's sandbox) where
# the kernel does not grant AMX tile state: undefining the feature macros leaves them out.
NO_AMX="-U__AMX_TILE__ -U__AMX_INT8__ -U__AMX_BF16__"
say "configuring"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DGGML_RPC=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" >"$WORK/configure.log" 2>&1 \
  || { tail -n 30 "$WORK/configure.log" >&2; die "cmake configure failed (log above)"; }

say "building the llama-server and rpc-server targets (progress in percent below)"
# (llama.cpp names the RPC worker's target ggml-rpc-server; it is cached as rpc-server)
cmake --build "$WORK/build" --target llama-server ggml-rpc-server -j"$(nproc 2>/dev/null || echo 2)" \
  >"$WORK/build.log" 2>&1 &
BUILD_PID=$!
tail -n +1 -f "$WORK/build.log" --pid="$BUILD_PID" | grep --line-buffered -E '^\[ *[0-9]+%\]|error' | sed -u 's/^/  /' >&2 || true
wait "$BUILD_PID" || { tail -n 30 "$WORK/build.log" >&2; die "the build failed (log above)"; }
[ -x "$WORK/build/bin/llama-server" ] || die "the build did not produce bin/llama-server"
[ -x "$WORK/build/bin/ggml-rpc-server" ] || die "the build did not produce bin/ggml-rpc-server"

mkdir -p "$PREFIX/bin"
cp "$WORK/build/bin/ggml-rpc-server" "$RPC_BIN.tmp"
mv "$RPC_BIN.tmp" "$RPC_BIN"
cp "$WORK/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
"$BIN" --version >&2 2>&1 || true
say "cached at $BIN"
echo "$BIN"
