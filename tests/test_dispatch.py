"""Expert parallelism on CPU with Gloo: each world size runs every scenario of ep_worker.py in
spawned processes, comparing MoELayer over the group with the single-rank float64 reference."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import CUDA_SKIP
from ep_worker import worker


def spawn(world, tmp_path, device="cpu", backend="gloo"):
    init_file = os.path.join(tmp_path, "init")
    mp.spawn(worker, args=(world, init_file, device, backend), nprocs=world, join=True)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_expert_parallel_matches_reference_gloo(world, tmp_path):
    spawn(world, tmp_path)


@CUDA_SKIP
@pytest.mark.parametrize("world", [1, 2])
def test_expert_parallel_cuda_tensors_on_gloo(world, tmp_path):
    # Several processes share one GPU: CUDA tensors are staged through host memory.
    spawn(world, tmp_path, device="cuda")


@CUDA_SKIP
def test_expert_parallel_nccl(tmp_path):
    # NCCL cannot put two ranks on one GPU: one rank per visible GPU.
    spawn(torch.cuda.device_count(), tmp_path, device="cuda", backend="nccl")


def test_dispatch_layout_single_process():
    from moe_ep.dispatcher import dispatch_layout
    from moe_ep.placement import ExpertPlacement

    placement = ExpertPlacement.from_ranks([0, 0, 1, 1, 2, 2], world_size=4)
    ids = torch.tensor([[0, 1], [2, 4], [5, 3], [1, 0]], dtype=torch.int32)
    layout = dispatch_layout(ids, placement)
    # token 0 -> rank 0 once (two experts there); token 1 -> ranks 1, 2; token 2 -> 2, 1; 3 -> 0
    assert layout.send_counts.tolist() == [2, 2, 2, 0]
    assert layout.entry_counts.tolist() == [4, 2, 2, 0]
    assert layout.send_token.tolist() == [0, 3, 1, 2, 1, 2]
    assert layout.send_local_ids.tolist() == [[0, 1], [1, 0], [0, -1], [1, -1], [0, -1], [1, -1]]
    assert layout.token_slot.tolist() == [[0, -1], [2, 4], [5, 3], [1, -1]]
    assert layout.rows_saved == 2
    with pytest.raises(RuntimeError, match="'topk_ids'"):
        dispatch_layout(ids + 6, placement)
    rank_map, local_map = placement.expert_rank, placement.expert_local
    ops = torch.ops.moe_ep
    with pytest.raises(RuntimeError, match="'expert_rank'"):
        ops.dispatch_layout(ids, rank_map + 4, local_map, 4, 2)
    with pytest.raises(RuntimeError, match="'expert_local'"):
        ops.dispatch_layout(ids, rank_map, local_map + 2, 4, 2)
