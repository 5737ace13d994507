"""No leaks: 10,000 expert-parallel layer steps (both dispatch modes, token counts changing
from step to step) on each rank of a world-2 Gloo group, resident memory sampled every 250
steps. After a warm-up of 2,000 steps the least-squares slope must stay below 100 bytes per
step: a leak of the smallest tensor a step makes (a few hundred bytes with its metadata)
would be above it. CPU/Gloo only: CUDA memory is not measured here (no GPU has run this).
About 60 s on the loaded 2-core CI machine."""

import json

from launcher import run_ranks
from leak_worker import run

STEPS, EVERY, WARMUP = 10_000, 250, 2_000
SLOPE_LIMIT = 100.0  # bytes per step


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of (step, bytes)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return covariance / sum((x - mean_x) ** 2 for x, _ in points)


def test_resident_memory_is_flat_after_warm_up(tmp_path):
    codes, seconds = run_ranks(run, 2, (str(tmp_path / "init"), str(tmp_path), STEPS, EVERY), 900)
    assert codes == [0, 0], codes
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            samples = json.load(f)
        steady = [(step, rss) for step, rss in samples if step >= WARMUP]
        rss_slope = slope(steady)
        growth = steady[-1][1] - steady[0][1]
        print(
            f"\nrank {rank}: {STEPS} steps in {seconds:.1f} s, resident {steady[0][1] / 2**20:.1f} "
            f"MiB after warm-up, slope {rss_slope:.2f} B/step, growth {growth / 2**10:.0f} KiB"
        )
        assert rss_slope < SLOPE_LIMIT, (rank, rss_slope, samples)
