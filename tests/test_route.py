import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES

from moe_ep import ops, reference

SHAPES = [(e, k, t) for e in (1, 8, 64, 256) for k in (1, 2, 8) for t in (0, 1, 7, 1000) if k <= e]


def check_route(logits, top_k, **kwargs):
    ids, weights = ops.route(logits, top_k, **kwargs)
    ref_ids, ref_weights = reference.route(
        logits.cpu(),
        top_k,
        **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()},
    )
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (logits.shape[0], top_k)
    torch.testing.assert_close(ids.cpu().long(), ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights.cpu().double(), ref_weights, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts,top_k,tokens", SHAPES)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_route_matches_reference(device, experts, top_k, tokens, score_func):
    logits = torch.randn(tokens, experts, device=device)
    check_route(logits, top_k, score_func=score_func)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("renormalize,scaling", [(True, 1.0), (False, 1.0), (True, 2.5)])
def test_route_dtypes_and_weight_options(device, dtype, renormalize, scaling):
    # Low-precision logits hold exact ties: the lower expert id must win, as in the reference.
    logits = torch.randn(300, 64, device=device).to(dtype)
    check_route(logits, 8, renormalize=renormalize, scaling=scaling)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "experts,top_k,n_group,topk_group",
    [(256, 8, 8, 4), (64, 2, 8, 1), (64, 6, 4, 2), (16, 1, 16, 3)],
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_route_group_limited(device, experts, top_k, n_group, topk_group, with_bias, group_score):
    torch.manual_seed(experts + top_k + n_group)
    logits = torch.randn(500, experts, device=device)
    bias = torch.randn(experts, device=device) * 0.1 if with_bias else None
    options = dict(
        score_func="sigmoid",
        bias=bias,
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
    )
    check_route(logits, top_k, scaling=2.5, **options)
    ids, _ = ops.route(logits, top_k, **options)
    groups_used = (ids.long() // (experts // n_group)).cpu()
    assert all(len(set(row.tolist())) <= topk_group for row in groups_used)


@pytest.mark.parametrize("device", DEVICES)
def test_route_group_score_rule_does_not_depend_on_the_bias(device):
    """DeepSeek-V3 scores a group by its two best experts with or without a correction bias:
    a zero bias must not change the choice under either rule (it once switched the rule)."""
    torch.manual_seed(3)
    logits = torch.randn(400, 64, device=device)
    zero = torch.zeros(64, device=device)
    options = dict(score_func="sigmoid", n_group=8, topk_group=2)
    for rule in ("max", "top2_sum"):
        ids, _ = ops.route(logits, 4, group_score=rule, **options)
        biased_ids, _ = ops.route(logits, 4, group_score=rule, bias=zero, **options)
        torch.testing.assert_close(ids, biased_ids, rtol=0, atol=0)
    # The two rules differ on these logits, so the argument is what decides.
    best, _ = ops.route(logits, 4, group_score="max", **options)
    top2, _ = ops.route(logits, 4, group_score="top2_sum", **options)
    assert not torch.equal(best, top2)


@pytest.mark.parametrize("device", DEVICES)
def test_route_bias_changes_choice_not_weights(device):
    logits = torch.randn(200, 32, device=device)
    bias = torch.zeros(32, device=device)
    bias[5] = 10.0  # expert 5 always chosen first
    ids, weights = ops.route(logits, 2, score_func="sigmoid", bias=bias, renormalize=False)
    assert (ids[:, 0] == 5).all()
    torch.testing.assert_close(weights[:, 0], logits[:, 5].sigmoid())
    check_route(logits, 2, score_func="sigmoid", bias=bias, renormalize=False)


@pytest.mark.parametrize("device", DEVICES)
def test_route_all_tokens_to_one_expert_and_noncontiguous(device):
    wide = torch.randn(64, 40, device=device)
    wide[:, 6] += 50.0
    logits = wide[:, ::2]  # non-contiguous [64, 20]; column 3 is the former 6
    ids, _ = ops.route(logits, 1)
    assert (ids == 3).all()
    check_route(logits, 4)
    check_route(logits.t().contiguous().t(), 4)


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda x: ops.route(x[0], 2), "logits"),
        (lambda x: ops.route(x.long(), 2), "logits"),
        (lambda x: ops.route(x, 9), "top_k"),
        (lambda x: ops.route(x, 0), "top_k"),
        (lambda x: ops.route(x, 2, score_func="relu"), "score_func"),
        (lambda x: ops.route(x, 2, bias=torch.zeros(7)), "bias"),
        (lambda x: ops.route(x, 2, bias=torch.zeros(8, dtype=torch.float64)), "bias"),
        (lambda x: ops.route(x, 2, n_group=3), "n_group"),
        (lambda x: ops.route(x, 2, n_group=4, topk_group=5), "topk_group"),
        (lambda x: ops.route(x, 4, n_group=4, topk_group=1), "top_k"),
        (lambda x: ops.route(x, 2, n_group=4, topk_group=2, group_score="sum"), "group_score"),
    ],
)
def test_route_rejects_bad_arguments(call, argument):
    with pytest.raises(RuntimeError, match=f"'{argument}'"):
        call(torch.randn(5, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_route_opcheck(device):
    logits = torch.randn(33, 64, device=device)
    bias = torch.randn(64, device=device)
    torch.library.opcheck(torch.ops.moe_ep.route.default, (logits, 4))
    torch.library.opcheck(
        torch.ops.moe_ep.route.default, (logits, 8, "sigmoid", bias, 8, 4, True, 2.5, "top2_sum")
    )
