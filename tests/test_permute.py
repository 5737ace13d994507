import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, RELATIVE_TOLERANCE

from moe_ep import ops

SHAPES = [(e, k, t) for e in (1, 8, 64, 256) for k in (1, 2, 8) for t in (0, 1, 7, 1000) if k <= e]


def reference_permute(hidden, topk_ids, num_experts):
    """Stable sort of the flattened (token, choice) pairs by expert, in plain torch."""
    flat = topk_ids.reshape(-1).long().cpu()
    order = flat.sort(stable=True).indices
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(flat, minlength=num_experts).cumsum(0)
    row_of = torch.empty_like(order)
    row_of[order] = torch.arange(order.numel())
    return hidden.cpu()[order // topk_ids.shape[1]], offsets, row_of.view(topk_ids.shape)


def random_ids(tokens, experts, top_k, device):
    """k distinct experts per token, like a top-k."""
    return torch.rand(tokens, experts, device=device).argsort(dim=1)[:, :top_k].int()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts,top_k,tokens", SHAPES)
def test_permute_matches_reference(device, experts, top_k, tokens):
    hidden = torch.randn(tokens, 48, device=device)
    ids = random_ids(tokens, experts, top_k, device)
    permuted, offsets, row_of = ops.permute(hidden, ids, experts)
    ref_permuted, ref_offsets, ref_row_of = reference_permute(hidden, ids, experts)
    assert offsets.dtype == torch.int64 and row_of.dtype == torch.int32
    torch.testing.assert_close(offsets.cpu(), ref_offsets, rtol=0, atol=0)
    torch.testing.assert_close(row_of.cpu().long(), ref_row_of, rtol=0, atol=0)
    torch.testing.assert_close(permuted.cpu(), ref_permuted, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts", [64, 4096])
def test_permute_past_the_single_block_sort(device, experts):
    """More than 8,192 (token, choice) pairs, T not a multiple of the sort's 256-item chunks:
    on CUDA the three-kernel counting sort (and at 4,096 experts its largest scan buffer)."""
    hidden = torch.randn(3001, 24, device=device)
    ids = random_ids(3001, experts, 8, device)
    for got, want in zip(
        ops.permute(hidden, ids, experts), reference_permute(hidden, ids, experts), strict=True
    ):
        torch.testing.assert_close(got.cpu().to(want.dtype), want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("width", [1, 7, 64, 7168])
def test_permute_dtypes_widths_and_skew(device, dtype, width):
    tokens, experts = 300, 16
    hidden = torch.randn(tokens, width, device=device).to(dtype)
    ids = torch.full((tokens, 2), 3, dtype=torch.int64, device=device)  # all to expert 3 ...
    ids[:, 1] = 9  # ... and 9; every other expert gets nothing; int64 ids accepted
    permuted, offsets, row_of = ops.permute(hidden, ids, experts)
    ref_permuted, ref_offsets, ref_row_of = reference_permute(hidden, ids, experts)
    torch.testing.assert_close(offsets.cpu(), ref_offsets, rtol=0, atol=0)
    torch.testing.assert_close(row_of.cpu().long(), ref_row_of, rtol=0, atol=0)
    torch.testing.assert_close(permuted.cpu(), ref_permuted, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_permute_one_choice_ids_with_any_strides(device, dtype):
    """[T, 1] ids transposed from [1, T] (strides (1, T)): contiguous to PyTorch, with a
    column stride of T."""
    hidden = torch.randn(300, 16, device=device)
    ids = torch.randint(0, 8, (1, 300), device=device, dtype=dtype).t()
    assert ids.stride() == (1, 300)
    permuted, offsets, row_of = ops.permute(hidden, ids, 8)
    for got, want in zip(
        (permuted, offsets, row_of), reference_permute(hidden, ids, 8), strict=True
    ):
        torch.testing.assert_close(got.cpu().to(want.dtype), want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_permute_noncontiguous_hidden(device):
    base = torch.randn(64, 100, device=device)
    hidden = base[:, 10:90:2]
    ids = random_ids(64, 8, 2, device)
    permuted, _, _ = ops.permute(hidden, ids, 8)
    torch.testing.assert_close(permuted.cpu(), reference_permute(hidden, ids, 8)[0], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("tokens,top_k,width", [(0, 2, 64), (1, 1, 64), (7, 8, 7), (1000, 2, 256)])
def test_unpermute_matches_reference(device, dtype, tokens, top_k, width):
    rows = tokens * top_k
    expert_out = torch.randn(rows, width, device=device).to(dtype)
    row_of = torch.randperm(rows, device=device).int().view(tokens, top_k)
    if rows > 1:
        row_of.view(-1)[0] = -1  # a dropped choice contributes nothing
    weights = torch.rand(tokens, top_k, device=device)
    out = ops.unpermute(expert_out, row_of, weights)
    gathered = expert_out.cpu().double()[row_of.cpu().long().clamp_min(0)]
    mask = (row_of.cpu() >= 0).double().unsqueeze(-1)
    expected = (gathered * mask * weights.cpu().double().unsqueeze(-1)).sum(dim=1)
    assert out.dtype == dtype and out.shape == (tokens, width)
    error = (out.cpu().double() - expected).abs()
    # one rounding of the fp32 sum to the output dtype
    assert (error <= RELATIVE_TOLERANCE[dtype] * expected.abs() + 1e-6).all()


@pytest.mark.parametrize("device", DEVICES)
def test_permute_unpermute_roundtrip(device):
    hidden = torch.randn(100, 32, device=device)
    ids = random_ids(100, 64, 8, device)
    permuted, _, row_of = ops.permute(hidden, ids, 64)
    weights = torch.full((100, 8), 1.0 / 8, device=device)
    torch.testing.assert_close(ops.unpermute(permuted, row_of, weights), hidden)


@pytest.mark.parametrize("device", DEVICES)
def test_permute_rejects_bad_arguments(device):
    hidden = torch.randn(4, 8, device=device)
    ids = torch.zeros(4, 2, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="'topk_ids'.*outside"):
        ops.permute(hidden, ids + 8, 8)
    with pytest.raises(RuntimeError, match="'topk_ids'.*outside"):
        ops.permute(hidden, ids - 1, 8)
    with pytest.raises(RuntimeError, match="'topk_ids'.*outside"):  # no wrap to expert 3
        ops.permute(hidden, ids.long() + 2**32 + 3, 8)
    with pytest.raises(RuntimeError, match="'topk_ids'"):
        ops.permute(hidden, ids.float(), 8)
    with pytest.raises(RuntimeError, match="'topk_ids'"):
        ops.permute(hidden, ids[:3], 8)
    with pytest.raises(RuntimeError, match="'hidden'"):
        ops.permute(hidden[0], ids, 8)
    with pytest.raises(RuntimeError, match="'hidden'"):
        ops.permute(hidden.int(), ids, 8)
    with pytest.raises(RuntimeError, match="'num_experts'"):
        ops.permute(hidden, ids, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_unpermute_rejects_bad_arguments(device):
    out = torch.randn(8, 4, device=device)
    rows = torch.arange(8, dtype=torch.int32, device=device).view(4, 2)
    weights = torch.rand(4, 2, device=device)
    with pytest.raises(RuntimeError, match="'row_of'"):
        ops.unpermute(out, rows + 1, weights)
    with pytest.raises(RuntimeError, match="'row_of'"):
        ops.unpermute(out, rows.long(), weights)
    with pytest.raises(RuntimeError, match="'topk_weights'"):
        ops.unpermute(out, rows, weights[:, :1])
    with pytest.raises(RuntimeError, match="'expert_out'"):
        ops.unpermute(out.int(), rows, weights)


@pytest.mark.parametrize("device", DEVICES)
def test_permute_unpermute_opcheck(device):
    hidden = torch.randn(21, 16, device=device)
    ids = random_ids(21, 8, 2, device)
    torch.library.opcheck(torch.ops.moe_ep.permute.default, (hidden, ids, 8))
    permuted, _, row_of = ops.permute(hidden, ids, 8)
    weights = torch.rand(21, 2, device=device)
    torch.library.opcheck(torch.ops.moe_ep.unpermute.default, (permuted, row_of, weights))
