"""Whether this build's CUDA kernels can run on the GPUs present.

moe_ep._C.cuda_targets lists what nvcc put in the binary (setup.py records it). "sm_XY" code
runs on GPUs of compute capability X.Z with Z >= Y; "sm_XYa" only on X.Y and "sm_XYf" on
the X family from X.Y up; "compute_XY" (PTX) is compiled by the driver for any GPU of
capability X.Y or later. A GPU that no target serves would fail at its first kernel with
"no kernel image is available", so moe_ep checks at import and says how to rebuild.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe_ep import _C

__all__ = ["built_targets", "target_runs_on", "unsupported_gpu_error", "check_gpus"]


def built_targets() -> list[str]:
    """The CUDA targets of this build, e.g. ["sm_80", "sm_90", "compute_90"]; [] if CPU-only."""
    return [target for target in _C.cuda_targets.split(",") if target]


def target_runs_on(target: str, capability: tuple[int, int]) -> bool:
    """Whether code built for `target` ("sm_90", "sm_90a", "compute_120") runs on a GPU of
    compute capability `capability` (major, minor)."""
    kind, _, version = target.partition("_")
    digits = version.rstrip("af")
    if kind not in ("sm", "compute") or not digits.isdigit():
        raise ValueError(f"target: expected sm_XY or compute_XY, got {target!r}")
    variant = version[len(digits) :]
    built = divmod(int(digits), 10)
    if variant == "a":
        return capability == built
    if kind == "compute" and not variant:
        return capability >= built
    return capability[0] == built[0] and capability[1] >= built[1]


def unsupported_gpu_error(
    capability: tuple[int, int], device_name: str, targets: Sequence[str]
) -> str | None:
    """The error for a GPU that none of `targets` serves, or None when one does."""
    if any(target_runs_on(target, capability) for target in targets):
        return None
    arch = f"{capability[0]}.{capability[1]}"
    return (
        f"moe_ep was built for CUDA targets {','.join(targets) or '(none)'}, which cannot run "
        f"on {device_name} (compute capability {arch}). Rebuild it for this GPU from the "
        f"source: TORCH_CUDA_ARCH_LIST={arch} pip install --no-build-isolation "
        "--force-reinstall <path to moe_ep> (or leave TORCH_CUDA_ARCH_LIST unset on this "
        "machine to build for the GPUs present; in a checkout, bash scripts/setup.sh)."
    )


def check_gpus() -> None:
    """Raises RuntimeError if a visible GPU cannot run this build's CUDA kernels."""
    if not _C.with_cuda or not torch.cuda.is_available():
        return
    targets = built_targets()
    for index in range(torch.cuda.device_count()):
        error = unsupported_gpu_error(
            torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index), targets
        )
        if error:
            raise RuntimeError(error)
