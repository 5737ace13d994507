#!/usr/bin/env bash
# The main job: builds moe_ep, then runs the MoE demo under torchrun and checks it against
# the plain PyTorch reference. NPROC sets the number of ranks: by default one per GPU
# (NCCL) where GPUs are present, else 4 CPU ranks over Gloo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
bash scripts/setup.sh
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ -z "${NPROC:-}" ]; then
  if [ "$gpus" -gt 0 ]; then NPROC=$gpus; else NPROC=4; fi
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m moe_ep.demo "$@"
