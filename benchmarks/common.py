"""Small helpers shared by the benchmarks: timing, the device's measured limits, tables.

Timing: on CUDA, CUDA events around each call after warmup, median of the samples; on CPU,
time.perf_counter, median. Limits are measured in the same process as the figures they
judge: a dense matmul of the benchmark's dtype (TFLOP/s ceiling) and a large
``dst.copy_(src)`` (copy bandwidth ceiling, counting the bytes read plus the bytes written);
a limit is the best of its samples (a ceiling), an op's figure is the median.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    iters: int = 20,
    min_iters: int = 3,
    budget_s: float = 2.0,
    best: bool = False,
) -> float:
    """Median (or with `best`, minimum) milliseconds of fn() over at most `iters` calls
    after `warmup` calls.

    Stops early (after at least `min_iters` samples) once `budget_s` seconds of samples
    are spent, so that slow references on a CPU do not dominate a run.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    spent = 0.0
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        samples.append(ms)
        spent += ms / 1e3
        if len(samples) >= min_iters and spent >= budget_s:
            break
    return min(samples) if best else statistics.median(samples)


def init_distributed(cpu_only: bool = False) -> tuple[int, int, torch.device]:
    """Joins the torchrun group: NCCL with one GPU per rank where GPUs are present, else Gloo.
    Returns (rank, world size, device)."""
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and not cpu_only
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def time_collective(device: torch.device, iters: int, fn: Callable, *args) -> tuple[object, float]:
    """(fn(*args), median over iterations of the slowest rank's milliseconds): ranks start
    each iteration together (barrier) and a step lasts as long as its slowest rank."""
    import torch.distributed as dist

    result = fn(*args)  # warm-up
    samples = []
    for _ in range(iters):
        dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        result = fn(*args)
        synchronize(device)
        elapsed = torch.tensor([(time.perf_counter() - start) * 1e3])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        samples.append(float(elapsed))
    return result, statistics.median(samples)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """TFLOP/s of one dense n x n x n matmul (2 n^3 FLOPs) in `dtype` on `device`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = time_ms(
        lambda: torch.mm(a, b, out=out), device, warmup=2, iters=10, budget_s=3.0, best=True
    )
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measured_copy_gbps(device: torch.device, nbytes: int) -> float:
    """GB/s of dst.copy_(src) for an `nbytes` tensor, counting read + write (2 * nbytes)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, iters=20, budget_s=2.0, best=True)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads"


def environment(device: torch.device) -> dict:
    """What a results entry records about the run."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1]] + sys.argv),
    }


def announce(rank: int, world: int, device: torch.device, details: str) -> tuple[Callable, dict]:
    """Prints, on rank 0, the two header lines a results entry starts with (device, ranks and
    backend, torch, the run's details, date; then the command); returns rank 0's printer
    (a no-op on the other ranks) and the environment."""
    say = print if rank == 0 else (lambda *a, **k: None)
    env = environment(device)
    say(
        f"# {env['device']} x {world} ranks ({dist.get_backend()}) | torch {env['torch']} | "
        f"{details} | {env['date']}"
    )
    say(f"# {env['command']}")
    return say, env


def format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:.2f}"
        return f"{value:.2e}"
    return str(value)


def format_table(
    rows: Sequence[dict], columns: Sequence[str], min_widths: Sequence[int] | None = None
) -> str:
    """A plain-text table of the given columns (missing values print as '-'). Fixed
    `min_widths` let rows printed one at a time line up with a header printed first."""
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    floor = min_widths or [0] * len(columns)
    widths = [max([len(c), floor[i]] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
