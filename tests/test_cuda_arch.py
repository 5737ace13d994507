"""The decision behind the import-time GPU check (moe_ep.cuda_arch), on made-up GPUs: the
expected answers are CUDA's compatibility rules written out case by case."""

import types

import pytest
import torch

import moe_ep
from moe_ep import cuda_arch
from moe_ep.cuda_arch import built_targets, target_runs_on, unsupported_gpu_error

# (target, GPU compute capability, runs?)
CASES = [
    ("sm_80", (8, 0), True),
    ("sm_80", (8, 6), True),  # A10 / RTX 30xx run A100 code
    ("sm_80", (8, 9), True),  # L4 / L40
    ("sm_86", (8, 0), False),  # never downwards
    ("sm_80", (9, 0), False),  # machine code never crosses a major version
    ("sm_90", (9, 0), True),
    ("sm_90", (10, 0), False),
    ("sm_90a", (9, 0), True),
    ("sm_90a", (10, 0), False),
    ("sm_100a", (10, 3), False),  # arch-specific: that exact GPU only
    ("sm_100", (10, 3), True),  # B300 runs B200 code
    ("sm_100f", (10, 3), True),  # family code: same major, same or later minor
    ("sm_100", (12, 0), False),
    ("sm_120", (12, 1), True),
    ("compute_90", (9, 0), True),  # PTX: compiled by the driver for any later GPU
    ("compute_90", (12, 0), True),
    ("compute_90", (8, 9), False),
    ("compute_120", (10, 0), False),
    ("compute_90a", (10, 0), False),
]


@pytest.mark.parametrize("target, capability, runs", CASES)
def test_target_runs_on(target, capability, runs):
    assert target_runs_on(target, capability) is runs


@pytest.mark.parametrize("target", ["sm90", "gfx90a", "sm_", "compute_x", ""])
def test_bad_target_is_named(target):
    with pytest.raises(ValueError, match="target"):
        target_runs_on(target, (9, 0))


def test_hopper_only_build_on_an_a100_names_the_rebuild():
    error = unsupported_gpu_error((8, 0), "NVIDIA A100-SXM4-80GB", ["sm_90"])
    assert "sm_90" in error and "NVIDIA A100-SXM4-80GB" in error and "8.0" in error
    assert "TORCH_CUDA_ARCH_LIST=8.0" in error and "pip install" in error


def test_default_list_serves_every_gpu_family():
    # setup.py's list without a GPU present: 8.0;9.0;10.0;12.0+PTX.
    targets = ["sm_80", "sm_90", "sm_100", "sm_120", "compute_120"]
    for capability in [(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1)]:
        assert unsupported_gpu_error(capability, "gpu", targets) is None, capability
    assert unsupported_gpu_error((13, 0), "a later GPU", targets) is None  # through the PTX
    assert unsupported_gpu_error((11, 0), "Thor", targets) is not None
    assert unsupported_gpu_error((7, 5), "T4", targets) is not None


def test_cpu_only_build_serves_no_gpu():
    assert unsupported_gpu_error((9, 0), "H100", []) is not None


def test_built_targets_match_the_build():
    targets = built_targets()
    if moe_ep._C.with_cuda:
        assert targets, "a CUDA build records its targets"
        for target in targets:
            target_runs_on(target, (9, 0))  # raises on a target it cannot read
    else:
        assert targets == []


def test_check_gpus_raises_for_a_gpu_the_build_lacks(monkeypatch):
    # The import-time check, wired to a pretend Hopper-only build on a pretend A100 + H100.
    monkeypatch.setattr(
        cuda_arch, "_C", types.SimpleNamespace(with_cuda=True, cuda_targets="sm_90")
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus = {0: ((9, 0), "H100"), 1: ((8, 0), "A100")}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: gpus[i][1])
    with pytest.raises(RuntimeError, match="A100 .compute capability 8.0"):
        cuda_arch.check_gpus()
    gpus[1] = ((9, 0), "H200")
    cuda_arch.check_gpus()
