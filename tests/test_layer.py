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
