import contextlib
import zlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

CUDA_SKIP = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"
)

# cpu always; cuda where a GPU is present (skipped with a reason elsewhere).
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Relative tolerance (error over the reference's largest magnitude) for results that pass
# through one rounding to the dtype per stage: fp32 accumulation everywhere.
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    """max |actual - expected| <= tol(dtype) * max |expected| (expected in float64)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    error = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-6)
    assert error <= RELATIVE_TOLERANCE[dtype] * scale, f"error {error:.3e} vs scale {scale:.3e}"


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, reproducible from the test's name.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@contextlib.contextmanager
def process_group(rank: int, world: int, init_file: str, backend: str = "gloo"):
    """The world group of a spawned test process (one thread: the ranks share the cores)."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        torch.set_num_threads(1)
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def group_name(tmp_path_factory):
    """The name of a one-rank Gloo world group in this process (opcheck, argument checks)."""
    init_file = tmp_path_factory.mktemp("dist") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    yield dist.group.WORLD.group_name
    dist.destroy_process_group()
