#!/usr/bin/env bash
# Everything a fresh machine needs before moe_ep runs: torch and the test/bench tools from
# PyPI when missing, then the extension build in place (incremental with ninja).
# Environment: PYTHON (default python3), MOE_EP_CPU_ONLY=1 for a CPU-only build,
# TORCH_CUDA_ARCH_LIST to override the CUDA target (default 9.0, Hopper).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

missing=()
for module in torch numpy pytest expecttest ninja matplotlib; do
  "$PYTHON" -c "import $module" 2>/dev/null || missing+=("$module")
done
if ((${#missing[@]})); then
  echo "[setup] installing from PyPI: ${missing[*]}"
  "$PYTHON" -m pip install --quiet "${missing[@]}"
fi
"$PYTHON" -m pip show setuptools wheel >/dev/null 2>&1 || "$PYTHON" -m pip install --quiet setuptools wheel
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
# no install step rebuilds the extension; `pip install --no-build-isolation -e .` is the
# way to install it into an environment.
