#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer (any undefined behaviour aborts): the core's
# GoogleTest tests, then the CPU ops built instrumented under a short expert-parallel test
# (world 2 over Gloo, every scenario of tests/ep_worker.py) and the bad-input table.
# The instrumented extension is a package of its own (build/asan-ops/pkg/moe_ep: links to the
# Python sources and the instrumented _C), so the checkout's own build is left alone.
# On the 2-core CI machine: see benchmarks/RESULTS.md, "Issue 15", for the times.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

cmake -S . -B build/asan-core -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_EP_SANITIZE=ON >/dev/null
cmake --build build/asan-core
ctest --test-dir build/asan-core --output-on-failure

echo "[sanitize] building the CPU ops with -fsanitize=address,undefined"
MOE_EP_CPU_ONLY=1 MOE_EP_SANITIZE=1 "$PYTHON" setup.py --quiet build_ext \
  --build-lib build/asan-ops/lib --build-temp build/asan-ops/temp
package=build/asan-ops/pkg/moe_ep
rm -rf "$package"
mkdir -p "$package"
for source in moe_ep/*; do
  case "$source" in moe_ep/_C*.so | moe_ep/__pycache__) ;; *) ln -s "$ROOT/$source" "$package/" ;; esac
done
cp build/asan-ops/lib/moe_ep/_C*.so "$package/"

# The sanitizer runtime comes first (Python itself is not instrumented), with libstdc++ (ASan
# finds the __cxa_throw it wraps at start-up: loaded later with torch, the first C++ exception
# aborts); Python's own allocations at exit are not moe_ep's leaks.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  PYTHONPATH="$ROOT/build/asan-ops/pkg" \
  bash -c "cd build/asan-ops && $PYTHON -c 'import moe_ep; assert \"asan-ops\" in moe_ep._C.__file__' \
    && $PYTHON -m pytest -q -p no:cacheprovider --rootdir '$ROOT' \
    '$ROOT/tests/test_dispatch.py::test_expert_parallel_matches_reference_gloo[2]' \
    '$ROOT/tests/test_bad_input.py' '$ROOT/tests/test_permute.py' '$ROOT/tests/test_route.py'"
