#!/usr/bin/env bash
# make bench-peer on a host without network (how the 16-core Xeon figures in
# docs/quantization.md were taken): llama.cpp is built from a source folder you bring, not from
# the sdist on PyPI, and the 1B Llama shape is made and converted there.
#   bash scripts/bench_peer_offline.sh LLAMA_CPP_SRC PEER_DIR TOKENIZER_DIR [WORK] [THREADS]
#     LLAMA_CPP_SRC  llama.cpp's source (e.g. vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist;
#                    docs/, models/, tests/, examples/ and the GPU backends can be left out)
#     PEER_DIR       a copy of ../shared/peer;  TOKENIZER_DIR: SmolLM2's config and tokenizer files
#     WORK           default /tmp/llama.cpp-peer;  THREADS: default all cores
# Needs python3 with torch, transformers, numpy and sentencepiece; cmake and g++.
set -euo pipefail
src=$(realpath "$1"); peer=$(realpath "$2"); tok=$(realpath "$3")
work="${4:-/tmp/llama.cpp-peer}"; threads="${5:-$(nproc)}"
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work/gguf"
if [ ! -x "$work/bin/llama-bench" ]; then
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF > "$work/build.log" 2>&1
  cmake --build "$work/build" -j"$threads" --target llama-bench llama-quantize >> "$work/build.log" 2>&1
  ln -sfn build/bin "$work/bin"
fi
ln -sfn "$src" "$work/src"
(cd "$root/kernels" && MAX_JOBS="$threads" python3 -m pip install -q --no-build-isolation --no-deps .)
shape="$work/llama-1b-shape" prefix="$work/gguf/llama-1b-shape"
[ -f "$shape/config.json" ] || python3 "$peer/make_shape_model.py" --out "$shape" --tokenizer-from "$tok"
if [ ! -f "$prefix-Q4_0.gguf" ]; then
  PYTHONPATH="$src/gguf-py" python3 "$src/convert_hf_to_gguf.py" "$shape" --outtype f32 --outfile "$prefix-F32.gguf"
  for t in Q8_0 Q4_0; do "$work/bin/llama-quantize" "$prefix-F32.gguf" "$prefix-$t.gguf" "$t" "$threads"; done
fi
python3 "$root/scripts/bench_peer.py" --models "$shape" --work "$work" --peer "$peer" --threads "$threads"
