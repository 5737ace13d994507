"""A fixed-capacity expert-parallel step captured in a CUDA graph (one-rank NCCL group in
this process): no device-to-host read may happen inside, and the replay must match eager."""

import pytest
import torch
import torch.distributed as dist
from conftest import CUDA_SKIP

import moe_ep


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory):
    torch.cuda.set_device(0)
    init_file = tmp_path_factory.mktemp("dist") / "init"
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@CUDA_SKIP
def test_capacity_step_captures_in_a_cuda_graph(nccl_group):
    torch.manual_seed(0)
    layer = moe_ep.MoELayer(
        256,
        128,
        8,
        2,
        dtype=torch.bfloat16,
        device="cuda",
        group=nccl_group,
        dispatch_mode="capacity",
        capacity=64,
        on_overflow="report",
        num_chunks=1,
    )
    static_x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    eager = layer(static_x)  # warm-up outside the graph (lazy NCCL init, cuBLAS handles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    layer.check_dispatch_status()
    torch.testing.assert_close(static_out, layer(fresh), rtol=0, atol=0)
    assert not torch.equal(static_out, eager)
