import pytest
import torch
from conftest import CUDA_SKIP, FLOAT_DTYPES, assert_close_relative

from moe_ep import ops, reference
from moe_ep.debug import counting_host_reads

# MOE_EP_EXPERT_GEMM picks how the CUDA op runs its GEMMs (None: unset, which means auto);
# the CPU op has one implementation and ignores it.
EXPERT_GEMMS = ["auto", "grouped_mm", "per_expert", "cublas_grouped"]
# (device of x, MOE_EP_EXPERT_GEMM, device of the offsets): a CPU x takes CPU offsets, a CUDA x
# takes CPU or device offsets. "cuda" in every CUDA id: scripts/gpu_check.sh runs -k cuda.
CASES = [pytest.param("cpu", None, "cpu", id="cpu")] + [
    pytest.param("cuda", gemm, where, marks=CUDA_SKIP, id=f"cuda-{gemm}-{where}_offsets")
    for gemm in EXPERT_GEMMS
    for where in ("cpu", "cuda")
]


def use_gemm(monkeypatch, gemm):
    """Sets MOE_EP_EXPERT_GEMM for this test (None: unset, the default)."""
    if gemm is None:
        monkeypatch.delenv("MOE_EP_EXPERT_GEMM", raising=False)
    else:
        monkeypatch.setenv("MOE_EP_EXPERT_GEMM", gemm)


def grouped_mm_fast_path() -> bool:
    """Whether torch's grouped GEMM reads no offset on the host here (CUTLASS, bf16 only)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


NEEDS_GROUPED_MM = pytest.mark.skipif(
    not grouped_mm_fast_path(),
    reason="torch._grouped_mm's device-offset path needs a GPU of compute capability 9.x/10.x",
)


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


def assert_covered_rows_match(out, x, offsets, w13, w2, activation, dtype):
    """The rows below offsets[E] equal the float64 reference (the rest are unspecified)."""
    assert out.dtype == x.dtype and out.shape == x.shape
    n = int(offsets[-1])
    expected = reference.expert_ffn(x[:n], offsets, w13, w2, activation)
    assert_close_relative(out[:n], expected, dtype)


@pytest.mark.parametrize("device,gemm,where", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize(
    "experts,rows", [(1, 0), (1, 7), (8, 1), (8, 1000), (64, 1000), (256, 700)]
)
def test_expert_ffn_matches_reference(
    monkeypatch, device, gemm, where, dtype, activation, experts, rows
):
    use_gemm(monkeypatch, gemm)
    hidden, ffn = 64, 32
    x = torch.randn(rows, hidden, device=device).to(dtype)
    w13, w2 = make_experts(experts, hidden, ffn, dtype, device)
    offsets = random_offsets(rows, experts, where)
    # Device offsets as moe_ep's own callers pass them: trusted, nothing validated on the host.
    out = ops.expert_ffn(x, offsets, w13, w2, activation, check_offsets=where == "cpu")
    assert_covered_rows_match(out, x, offsets, w13, w2, activation, dtype)


@pytest.mark.parametrize("device,gemm,where", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("needed,buffer", [(300, 512), (0, 64), (1, 1024)])
def test_expert_ffn_buffer_with_unused_trailing_rows(
    monkeypatch, device, gemm, where, dtype, needed, buffer
):
    # A fixed-size buffer whose rows from offsets[E] on are unused (NaN here): the covered rows
    # equal the reference, and nothing from the trailing rows reaches them.
    use_gemm(monkeypatch, gemm)
    hidden, ffn, experts = 64, 32, 8
    x = torch.full((buffer, hidden), float("nan"), device=device, dtype=dtype)
    x[:needed] = torch.randn(needed, hidden, device=device).to(dtype)
    w13, w2 = make_experts(experts, hidden, ffn, dtype, device)
    offsets = random_offsets(needed, experts, where)
    for check in (True, False):
        out = ops.expert_ffn(x, offsets, w13, w2, "silu", check_offsets=check)
        assert_covered_rows_match(out, x, offsets, w13, w2, "silu", dtype)
        assert not out[:needed].isnan().any()


def test_expert_ffn_cpu_gemms_cover_only_the_offsets():
    # The CPU op's GEMMs (one gate/up and one down product per non-empty expert) run over the
    # rows below offsets[E] only: their row counts, from the profiler, sum to twice that.
    hidden, ffn, experts, needed, buffer = 32, 16, 6, 90, 400
    x = torch.randn(buffer, hidden)
    w13, w2 = make_experts(experts, hidden, ffn, torch.float32, "cpu")
    offsets = random_offsets(needed, experts, "cpu")
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        ops.expert_ffn(x, offsets, w13, w2)
    gemm_rows = [e.input_shapes[0][0] for e in prof.events() if e.name == "aten::mm"]
    assert gemm_rows and sum(gemm_rows) == 2 * needed


@pytest.mark.parametrize("device,gemm,where", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_all_rows_to_one_expert_and_noncontiguous(
    monkeypatch, device, gemm, where, dtype
):
    use_gemm(monkeypatch, gemm)
    hidden, ffn, experts, rows = 96, 48, 8, 200
    x = torch.randn(hidden, rows, device=device).to(dtype).t()  # non-contiguous [rows, hidden]
    w13, w2 = make_experts(experts, hidden, ffn, dtype, device)
    w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous weights
    # Non-contiguous offsets too: every other entry of a longer tensor.
    offsets = torch.tensor([0, 0, 0, rows, rows, rows, rows, rows, rows]).repeat_interleave(2)
    offsets = offsets.to(where)[::2]
    out = ops.expert_ffn(x, offsets, w13, w2, check_offsets=where == "cpu")
    assert_covered_rows_match(out, x, offsets, w13, w2, "silu", dtype)


@pytest.mark.parametrize("device,gemm,where", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_expert_ffn_odd_sizes_and_offset_views(monkeypatch, device, gemm, where, dtype):
    # Rows of 20 and 6 elements and views at an odd offset: matrix pointers that are not
    # 16-byte aligned (grouped_mm and cublas_grouped hand such calls to the per-expert GEMMs).
    use_gemm(monkeypatch, gemm)
    hidden, ffn, experts, rows = 20, 3, 5, 61
    x = torch.randn(rows + 1, hidden, device=device).to(dtype)[1:]
    w13, w2 = make_experts(experts + 1, hidden, ffn, dtype, device)
    w13, w2 = w13[1:], w2[1:]  # contiguous views that start one expert in
    offsets = random_offsets(rows, experts, where)
    out = ops.expert_ffn(x, offsets, w13, w2, "gelu")
    assert_covered_rows_match(out, x, offsets, w13, w2, "gelu", dtype)


@pytest.mark.parametrize("check_offsets", [True, False])
def test_expert_ffn_cpu_reads_nothing_on_the_host(check_offsets):
    # The CPU kernel reads its own CPU offsets (validating them): not a host read.
    x = torch.randn(40, 16)
    w13, w2 = make_experts(4, 16, 8, torch.float32, "cpu")
    offsets = random_offsets(30, 4, "cpu")
    with counting_host_reads() as reads:
        ops.expert_ffn(x, offsets, w13, w2, check_offsets=check_offsets)
    assert reads.count == 0


@CUDA_SKIP
@pytest.mark.parametrize("gemm", [None] + EXPERT_GEMMS)
@pytest.mark.parametrize("check_offsets", [True, False])
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_expert_ffn_cuda_host_reads(monkeypatch, gemm, check_offsets, where):
    # The budget of every variant, bf16 (grouped_mm's fast path): CPU offsets cost nothing;
    # device offsets cost one counted read where cuBLAS needs host sizes (per_expert,
    # cublas_grouped, grouped_mm without its fast path) or check_offsets asks for it.
    use_gemm(monkeypatch, gemm)
    dtype = torch.bfloat16
    x = torch.randn(300, 64, device="cuda").to(dtype)
    w13, w2 = make_experts(8, 64, 32, dtype, "cuda")
    offsets = random_offsets(250, 8, where)
    ops.expert_ffn(x, offsets, w13, w2, check_offsets=check_offsets)  # warm-up (handles)
    with counting_host_reads() as reads:
        out = ops.expert_ffn(x, offsets, w13, w2, check_offsets=check_offsets)
    device_driven = gemm in (None, "auto", "grouped_mm") and grouped_mm_fast_path()
    expected = 0 if where == "cpu" or (device_driven and not check_offsets) else 1
    assert reads.count == expected
    assert_covered_rows_match(out, x, offsets, w13, w2, "silu", dtype)


@CUDA_SKIP
@NEEDS_GROUPED_MM
@pytest.mark.parametrize("gemm", [None, "grouped_mm"])
def test_expert_ffn_cuda_device_offsets_never_sync(monkeypatch, gemm):
    # Device offsets, trusted: no host read and no synchronisation at all.
    use_gemm(monkeypatch, gemm)
    dtype = torch.bfloat16
    x = torch.randn(512, 128, device="cuda").to(dtype)
    w13, w2 = make_experts(16, 128, 64, dtype, "cuda")
    offsets = random_offsets(400, 16, "cuda")
    ops.expert_ffn(x, offsets, w13, w2, check_offsets=False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with counting_host_reads() as reads:
            out = ops.expert_ffn(x, offsets, w13, w2, check_offsets=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert reads.count == 0
    assert_covered_rows_match(out, x, offsets, w13, w2, "silu", dtype)


@CUDA_SKIP
@NEEDS_GROUPED_MM
def test_expert_ffn_cuda_graph_replays_new_device_offsets(monkeypatch):
    # Captured once with device offsets, then replayed after writing new rows and a new split
    # (another real row count in the same buffer) into the captured tensors: the GPU reads
    # the sizes each replay.
    use_gemm(monkeypatch, "grouped_mm")
    dtype, hidden, ffn, experts, buffer = torch.bfloat16, 128, 64, 8, 600
    x = torch.randn(buffer, hidden, device="cuda").to(dtype)
    w13, w2 = make_experts(experts, hidden, ffn, dtype, "cuda")
    offsets = random_offsets(500, experts, "cuda")
    ops.expert_ffn(x, offsets, w13, w2, check_offsets=False)  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.expert_ffn(x, offsets, w13, w2, check_offsets=False)
    for needed in (500, 123, 0, 600):
        x.copy_(torch.randn_like(x, dtype=torch.float32).to(dtype))
        offsets.copy_(random_offsets(needed, experts, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_covered_rows_match(out, x, offsets, w13, w2, "silu", dtype)


@CUDA_SKIP
@pytest.mark.parametrize("gemm", EXPERT_GEMMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_replays_in_a_cuda_graph_with_cpu_offsets(monkeypatch, gemm, dtype):
    # Host offsets: no device-to-host read, so every variant can be captured. What the
    # captured copies read (the grouped pointer table, grouped_mm's int32 ends) lives in pinned
    # blocks that must stay intact for every replay.
    use_gemm(monkeypatch, gemm)
    hidden, ffn, experts, rows = 64, 32, 8, 300
    x = torch.randn(rows, hidden, device="cuda").to(dtype)
    w13, w2 = make_experts(experts, hidden, ffn, dtype, "cuda")
    offsets = random_offsets(rows, experts, "cpu")
    ops.expert_ffn(x, offsets, w13, w2)  # warm-up outside the graph (cuBLAS handle)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.expert_ffn(x, offsets, w13, w2)
    for _ in range(2):
        x.copy_(torch.randn_like(x, dtype=torch.float32).to(dtype))
        for n in (8, 6, 12, 24, 48):  # pinned blocks of the copied sizes, filled with garbage
            torch.full((n,), -1, dtype=torch.int64, pin_memory=True)
            torch.full((n,), -1, dtype=torch.int32, pin_memory=True)
        graph.replay()
        torch.cuda.synchronize()
        assert_covered_rows_match(out, x, offsets, w13, w2, "silu", dtype)


@CUDA_SKIP
@pytest.mark.parametrize("value", ["batched", "PER_EXPERT", "grouped"])
def test_expert_ffn_cuda_rejects_unknown_expert_gemm(monkeypatch, value):
    # Only the CUDA op reads the variable (the CPU op has a single implementation), so this
    # needs a GPU. "grouped" is the old name of cublas_grouped.
    monkeypatch.setenv("MOE_EP_EXPERT_GEMM", value)
    x = torch.randn(10, 16, device="cuda")
    w13, w2 = make_experts(4, 16, 8, torch.float32, "cuda")
    offsets = torch.tensor([0, 2, 5, 5, 10])
    with pytest.raises(RuntimeError, match="MOE_EP_EXPERT_GEMM"):
        ops.expert_ffn(x, offsets, w13, w2)
    with pytest.raises(RuntimeError, match="MOE_EP_EXPERT_GEMM"):
        ops.expert_ffn(x[:0], torch.zeros(5, dtype=torch.int64), w13, w2)  # T = 0 too


def bad_offsets_cases():
    """(offsets for x of 10 rows and 4 experts, what is wrong)."""
    good = torch.tensor([0, 2, 5, 5, 10])
    return [
        (good[:4], "size"),
        (good.int(), "dtype"),
        (good + 1, "start"),
        (torch.tensor([0, 5, 2, 5, 10]), "order"),
        (torch.tensor([0, 2, 5, 5, 11]), "end past the rows"),
        (torch.tensor([0, 2, -1, 5, 10]), "negative"),
    ]


def test_expert_ffn_rejects_bad_arguments():
    x = torch.randn(10, 16)
    w13, w2 = make_experts(4, 16, 8, torch.float32, "cpu")
    offsets = torch.tensor([0, 2, 5, 5, 10])
    cases = [
        (lambda: ops.expert_ffn(x[0], offsets, w13, w2), "x"),
        (lambda: ops.expert_ffn(x.int(), offsets, w13, w2), "x"),
        (lambda: ops.expert_ffn(x, offsets, w13.half(), w2), "w13"),
        # An input that does not fit the weights names x (the usual culprit) and w13.
        (lambda: ops.expert_ffn(x.half(), offsets, w13.half().float().bfloat16(), w2), "x"),
        (lambda: ops.expert_ffn(x[:, :8], offsets, w13, w2), "x"),
        (lambda: ops.expert_ffn(x, offsets, w13[:, :15], w2), "w13"),
        (lambda: ops.expert_ffn(x, offsets, w13, w2[:3]), "w2"),
        (lambda: ops.expert_ffn(x, offsets, w13, w2[:, :, :4]), "w2"),
        (lambda: ops.expert_ffn(x, offsets, w13, w2, "relu"), "activation"),
    ]
    # CPU offsets are validated whatever check_offsets says (it is free).
    for bad, _ in bad_offsets_cases():
        for check in (True, False):
            cases.append(
                (
                    lambda b=bad, c=check: ops.expert_ffn(x, b, w13, w2, check_offsets=c),
                    "expert_offsets",
                )
            )
    for call, argument in cases:
        with pytest.raises(RuntimeError, match=f"'{argument}'"):
            call()
    # Ending before the last row is valid: the trailing row is simply not computed.
    ops.expert_ffn(x, torch.tensor([0, 2, 5, 5, 9]), w13, w2)


@CUDA_SKIP
@pytest.mark.parametrize("gemm", EXPERT_GEMMS)
def test_expert_ffn_cuda_rejects_bad_offsets(monkeypatch, gemm):
    # Device offsets with check_offsets=True are validated in one read (every variant), CPU
    # offsets always (free); offsets on another device than x are refused.
    use_gemm(monkeypatch, gemm)
    x = torch.randn(10, 16, device="cuda")
    w13, w2 = make_experts(4, 16, 8, torch.float32, "cuda")
    for bad, _ in bad_offsets_cases():
        for where, check in (("cpu", True), ("cpu", False), ("cuda", True)):
            with pytest.raises(RuntimeError, match="'expert_offsets'"):
                ops.expert_ffn(x, bad.to(where), w13, w2, check_offsets=check)
    with pytest.raises(RuntimeError, match="'expert_offsets'"):
        ops.expert_ffn(x.cpu(), torch.tensor([0, 2, 5, 5, 10], device="cuda"), w13.cpu(), w2.cpu())


@pytest.mark.parametrize("device,gemm,where", CASES)
@pytest.mark.parametrize("check_offsets", [True, False])
def test_expert_ffn_opcheck(monkeypatch, device, gemm, where, check_offsets):
    # Offsets that cover every row: opcheck compares whole outputs across runs.
    use_gemm(monkeypatch, gemm)
    x = torch.randn(30, 16, device=device)
    w13, w2 = make_experts(4, 16, 8, torch.float32, device)
    offsets = torch.tensor([0, 10, 10, 25, 30], device=where)
    torch.library.opcheck(
        torch.ops.moe_ep.expert_ffn.default, (x, offsets, w13, w2, "gelu", check_offsets)
    )
