"""The device-driven hot path, held to its budgets on the CPU: host reads per layer (exact mode
one header per layer for 1, 2 and 4 chunks; fixed capacity and a single rank none), rows
computed equal to rows needed in fixed-capacity mode, operators per call; in spawned Gloo
processes at world sizes 1, 2 and 4 (tests/hot_path_worker.py)."""

import os

import pytest
import torch.multiprocessing as mp
from hot_path_worker import worker


@pytest.mark.parametrize("world", [1, 2, 4])
def test_hot_path_budgets_gloo(world, tmp_path):
    mp.spawn(worker, args=(world, os.path.join(tmp_path, "init")), nprocs=world, join=True)
