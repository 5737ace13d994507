#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension, run the CUDA tests and the
# single-GPU benchmarks, write every log and JSON under $OUT (default benchmarks/out).
# The GPU image has torch, ninja and pytest but no network, so this skips scripts/setup.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONPATH="$(pwd)" PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$out/env.txt"
nvidia-smi >> "$out/env.txt" 2>&1
echo "== build"
python3 setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
python3 -m moe_ep | tee -a "$out/env.txt"  # the import-time GPU check, and what was built
echo "== CUDA tests"
python3 -m pytest -q -x tests -k "cuda or nccl" 2>&1 | tee "$out/tests.log" | tail -15
echo "== bench_local"
python3 benchmarks/bench_local.py --json "$out/local.json" 2>&1 | tee "$out/local.log" | tail -60
echo "== bench_dispatch (NCCL, world 1)"
python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/bench_dispatch.py \
  --json "$out/dispatch.json" 2>&1 | tee "$out/dispatch.log" | tail -12
echo "== bench_overlap (NCCL, world 1) with a profiler trace"
python3 -m torch.distributed.run --standalone --nproc-per-node 1 benchmarks/bench_overlap.py \
  --profile "$out/overlap_trace.json" --json "$out/overlap.json" 2>&1 | tee "$out/overlap.log" | tail -12
