#!/usr/bin/env bash
# Runs every test: the torch-free core with GoogleTest (CTest), then pytest, then both under
# the sanitizers (scripts/sanitize.sh).
# CUDA tests skip with a reason where no GPU is present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
bash scripts/setup.sh

cmake -S . -B build/core -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/core
ctest --test-dir build/core --output-on-failure

"$PYTHON" -m pytest -q tests "$@"

# The core and the CPU ops under AddressSanitizer + UndefinedBehaviorSanitizer.
bash scripts/sanitize.sh
