"""Thousands of expert-parallel layer steps with the resident memory sampled (run by
tests/test_leaks.py through tests/launcher.py). The steps alternate between an exact-size
and a fixed-capacity layer (status checked every step) and change the token count from step
to step (0 included), so every buffer size recurs; each rank writes its samples of
(step, resident bytes) to <results>/rank<r>.json."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from launcher import join_group

import moe_ep

HIDDEN, FFN, EXPERTS = 32, 16, 8
TOKENS = [0, 5, 17, 32, 9, 24]  # cycled: shapes recur, as in serving


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(rank: int, world: int, init_file: str, results: str, steps: int, every: int) -> None:
    join_group(rank, world, init_file)
    layers = [
        moe_ep.MoELayer(
            HIDDEN,
            FFN,
            EXPERTS,
            2,
            dtype=torch.float32,
            group=dist.group.WORLD,
            dispatch_mode=mode,
            capacity=max(TOKENS),
            num_chunks=chunks,
        )
        for mode, chunks in (("exact", 2), ("capacity", 1))
    ]
    inputs = [torch.randn(t, HIDDEN) for t in TOKENS]
    samples = []
    for step in range(steps):
        layer = layers[step % 2]
        layer(inputs[(step // 2 + rank) % len(inputs)])
        if layer.dispatch_mode == "capacity":
            layer.check_dispatch_status()
        if step % every == 0 or step == steps - 1:
            samples.append((step, resident_bytes()))
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(samples, f)
    dist.destroy_process_group()
