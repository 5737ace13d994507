"""One op of each family, run by tests/test_install.py with the installed wheel, from a
directory outside the checkout: `python installed_checks.py <checkout root>`.

Each result is compared with plain PyTorch (float64) written here, not with moe_ep's own
reference module, so that this file needs nothing from the checkout.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import sys
import tempfile

import torch
import torch.distributed as dist

import moe_ep
from moe_ep import dispatcher, ops, perf, plan
from moe_ep.placement import ExpertPlacement

TOKENS, HIDDEN, FFN, EXPERTS, TOP_K = 13, 16, 8, 6, 2


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= 1e-5 * scale, f"{what}: error {error:.3e} vs scale {scale:.3e}"


def moe_reference(x, topk_ids, topk_weights, w13, w2) -> torch.Tensor:
    """sum_j weight[t, j] * (silu(x w1^T) * (x w3^T)) w2^T for expert topk_ids[t, j]."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (w13[e] @ x[t]).split(FFN)
            out[t] += float(topk_weights[t, j]) * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def check_installed(checkout: str) -> None:
    location = os.path.realpath(moe_ep.__file__)
    assert not location.startswith(os.path.realpath(checkout) + os.sep), location
    assert moe_ep.__version__ == importlib.metadata.version("moe_ep"), moe_ep.__version__


def check_route() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(TOKENS, EXPERTS)
    topk_ids, topk_weights = ops.route(logits, TOP_K)
    best, best_ids = torch.softmax(logits.double(), dim=-1).topk(TOP_K)
    assert torch.equal(topk_ids.long(), best_ids), (topk_ids, best_ids)
    assert_close(topk_weights, best / best.sum(-1, keepdim=True), "route")
    return topk_ids, topk_weights


def check_local_experts(x, topk_ids, topk_weights, w13, w2, expected) -> None:
    permuted, offsets, row_of = ops.permute(x, topk_ids, EXPERTS)
    y = ops.expert_ffn(permuted, offsets, w13, w2)
    assert_close(ops.unpermute(y, row_of, topk_weights), expected, "permute/expert_ffn/unpermute")


def check_dispatch(x, topk_ids, topk_weights, w13, w2, expected) -> None:
    with tempfile.TemporaryDirectory() as rendezvous:
        init = f"file://{os.path.join(rendezvous, 'store')}"
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        try:
            placement = ExpertPlacement.contiguous(EXPERTS, 1)
            received = dispatcher.dispatch(x, topk_ids, topk_weights, placement)
            y = ops.expert_ffn(received.x_sorted, received.expert_offsets, w13, w2)
            assert_close(dispatcher.combine(y, received), expected, "dispatch/combine (gloo)")
        finally:
            dist.destroy_process_group()


def check_plan() -> None:
    expert_bytes = plan.gated_ffn_bytes(HIDDEN, FFN)
    model = plan.Model(2, (), experts_per_layer=8, top_k=2, bytes_per_expert=expert_bytes)
    placed = plan.plan(model, plan.Cluster(num_nodes=2, gpus_per_node=4))
    for layer in placed.moe_layers:  # 8 GPUs, 8 experts: one expert on each GPU
        assert sorted(layer.phy2log) == list(range(8)), layer.phy2log
        assert sorted(layer.gpus) == list(range(8)), layer.gpus


def check_perf() -> None:
    batch = 64.0
    hardware = next(iter(perf.HARDWARE.values()))  # any preset: it reads the package's data
    predicted = perf.predict(
        perf.MODELS["seeds"],
        hardware,
        perf.parse_strategy("ep16tp8"),
        perf.Workload("decode", batch),
    )
    assert math.isfinite(predicted.step_time_s) and predicted.step_time_s > 0
    # A decode step makes one token per sequence.
    assert math.isclose(predicted.tokens_per_s, batch / predicted.step_time_s, rel_tol=1e-9)


def main() -> None:
    torch.manual_seed(0)
    check_installed(sys.argv[1])
    topk_ids, topk_weights = check_route()
    x = torch.randn(TOKENS, HIDDEN)
    w13 = torch.randn(EXPERTS, 2 * FFN, HIDDEN) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, FFN) / FFN**0.5
    expected = moe_reference(x, topk_ids, topk_weights, w13, w2)
    check_local_experts(x, topk_ids, topk_weights, w13, w2, expected)
    check_dispatch(x, topk_ids, topk_weights, w13, w2, expected)
    check_plan()
    check_perf()
    print("installed moe_ep: all op families pass")


if __name__ == "__main__":
    main()
