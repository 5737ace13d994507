"""Single-rank benchmark of the moe_ep ops and the whole local MoE layer.

Times route, permute, expert_ffn, unpermute and moe_ep.MoELayer side by side with plain
PyTorch, and reports each op's TFLOP/s or GB/s as a fraction of the dense-matmul rate and the
copy bandwidth measured in the same run.

expert_ffn gets one row per implementation ("impl"), each against the same torch loop: on
CUDA every MOE_EP_EXPERT_GEMM variant (per_expert, cublas_grouped, grouped_mm), on the CPU the
CPU op ("cpu"), and on both plain torch.nn.functional.grouped_mm ("F.grouped_mm", where it
runs). Our variants take the offsets where permute left them (on the GPU for CUDA) with
check_offsets=False, as moe_ep's own callers do. "reads" is moe_ep's host reads in one call
(moe_ep.debug); "buf2x" is the best time of the same call on a fixed-size buffer with twice
the rows (the second half unused) over the best time on the exact rows: 1 when only the rows
the offsets cover cost time, 2 when the whole buffer is computed; "rows c/n" is the rows our
GEMMs ran over on that buffer (the profiler's aten::mm shapes, CPU only) per row needed. The
other ops and the layer run with MOE_EP_EXPERT_GEMM as set in the environment.

    python benchmarks/bench_local.py                       # the defaults of the device
    python benchmarks/bench_local.py --device cuda --experts 256 --topk 8 --json out.json

Defaults: on CUDA the seeds' dimensions (H 7168, F 2048, E 64 and 256, k 2 and 8, T 16 to
16384, bf16); on CPU a scaled-down set that finishes in a few minutes on two cores.
The expert_ffn "local" rows time the expert-parallel case (a few experts per rank, many
tokens per expert), which the per-layer sweep never reaches: at T = 16384, k = 8, E = 256
an expert gets 512 tokens on average, while the issue's target is >= 4096 per expert.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

# Run from a checkout: benchmark the moe_ep of the checkout this script lives in.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import common  # noqa: E402

import moe_ep  # noqa: E402
from moe_ep import ops, reference  # noqa: E402
from moe_ep.debug import counting_host_reads  # noqa: E402

COLUMNS = [
    "op",
    "E",
    "k",
    "T",
    "rows/exp",
    "ms ours",
    "ms ref",
    "ref",
    "speedup",
    "TFLOP/s",
    "%mm",
    "GB/s",
    "%copy",
    "err",
    "impl",
    "reads",
    "buf2x",
    "rows c/n",
]
WIDTHS = [10, 4, 2, 6, 8, 8, 8, 19, 7, 7, 5, 6, 5, 8, 14, 5, 5, 8]
EXPERT_GEMM = "MOE_EP_EXPERT_GEMM"  # read by the CUDA op on every call
CUDA_VARIANTS = ["per_expert", "cublas_grouped", "grouped_mm"]  # auto picks one of these


# --------------------------------------------------------------------------------------
# Work per op, from first principles. Elements are counted in the hidden dtype (`elt`
# bytes); ids and weights are int32 / float32 (4 bytes). Bytes are the minimum traffic
# the op must move (each input read once, each output written once); FLOPs count a
# multiply-add as 2.
# --------------------------------------------------------------------------------------
def work(
    op: str, T: int, H: int, F_: int, E: int, k: int, elt: int, active: int | None = None
) -> tuple[float, float]:
    """(FLOPs, bytes) of one call of `op` on T tokens; `active` experts (default E) get at
    least one row, and only their weights need to be read.

    route:      read the T x E float32 logits, write T x k ids and weights.
    permute:    read T x H hidden and the T x k ids, write T*k x H rows, T x k row_of
                and E+1 int64 offsets.
    expert_ffn: N = T*k rows; a gated FFN is 3 GEMM-sized matrices per expert:
                2*N*(2F*H) for gate/up plus 2*N*(H*F) for down. Bytes: the weights of
                the experts that get a row (active * 3*H*F elements; decode is bound by
                this) plus N x H in and N x H out.
    unpermute:  read T*k x H rows and T x k row_of + weights, write T x H.
    layer:      the router GEMM (2*T*H*E, float32 logits) plus expert_ffn; bytes: the
                expert weights and the router weight, plus T x H in and out.
    """
    N = T * k
    ffn_flops = 2.0 * N * (2 * F_ * H + H * F_)
    weight_bytes = (E if active is None else active) * 3 * H * F_ * elt
    if op == "route":
        return 0.0, T * E * 4 + T * k * 8
    if op == "permute":
        return 0.0, T * H * elt + N * H * elt + N * 4 + N * 4 + (E + 1) * 8
    if op == "unpermute":
        return 0.0, N * H * elt + N * 8 + T * H * elt
    if op == "expert_ffn":
        return ffn_flops, weight_bytes + 2 * N * H * elt
    if op == "layer":
        return ffn_flops + 2.0 * T * H * E, weight_bytes + E * H * 4 + 2 * T * H * elt
    raise ValueError(op)


# ----------------------------------------------------------------------------------------
# Plain PyTorch references (what a user writes without moe_ep).
# ----------------------------------------------------------------------------------------
def route_torch(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = logits.softmax(dim=-1).topk(k, dim=-1)
    return ids, weights / weights.sum(dim=-1, keepdim=True)


def permute_torch(hidden: torch.Tensor, ids: torch.Tensor, E: int):
    k = ids.shape[1]
    flat = ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    permuted = hidden.index_select(0, order // k)
    offsets = torch.zeros(E + 1, dtype=torch.long, device=hidden.device)
    offsets[1:] = torch.bincount(flat, minlength=E).cumsum(0)
    row_of = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device)
    )
    return permuted, offsets, row_of.view(ids.shape)


def unpermute_torch(y: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (y[row_of.long()] * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)


def expert_ffn_loop(x, offsets, w13, w2):
    out = torch.empty_like(x)
    bounds = offsets.tolist()
    for e in range(w13.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            gate, up = (x[lo:hi] @ w13[e].T).chunk(2, dim=-1)
            out[lo:hi] = (F.silu(gate) * up) @ w2[e].T
    return out


def expert_ffn_grouped_mm(x, offs32, w13_t, w2_t):
    """Gated FFN with two torch.nn.functional.grouped_mm calls; w13_t [E, H, 2F], w2_t [E, F, H]."""
    gate, up = F.grouped_mm(x, w13_t, offs=offs32).chunk(2, dim=-1)
    return F.grouped_mm(F.silu(gate) * up, w2_t, offs=offs32)


def gemm_rows(fn) -> int:
    """Rows that the aten::mm calls of fn() multiply, summed (from the profiler's shapes)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        fn()
    return sum(e.input_shapes[0][0] for e in prof.events() if e.name == "aten::mm")


@contextlib.contextmanager
def expert_gemm(value: str | None):
    """Runs the body with MOE_EP_EXPERT_GEMM=value (None: unchanged), then restores it."""
    if value is None:
        yield
        return
    old = os.environ.get(EXPERT_GEMM)
    os.environ[EXPERT_GEMM] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(EXPERT_GEMM, None)
        else:
            os.environ[EXPERT_GEMM] = old


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, device, dtype, mm_tflops, copy_gbps):
        self.args, self.device, self.dtype = args, device, dtype
        self.mm_tflops, self.copy_gbps = mm_tflops, copy_gbps
        self.elt = torch.empty(0, dtype=dtype).element_size()
        self.rows: list[dict] = []
        self.active: int | None = None  # experts with at least one row in this config
        self.notes: list[str] = []

    def time(self, fn, best: bool = False) -> float:
        a = self.args
        return common.time_ms(
            fn, self.device, warmup=a.warmup, iters=a.iters, budget_s=a.budget, best=best
        )

    def add(
        self,
        op,
        H,
        F_,
        E,
        k,
        T,
        ms,
        ref_ms,
        ref_name,
        err,
        rows_per_expert=None,
        work_op=None,
        extra=None,
    ):
        flops, nbytes = work(work_op or op, T, H, F_, E, k, self.elt, self.active)
        row = {
            "op": op,
            "H": H,
            "F": F_,
            "E": E,
            "k": k,
            "T": T,
            "rows/exp": rows_per_expert if rows_per_expert is not None else T * k / E,
            "ms ours": ms,
            "ms ref": ref_ms,
            "ref": ref_name,
            "speedup": ref_ms / ms if ref_ms else None,
            "TFLOP/s": flops / (ms * 1e-3) / 1e12 if flops else None,
            "GB/s": nbytes / (ms * 1e-3) / 1e9,
            "flops": flops,
            "bytes": nbytes,
            "err": err,
            **(extra or {}),
        }
        row["%mm"] = 100 * row["TFLOP/s"] / self.mm_tflops if flops else None
        row["%copy"] = 100 * row["GB/s"] / self.copy_gbps
        self.rows.append(row)
        print(common.format_table([row], COLUMNS, WIDTHS).splitlines()[-1], flush=True)

    def rescale(self, mm_tflops: float, copy_gbps: float) -> None:
        """Recompute the %mm and %copy columns against new limits."""
        self.mm_tflops, self.copy_gbps = mm_tflops, copy_gbps
        for row in self.rows:
            row["%mm"] = 100 * row["TFLOP/s"] / mm_tflops if row["flops"] else None
            row["%copy"] = 100 * row["GB/s"] / copy_gbps

    def layer_config(self, H, F_, E, k, T):
        dev, dt, want = self.device, self.dtype, set(self.args.ops)
        torch.manual_seed(0)
        layer = moe_ep.MoELayer(H, F_, E, k, dtype=dt, device=dev)
        x = torch.randn(T, H, device=dev).to(dt)
        logits = layer.router_logits(x)
        ids, weights = ops.route(logits, k)

        if "route" in want:
            ms = self.time(lambda: ops.route(logits, k))
            ref_ms = self.time(lambda: route_torch(logits, k))
            ref_ids, ref_w = route_torch(logits, k)
            err = rel_err(weights, ref_w) if torch.equal(ids.long(), ref_ids) else float("nan")
            self.add("route", H, F_, E, k, T, ms, ref_ms, "torch softmax/topk", err)

        permuted, offsets, row_of = ops.permute(x, ids, E)
        self.active = int((offsets.diff() > 0).sum())
        if "permute" in want:
            ms = self.time(lambda: ops.permute(x, ids, E))
            ref_ms = self.time(lambda: permute_torch(x, ids, E))
            p, o, r = permute_torch(x, ids, E)
            same = (
                torch.equal(p, permuted)
                and torch.equal(o, offsets)
                and torch.equal(r.int(), row_of)
            )
            self.add(
                "permute",
                H,
                F_,
                E,
                k,
                T,
                ms,
                ref_ms,
                "torch argsort+index",
                0.0 if same else float("nan"),
            )

        y = ops.expert_ffn(permuted, offsets, layer.w13, layer.w2)
        if "expert_ffn" in want:
            self.expert_ffn_rows(H, F_, E, k, T, permuted, offsets, layer.w13, layer.w2)

        if "unpermute" in want:
            ms = self.time(lambda: ops.unpermute(y, row_of, weights))
            ref_ms = self.time(lambda: unpermute_torch(y, row_of, weights))
            err = rel_err(ops.unpermute(y, row_of, weights), unpermute_torch(y, row_of, weights))
            self.add("unpermute", H, F_, E, k, T, ms, ref_ms, "torch gather*w+sum", err)

        if "layer" in want:
            with torch.no_grad():
                ms = self.time(lambda: layer(x))
                args = (x, layer.gate_weight, layer.w13, layer.w2, k)
                ref_ms = self.time(lambda: reference.moe_layer_torch(*args))
                err = rel_err(layer(x), reference.moe_layer_torch(*args))
                with counting_host_reads() as reads:
                    layer(x)
            self.add(
                "layer",
                H,
                F_,
                E,
                k,
                T,
                ms,
                ref_ms,
                "moe_layer_torch",
                err,
                extra={"reads": reads.count},
            )

    def expert_ffn_rows(
        self, H, F_, E, k, T, x, offsets, w13, w2, label="expert_ffn", rows_per_expert=None
    ):
        """One row per implementation of the expert FFN, each against the same torch loop."""
        cuda = self.device.type == "cuda"
        loop_ms = self.time(lambda: expert_ffn_loop(x, offsets, w13, w2))
        loop = expert_ffn_loop(x, offsets, w13, w2)
        needed = int(offsets[-1])
        buffer = torch.cat([x, torch.zeros_like(x)])  # fixed size, second half unused

        def row(impl, ms, err, extra=None):
            self.add(
                label,
                H,
                F_,
                E,
                k,
                T,
                ms,
                loop_ms,
                "torch loop",
                err,
                rows_per_expert,
                "expert_ffn",
                {"impl": impl, **(extra or {})},
            )

        for impl in CUDA_VARIANTS if cuda else ["cpu"]:
            with expert_gemm(impl if cuda else None):

                def call(rows):
                    return ops.expert_ffn(rows, offsets, w13, w2, check_offsets=False)

                y = call(x)
                with counting_host_reads() as reads:
                    call(x)
                ms = self.time(lambda: call(x))
                # Best of the samples on both sides: waiting for a shared core only adds time.
                buf2x = self.time(lambda: call(buffer), best=True) / self.time(
                    lambda: call(x), best=True
                )
                extra = {"reads": reads.count, "buf2x": buf2x}
                if not cuda:  # two GEMMs per expert, one gate/up and one down
                    extra["rows c/n"] = gemm_rows(lambda: call(buffer)) / 2 / needed
            row(impl, ms, rel_err(y, loop), extra)

        if not hasattr(F, "grouped_mm"):
            reason = f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
        else:
            try:
                offs32 = offsets[1:].to(device=self.device, dtype=torch.int32)
                w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)
                gm_ms = self.time(lambda: expert_ffn_grouped_mm(x, offs32, w13_t, w2_t))
                row(
                    "F.grouped_mm",
                    gm_ms,
                    rel_err(expert_ffn_grouped_mm(x, offs32, w13_t, w2_t), loop),
                )
                return
            except Exception as exc:  # noqa: BLE001  (report any failure, keep benchmarking)
                reason = f"F.grouped_mm failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        if reason not in self.notes:
            self.notes.append(reason)
            print(f"# skipped torch.nn.functional.grouped_mm: {reason}", flush=True)

    def local_expert_config(self, H, F_, E_local, rows_per_expert):
        """The expert-parallel case: E_local experts, `rows_per_expert` rows each."""
        dev, dt = self.device, self.dtype
        torch.manual_seed(0)
        N = E_local * rows_per_expert
        x = torch.randn(N, H, device=dev).to(dt)
        w13 = (torch.randn(E_local, 2 * F_, H, device=dev) / H**0.5).to(dt)
        w2 = (torch.randn(E_local, H, F_, device=dev) / F_**0.5).to(dt)
        offsets = torch.arange(E_local + 1, dtype=torch.long, device=dev) * rows_per_expert
        self.active = E_local
        # Rows are the tokens here (k = 1): T = N.
        self.expert_ffn_rows(
            H, F_, E_local, 1, N, x, offsets, w13, w2, "ffn_local", rows_per_expert
        )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default=None, help="default: bf16")
    p.add_argument("--hidden", type=int, nargs="+")
    p.add_argument("--ffn", type=int, nargs="+")
    p.add_argument("--experts", type=int, nargs="+")
    p.add_argument("--topk", type=int, nargs="+")
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--local-experts", type=int, nargs="*", help="ffn_local rows: experts per rank")
    p.add_argument(
        "--rows-per-expert", type=int, nargs="*", help="ffn_local rows: tokens per expert"
    )
    p.add_argument(
        "--ops", nargs="+", default=["route", "permute", "expert_ffn", "unpermute", "layer"]
    )
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="max seconds of samples per timing")
    p.add_argument("--mm-size", type=int, default=None, help="n of the n^3 matmul ceiling")
    p.add_argument("--copy-mib", type=int, default=None, help="MiB of the copy ceiling")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default 1 on cpu: on a shared 2-core machine every OpenMP region "
        "with 2 threads waited ~8 ms for a descheduled worker)",
    )
    p.add_argument("--json", default=None, help="also write the rows to this path")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    defaults = {
        # The seeds' dimensions on a GPU; a scaled-down set for a CPU run of a few minutes.
        "dtype": "bf16",
        "hidden": [7168] if cuda else [1024],
        "ffn": [2048] if cuda else [256],
        "experts": [64, 256],
        "topk": [2, 8],
        "tokens": [16, 64, 256, 1024, 4096, 16384] if cuda else [16, 128, 512, 2048],
        "local_experts": [1, 4] if cuda else [1, 4],
        "rows_per_expert": [128, 512, 1024, 4096, 8192] if cuda else [128, 1024, 4096],
        "warmup": 5 if cuda else 2,
        "iters": 30 if cuda else 10,
        "budget": 2.0 if cuda else 1.0,
        "mm_size": 8192 if cuda else 2048,
        "copy_mib": 1024 if cuda else 256,
        "threads": None if cuda else 1,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = common.DTYPES[args.dtype]
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.environment(device)
    if device.type == "cuda":  # the CPU op has a single implementation
        env["expert_gemm"] = os.environ.get(EXPERT_GEMM) or "auto (unset)"
    mm = common.measured_matmul_tflops(device, dtype, args.mm_size)
    copy = common.measured_copy_gbps(device, args.copy_mib << 20)
    print(f"# {env['device']} | torch {env['torch']} | {args.dtype} | {env['date']}")
    print(f"# measured dense matmul {args.mm_size}^3 {args.dtype}: {mm:.3f} TFLOP/s")
    print(f"# measured copy ({args.copy_mib} MiB, read+write): {copy:.1f} GB/s")
    print("# speedup = ms ref / ms ours; %mm, %copy: of the measured limits above; err: relative")
    print("# L2 error of ours vs the reference (0 = identical, nan = different routing/layout)")
    print(
        "# expert_ffn: one row per impl, ms ours = that impl, ms ref = the torch loop; reads ="
        " moe_ep host reads per call; buf2x = best ms on a half-used buffer of twice the rows"
        " / best ms; rows c/n = GEMM rows on that buffer per row needed (CPU)"
    )
    if device.type == "cuda":
        print(f"# the other ops and the layer run with {EXPERT_GEMM}={env['expert_gemm']}")
    bench = Bench(args, device, dtype, mm, copy)
    print(common.format_table([], COLUMNS, WIDTHS), flush=True)
    for H in args.hidden:
        for F_ in args.ffn:
            for E in args.experts:
                for k in args.topk:
                    for T in args.tokens:
                        bench.layer_config(H, F_, E, k, T)
            if "expert_ffn" in args.ops:
                for E_local in args.local_experts:
                    for rpe in args.rows_per_expert:
                        bench.local_expert_config(H, F_, E_local, rpe)

    # The limits again after the sweep: on a shared machine the first measurement may have
    # been slowed by other work. The final table and the summary use the better of the two.
    mm_end = common.measured_matmul_tflops(device, dtype, args.mm_size)
    copy_end = common.measured_copy_gbps(device, args.copy_mib << 20)
    print(
        f"\n# limits re-measured after the sweep: matmul {mm_end:.3f} TFLOP/s, "
        f"copy {copy_end:.1f} GB/s"
    )
    bench.rescale(max(mm, mm_end), max(copy, copy_end))
    print(
        f"# final table against matmul {bench.mm_tflops:.3f} TFLOP/s, "
        f"copy {bench.copy_gbps:.1f} GB/s (the better of the two measurements)"
    )
    print(common.format_table(bench.rows, COLUMNS))
    summary = summarize(bench.rows)
    print()
    print("\n".join(summary))
    if args.json:
        common.write_json(
            args.json,
            {
                "env": env,
                "args": vars(args),
                "limits": {
                    "matmul_tflops": bench.mm_tflops,
                    "copy_gbps": bench.copy_gbps,
                    "matmul_tflops_start_end": [mm, mm_end],
                    "copy_gbps_start_end": [copy, copy_end],
                },
                # What `python -m moe_ep.perf --calibrate FILE` reads: the measured rates.
                "rates": {
                    "matmul_flops_per_s": bench.mm_tflops * 1e12,
                    "memory_bytes_per_s": bench.copy_gbps * 1e9,
                },
                "notes": bench.notes,
                "summary": summary,
                "rows": bench.rows,
            },
        )


def summarize(rows: list[dict]) -> list[str]:
    """One line per op (per implementation for the expert FFN): the range of speedups and the
    best fraction of the limit, plus the issue's targets (>= 75% of matmul for expert_ffn at
    >= 4096 rows per expert, >= 80% of copy for permute/unpermute, >= 2x over
    moe_layer_torch for the layer)."""
    lines = []
    for op in ["route", "permute", "expert_ffn", "ffn_local", "unpermute", "layer"]:
        for impl, ref in sorted({(r.get("impl", ""), r["ref"]) for r in rows if r["op"] == op}):
            sel = [r for r in rows if r["op"] == op and r.get("impl", "") == impl]
            sp = [r["speedup"] for r in sel]
            limit = f"best %copy {max(r['%copy'] for r in sel):.0f}"
            if sel[0]["flops"]:
                limit = f"best %mm {max(r['%mm'] for r in sel):.0f}, " + limit
            lines.append(
                f"{op:>10} {impl:<14} vs {ref:<20} speedup {min(sp):.2f}x .. {max(sp):.2f}x "
                f"(median {sorted(sp)[len(sp) // 2]:.2f}x); {limit}"
            )
            if "reads" in sel[0] and "buf2x" not in sel[0]:
                lines.append(f"{'':>10} host reads per layer {max(r['reads'] for r in sel)}")
            elif "reads" in sel[0]:
                buf = sorted(r["buf2x"] for r in sel)
                cn = [r["rows c/n"] for r in sel if r.get("rows c/n") is not None]
                lines.append(
                    f"{'':>10} {impl:<14} host reads per call {max(r['reads'] for r in sel)}; "
                    f"buf2x {buf[0]:.2f} .. {buf[-1]:.2f}"
                    + (f"; rows computed / needed {min(cn):.2f} .. {max(cn):.2f}" if cn else "")
                )
    for impl in sorted({r.get("impl", "") for r in rows if r["op"] in ("expert_ffn", "ffn_local")}):
        big = [
            r
            for r in rows
            if r["op"] in ("expert_ffn", "ffn_local")
            and r.get("impl", "") == impl
            and r["rows/exp"] >= 4096
        ]
        if big:
            lines.append(
                f"target expert_ffn >= 75% of matmul at >= 4096 rows/expert, {impl}: "
                f"{min(r['%mm'] for r in big):.0f}% .. {max(r['%mm'] for r in big):.0f}%"
            )
    for op in ("permute", "unpermute"):
        sel = [r for r in rows if r["op"] == op]
        if sel:
            lines.append(
                f"target {op} >= 80% of copy bandwidth: best {max(r['%copy'] for r in sel):.0f}% "
                f"(at T={max(sel, key=lambda r: r['%copy'])['T']})"
            )
    sel = [r for r in rows if r["op"] == "layer"]
    if sel:
        lines.append(
            f"target layer >= 2x moe_layer_torch: {min(r['speedup'] for r in sel):.2f}x .. "
            f"{max(r['speedup'] for r in sel):.2f}x"
        )
    return lines


if __name__ == "__main__":
    main()
