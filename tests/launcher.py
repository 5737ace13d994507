"""Launches the ranks of a test group cheaply and makes sure none is left running.

The ranks fork from a server that imported torch and moe_ep once (multiprocessing's
forkserver), so a scenario costs a fork per rank instead of a Python start and a torch import
(about 15 s on the 2-core CI machine under load). Unlike mp.spawn, a rank that exits early or
dies does not take the others down: the failure tests need exactly that. Every rank must end
by itself within `timeout`; one still running then is killed and reported.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["torch", "torch.distributed", "moe_ep"])


def run_ranks(
    target: Callable[..., None], world: int, args: tuple, timeout: float
) -> tuple[list[int | None], float]:
    """Runs target(rank, world, *args) in `world` processes; returns their exit codes (None
    for a rank that was still running at the timeout, then killed) and the seconds taken."""
    start = time.monotonic()
    ranks = [_context.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(max(0.0, timeout - (time.monotonic() - start)))
    codes: list[int | None] = []
    for process in ranks:
        if process.is_alive():
            process.kill()
            process.join()
            codes.append(None)
        else:
            codes.append(process.exitcode)
    return codes, time.monotonic() - start


def join_group(rank: int, world: int, init_file: str, timeout: float = 120.0) -> None:
    """This rank's world group over Gloo (one thread: the ranks share the cores); `timeout`
    is the group's own, which moe_ep's deadline must beat."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
    )
