import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, assert_close_relative

from moe_ep import ops, reference


def make_experts(experts, hidden, ffn, dtype, device):
    w13 = (torch.randn(experts, 2 * ffn, hidden, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, ffn, device=device) / ffn**0.5).to(dtype)
    return w13, w2


def random_offsets(rows, experts, device, empty_fraction=0.3):
    """Offsets of a random split of rows over experts, some of them empty."""
    weights = torch.rand(experts) * (torch.rand(experts) > empty_fraction)
    if weights.sum() == 0:
        weights[0] = 1.0
    expert_of_row = torch.multinomial(weights, rows, replacement=True) if rows else torch.zeros(0)
    counts = torch.bincount(expert_of_row.long(), minlength=experts)
    offsets = torch.zeros(experts + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    return offsets.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize(
    "experts,rows", [(1, 0), (1, 7), (8, 1), (8, 1000), (64, 1000), (256, 700)]
)
def test_expert_ffn_matches_reference(device, dtype, activation, experts, rows):
    hidden, ffn = 64, 32
    x = torch.randn(rows, hidden, device=device).to(dtype)
    w13, w2 = make_experts(experts, hidden, ffn, dtype, device)
    offsets = random_offsets(rows, experts, device)
    out = ops.expert_ffn(x, offsets, w13, w2, activation)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_relative(out, reference.expert_ffn(x, offsets, w13, w2, activation), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_expert_ffn_all_rows_to_one_expert_and_noncontiguous(device):
    hidden, ffn, experts, rows = 96, 48, 8, 200
    x = torch.randn(hidden, rows, device=device).t()  # non-contiguous [rows, hidden]
    w13, w2 = make_experts(experts, hidden, ffn, torch.float32, device)
    w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous weights
    offsets = torch.tensor([0, 0, 0, rows, rows, rows, rows, rows, rows], device=device)
    out = ops.expert_ffn(x, offsets.cpu(), w13, w2)
    assert_close_relative(out, reference.expert_ffn(x, offsets, w13, w2, "silu"), torch.float32)


def test_expert_ffn_rejects_bad_arguments():
    x = torch.randn(10, 16)
    w13, w2 = make_experts(4, 16, 8, torch.float32, "cpu")
    offsets = torch.tensor([0, 2, 5, 5, 10])
    cases = [
        (lambda: ops.expert_ffn(x[0], offsets, w13, w2), "x"),
        (lambda: ops.expert_ffn(x.int(), offsets, w13, w2), "x"),
        (lambda: ops.expert_ffn(x, offsets, w13.half(), w2), "w13"),
        (lambda: ops.expert_ffn(x, offsets, w13[:, :15], w2), "w13"),
        (lambda: ops.expert_ffn(x, offsets, w13, w2[:3]), "w2"),
        (lambda: ops.expert_ffn(x, offsets, w13, w2[:, :, :4]), "w2"),
        (lambda: ops.expert_ffn(x, offsets[:4], w13, w2), "expert_offsets"),
        (lambda: ops.expert_ffn(x, offsets.int(), w13, w2), "expert_offsets"),
        (lambda: ops.expert_ffn(x, offsets + 1, w13, w2), "expert_offsets"),
        (lambda: ops.expert_ffn(x, torch.tensor([0, 5, 2, 5, 10]), w13, w2), "expert_offsets"),
        (lambda: ops.expert_ffn(x, torch.tensor([0, 2, 5, 5, 9]), w13, w2), "expert_offsets"),
        (lambda: ops.expert_ffn(x, offsets, w13, w2, "relu"), "activation"),
    ]
    for call, argument in cases:
        with pytest.raises(RuntimeError, match=f"'{argument}'"):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_expert_ffn_opcheck(device):
    x = torch.randn(30, 16, device=device)
    w13, w2 = make_experts(4, 16, 8, torch.float32, device)
    offsets = torch.tensor([0, 10, 10, 25, 30], device=device)
    torch.library.opcheck(torch.ops.moe_ep.expert_ffn.default, (x, offsets, w13, w2, "gelu"))
