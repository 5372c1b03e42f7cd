#!/usr/bin/env bash
# Build llama.cpp's llama-quantize and llama-perplexity from the source vendored in the
# llama-cpp-python 0.3.36 sdist (system cmake + g++, ~12 min with 2 jobs), once, into a cache.
#
#   scripts/build_llamacpp.sh            # -> $SMPQ_LLAMACPP (default ~/.cache/smpq/llama.cpp-0.3.36)
#   SMPQ_LLAMACPP=/opt/llamacpp JOBS=8 scripts/build_llamacpp.sh
#
# GGML_NATIVE=OFF with AVX2/FMA/F16C on: a native build can die with an illegal instruction
# on CPUs that advertise AMX. smpq finds the tools through $SMPQ_LLAMACPP or the default
# folder (smpq.export.llamacpp.find_tools); nothing in `make test` needs them.
set -euo pipefail
VERSION=0.3.36
DEST="${SMPQ_LLAMACPP:-$HOME/.cache/smpq/llama.cpp-$VERSION}"
JOBS="${JOBS:-2}"
PIP="${PIP:-pip}"
if [[ -x "$DEST/bin/llama-quantize" && -x "$DEST/bin/llama-perplexity" && -f "$DEST/src/convert_hf_to_gguf.py" ]]; then
  echo "llama.cpp tools already built in $DEST"; exit 0
fi
for tool in cmake g++ tar; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed to build llama.cpp" >&2; exit 2; }
done
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
echo "downloading the llama-cpp-python==$VERSION sdist (source only) ..."
"$PIP" download --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==$VERSION" >/dev/null
tar xzf "$work"/llama_cpp_python-$VERSION.tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
echo "configuring (GGML_NATIVE=OFF, AVX2) ..."
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
echo "building llama-quantize and llama-perplexity with $JOBS jobs (about 12 minutes on 2 cores) ..."
cmake --build "$work/build" --config Release -j "$JOBS" --target llama-quantize llama-perplexity >/dev/null
stage="$DEST.partial.$$"; rm -rf "$stage"; mkdir -p "$stage/bin" "$stage/src"
cp "$work/build/bin/llama-quantize" "$work/build/bin/llama-perplexity" "$stage/bin/"
cp -r "$src/convert_hf_to_gguf.py" "$src/gguf-py" "$stage/src/"
[[ -d "$src/conversion" ]] && cp -r "$src/conversion" "$stage/src/"
mkdir -p "$(dirname "$DEST")"; rm -rf "$DEST"; mv "$stage" "$DEST"
"$DEST/bin/llama-quantize" --help >/dev/null 2>&1 || true
echo "llama.cpp tools in $DEST/bin (converter in $DEST/src)"
