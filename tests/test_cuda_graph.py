"""The device-driven hot path on a GPU (skipped elsewhere): steps that read nothing on the host
run under torch.cuda.set_sync_debug_mode("error") (any host synchronisation raises) and are
captured in a CUDA graph whose replay must match eager execution. The expert-parallel steps use
a one-rank NCCL group in this process."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from conftest import CUDA_SKIP

import moe_ep
from moe_ep import debug


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory):
    torch.cuda.set_device(0)
    init_file = tmp_path_factory.mktemp("dist") / "init"
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        with debug.counting_host_reads() as reads:
            yield
        assert reads.count == 0
    finally:
        torch.cuda.set_sync_debug_mode("default")


def assert_graph_replays(layer, x):
    """Capture layer(x), replay it on fresh input, compare with eager."""
    eager = layer(x)  # warm-up outside the graph (lazy NCCL init, cuBLAS handles, handshake)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(x)
    fresh = torch.randn_like(x)
    x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, layer(fresh), rtol=0, atol=0)
    assert not torch.equal(static_out, eager)


@CUDA_SKIP
def test_single_rank_layer_reads_nothing_and_captures():
    torch.manual_seed(0)
    layer = moe_ep.MoELayer(256, 128, 16, 2, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    layer(x)
    with no_host_sync():
        layer(x)
    assert_graph_replays(layer, x)


@CUDA_SKIP
@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("dispatch_dtype", [None, torch.float8_e4m3fn])
def test_capacity_step_reads_nothing_and_captures(nccl_group, chunks, dispatch_dtype):
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
        num_chunks=chunks,
        dispatch_dtype=dispatch_dtype,
    )
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    layer(x)
    layer.check_dispatch_status()  # the handshake and the first status, outside the step
    with no_host_sync():
        layer(x)
    layer.check_dispatch_status()
    assert_graph_replays(layer, x)
    layer.check_dispatch_status()


@CUDA_SKIP
@pytest.mark.parametrize("chunks", [1, 4])
def test_exact_step_reads_one_header(nccl_group, chunks):
    layer = moe_ep.MoELayer(
        256, 128, 8, 2, dtype=torch.bfloat16, device="cuda", group=nccl_group, num_chunks=chunks
    )
    x = torch.randn(96, 256, device="cuda", dtype=torch.bfloat16)
    layer(x)
    with debug.counting_host_reads() as reads:
        layer(x)
    assert reads.count == 1
