"""Plain PyTorch references for the moe_ep ops: float64 math, no moe_ep op involved.

Tests compare the ops against these; benchmarks and the demo time them side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_select_scores(
    logits: torch.Tensor, score_func: str, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, selection scores) in float64: the weights come from the first, the choice
    from the second (scores plus the optional load-balancing bias)."""
    logits = logits.double()
    scores = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()
    select = scores if bias is None else scores + bias.double()
    return scores, select


def route(
    logits: torch.Tensor,
    top_k: int,
    score_func: str = "softmax",
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
    group_score: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gating: int64 ids [T, k] (best first, ties to the lower id), float64 weights."""
    scores, select = route_select_scores(logits, score_func, bias)
    num_tokens, num_experts = select.shape
    if n_group > 1:
        grouped = select.view(num_tokens, n_group, num_experts // n_group)
        if group_score == "top2_sum" and grouped.shape[-1] > 1:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        chosen = group_scores.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        allowed = allowed.repeat_interleave(num_experts // n_group, dim=1)
        select = select.masked_fill(~allowed, float("-inf"))
    ids = select.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return ids, weights * scaling


def gated_ffn(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str
) -> torch.Tensor:
    """One expert in float64: (act(x w1^T) * (x w3^T)) w2^T with w13 = cat(w1, w3)."""
    gate, up = (x.double() @ w13.double().T).chunk(2, dim=-1)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate)
    return (act * up) @ w2.double().T


def expert_ffn(
    x: torch.Tensor,
    expert_offsets: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Rows grouped by expert, float64 result."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    bounds = expert_offsets.tolist()
    for e in range(w13.shape[0]):
        rows = slice(bounds[e], bounds[e + 1])
        if bounds[e + 1] > bounds[e]:
            out[rows] = gated_ffn(x[rows], w13[e], w2[e], activation)
    return out


def moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The whole routed MoE in float64: each token's weighted sum of its k experts."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    ids = topk_ids.long()
    for e in ids.unique().tolist():
        token, choice = (ids == e).nonzero(as_tuple=True)
        y = gated_ffn(x[token], w13[e], w2[e], activation)
        out.index_add_(0, token, y * topk_weights[token, choice].double().unsqueeze(-1))
    return out


def moe_layer_torch(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    activation: str = "silu",
) -> torch.Tensor:
    """The baseline a user writes without moe_ep, in x's dtype: softmax top-k, renormalised,
    then a loop over experts with torch indexing. Used by the benchmarks as the reference
    to beat, not as a test oracle."""
    logits = F.linear(x.float(), gate_weight)
    weights, ids = logits.softmax(dim=-1).topk(top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, choice = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[token] @ w13[e].T).chunk(2, dim=-1)
        act = F.silu(gate) if activation == "silu" else F.gelu(gate)
        out.index_add_(0, token, ((act * up) @ w2[e].T) * weights[token, choice].unsqueeze(-1))
    return out


# The FP8 dispatch (docs/dispatch.md, "FP8 dispatch"): float8_e4m3fn codes with one float32
# scale per block of 128 channels of a token.
FP8_BLOCK_SIZE = 128
E4M3_MAX = 448.0
SMALLEST_NORMAL_FLOAT = 2.0**-126


def fp8_scales(x: torch.Tensor) -> torch.Tensor:
    """float32 [T, H]: the scale of each element's block, amax / 448 (at least 2^-126)."""
    magnitude = x.float().abs()
    num_blocks = -(-x.shape[1] // FP8_BLOCK_SIZE)
    padded = F.pad(magnitude, (0, num_blocks * FP8_BLOCK_SIZE - x.shape[1]))
    blocks = padded.view(x.shape[0], num_blocks, FP8_BLOCK_SIZE)
    scale = (blocks.amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(SMALLEST_NORMAL_FLOAT)
    return scale.expand(blocks.shape).reshape(padded.shape)[:, : x.shape[1]]


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x [T, H] through the FP8 dispatch and back to x's dtype, in float32 with torch's own
    e4m3fn rounding: codes = x * (1 / scale) rounded to e4m3fn, then codes * scale rounded to
    x's dtype."""
    scale = fp8_scales(x)
    codes = (x.float() * (1.0 / scale)).to(torch.float8_e4m3fn)
    return (codes.float() * scale).to(x.dtype)


def fp8_error_bound(x: torch.Tensor) -> torch.Tensor:
    """float64 [T, H]: a bound of |fp8_round_trip(x) - x| per element from e4m3's precision.
    Half a code: 2^-4 |x| (3 mantissa bits) for a scaled value in e4m3's normal range, 2^-10
    scale among its subnormals (codes k 2^-9); the float32 roundings of the scaled value and of
    the product add under 2^-21 |x|; the rounding to x's dtype adds its unit roundoff u of the
    result, or half its subnormal spacing."""
    magnitude = x.double().abs()
    u = torch.finfo(x.dtype).eps / 2
    code = torch.maximum(magnitude * 2.0**-4, fp8_scales(x).double() * 2.0**-10)
    code = code + magnitude * 2.0**-21
    return code + u * (magnitude + code) + torch.finfo(x.dtype).smallest_normal * u


# The largest slope of silu(z) = z sigmoid(z): 1.0998 at z = 2.3994.
SILU_LIPSCHITZ = 1.1


def moe_error_bound(
    x: torch.Tensor,
    x_error: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """float64 [T, H]: a bound of |moe(x + e) - moe(x)| (the silu-gated experts) over every
    input error |e| <= x_error elementwise, in exact arithmetic. Through each expert:
    |d(x w13^T)| <= x_error |w13|^T; with gate g and up u, silu(g + dg)(u + du) - silu(g) u
    = (silu(g + dg) - silu(g))(u + du) + silu(g) du, and silu is 1.1-Lipschitz; then
    |dy| <= |d(silu(g) u)| |w2|^T, and the token sums |weight| |dy| over its choices."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    ids = topk_ids.long().cpu()
    for e in ids.unique().tolist():
        token, choice = (ids == e).nonzero(as_tuple=True)
        w13_e, w2_e = w13[e].double().cpu(), w2[e].double().cpu()
        gate, up = (x[token].double().cpu() @ w13_e.T).chunk(2, dim=-1)
        d_gate, d_up = (x_error[token].double().cpu() @ w13_e.abs().T).chunk(2, dim=-1)
        d_act = SILU_LIPSCHITZ * d_gate * (up.abs() + d_up) + F.silu(gate).abs() * d_up
        d_y = d_act @ w2_e.abs().T
        weight = topk_weights[token, choice].double().cpu().abs().unsqueeze(-1)
        out.index_add_(0, token, d_y * weight)
    return out


def fp8_error_variance(x: torch.Tensor) -> torch.Tensor:
    """float64 [T, H]: the variance of fp8_round_trip(x) - x per element when rounding errors
    are uniform over a code's spacing (the usual model of round-to-nearest on data that does
    not sit on the codes): spacing^2 / 12, with e4m3's spacing 2^(e - 3) scale for a scaled
    value in [2^e, 2^(e + 1)) (3 mantissa bits; 2^-9 scale among the subnormals), plus the
    same for the rounding to x's dtype."""
    magnitude = x.double().abs()
    scale = fp8_scales(x).double()
    _, exponent = torch.frexp(magnitude / scale)  # scaled value in [2^(e - 1), 2^e)
    code_spacing = torch.where(
        magnitude / scale >= 2.0**-6, torch.ldexp(scale, exponent - 4), scale * 2.0**-9
    )
    mantissa_bits = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[x.dtype]
    _, dtype_exponent = torch.frexp(magnitude)
    dtype_spacing = torch.ldexp(torch.ones_like(magnitude), dtype_exponent - 1 - mantissa_bits)
    return (code_spacing.pow(2) + dtype_spacing.pow(2)) / 12


def moe_error_std(
    x: torch.Tensor,
    x_variance: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """float64 [T, H]: to first order, the standard deviation of moe(x + e) - moe(x) (the
    silu-gated experts) for independent zero-mean input errors e of the given variances:
    sum over the token's choices of weight^2 (J^2 @ variance), with each expert's Jacobian
    J = w2 (diag(silu'(g) u) w1 + diag(silu(g)) w3) at the token (gate g, up u)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    ids = topk_ids.long().cpu()
    for e in ids.unique().tolist():
        token, choice = (ids == e).nonzero(as_tuple=True)
        w1, w3 = w13[e].double().cpu().chunk(2, dim=0)
        gate, up = x[token].double().cpu() @ w1.T, x[token].double().cpu() @ w3.T
        sigmoid = gate.sigmoid()
        d_silu = sigmoid * (1 + gate * (1 - sigmoid))
        inner = (d_silu * up).unsqueeze(-1) * w1 + F.silu(gate).unsqueeze(-1) * w3
        jacobian = w2[e].double().cpu() @ inner  # [n, H, H]
        variance = jacobian.pow(2) @ x_variance[token].double().cpu().unsqueeze(-1)
        weight = topk_weights[token, choice].double().cpu().pow(2).unsqueeze(-1)
        out.index_add_(0, token, variance.squeeze(-1) * weight)
    return out.sqrt()
