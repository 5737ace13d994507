import pytest
import torch
from conftest import CUDA_SKIP, FLOAT_DTYPES, assert_close_relative

from moe_ep import ops, reference

# MOE_EP_EXPERT_GEMM picks how the CUDA op reaches cuBLAS (one GEMM per expert, or one grouped
# GEMM per projection); the CPU op has one implementation and ignores it.
EXPERT_GEMMS = ["per_expert", "grouped"]
DEVICE_GEMMS = [pytest.param("cpu", None, id="cpu")] + [
    pytest.param("cuda", gemm, marks=CUDA_SKIP, id=f"cuda-{gemm}") for gemm in EXPERT_GEMMS
]


def use_gemm(monkeypatch, gemm):
    """Sets MOE_EP_EXPERT_GEMM for this test (None: unset, the default)."""
    if gemm is None:
        monkeypatch.delenv("MOE_EP_EXPERT_GEMM", raising=False)
    else:
        monkeypatch.setenv("MOE_EP_EXPERT_GEMM", gemm)


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


@pytest.mark.parametrize("device,gemm", DEVICE_GEMMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize(
    "experts,rows", [(1, 0), (1, 7), (8, 1), (8, 1000), (64, 1000), (256, 700)]
)
def test_expert_ffn_matches_reference(monkeypatch, device, gemm, dtype, activation, experts, rows):
    use_gemm(monkeypatch, gemm)
    hidden, ffn = 64, 32
    x = torch.randn(rows, hidden, device=device).to(dtype)
    w13, w2 = make_experts(experts, hidden, ffn, dtype, device)
    offsets = random_offsets(rows, experts, device)
    out = ops.expert_ffn(x, offsets, w13, w2, activation)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_relative(out, reference.expert_ffn(x, offsets, w13, w2, activation), dtype)


@pytest.mark.parametrize("device,gemm", DEVICE_GEMMS)
def test_expert_ffn_all_rows_to_one_expert_and_noncontiguous(monkeypatch, device, gemm):
    use_gemm(monkeypatch, gemm)
    hidden, ffn, experts, rows = 96, 48, 8, 200
    x = torch.randn(hidden, rows, device=device).t()  # non-contiguous [rows, hidden]
    w13, w2 = make_experts(experts, hidden, ffn, torch.float32, device)
    w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous weights
    offsets = torch.tensor([0, 0, 0, rows, rows, rows, rows, rows, rows], device=device)
    out = ops.expert_ffn(x, offsets.cpu(), w13, w2)
    assert_close_relative(out, reference.expert_ffn(x, offsets, w13, w2, "silu"), torch.float32)


@pytest.mark.parametrize("device,gemm", DEVICE_GEMMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_expert_ffn_odd_sizes_and_offset_views(monkeypatch, device, gemm, dtype):
    # Rows of 20 and 6 elements and views at an odd offset: matrix pointers that are not
    # 16-byte aligned (the grouped path hands such calls to the per-expert GEMMs).
    use_gemm(monkeypatch, gemm)
    hidden, ffn, experts, rows = 20, 3, 5, 61
    x = torch.randn(rows + 1, hidden, device=device).to(dtype)[1:]
    w13, w2 = make_experts(experts + 1, hidden, ffn, dtype, device)
    w13, w2 = w13[1:], w2[1:]  # contiguous views that start one expert in
    offsets = random_offsets(rows, experts, device)
    out = ops.expert_ffn(x, offsets, w13, w2, "gelu")
    assert_close_relative(out, reference.expert_ffn(x, offsets, w13, w2, "gelu"), dtype)


@CUDA_SKIP
@pytest.mark.parametrize("gemm", EXPERT_GEMMS)
def test_expert_ffn_replays_in_a_cuda_graph(monkeypatch, gemm):
    # Host offsets: no device-to-host read, so the op can be captured (the fixed-capacity
    # layer does this). Grouped, the pinned pointer table read by the captured copy must
    # stay intact for every replay.
    use_gemm(monkeypatch, gemm)
    hidden, ffn, experts, rows = 64, 32, 8, 300
    x = torch.randn(rows, hidden, device="cuda")
    w13, w2 = make_experts(experts, hidden, ffn, torch.float32, "cuda")
    offsets = random_offsets(rows, experts, "cpu")
    ops.expert_ffn(x, offsets, w13, w2)  # warm-up outside the graph (cuBLAS handle)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.expert_ffn(x, offsets, w13, w2)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        for n in (6, 12, 24, 48):  # pinned blocks of the table sizes, filled with garbage
            torch.full((n,), -1, dtype=torch.int64, pin_memory=True)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_relative(out, reference.expert_ffn(x, offsets, w13, w2, "silu"), torch.float32)


@CUDA_SKIP
@pytest.mark.parametrize("value", ["batched", "PER_EXPERT"])
def test_expert_ffn_cuda_rejects_unknown_expert_gemm(monkeypatch, value):
    # Only the CUDA op reads the variable (the CPU op has a single implementation), so this
    # needs a GPU. "cuda" in the name: scripts/gpu_check.sh selects tests with -k cuda.
    monkeypatch.setenv("MOE_EP_EXPERT_GEMM", value)
    x = torch.randn(10, 16, device="cuda")
    w13, w2 = make_experts(4, 16, 8, torch.float32, "cuda")
    offsets = torch.tensor([0, 2, 5, 5, 10])
    with pytest.raises(RuntimeError, match="MOE_EP_EXPERT_GEMM"):
        ops.expert_ffn(x, offsets, w13, w2)
    with pytest.raises(RuntimeError, match="MOE_EP_EXPERT_GEMM"):
        ops.expert_ffn(x[:0], torch.zeros(5, dtype=torch.int64), w13, w2)  # T = 0 too


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


@pytest.mark.parametrize("device,gemm", DEVICE_GEMMS)
def test_expert_ffn_opcheck(monkeypatch, device, gemm):
    use_gemm(monkeypatch, gemm)
    x = torch.randn(30, 16, device=device)
    w13, w2 = make_experts(4, 16, 8, torch.float32, device)
    offsets = torch.tensor([0, 10, 10, 25, 30], device=device)
    torch.library.opcheck(torch.ops.moe_ep.expert_ffn.default, (x, offsets, w13, w2, "gelu"))
