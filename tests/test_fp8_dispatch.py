"""The FP8 dispatch (dispatch_dtype=torch.float8_e4m3fn): the quantization against torch's own
e4m3fn rounding (bitwise) and against e4m3's precision (per element), the bytes on the wire,
argument checks and fake kernels in a one-rank Gloo group in this process; the layer over
spawned Gloo groups of 1, 2 and 4 ranks (tests/fp8_worker.py); the cost model's FP8 term."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import CUDA_SKIP
from fp8_worker import worker

import moe_ep
from moe_ep import dispatcher, perf, reference
from moe_ep.placement import ExpertPlacement

FP8 = torch.float8_e4m3fn


def awkward_rows(tokens: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that reach every corner of the format: Gaussian rows, outlier channels, a row of
    zeros, a row whose blocks span 2^-20..2^15 (e4m3 subnormals after scaling), a row of
    values at the dtype's smallest normal, exact e4m3 codes and ties between them."""
    x = torch.randn(tokens, hidden)
    x[:, :: max(1, hidden // 5)] *= 300.0
    x[1] = 0.0
    x[2] = torch.logspace(-20, 15, hidden, base=2.0) * torch.sign(torch.randn(hidden))
    x[3] = torch.finfo(dtype).smallest_normal * torch.randint(-3, 4, (hidden,))
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float().nan_to_num(0.0)
    x[4] = codes.repeat(hidden // 256 + 1)[:hidden]
    x[5] = (codes[:-1] + codes[1:]).div(2).nan_to_num(0.0).repeat(hidden // 255 + 1)[:hidden]
    x[4:6, 0] = 448.0  # scale 1: the codes and the ties between them stay exact
    return x.to(dtype)


def layout(hidden: int, local: int, top_k: int, tokens: int):
    placement = ExpertPlacement.contiguous(local, 1)
    ids = torch.stack([torch.randperm(local)[:top_k] for _ in range(tokens)]).int()
    return placement, ids, torch.rand(tokens, top_k)


def received_rows(x, ids, weights, placement, mode, dispatch_dtype=None):
    """x_sorted of the rows that arrived (the front of a fixed-capacity buffer)."""
    if mode == "exact":
        return dispatcher.dispatch(x, ids, weights, placement, dispatch_dtype=dispatch_dtype)
    result = dispatcher.dispatch_capacity(
        x, ids, weights, placement, x.shape[0], dispatch_dtype=dispatch_dtype
    )
    result.check()
    return result


@pytest.mark.parametrize("mode", ["exact", "capacity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [128, 200, 7168])
@pytest.mark.parametrize("local,top_k", [(1, 1), (4, 2), (8, 8)])
def test_fp8_rows_match_torch_e4m3fn(group_name, mode, dtype, hidden, local, top_k):
    """The rows an FP8 dispatch hands to the experts are bitwise the rows a plain dispatch of
    reference.fp8_round_trip(x) hands them: the scales, the e4m3fn rounding (torch's own, ties
    to even, saturating) and the dequantization are right, for one local expert (no grouping:
    the dequantization is its own pass), several, and a token's k choices on one rank."""
    placement, ids, weights = layout(hidden, local, top_k, 12)
    x = awkward_rows(12, hidden, dtype)
    # Non-contiguous input: the left half of a wider tensor.
    wide = torch.cat([x, torch.full_like(x, 7.0)], dim=1)[:, :hidden]
    for rows in (x, wide):
        got = received_rows(rows, ids, weights, placement, mode, FP8)
        want = received_rows(reference.fp8_round_trip(x), ids, weights, placement, mode)
        count = int(want.expert_offsets[-1])
        assert int(got.expert_offsets[-1]) == count
        assert got.x_sorted.dtype == dtype
        assert torch.equal(got.x_sorted[:count], want.x_sorted[:count])
        assert torch.equal(got.recv_weights, want.recv_weights)
        assert torch.equal(got.recv_row_of, want.recv_row_of)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_round_trip_within_half_a_code(group_name, dtype):
    """Against float64: each dispatched element is within reference.fp8_error_bound of x (half
    an e4m3 code and the roundings, derived there), and the bound is tight: some element uses
    more than half of it (e4m3's rounding error, not a looser one, is what the bound allows)."""
    placement, ids, weights = layout(7168, 1, 1, 64)
    for heavy in (False, True):
        x = torch.randn(64, 7168)
        if heavy:  # Student-t values and outlier channels
            x = x / torch.randn(64, 7168, 3).pow(2).mean(-1).sqrt()
            x[:, torch.randperm(7168)[:100]] *= 100.0
        x = x.to(dtype)
        got = dispatcher.dispatch(x, ids, weights, placement, dispatch_dtype=FP8).x_sorted
        ratio = (got.double() - x.double()).abs() / reference.fp8_error_bound(x)
        assert ratio.max() <= 1.0, ratio.max()
        assert ratio.max() > 0.5, ratio.max()


def test_fp8_non_finite_values(group_name):
    """A NaN stays NaN and does not change its block's scale; an infinity makes its block NaN
    (its scale is infinite), so a broken activation shows instead of turning finite."""
    placement, ids, weights = layout(256, 1, 1, 3)
    x = torch.randn(3, 256)
    x[0, 5] = float("nan")
    x[1, 130] = float("inf")
    got = dispatcher.dispatch(x, ids, weights, placement, dispatch_dtype=FP8).x_sorted
    assert got[0, 5].isnan() and got[0].isnan().sum() == 1
    finite = torch.ones(256, dtype=torch.bool)
    finite[5] = False
    # The scale of a block with a NaN is that of its other values (reference: NaN read as 0).
    assert torch.equal(got[0, finite], reference.fp8_round_trip(x[:1].nan_to_num(0.0))[0, finite])
    assert got[1, 128:].isnan().all() and got[1, :128].isfinite().all()
    assert got[2].isfinite().all()


@pytest.mark.parametrize("mode", ["exact", "capacity"])
def test_fp8_wire_bytes(group_name, mode):
    """Bytes per dispatched row, measured on the tensors that travel, at the seeds' hidden size
    7168 with top-2: FP8 rows (7168 codes and 56 float32 scales) with their routing metadata
    (W = 2 slots of id and weight) are at most 0.53x of bf16 rows with theirs; ideal
    (7168 + 224 + 16) / (14336 + 16) = 0.516, plus the status words in capacity mode."""
    placement, ids, weights = layout(7168, 4, 2, 16)
    x = torch.randn(16, 7168, dtype=torch.bfloat16)
    per_row = {}
    maps = (placement.expert_rank, placement.expert_local)
    for dispatch_dtype in (None, FP8):
        if mode == "exact":
            x_recv, meta_recv, _, _, _, entries = torch.ops.moe_ep.dispatch_start(
                x, ids, weights, *maps, 4, 1, group_name, dispatch_dtype
            )
            torch.ops.moe_ep.dispatch_finish(x_recv, meta_recv, entries, 4, x.dtype)
            metadata = 8 * 2
        else:
            x_recv, meta_recv, _ = torch.ops.moe_ep.dispatch_capacity_start(
                x, ids, weights, *maps, 4, 16, group_name, dispatch_dtype
            )
            torch.ops.moe_ep.dispatch_capacity_finish(x_recv, meta_recv, 4, 16, x.dtype)
            metadata = 8 * 2 + 16  # and the status words
        rows = x_recv.shape[0]
        assert meta_recv.shape[0] == rows > 0
        per_row[dispatch_dtype] = (x_recv.nbytes + meta_recv.nbytes) / rows
        hidden_state = dispatcher.dispatch_row_bytes(7168, x.dtype, dispatch_dtype)
        assert per_row[dispatch_dtype] == hidden_state + metadata
    assert x_recv.dtype == FP8
    assert per_row[FP8] / per_row[None] <= 0.53, per_row


def test_fp8_argument_checks(group_name):
    placement, ids, weights = layout(128, 2, 1, 4)
    x = torch.randn(4, 128)
    with pytest.raises(RuntimeError, match="'dispatch_dtype'"):
        dispatcher.dispatch(x, ids, weights, placement, dispatch_dtype=torch.float16)
    with pytest.raises(RuntimeError, match="'dispatch_dtype'"):
        dispatcher.dispatch_capacity(x, ids, weights, placement, 4, dispatch_dtype=torch.int8)
    # The layer dtype is given explicitly: x's own dtype is "no quantization".
    plain = dispatcher.dispatch(x, ids, weights, placement, dispatch_dtype=torch.float32)
    assert torch.equal(plain.x_sorted, dispatcher.dispatch(x, ids, weights, placement).x_sorted)
    maps = (placement.expert_rank, placement.expert_local)
    x_recv, meta_recv, _, _, _, entries = torch.ops.moe_ep.dispatch_start(
        x, ids, weights, *maps, 2, 1, group_name, FP8
    )
    with pytest.raises(RuntimeError, match="'dtype'"):
        torch.ops.moe_ep.dispatch_finish(x_recv, meta_recv, entries, 2)
    with pytest.raises(ValueError, match="dispatch_dtype"):
        moe_ep.MoELayer(128, 32, 4, 2, dtype=torch.bfloat16, dispatch_dtype=torch.float16)


def test_fp8_dispatch_registers_its_transfers(group_name):
    """The FP8 rows travel as bytes (Gloo has no FP8 type) and are handed back as an FP8
    view: waiting on the view must wait for (and release) the transfer's work."""
    registry = torch._C._distributed_c10d._get_work_registry_size
    placement, ids, weights = layout(128, 2, 2, 8)
    before = registry()
    pending = dispatcher.dispatch(
        torch.randn(8, 128), ids, weights, placement, async_op=True, dispatch_dtype=FP8
    )
    assert registry() > before
    pending.wait()
    assert registry() == before


def test_opcheck_fp8(group_name):
    placement, ids, weights = layout(256, 4, 2, 6)
    x = torch.randn(6, 256)
    maps = (placement.expert_rank, placement.expert_local)
    ops = torch.ops.moe_ep
    torch.library.opcheck(ops.dispatch.default, (x, ids, weights, *maps, 4, group_name, FP8))
    torch.library.opcheck(
        ops.dispatch_capacity.default, (x, ids, weights, *maps, 4, 6, group_name, FP8)
    )
    w13, w2 = torch.randn(4, 6, 256) / 16, torch.randn(4, 256, 3) / 2
    torch.library.opcheck(
        ops.moe_forward.default,
        (x, ids, weights, *maps, 4, w13, w2, "silu", 2, group_name, None, FP8),
    )
    x_recv, meta_recv, _, _, _, entries = ops.dispatch_start(
        x, ids, weights, *maps, 4, 1, group_name, FP8
    )
    ops.dispatch_finish(x_recv, meta_recv, entries, 4, torch.float32)  # waits: opcheck copies
    # Not test_schema: its mutation check multiplies the inputs, which torch cannot do for FP8.
    torch.library.opcheck(
        ops.dispatch_finish.default,
        (x_recv, meta_recv, entries, 4, torch.float32),
        test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_cost_model_charges_the_fp8_row(group_name):
    """perf.dispatch_bytes is the row that travels per hidden element (1 + 4 / 128 with the
    scales), and the cost model's dispatch term charges it: the term is a fixed cost plus the
    bytes over the links, so its growth with the batch (the bytes part) shrinks by exactly
    1.03125 / 2, while combine stays."""
    assert perf.dispatch_bytes(7168, FP8) == 1.03125
    assert perf.dispatch_bytes(7168, torch.bfloat16) == 2.0
    layer = moe_ep.MoELayer(7168, 64, 8, 2, dispatch_dtype=FP8)
    assert perf.dispatch_bytes(layer.hidden, layer.dispatch_dtype) == 1.03125
    strategy = perf.parse_strategy("ep64")
    terms = {}
    for element in (2.0, 1.03125):
        placed = perf.Strategy(**{**strategy.__dict__, "dispatch_bytes": element})
        for batch in (64, 128):
            workload = perf.Workload("prefill", batch=batch, sequence_length=4096)
            p = perf.predict(perf.MODELS["seeds"], perf.HARDWARE["h100"], placed, workload)
            terms[element, batch] = dict(p.breakdown)
    growth = {e: terms[e, 128]["dispatch"] - terms[e, 64]["dispatch"] for e in (2.0, 1.03125)}
    assert growth[1.03125] / growth[2.0] == pytest.approx(1.03125 / 2, rel=1e-9)
    assert terms[1.03125, 64]["combine"] == terms[2.0, 64]["combine"]
    assert perf.main(["--strategy", "ep64", "--phase", "prefill", "--dispatch-dtype", "fp8"]) == 0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fp8_layer_gloo(world, tmp_path):
    init_file = os.path.join(tmp_path, "init")
    mp.spawn(worker, args=(world, init_file), nprocs=world, join=True)


@CUDA_SKIP
@pytest.mark.parametrize("hidden", [7168, 202])  # 202: the kernels' scalar (unaligned) path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_cuda_matches_cpu_bits(group_name, hidden, dtype):
    """The CUDA quantize-pack and dequantize-scatter kernels give the CPU path's bits (the
    same arithmetic, the hardware e4m3 conversion on sm_89+), in both modes."""
    for local, top_k in ((1, 1), (4, 2)):
        placement, ids, weights = layout(hidden, local, top_k, 40)
        x = awkward_rows(40, hidden, dtype)
        for mode in ("exact", "capacity"):
            cpu = received_rows(x, ids, weights, placement, mode, FP8)
            gpu = received_rows(
                x.cuda(), ids.cuda(), weights.cuda(), placement.to("cuda"), mode, FP8
            )
            count = int(cpu.expert_offsets[-1])
            assert torch.equal(gpu.x_sorted[:count].cpu(), cpu.x_sorted[:count])


@CUDA_SKIP
def test_fp8_layer_cuda_tensors_on_gloo(tmp_path):
    mp.spawn(worker, args=(1, os.path.join(tmp_path, "init"), "cuda"), nprocs=1, join=True)
