"""Sparse Jacobians whose dense form cannot fit the memory budget (`output="sparse"`), first calls in fresh processes.

Every row runs in its own fresh subprocess (MALLOC_MMAP_THRESHOLD_=131072, so RSS follows what is live): the first
call of `autojac.jacobian(f, x, output="sparse", memory_budget=B)` (or `autojac.hessian`) with its wall time and
its peak RSS over the RSS before it (through autojac's own meter, so its VmHWM resets cannot hide the peak), then
the median of 5 warm calls. No torch peer can run these: each needs the dense Jacobian, whose size is reported.
Correctness without a dense reference: for random w and v, w^T J from the sparse result against one
`torch.autograd.grad` VJP, and J v against one `torch.func.jvp` (float64, relative error).

    python benchmarks/sparse_beyond_budget.py [--quick] [--device cuda] [--out DIR]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import autojac  # noqa: E402


def heat(n: int, device):
    """Allen-Cahn-type residual on an n x n grid: a 5-point Laplacian through conv2d (zero boundary), a cubic term."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64,
                          device=device).reshape(1, 1, 3, 3)

    def f(u):
        return F.conv2d(u[None, None], kernel, padding=1)[0, 0] + u - u ** 3

    g = torch.Generator().manual_seed(n)
    return f, torch.rand(n, n, generator=g, dtype=torch.float64).to(device)


def stencil(n: int, device):
    """A periodic 1-D reaction-diffusion residual through torch.roll: tridiagonal."""
    def f(u):
        return u.roll(1) - 2 * u + u.roll(-1) + u - u ** 3

    g = torch.Generator().manual_seed(n)
    return f, torch.rand(n, generator=g, dtype=torch.float64).to(device)


def rosenbrock(n: int, device):
    """The chained Rosenbrock function, a scalar: its Hessian is tridiagonal."""
    def f(x):
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    g = torch.Generator().manual_seed(n)
    return f, torch.randn(n, generator=g, dtype=torch.float64).to(device)


def per_sample_mlp(batch: int, device):
    """An MLP 16 -> 64 -> 4 (tanh) on a batch: block diagonal, 64 nonzeros a sample."""
    g = torch.Generator().manual_seed(batch)
    w1 = torch.randn(16, 64, generator=g, dtype=torch.float64).to(device)
    w2 = torch.randn(64, 4, generator=g, dtype=torch.float64).to(device)

    def f(X):
        return torch.tanh(X @ w1) @ w2

    return f, torch.randn(batch, 16, generator=g, dtype=torch.float64).to(device)


# (name, builder, size, quick size, budget, quick budget, kind): budgets far below the dense Jacobian.
CASES = [
    ("heat 200 x 200", heat, 200, 40, "64MiB", "16MiB", "jacobian"),
    ("heat 450 x 450", heat, 450, 60, "256MiB", "24MiB", "jacobian"),
    ("heat 450 x 450, budget below its pattern", heat, 450, 200, "64MiB", "24MiB", "jacobian"),
    ("1-D stencil, 10^6", stencil, 1_000_000, 20_000, "640MiB", "24MiB", "jacobian"),
    ("Rosenbrock Hessian, 10^5", rosenbrock, 100_000, 5_000, "128MiB", "16MiB", "hessian"),
    ("per-sample MLP, 2 x 10^4 samples", per_sample_mlp, 20_000, 500, "512MiB", "16MiB", "jacobian"),
    ("per-sample MLP, 10^5 samples, budget below its pattern", per_sample_mlp, 100_000, 20_000, "256MiB", "48MiB",
     "jacobian"),
]


def _call(kind: str, f, x, budget: str):
    if kind == "hessian":
        return autojac.hessian(f, x, output="sparse", memory_budget=budget)
    return autojac.jacobian(f, x, output="sparse", memory_budget=budget)


def _check(kind: str, f, x, J) -> float:
    """Largest relative error of w^T J and J v against torch's own VJP and JVP (random w, v)."""
    g = torch.Generator().manual_seed(0)
    J = J.coalesce()
    k = J.dim() - x.dim()  # the output's dimensions come first
    rows = torch.zeros(J._nnz(), dtype=torch.int64, device=J.device)
    cols = torch.zeros_like(rows)
    for d in range(J.dim()):  # flat (row-major) output and input positions of every nonzero
        if d < k:
            rows = rows * J.shape[d] + J.indices()[d]
        else:
            cols = cols * J.shape[d] + J.indices()[d]
    J2 = torch.sparse_coo_tensor(torch.stack([rows, cols]), J.values(), (J.shape[:k].numel(), x.numel()))
    if kind == "hessian":
        grad = lambda z: torch.autograd.grad(f(z), z, create_graph=True)[0]  # noqa: E731
        fun = lambda z: torch.func.grad(f)(z)  # noqa: E731
    else:
        grad = None
        fun = f
    xr = x.detach().requires_grad_()
    y = grad(xr) if grad is not None else f(xr)
    w = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)
    v = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    (wJ,) = torch.autograd.grad(y, xr, w)
    _, Jv = torch.func.jvp(fun, (x,), (v,))
    got_wJ = torch.sparse.mm(J2.t(), w.reshape(-1, 1)).reshape(-1)
    got_Jv = torch.sparse.mm(J2, v.reshape(-1, 1)).reshape(-1)
    err = lambda a, b: float((a - b.reshape(-1)).abs().max() / b.abs().max().clamp_min(1e-300))  # noqa: E731
    return max(err(got_wJ, wJ), err(got_Jv, Jv))


def child(spec: dict) -> dict:
    """One row, in this fresh process."""
    device = torch.device(spec["device"])
    name, build, size, quick_size, budget, quick_budget, kind = next(c for c in CASES if c[0] == spec["name"])
    n, budget = (quick_size, quick_budget) if spec["quick"] else (size, budget)
    f, x = build(n, device)
    with torch.no_grad():
        y = f(x)
    n_out = x.numel() if kind == "hessian" else y.numel()
    row = {"name": name, "kind": kind, "n_in": x.numel(), "n_out": n_out, "budget": budget,
           "dense_bytes": n_out * x.numel() * x.element_size()}
    meter = C.PeakMeter(device)
    try:
        with meter.region() as region:
            started = time.perf_counter()
            J = _call(kind, f, x, budget)
            C.sync(device)
            row["first_seconds"] = time.perf_counter() - started
        row["first_peak_bytes"] = region.peak_bytes
        report = autojac.last_report()
        row.update(method=report.method, verified=report.verified, evaluations=report.evaluations)
        layout = autojac.plan(f, x, kind=kind, output="sparse", memory_budget=budget).problem.layout
        row.update(nnz=layout.pattern.nnz, colours=min(layout.row_passes, layout.col_passes))
        row["relative_error"] = _check(kind, f, x, J)
        del J
        warm = []
        for _ in range(5):
            t, J = C.timed(lambda: _call(kind, f, x, budget), device)
            warm.append(t)
            del J
        row["warm_seconds"] = statistics.median(warm)
    except autojac.MemoryBudgetError as exc:
        C.sync(device)
        row["refused_seconds"] = time.perf_counter() - started
        row["refused_peak_bytes"] = region.peak_bytes
        row["refused"] = C.error_text(exc)
    return row


def run_in_child(spec: dict, script: str) -> dict:
    import os
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, script, C.CHILD_FLAG, json.dumps(spec)], capture_output=True, text=True,
                         env=env, timeout=1800)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": spec["name"], "error": f"subprocess failed (rc {out.returncode}): {tail[:200]}"}
    return json.loads(lines[-1])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Sparse Jacobians beyond the dense budget",
        "",
        f"Machine: {meta['machine']}. Device: `{meta['device']}`. Date: {meta['date']}. Wall time: "
        f"{meta['wall_seconds']:.0f} s. {meta['threads']} torch threads.",
        "",
        "`output=\"sparse\"` under a `memory_budget` far below the dense Jacobian: the pattern is found first and "
        "the budget held against the sparse result (NOTE: [Structure first when only a sparse result fits]). "
        "Each row is a fresh subprocess (MALLOC_MMAP_THRESHOLD_=131072); peak = peak RSS over the RSS before the "
        "first call (CUDA: the allocator's peak). No torch peer can run these: each needs the dense Jacobian. "
        "Error: the larger relative error of w^T J and J v against torch's own VJP and JVP (random w, v).",
        "",
        "| problem | Jacobian | dense would take | budget | nonzeros | colours | first call | its peak | within budget "
        "| warm (median of 5) | method | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | | | {r['error']} | | | | | |")
            continue
        shape = f"{r['n_out']} x {r['n_in']}"
        budget_bytes = autojac._core.units.parse_budget(r["budget"], free_bytes=2**62)
        if "refused" in r:
            peak = r.get("refused_peak_bytes")
            lines.append(f"| {r['name']} | {shape} | {C.mib(r['dense_bytes'])} | {r['budget']} | – | – | refused in "
                         f"{C.ms(r['refused_seconds'])}: {r['refused']} | {C.mib(peak)} | "
                         f"{C.verdict(peak is not None and peak <= budget_bytes)} | – | – | – |")
            continue
        peak = r.get("first_peak_bytes")
        lines.append(f"| {r['name']} | {shape} | {C.mib(r['dense_bytes'])} | {r['budget']} | {r.get('nnz')} | "
                     f"{r.get('colours', '–')} | {C.ms(r['first_seconds'])} | {C.mib(peak)} | "
                     f"{C.verdict(peak is not None and peak <= budget_bytes)} | {C.ms(r['warm_seconds'])} | "
                     f"{r['method']} | {r['relative_error']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if C.CHILD_FLAG in sys.argv:
        spec = json.loads(sys.argv[sys.argv.index(C.CHILD_FLAG) + 1])
        print(json.dumps(child(spec), default=str))
        return
    args = C.parse(__doc__.splitlines()[0])
    started = time.perf_counter()
    wanted = [s for s in args.only.split(",") if s]
    rows = []
    for case in CASES:
        if wanted and not any(w in case[0] for w in wanted):
            continue
        print(f"[{time.perf_counter() - started:5.0f} s] {case[0]} ...", flush=True)
        row = run_in_child({"name": case[0], "device": str(args.device), "quick": args.quick}, __file__)
        print(f"        {row}", flush=True)
        rows.append(row)
    meta = {"machine": C.machine_text(args.device), "device": str(args.device), "quick": args.quick,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "wall_seconds": time.perf_counter() - started}
    text = markdown(rows, meta)
    C.write(Path(args.out), C.stem_for(args.device, "sparse-beyond-budget", args.quick), {"meta": meta, "rows": rows},
            text, None)
    print(text)


if __name__ == "__main__":
    main()
