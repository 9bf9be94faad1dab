#!/usr/bin/env bash
# From nothing to a working checkout: a virtual environment in .venv, the dependencies, and the
# native extension (CPU kernels always; CUDA kernels too when torch has CUDA and nvcc is found).
#   C2C_TORCH   the torch requirement (default torch==2.14.1, a CUDA build that can compile .cu)
#   C2C_VENV    where to put the environment (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${C2C_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip setuptools wheel
"$py" -m pip install -q "${C2C_TORCH:-torch==2.14.1}" numpy ninja pybind11 pytest pytest-benchmark \
  hypothesis expecttest tqdm matplotlib transformers==5.24.0 tokenizers==0.23.3
# torch derives the toolkit root from the nvcc on PATH, which may be a wrapper script.
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# --no-build-isolation: build against the torch installed above, not another one.
MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -q --no-build-isolation -e .
"$py" -c "import c2c_kernels as c2c; print('c2c_kernels', c2c.__version__, 'backends:', c2c.available_backends())"
