#!/usr/bin/env bash
# Runs every test: the torch-free core with GoogleTest (CTest), then pytest, ending with
# tests/test_install.py (sdist -> wheel -> fresh virtual environment, run from outside the
# checkout), then the core and the CPU ops under the sanitizers (scripts/sanitize.sh).
# CUDA tests skip with a reason where no GPU is present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
bash scripts/setup.sh

cmake -S . -B build/core -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/core
ctest --test-dir build/core --output-on-failure

suite=()
for file in tests/test_*.py; do
  [ "$file" = tests/test_install.py ] || suite+=("$file")
done
"$PYTHON" -m pytest -q "${suite[@]}" tests/test_install.py "$@"

# The core and the CPU ops under AddressSanitizer + UndefinedBehaviorSanitizer.
bash scripts/sanitize.sh
