import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, assert_close_relative

import moe_ep
from moe_ep import reference


def layer_reference(layer, x):
    """Routing recomputed in float64 from the layer's own logits, experts in float64."""
    tokens = x.reshape(-1, layer.hidden)
    ids, weights = reference.route(
        layer.router_logits(tokens),
        layer.top_k,
        layer.score_func,
        layer.expert_bias,
        layer.n_group,
        layer.topk_group,
        layer.renormalize,
        layer.scaling,
        layer.group_score,
    )
    out = reference.moe(tokens, ids, weights, layer.w13, layer.w2, layer.activation)
    return out.view(x.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "experts,top_k,tokens", [(1, 1, 7), (8, 2, 1000), (64, 8, 7), (256, 8, 300), (64, 2, 0)]
)
def test_layer_matches_reference(device, dtype, experts, top_k, tokens):
    layer = moe_ep.MoELayer(64, 32, experts, top_k, dtype=dtype, device=device)
    x = torch.randn(tokens, 64, device=device).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_relative(out, layer_reference(layer, x), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_deepseek_style_routing_and_3d_input(device):
    layer = moe_ep.MoELayer(
        64,
        16,
        256,
        8,
        score_func="sigmoid",
        n_group=8,
        topk_group=4,
        group_score="top2_sum",
        scaling=2.5,
        expert_bias=True,
        dtype=torch.bfloat16,
        device=device,
    )
    layer.expert_bias.copy_(torch.randn(256) * 0.05)
    x = torch.randn(3, 50, 64, device=device).to(torch.bfloat16)
    assert_close_relative(layer(x), layer_reference(layer, x), torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_all_tokens_to_one_expert_and_noncontiguous_input(device):
    layer = moe_ep.MoELayer(32, 16, 16, 2, dtype=torch.float32, device=device)
    layer.gate_weight.zero_()
    layer.gate_weight[11] = 1.0  # every token prefers expert 11
    x = torch.rand(64, 200, device=device)[:, ::2][:, :32] + 0.1  # non-contiguous, positive
    assert_close_relative(layer(x), layer_reference(layer, x), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_compiles_fullgraph(device):
    layer = moe_ep.MoELayer(64, 32, 16, 2, dtype=torch.float32, device=device)
    x = torch.randn(40, 64, device=device)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def full_weights(experts, hidden, ffn):
    return (
        torch.randn(experts, hidden) / hidden**0.5,
        torch.randn(experts, 2 * ffn, hidden) / hidden**0.5,
        torch.randn(experts, hidden, ffn) / ffn**0.5,
    )


def test_layer_rejects_a_bias_it_was_built_without():
    layer = moe_ep.MoELayer(32, 8, 8, 2, dtype=torch.float32)
    gate, w13, w2 = full_weights(8, 32, 8)
    with pytest.raises(ValueError, match="expert_bias: .*expert_bias=True"):
        layer.load_full_weights(gate, w13, w2, torch.zeros(8))
    with_bias = moe_ep.MoELayer(32, 8, 8, 2, dtype=torch.float32, expert_bias=True)
    with pytest.raises(ValueError, match=r"expert_bias: expected shape \[8\]"):
        with_bias.load_full_weights(gate, w13, w2, torch.zeros(7))


def test_layer_names_the_input_of_another_dtype_or_size():
    layer = moe_ep.MoELayer(32, 8, 8, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x: dtype torch.float32 .* torch.bfloat16"):
        layer(torch.randn(4, 32))
    with pytest.raises(ValueError, match=r"x: expected \[\.\.\., 32\]"):
        layer(torch.randn(4, 16).to(torch.bfloat16))


@pytest.mark.parametrize(
    "argument,index,shape",
    [
        ("gate_weight", 0, (8, 31)),
        ("w13", 1, (8, 16, 31)),
        ("w13", 1, (7, 16, 32)),
        ("w2", 2, (8, 32, 9)),
        ("w2", 2, (8, 8, 32)),  # its transpose: the message says so
    ],
)
def test_layer_names_the_weight_of_the_wrong_shape(argument, index, shape):
    layer = moe_ep.MoELayer(32, 8, 8, 2, dtype=torch.float32)
    weights = list(full_weights(8, 32, 8))
    weights[index] = torch.randn(shape)
    with pytest.raises(ValueError, match=f"{argument}: expected shape"):
        layer.load_full_weights(*weights)


def test_layer_refuses_to_guess_the_layout_of_a_square_w13():
    """With H == 2F a transposed w13 has the right shape: the layer asks instead of guessing;
    transposed=True then computes what the untransposed weights compute."""
    gate, w13, w2 = full_weights(8, 32, 16)
    layer = moe_ep.MoELayer(32, 16, 8, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="w13: .*transposed=False .*transposed=True"):
        layer.load_full_weights(gate, w13.transpose(1, 2).contiguous(), w2)
    layer.load_full_weights(gate, w13, w2, transposed=False)
    flipped = moe_ep.MoELayer(32, 16, 8, 2, dtype=torch.float32)
    flipped.load_full_weights(
        gate, w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous(), transposed=True
    )
    x = torch.randn(20, 32)
    torch.testing.assert_close(flipped(x), layer(x), rtol=0, atol=0)
    assert_close_relative(layer(x), layer_reference(layer, x), torch.float32)


def test_layer_loads_its_local_experts_only():
    gate, w13, w2 = full_weights(8, 32, 8)
    full = moe_ep.MoELayer(32, 8, 8, 2, dtype=torch.float32)
    full.load_full_weights(gate, w13, w2)
    local = moe_ep.MoELayer(32, 8, 8, 2, dtype=torch.float32)
    local.load_local_weights(gate, w13, w2)
    torch.testing.assert_close(local.w13, full.w13, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"w13: expected shape \[8, 16, 32\]"):
        local.load_local_weights(gate, w13[:4], w2)


def test_layer_router_dtype_sets_the_logits_dtype():
    layer = moe_ep.MoELayer(32, 8, 8, 2, dtype=torch.bfloat16, router_dtype=torch.bfloat16)
    x = torch.randn(6, 32).to(torch.bfloat16)
    assert layer.gate_weight.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x, layer.gate_weight)
    torch.testing.assert_close(layer.router_logits(x), expected, rtol=0, atol=0)
    assert_close_relative(layer(x), layer_reference(layer, x), torch.bfloat16)
