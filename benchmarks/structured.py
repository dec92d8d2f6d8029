"""Sparse Jacobians: autojac's structure detection, colouring and compressed evaluation against the dense torch
ways, on problems whose Jacobians have few nonzeros per row (and two controls).

    python benchmarks/structured.py [--device cuda] [--quick] [--only brusselator,heat] [--memory rss|tracker|off]

Writes benchmarks/results/<machine>-structured.md, .json and .png (with --quick: <machine>-structured-quick.*).
The full run takes about 30 minutes on 2 quiet CPU cores (the dense 10^4 x 10^4 Jacobians of the element-wise
map dominate); --quick about 2 minutes. See benchmarks/README.md ("Sparse Jacobians").
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import autojac
from autojac._structure import color_columns, color_rows

if __package__:
    from . import _common as C
else:  # run as a script: its folder is on sys.path
    import _common as C

EXPECTED = {"quick": "about 2 minutes on 2 CPU cores", "full": "about 30 minutes on 2 quiet CPU cores"}
LOOP_LIMIT = 10.0  # seconds: the plain torch loop is skipped when its estimate is longer
WARM_SPEEDUP, FIRST_SPEEDUP = 20.0, 5.0  # acceptance 1
QUALIFY_N, QUALIFY_ROW_NNZ = 2000, 15
DENSE_FIRST_SLACK, DENSE_WARM_SLACK = 1.10, 1.03  # acceptance 3 ("no slower": within the planner's own 3%)

ANCHORS = [
    ("JAX sparsejac", "diagonal Jacobian, n = 10,000", "93 us (sparse) against 182 ms (dense jacfwd/jacrev)"),
    ("asdex", "heat equation, N = 200", "detection 0.94 ms, colouring 37 us"),
    ("SparseConnectivityTracer.jl", "Brusselator, N = 24", "detection 0.54 ms"),
]


# --- problems -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    name: str
    kind: str  # stencil, banded, diagonal, dense row, permutation, block diagonal, dense
    what: str
    build: Callable[[bool, torch.dtype, torch.device], tuple[Callable, torch.Tensor]]
    qualifies: bool  # at full size: n >= 2000 and at most ~15 nonzeros per row (acceptance 1)


def _seeded(fn):
    def build(quick, dtype, device):
        g = torch.Generator().manual_seed(0)
        return fn(quick, dtype, device, g)
    return build


def _laplacian_roll(z):
    return z.roll(1, 0) + z.roll(-1, 0) + z.roll(1, 1) + z.roll(-1, 1) - 4 * z


def brusselator_at(n: int, dtype, device, g):
    """The 2-D Brusselator reaction-diffusion right-hand side on a periodic n x n grid, 2 n^2 unknowns."""
    a_const, b_const, alpha = 1.0, 3.4, 0.1

    def f(u):
        u = u.reshape(2, n, n)
        a, b = u[0], u[1]
        a2b = a * a * b
        da = b_const + a2b - (a_const + 1) * a + alpha * _laplacian_roll(a)
        db = a_const * a - a2b + alpha * _laplacian_roll(b)
        return torch.stack([da, db]).reshape(-1)

    return f, torch.rand(2 * n * n, generator=g, dtype=dtype).to(device)


@_seeded
def brusselator(quick, dtype, device, g):
    return brusselator_at(8 if quick else 32, dtype, device, g)


def heat_at(n: int, dtype, device, g):
    """Allen-Cahn-type heat equation residual on an n x n grid: a 5-point Laplacian through conv2d (zero
    boundary) plus a cubic term."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=dtype, device=device)
    kernel = kernel.reshape(1, 1, 3, 3) * (n + 1) ** 2 * 1e-3

    def f(u):
        lap = F.conv2d(u[None, None], kernel, padding=1)[0, 0]
        return lap + u - u ** 3

    return f, torch.rand(n, n, generator=g, dtype=dtype).to(device)


@_seeded
def heat(quick, dtype, device, g):
    return heat_at(12 if quick else 64, dtype, device, g)


@_seeded
def conv_chain(quick, dtype, device, g):
    """Three conv1d layers (fixed random 5-tap kernels, zero padding) with tanh between, on a 1-D signal."""
    n = 300 if quick else 4096
    kernels = [(torch.randn(1, 1, 5, generator=g, dtype=dtype) * 0.5).to(device) for _ in range(3)]

    def f(x):
        h = x[None, None]
        h = torch.tanh(F.conv1d(h, kernels[0], padding=2))
        h = torch.tanh(F.conv1d(h, kernels[1], padding=2))
        return F.conv1d(h, kernels[2], padding=2)[0, 0]

    return f, torch.randn(n, generator=g, dtype=dtype).to(device)


@_seeded
def elementwise(quick, dtype, device, g):
    """x.sin() * x.exp(): a diagonal Jacobian."""
    n = 1000 if quick else 10_000

    def f(x):
        return x.sin() * x.exp()

    return f, torch.randn(n, generator=g, dtype=dtype).to(device)


@_seeded
def dense_row(quick, dtype, device, g):
    """cat(x.sin(), x.sum()): diagonal plus one dense row; columns need n colours, rows 2."""
    n = 400 if quick else 3000

    def f(x):
        return torch.cat([x.sin(), x.sum()[None]])

    return f, torch.randn(n, generator=g, dtype=dtype).to(device)


@_seeded
def permutation(quick, dtype, device, g):
    """x[perm] * scale: one nonzero per row and column, off the diagonal."""
    n = 500 if quick else 5000
    perm = torch.randperm(n, generator=g).to(device)
    scale = torch.rand(n, generator=g, dtype=dtype).to(device) + 0.5

    def f(x):
        return x[perm] * scale

    return f, torch.randn(n, generator=g, dtype=dtype).to(device)


@_seeded
def per_sample_mlp(quick, dtype, device, g):
    """A small MLP (8 -> 32 -> 32 -> 4, tanh) on a batch of samples: block-diagonal Jacobian."""
    batch = 32 if quick else 256
    w1 = (torch.randn(32, 8, generator=g, dtype=dtype) / 8 ** 0.5).to(device)
    w2 = (torch.randn(32, 32, generator=g, dtype=dtype) / 32 ** 0.5).to(device)
    w3 = (torch.randn(4, 32, generator=g, dtype=dtype) / 32 ** 0.5).to(device)
    b1 = torch.randn(32, generator=g, dtype=dtype).to(device) * 0.1

    def f(x):
        h = torch.tanh(x @ w1.T + b1)
        h = torch.tanh(h @ w2.T)
        return h @ w3.T

    return f, torch.randn(batch, 8, generator=g, dtype=dtype).to(device)


@_seeded
def dense_control(quick, dtype, device, g):
    """tanh(W x) with a dense W: no structure to find."""
    n = 64 if quick else 512
    w = (torch.randn(n, n, generator=g, dtype=dtype) / n ** 0.5).to(device)

    def f(x):
        return torch.tanh(w @ x)

    return f, torch.randn(n, generator=g, dtype=dtype).to(device)


PROBLEMS = [
    Problem("brusselator", "stencil", "2-D Brusselator, periodic, torch.roll; N = 32 (2048 unknowns)", brusselator, True),
    Problem("heat", "stencil", "2-D heat equation through conv2d (5-point) + cubic term; 64 x 64", heat, True),
    Problem("conv_chain", "banded", "three conv1d (5-tap) with tanh between; 4096 points", conv_chain, True),
    Problem("elementwise", "diagonal", "x.sin() * x.exp(); n = 10^4", elementwise, True),
    Problem("dense_row", "dense row", "cat(x.sin(), x.sum()); n = 3000", dense_row, False),
    Problem("permutation", "permutation", "x[perm] * scale; n = 5000", permutation, True),
    Problem("per_sample_mlp", "block diagonal", "MLP 8 -> 32 -> 32 -> 4 on a (256, 8) batch", per_sample_mlp, True),
    Problem("dense_control", "dense", "tanh(W x), dense 512 x 512 W", dense_control, False),
]
BY_NAME = {p.name: p for p in PROBLEMS}

# Detection and colouring only, at the sizes the anchors quote (our own functions; theirs may differ).
ANCHOR_SIZES = [
    ("brusselator N = 24 (1152 unknowns)", "SparseConnectivityTracer.jl", lambda d, g: brusselator_at(24, torch.float64, d, g)),
    ("heat 2-D 200 x 200 (40,000 unknowns)", "asdex", lambda d, g: heat_at(200, torch.float64, d, g)),
]


# --- contestants --------------------------------------------------------------------------------------

def loop_estimate(f, x, device) -> float:
    """Seconds torch's plain loop would take: one backward pass (retained graph) per output element."""
    xr = x.detach().requires_grad_()
    y = f(xr)
    w = torch.ones_like(y)
    ts = []
    for _ in range(5):
        t, _ = C.timed(lambda: torch.autograd.grad(y, xr, w, retain_graph=True), device)
        ts.append(t)
    return y.numel() * statistics.median(ts)


def contestants(f, x, device, estimate: float | None = None) -> list[C.Contestant]:
    def aj(name, note, **options):
        plan = (lambda: C.private_plan(f, x, **options)) if options else (lambda: autojac.plan(f, x))
        return C.Contestant(name, "autojac", lambda: autojac.jacobian(f, x, **options), plan=plan,
                            frozen=lambda p: (lambda: autojac.jacobian(f, x, plan=p, **options)), note=note)

    jac = torch.autograd.functional.jacobian
    out = [
        aj("autojac", "sparsity='auto' (default), dense output"),
        aj("autojac output=sparse", "sparsity='auto', torch sparse COO output", output="sparse"),
        aj("autojac dense", "sparsity=None", sparsity=None),
        C.Contestant("func.jacrev", "peer", lambda: torch.func.jacrev(f)(x)),
        C.Contestant("func.jacfwd", "peer", lambda: torch.func.jacfwd(f)(x)),
        C.Contestant("autograd vec rev", "peer", lambda: jac(f, x, vectorize=True)),
        C.Contestant("autograd vec fwd", "peer", lambda: jac(f, x, vectorize=True, strategy="forward-mode")),
        C.Contestant("autograd loop", "peer", lambda: jac(f, x)),
    ]
    if estimate is not None and estimate > LOOP_LIMIT:
        out[-1].skip = f"skipped: estimated {estimate:.0f} s (one backward pass per output element) > {LOOP_LIMIT:.0f} s"
    return out


def _find(spec: dict):
    device = torch.device(spec["device"])
    f, x = BY_NAME[spec["problem"]].build(spec["quick"], torch.float64, device)
    c = next(c for c in contestants(f, x, device) if c.name == spec["contestant"])
    return c, device


# --- one problem --------------------------------------------------------------------------------------

def structure_facts(f, x, repeats: int) -> dict:
    """Detection (autojac.sparsity) and colouring times, colours against the lower bounds."""
    det, wall, rows, cols = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = autojac.sparsity(f, x)
        wall.append(time.perf_counter() - t0)
        det.append(p.seconds)
        rows.append(color_rows(p))
        cols.append(color_columns(p))
    r, c = rows[-1], cols[-1]
    counts_row = np.diff(p.to_scipy().indptr) if p.nnz else np.zeros(1)
    return {"shape": list(p.shape), "nnz": p.nnz, "max_row_nnz": p.max_row_nnz, "max_col_nnz": p.max_col_nnz,
            "mean_row_nnz": p.nnz / max(1, p.shape[0]), "median_row_nnz": float(np.median(counts_row)),
            "dense_ops": list(p.dense_ops), "valid_everywhere": p.valid_everywhere, "source": p.source,
            "detect_seconds": statistics.median(det), "detect_wall_seconds": statistics.median(wall),
            "rows": {"n_colors": r.n_colors, "lower_bound": r.lower_bound, "order": r.order,
                     "seconds": statistics.median(x.seconds for x in rows)},
            "columns": {"n_colors": c.n_colors, "lower_bound": c.lower_bound, "order": c.order,
                        "seconds": statistics.median(x.seconds for x in cols)}}


def run_problem(problem: Problem, s: C.Settings, say=print) -> dict:
    device = s.device
    f, x = problem.build(s.quick, torch.float64, device)
    want = torch.func.jacfwd(f)(x)  # float64 reference, independent of the reverse-mode contestants
    facts = {"problem": problem.name, "kind": problem.kind, "what": problem.what, "n_in": x.numel(),
             "n_out": want.numel() // x.numel(), "qualifies": problem.qualifies}
    facts["structure"] = structure_facts(f, x, 1 if s.quick else 3)
    estimate = loop_estimate(f, x, device)
    facts["loop_estimate_seconds"] = estimate
    cs = contestants(f, x, device, estimate)
    rows = C.measure(cs, want, torch.float64, s, say)
    want = None
    for c in cs:
        row = rows[c.name]
        if s.memory == "off" or "seconds" not in row or row["seconds"] > 10:
            continue
        try:
            row["peak_bytes"], row["memory_method"] = C.peak_memory(
                c, s, __file__, {"problem": problem.name, "quick": s.quick, "contestant": c.name, "device": str(device)})
        except Exception as exc:  # noqa: BLE001
            row["memory_error"] = C.error_text(exc)
    facts["rows"] = rows
    return facts


# --- report -------------------------------------------------------------------------------------------

def summarize(p: dict) -> dict:
    rows = p["rows"]
    peer = C.best_peer(rows)
    auto, dense, sparse_out = rows.get("autojac", {}), rows.get("autojac dense", {}), rows.get("autojac output=sparse", {})
    st = p["structure"]
    return {
        "peer": peer,
        "warm_speedup": C.ratio(peer and peer["seconds"], auto.get("seconds")),
        "first_speedup": C.ratio(peer and peer["seconds"], auto.get("first_seconds")),
        "sparse_out_warm_speedup": C.ratio(peer and peer["seconds"], sparse_out.get("seconds")),
        "vs_dense_warm": C.ratio(auto.get("seconds"), dense.get("seconds")),
        "vs_dense_first": C.ratio(auto.get("first_seconds"), dense.get("first_seconds")),
        "side": auto.get("side"),
        "rows_smaller": st["rows"]["n_colors"] < st["columns"]["n_colors"],
        "qualifies": p["qualifies"] and (st["max_row_nnz"] <= QUALIFY_ROW_NNZ),
    }


def acceptance(problems: list[dict], quick: bool) -> list[str]:
    lines = []
    # 1. warm >= 20x and first >= 5x faster than the fastest dense torch peer
    qual = [p for p in problems if summarize(p)["qualifies"]]
    figures, ok = [], True if qual else None
    for p in qual:
        sm = summarize(p)
        w, fc = sm["warm_speedup"], sm["first_speedup"]
        good = w is not None and fc is not None and w >= WARM_SPEEDUP and fc >= FIRST_SPEEDUP
        ok = ok and good
        figures.append(f"{p['problem']} warm {C.x_text(w)}, first {C.x_text(fc)}{'' if good else ' (miss)'}")
    lines.append(f"- On every structured problem with n >= {QUALIFY_N} and at most ~{QUALIFY_ROW_NNZ} nonzeros per row: warm "
                 f"at least {WARM_SPEEDUP:.0f}x and first call (detection included) at least {FIRST_SPEEDUP:.0f}x faster than "
                 "the fastest dense torch peer, dense output: "
                 f"{C.verdict(ok)} ({'; '.join(figures) or 'no problem qualifies'}; speed-ups = fastest peer's warm time / "
                 "autojac's time" + ("; quick sizes are below n = 2000: the problems that qualify at full size are judged"
                                     if quick else "") + ")")
    # 2. colours within 1 of the lower bound on banded and stencil problems; rows chosen where smaller
    figures, ok = [], None
    for p in problems:
        if p["kind"] not in ("banded", "stencil"):
            continue
        st = p["structure"]
        r, c = st["rows"], st["columns"]
        good = r["n_colors"] <= r["lower_bound"] + 1 and c["n_colors"] <= c["lower_bound"] + 1
        ok = good if ok is None else ok and good
        figures.append(f"{p['problem']} rows {r['n_colors']} (bound {r['lower_bound']}), columns {c['n_colors']} "
                       f"(bound {c['lower_bound']}){'' if good else ' (miss)'}")
    side_figs, side_ok = [], None
    for p in problems:
        sm = summarize(p)
        if not sm["rows_smaller"] or sm["side"] is None:
            continue
        good = sm["side"] == "rows"
        side_ok = good if side_ok is None else side_ok and good
        st = p["structure"]
        side_figs.append(f"{p['problem']} ({st['rows']['n_colors']} row / {st['columns']['n_colors']} column colours): "
                         f"plan pushes {sm['side']}")
    both = None if ok is None and side_ok is None else bool((ok is not False) and (side_ok is not False))
    lines.append(f"- Colours within 1 of the lower bound on banded and stencil problems; row colouring chosen where it is "
                 f"the smaller: {C.verdict(both)} (colours: {C.verdict(ok)}: {'; '.join(figures) or 'none run'}. "
                 f"Side: {C.verdict(side_ok)}: {'; '.join(side_figs) or 'no problem run where rows need fewer colours'})")
    # 3. dense control
    dc = next((p for p in problems if p["problem"] == "dense_control"), None)
    if dc is None:
        lines.append("- Dense control: not run")
    else:
        sm = summarize(dc)
        f_r, w_r = sm["vs_dense_first"], sm["vs_dense_warm"]
        good = None if f_r is None or w_r is None else f_r <= DENSE_FIRST_SLACK and w_r <= DENSE_WARM_SLACK
        lines.append(f"- Dense control: first call no more than 10% slower, warm no slower, than autojac with "
                     f"sparsity=None: {C.verdict(good)} (first {C.x_text(f_r)}, warm {C.x_text(w_r)}; \"no slower\" "
                     f"judged as at most {DENSE_WARM_SLACK:.2f}x, the planner's own threshold for a faster method)")
    return lines


def markdown(problems: list[dict], anchors: list[dict], meta: dict) -> str:
    lines = [f"# Sparse Jacobians: autojac against the dense torch ways{' (quick: tiny sizes, a smoke test)' if meta['quick'] else ''}",
             "", f"Machine: {meta['machine']}. Device: `{meta['device']}`. Date: {meta['date']}. "
             f"Wall time: {meta['wall_seconds']:.0f} s. {torch.get_num_threads()} torch threads.", "",
             "## Acceptance (the structure issue)", "", *acceptance(problems, meta["quick"]), "",
             "## Summary", "",
             "Speed-ups are the fastest dense torch peer's warm time over autojac's (above 1: autojac is faster); "
             "\"vs autojac dense\" is autojac's time over `sparsity=None`'s (below 1: faster).", "",
             "| problem | kind | Jacobian (n_out x n_in) | nonzeros per row (max / mean) | detection | row colours (bound) | column colours (bound) "
             "| plan after 10 calls | pushes | autojac warm | first call | fastest torch peer | warm speed-up | first-call speed-up "
             "| output=sparse warm | vs autojac dense (warm / first) |",
             "|" + "---|" * 16]
    for p in problems:
        st, sm, rows = p["structure"], summarize(p), p["rows"]
        auto, so = rows.get("autojac", {}), rows.get("autojac output=sparse", {})
        peer = sm["peer"]
        lines.append(
            f"| {p['problem']} | {p['kind']} | {p['n_out']} x {p['n_in']} | {st['max_row_nnz']} / {st['mean_row_nnz']:.1f} "
            f"| {C.ms(st['detect_seconds'])} | {st['rows']['n_colors']} ({st['rows']['lower_bound']}) "
            f"| {st['columns']['n_colors']} ({st['columns']['lower_bound']}) | {auto.get('plan', auto.get('error', '–'))} "
            f"| {auto.get('side', '–')} | {C.ms(auto.get('seconds'))} | {C.ms(auto.get('first_seconds'))} "
            f"| {peer['contestant'] + ' ' + C.ms(peer['seconds']) if peer else '–'} | {C.x_text(sm['warm_speedup'])} "
            f"| {C.x_text(sm['first_speedup'])} | {C.ms(so.get('seconds'))} "
            f"| {C.x_text(sm['vs_dense_warm'])} / {C.x_text(sm['vs_dense_first'])} |")
    lines += ["", "## Detection and colouring", "",
              "`autojac.sparsity(f, x).seconds` (and the wall time of the call), then `color_rows` / `color_columns` "
              "(`from autojac._structure import ...`): colours, the lower bound (the most nonzeros in one column / row), "
              "the colouring's own seconds and the order it found.", "",
              "| problem | pattern | detection (wall) | treated as dense | rows: colours / bound, time, order "
              "| columns: colours / bound, time, order |", "|---|---|---|---|---|---|"]
    for p in problems:
        st = p["structure"]
        r, c = st["rows"], st["columns"]
        lines.append(f"| {p['problem']} | {st['nnz']} nonzeros of {st['shape'][0]} x {st['shape'][1]} ({st['source']}) "
                     f"| {C.ms(st['detect_seconds'])} ({C.ms(st['detect_wall_seconds'])}) | {', '.join(st['dense_ops']) or '–'} "
                     f"| {r['n_colors']} / {r['lower_bound']}, {C.ms(r['seconds'])}, {r['order']} "
                     f"| {c['n_colors']} / {c['lower_bound']}, {C.ms(c['seconds'])}, {c['order']} |")
    lines += ["", "## Published figures of other tools (quoted, not measured here) and ours at the same sizes", "",
              "Their hardware, problem definitions and timing methods differ from ours; these are orders of magnitude, "
              "not a race.", "", "| tool | problem | their figure (as published) |", "|---|---|---|"]
    for tool, what, fig in ANCHORS:
        lines.append(f"| {tool} | {what} | {fig} |")
    lines += ["", "| ours, same size | beside | detection | row colouring | column colouring | colours (rows / columns) |",
              "|---|---|---|---|---|---|"]
    for a in anchors:
        if "error" in a:
            lines.append(f"| {a['label']} | {a['anchor']} | {a['error']} | | | |")
            continue
        lines.append(f"| {a['label']} | {a['anchor']} | {C.ms(a['detect_seconds'])} | {C.ms(a['rows']['seconds'])} "
                     f"| {C.ms(a['columns']['seconds'])} | {a['rows']['n_colors']} / {a['columns']['n_colors']} |")
    el = next((p for p in problems if p["problem"] == "elementwise"), None)
    if el is not None:
        r = el["rows"]
        lines += ["", f"Beside sparsejac's diagonal figure: our element-wise map, n = {el['n_in']}: autojac output=sparse warm "
                  f"{C.ms(r.get('autojac output=sparse', {}).get('seconds'))}, dense output "
                  f"{C.ms(r.get('autojac', {}).get('seconds'))} (it writes an n x n float64 tensor), fastest dense torch "
                  f"peer {C.ms((C.best_peer(r) or {}).get('seconds'))}."]
    lines += ["", "## Every contestant", "", method_notes(meta), ""]
    for p in problems:
        lines += [f"### {p['problem']}: {p['what']}" + (f" (here n_in = {p['n_in']})" if meta["quick"] else ""), "",
                  "| contestant | warm | first call | calls to settle | settled warm | vs fastest peer (warm) "
                  "| vs autojac dense (warm) | peak memory | plan after 10 calls (settled) | first calls used |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        peer = C.best_peer(p["rows"])
        dense = p["rows"].get("autojac dense", {})
        for name, r in p["rows"].items():
            if "error" in r or "skipped" in r:
                lines.append(f"| {name} | {r.get('error') or r.get('skipped')} |" + " |" * 8)
                continue
            settle = "–"
            if r["group"] == "autojac":
                settle = (str(r["settled_at"]) if r.get("settled_at") else
                          f"not after {r.get('settle_calls_made')} (cap: 200 calls or the time cap)" if not r.get("lookup_error") else
                          f"unknown ({r['lookup_error']})")
            plan = r.get("plan", r.get("once", "–")) + (f" ({r['settled_plan']})" if r.get("settled_plan") else "")
            firsts = ", ".join(sorted(set(x or "?" for x in r.get("first_sides", [])))) or "–"
            mem = C.mib(r.get("peak_bytes")) if "peak_bytes" in r else r.get("memory_error", "–")
            lines.append(f"| {name} | {C.ms(r.get('seconds'))} | {C.ms(r.get('first_seconds'))} | {settle} "
                         f"| {C.ms(r.get('settled_seconds'))} | {C.x_text(C.ratio(r.get('seconds'), peer and peer['seconds']))} "
                         f"| {C.x_text(C.ratio(r.get('seconds'), dense.get('seconds')))} | {mem} | {plan} | {firsts} |")
        lines += ["", f"Plain torch loop estimate: {C.ms(p['loop_estimate_seconds'])}.", ""]
    return "\n".join(lines) + "\n"


def method_notes(meta: dict) -> str:
    return (C.method_text(meta) + " \"first calls used\": whether each first call's plan was compressed, and on which "
            "side (rows: one VJP per row colour; columns: one JVP per column colour), or dense. The reference is "
            "`torch.func.jacfwd` in float64; autojac's results are checked on calls 1 and 10.")


def plot(problems: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = [p["problem"] for p in problems]
    series = [("autojac (sparsity auto)", lambda r: r.get("autojac", {}).get("seconds"), "tab:blue"),
              ("autojac output=sparse", lambda r: r.get("autojac output=sparse", {}).get("seconds"), "tab:cyan"),
              ("autojac dense", lambda r: r.get("autojac dense", {}).get("seconds"), "tab:gray"),
              ("fastest torch peer", lambda r: (C.best_peer(r) or {}).get("seconds"), "tab:red")]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.2
    for i, (label, get, color) in enumerate(series):
        xs = [k + (i - 1.5) * width for k in range(len(names))]
        ax.bar(xs, [(get(p["rows"]) or float("nan")) * 1e3 for p in problems], width, label=label, color=color)
    firsts = [(p["rows"].get("autojac", {}).get("first_seconds") or float("nan")) * 1e3 for p in problems]
    ax.scatter([k - 1.5 * width for k in range(len(names))], firsts, marker="_", s=160, color="black", zorder=3,
               label="autojac first call (detection included)")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ms per Jacobian (log)")
    ax.set_title("Warm time per problem (autojac: plan after 10 calls); dense output unless noted")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------

def main() -> None:
    if C.CHILD_FLAG in sys.argv:
        C.child_main(_find)
        return
    args = C.parse(__doc__.split("\n\n")[0])
    s = C.Settings.make(args.quick, args.device, args.memory)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in BY_NAME]
    if unknown:
        sys.exit(f"unknown problem(s) {unknown}; choose from {list(BY_NAME)}")
    problems = [p for p in PROBLEMS if not only or p.name in only]
    out = Path(args.out)
    stem = C.stem_for(args.device, "structured", args.quick)
    print(f"structured: {len(problems)} problems; writing {(out / stem).resolve()}.md, .json and .png; expect "
          f"{EXPECTED['quick' if args.quick else 'full']} (longer on a busy machine)", flush=True)
    started = time.perf_counter()
    results = []
    for p in problems:
        print(f"[{time.perf_counter() - started:5.0f} s] {p.name} ...", flush=True)
        results.append(run_problem(p, s))
        r = results[-1]
        sm = summarize(r)
        print(f"        warm {C.ms(r['rows'].get('autojac', {}).get('seconds'))}, first "
              f"{C.ms(r['rows'].get('autojac', {}).get('first_seconds'))}, fastest peer "
              f"{C.ms((sm['peer'] or {}).get('seconds'))}: speed-up warm {C.x_text(sm['warm_speedup'])}, first "
              f"{C.x_text(sm['first_speedup'])}; plan {r['rows'].get('autojac', {}).get('plan', '–')}", flush=True)
    anchors = []
    if not only and not args.quick:
        for label, anchor, build in ANCHOR_SIZES:
            print(f"[{time.perf_counter() - started:5.0f} s] detection at the anchors' sizes: {label} ...", flush=True)
            try:
                f, x = build(args.device, torch.Generator().manual_seed(0))
                anchors.append({"label": label, "anchor": anchor, **structure_facts(f, x, 3)})
            except Exception as exc:  # noqa: BLE001
                anchors.append({"label": label, "anchor": anchor, "error": C.error_text(exc)})
    meta = C.meta_for(args.device, args.quick, started, s)
    text = markdown(results, anchors, meta)
    C.write(out, stem, {"meta": meta, "problems": results, "anchors": anchors,
                        "published": [dict(zip(("tool", "problem", "figure"), a)) for a in ANCHORS]},
            text, lambda path: plot(results, path))
    print("\n".join(acceptance(results, args.quick)))


if __name__ == "__main__":
    main()
