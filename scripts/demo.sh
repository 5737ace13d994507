#!/usr/bin/env bash
# The main job: builds moe_ep, then runs the MoE demo under torchrun and checks it against
# the plain PyTorch reference. NPROC (default 1) sets the number of ranks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-1}" \
  -m moe_ep.demo "$@"
