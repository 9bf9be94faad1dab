#!/usr/bin/env bash
# CI for the lowest torch the package supports (setup.py): a CPU-only build of the extension
# against torch 2.11 with triton 3.6 (the GPU machine's versions), then a short test subset:
# the op layer, the reference/cpu/Triton-interpreter matrix, torch.compile, the training kernels,
# and every Triton kernel compiled for sm_90a by triton 3.6 (tests/test_compile_sm90.py).
# Built in a copy of the tree so the main build (c2c_kernels/_C*.so) is left alone.
#   C2C_LOWEST_TORCH   torch requirement (default torch==2.11.*)
#   C2C_LOWEST_DIR     work folder (default build/lowest-torch: venv/ and src/)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=${C2C_LOWEST_DIR:-$root/build/lowest-torch}
venv=$work/venv
src=$work/src
start=$(date +%s)
stamp() { echo "[lowest-torch] $1: $(( $(date +%s) - start )) s"; }

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py=$venv/bin/python
pipq() { "$py" -m pip install -q --no-cache-dir "$@"; }
pipq --upgrade pip setuptools wheel
# Disk: PyPI's torch 2.11 for x86_64 is a CUDA build whose CUDA libraries (about 2.7 GB) come
# as nvidia-* packages. The main environment already holds the same major CUDA release (13), so
# torch and triton go in without their dependencies and this venv reads the main one's nvidia/
# folder through a .pth file (the CPU tests load those libraries, never call them). A full
# second copy filled the CI disk once. If the main venv has no such folder, or torch does not
# import against it, the plain install with every dependency follows.
main_site=$("${C2C_VENV:-$root/.venv}/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null || true)
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -f "$site/c2c_shared_cuda_libs.pth"
# numpy<2.4: triton 3.6's interpreter calls int() on one-element arrays (c2c_kernels/compat.py).
pipq "numpy<2.4" ninja pytest expecttest filelock typing-extensions sympy networkx jinja2 fsspec
shared_ok=0
if [ -n "$main_site" ] && [ -d "$main_site/nvidia" ]; then
  pipq --no-deps "${C2C_LOWEST_TORCH:-torch==2.11.*}" "triton==3.6.*"
  mkdir -p "$work/shared-cuda-libs"
  ln -sfn "$main_site/nvidia" "$work/shared-cuda-libs/nvidia"
  echo "$work/shared-cuda-libs" > "$site/c2c_shared_cuda_libs.pth"
  "$py" -c "import torch" 2>/dev/null && shared_ok=1 || rm -f "$site/c2c_shared_cuda_libs.pth"
fi
if [ "$shared_ok" = 0 ]; then
  pipq "${C2C_LOWEST_TORCH:-torch==2.11.*}" "triton==3.6.*"
fi
"$py" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
echo "[lowest-torch] CUDA libraries: $([ "$shared_ok" = 1 ] && echo "shared with $main_site" || echo "own copy"); venv $(du -sh "$venv" | cut -f1)"
stamp "install"

# The working tree's files (tracked, and new ones git does not ignore), nothing built.
rm -rf "$src" && mkdir -p "$src"
git ls-files --cached --others --exclude-standard | while read -r f; do [ -f "$f" ] && echo "$f"; done \
  | tar -cf - -T - | tar -xf - -C "$src"
(cd "$src" && C2C_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$py" setup.py -q build_ext --inplace > build.log 2>&1) \
  || { tail -40 "$src/build.log"; exit 1; }
stamp "build (CPU only)"

cd "$src"
# The op layer, the backends that run on a CPU (cuda_emulator is left to the main job: it builds
# the CUDA sources for the emulator, minutes), torch.compile, and the training kernels.
C2C_CUDA_EMULATOR=0 "$py" -m pytest -q -rs -p no:cacheprovider \
  tests/test_gpu_versions.py tests/test_compile_sm90.py tests/test_api.py tests/test_errors.py tests/test_layouts.py \
  "tests/test_ops.py" "tests/test_triton.py" \
  -k "not cuda_emulator" \
  tests/test_training.py::test_fp32_gradients_match_reference
stamp "tests"
