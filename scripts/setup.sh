#!/usr/bin/env bash
# Everything a fresh machine needs before moe_ep runs: torch and the test/bench tools from
# PyPI when missing, ccache from the system's packages where it can (root on Debian/Ubuntu;
# torch's build then caches every compile), then the extension build in place (incremental
# with ninja). Environment: PYTHON (default python3), MOE_EP_CPU_ONLY=1 for a CPU-only
# build, TORCH_CUDA_ARCH_LIST for the CUDA architectures (default: the GPUs present, or
# where there is none the list in setup.py), MAX_JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

missing=()
for module in torch pytest expecttest ninja matplotlib; do
  "$PYTHON" -c "import $module" 2>/dev/null || missing+=("$module")
done
if ((${#missing[@]})); then
  echo "[setup] installing from PyPI: ${missing[*]}"
  "$PYTHON" -m pip install --quiet "${missing[@]}"
fi
# setuptools >= 70.1 builds wheels by itself (no `wheel` package).
"$PYTHON" -c "import setuptools as s, sys; sys.exit([*map(int, s.__version__.split('.')[:2])] < [70, 1])" \
  || "$PYTHON" -m pip install --quiet "setuptools>=70.1"

if ! command -v ccache >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing ccache (apt-get)"
  { apt-get install -y -qq ccache || { apt-get update -qq && apt-get install -y -qq ccache; }; } \
    >/dev/null 2>&1 || echo "[setup] ccache not installed; building without a compiler cache"
fi
# Paths under the checkout hash as relative ones, so that another clone hits the cache too.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$(pwd)}
# moe_ep.integrations.transformers (the demo, its tests): transformers 5's expert-parallel
# interface, accelerate and safetensors.
"$PYTHON" -c "from transformers.distributed.expert_parallel import EPImplementationInterface
import accelerate, safetensors" 2>/dev/null || {
  echo "[setup] installing from PyPI: transformers>=5.24 accelerate safetensors"
  "$PYTHON" -m pip install --quiet "transformers>=5.24" accelerate safetensors
}

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "[setup] building moe_ep._C (MAX_JOBS=$MAX_JOBS)"
"$PYTHON" setup.py --quiet build_ext --inplace
# The scripts import moe_ep from this checkout through PYTHONPATH (set by the callers), so
# no install step rebuilds the extension; `pip install --no-build-isolation .` installs it
# into an environment (tests/test_install.py checks that install).
