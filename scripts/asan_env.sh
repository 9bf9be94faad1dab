# Sourced by the AddressSanitizer scripts: sets py, asan and stdcxx, or exits 0 (skipped) where
# gcc has no libasan or python with torch cannot start under ASan (some kernels' address-space
# settings keep it from starting at all: that is no memory error). $1: the script's name.
py=${PYTHON:-.venv/bin/python}
asan=$(gcc -print-file-name=libasan.so)
stdcxx=$(gcc -print-file-name=libstdc++.so)
if [[ ! -e "$asan" || ! -e "$stdcxx" ]]; then
  echo "$1: gcc has no libasan.so here; skipped"
  exit 0
fi
if ! ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$asan $stdcxx" "$py" -c "import torch" > /dev/null 2>&1; then
  echo "$1: python with torch does not start under AddressSanitizer here; skipped"
  exit 0
fi
