"""The torch.func user's habits: per-sample Jacobians (vmap(jacrev), vmap(jacfwd), the sum trick), Hessians
(torch.func.hessian, torch.autograd.functional.hessian) and Jacobians with respect to a parameter dict
(jacrev over functional_call), against autojac.batch_jacobian, autojac.hessian and autojac.jacobian(argnums=0).

    python benchmarks/habits.py [--device cuda] [--quick] [--only mlp,springs,rosenbrock] [--memory rss|tracker|off]

Writes benchmarks/results/<machine>-habits.md, .json and .png (with --quick: <machine>-habits-quick.*).
The full run takes about 10 minutes on 2 quiet CPU cores (most of it the fresh processes measuring memory and
autojac settling on the B = 4096 batches); --quick about 2 minutes. See benchmarks/README.md ("The torch.func
user's habits").
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import autojac
from autojac._measure.device import untracked_reserve

if __package__:
    from . import _common as C
else:  # run as a script: its folder is on sys.path
    import _common as C

EXPECTED = {"quick": "about 2 minutes on 2 CPU cores", "full": "about 10 minutes on 2 quiet CPU cores"}
WARM_RATIO = 1.10
BATCHES = {"full": [64, 512, 4096], "quick": [8, 32]}
BUDGET_SHARE = 0.25  # the budget: a quarter of vmap(jacrev)'s (or torch.func.hessian's) peak, above autojac's floor


# --- problems -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    name: str
    section: str  # "per-sample", "hessian", "params"
    what: str
    build: Callable  # (quick, batch, dtype, device) -> (f, inputs, extra)
    dtype: torch.dtype


def _randn(*shape, seed: int, dtype, device, scale=1.0, shift=0.0):
    """Drawn in float32 then cast, so the float64 reference sees exactly the float32 problem's values."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (x * scale + shift).to(dtype=dtype, device=device)


def _rand(*shape, seed: int, dtype, device):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype=dtype, device=device)


def _module(seed: int, make, dtype, device):
    torch.manual_seed(seed)
    return make().to(dtype=dtype, device=device).eval()


def mlp_net():
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))


def cnn_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 8, 3), nn.Tanh(), nn.Flatten(1),
                         nn.Linear(8 * 8 * 8, 10))


def build_mlp(quick, batch, dtype, device):
    net = _module(0, mlp_net, dtype, device)
    X = _randn(batch, 16, seed=1, dtype=dtype, device=device)
    return net, X, {}


def build_cnn(quick, batch, dtype, device):
    net = _module(0, cnn_net, dtype, device)
    X = _randn(batch, 1, 12, 12, seed=1, dtype=dtype, device=device)
    return net, X, {}


def build_springs(quick, batch, dtype, device):
    """Springs between every pair of 8 points in 2-D: q (B, 8, 2) -> the 28 spring energies per sample."""
    i, j = torch.triu_indices(8, 8, 1)
    i, j = i.to(device), j.to(device)
    rest = _rand(28, seed=2, dtype=dtype, device=device) + 0.5
    stiff = _rand(28, seed=3, dtype=dtype, device=device) + 1.0

    def springs(q):
        d = q[:, i] - q[:, j]
        r = torch.sqrt((d * d).sum(-1))
        return 0.5 * stiff * (r - rest) ** 2

    q = _randn(batch, 8, 2, seed=1, dtype=dtype, device=device, scale=2.0)
    return springs, q, {}


def build_logreg(quick, _batch, dtype, device):
    """Mean logistic loss (plus a small L2 term) in the weights: d = 200, 1000 samples."""
    d, n = (40, 200) if quick else (200, 1000)
    A = _randn(n, d, seed=0, dtype=dtype, device=device, scale=1 / d ** 0.5)
    y = (_rand(n, seed=1, dtype=torch.float32, device=device) > 0.5).to(dtype)

    def loss(w):
        return nn.functional.binary_cross_entropy_with_logits(A @ w, y) + 1e-3 * (w * w).sum()

    return loss, _randn(d, seed=2, dtype=dtype, device=device, scale=0.1), {}


def build_pairwise(quick, _batch, dtype, device):
    """Sum of inverse distances between 40 points in 3-D (explicit differences, no cdist): x (120,)."""
    n = 12 if quick else 40
    i, j = torch.triu_indices(n, n, 1)
    i, j = i.to(device), j.to(device)

    def energy(x):
        p = x.reshape(-1, 3)
        d = p[i] - p[j]
        return (1.0 / torch.sqrt((d * d).sum(-1))).sum()

    # points on a jittered grid, so no two are close
    side = round(n ** (1 / 3)) + 1
    grid = torch.stack(torch.meshgrid(*[torch.arange(side, dtype=torch.float32)] * 3, indexing="ij"), -1)
    x = grid.reshape(-1, 3)[:n] + _randn(n, 3, seed=0, dtype=torch.float32, device="cpu", scale=0.1)
    return energy, x.reshape(-1).to(dtype=dtype, device=device), {}


def build_net_input(quick, _batch, dtype, device):
    """A small network's loss in its input: MLP 64 -> 128 -> 128 -> 1 (tanh), the squared output."""
    net = _module(0, lambda: nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                                           nn.Linear(128, 1)), dtype, device)

    def loss(x):
        return (net(x) ** 2).sum()

    return loss, _randn(64, seed=1, dtype=dtype, device=device), {}


def build_rosenbrock(quick, _batch, dtype, device):
    """The chained Rosenbrock function in n = 2000: a tridiagonal Hessian."""
    n = 200 if quick else 2000

    def rosen(x):
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    return rosen, _randn(n, seed=0, dtype=dtype, device=device, scale=0.5, shift=1.0), {}


def build_stiffness(quick, _batch, dtype, device):
    """A chain of n = 2000 springs whose stiffness is one more variable: an arrowhead Hessian over a band."""
    n = 200 if quick else 2000

    def energy(x):
        k, u = x[0], x[1:]
        return (k.exp() * (u[1:] - u[:-1]) ** 2).sum() + (u ** 4).sum() + k ** 2

    return energy, _randn(n + 1, seed=0, dtype=dtype, device=device, scale=0.1), {}


def build_mlp_params(quick, _batch, dtype, device):
    net = _module(0, mlp_net, dtype, device)
    x = _randn(32, 16, seed=1, dtype=dtype, device=device)
    return net, x, {"params": {k: v.detach() for k, v in net.named_parameters()}}


def build_cnn_params(quick, _batch, dtype, device):
    net = _module(0, cnn_net, dtype, device)
    x = _randn(8 if quick else 32, 1, 12, 12, seed=1, dtype=dtype, device=device)
    return net, x, {"params": {k: v.detach() for k, v in net.named_parameters()}}


PROBLEMS = [
    Problem("mlp", "per-sample", "MLP 16 -> 64 -> 64 -> 8 (tanh), float32", build_mlp, torch.float32),
    Problem("cnn", "per-sample", "CNN (B, 1, 12, 12): two 3x3 convs (4, 8 channels, tanh), linear head to 10, float32",
            build_cnn, torch.float32),
    Problem("springs", "per-sample", "springs between all 28 pairs of 8 points in 2-D: (B, 8, 2) -> (B, 28) energies, "
            "float64", build_springs, torch.float64),
    Problem("logreg", "hessian", "logistic-regression loss in its weights, d = 200, 1000 samples, float32",
            build_logreg, torch.float32),
    Problem("pairwise", "hessian", "sum of inverse distances between 40 points in 3-D, float64", build_pairwise,
            torch.float64),
    Problem("net_input", "hessian", "an MLP's squared output in its 64-d input (64 -> 128 -> 128 -> 1, tanh), float32",
            build_net_input, torch.float32),
    Problem("rosenbrock", "hessian", "chained Rosenbrock, n = 2000 (tridiagonal Hessian), float64", build_rosenbrock,
            torch.float64),
    Problem("stiffness", "hessian", "springs in a chain with a global stiffness, n = 2001 (arrowhead Hessian: one "
            "dense row and column over a band), float64", build_stiffness, torch.float64),
    Problem("mlp_params", "params", "MLP 16 -> 64 -> 64 -> 8 on 32 inputs, w.r.t. its parameter dict, float32",
            build_mlp_params, torch.float32),
    Problem("cnn_params", "params", "the CNN on 32 inputs, w.r.t. its parameter dict, float32", build_cnn_params,
            torch.float32),
]
BY_NAME = {p.name: p for p in PROBLEMS}


# --- contestants and references -----------------------------------------------------------------------

def _per_sample_contestants(f, X, budget=None):
    func = torch.func

    def single(x):
        return f(x[None])[0]

    with torch.no_grad():
        d = f(X[:1]).dim() - 1  # sample dimensions of the output

    options = {} if budget is None else {"memory_budget": budget}
    auto = C.Contestant(
        "autojac" if budget is None else "autojac @budget", "autojac", lambda: autojac.batch_jacobian(f, X, **options),
        plan=lambda: autojac.plan(f, X, kind="batch_jacobian", **options),
        frozen=lambda p: (lambda: autojac.batch_jacobian(f, X, plan=p)), budget=budget,
        note="autojac.batch_jacobian(f, X)" + (f", memory_budget={budget}" if budget else ""))
    if budget is not None:
        return [auto]
    return [auto,
            C.Contestant("vmap(jacrev)", "peer", lambda: func.vmap(func.jacrev(single))(X)),
            C.Contestant("vmap(jacfwd)", "peer", lambda: func.vmap(func.jacfwd(single))(X)),
            C.Contestant("sum trick", "peer", lambda: func.jacrev(lambda Z: f(Z).sum(0))(X).movedim(d, 0))]


def _hessian_contestants(f, x, budget=None):
    options = {} if budget is None else {"memory_budget": budget}
    auto = C.Contestant(
        "autojac" if budget is None else "autojac @budget", "autojac", lambda: autojac.hessian(f, x, **options),
        plan=lambda: autojac.plan(f, x, kind="hessian", **options),
        frozen=lambda p: (lambda: autojac.hessian(f, x, plan=p)), budget=budget,
        note="autojac.hessian(f, x)" + (f", memory_budget={budget}" if budget else ""))
    if budget is not None:
        return [auto]
    return [auto,
            C.Contestant("func.hessian", "peer", lambda: torch.func.hessian(f)(x)),
            C.Contestant("autograd hessian vec", "peer",
                         lambda: torch.autograd.functional.hessian(f, x, vectorize=True))]


def _params_contestants(net, x, params):
    def g(p, x):
        return torch.func.functional_call(net, p, (x,))

    inputs = (params, x)
    return [C.Contestant("autojac", "autojac", lambda: autojac.jacobian(g, inputs, argnums=0),
                         plan=lambda: autojac.plan(g, inputs, argnums=0),
                         frozen=lambda p: (lambda: autojac.jacobian(g, inputs, argnums=0, plan=p)),
                         note="autojac.jacobian(lambda p, x: functional_call(net, p, (x,)), (params, x), argnums=0)"),
            C.Contestant("func.jacrev", "peer",
                         lambda: torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (x,)))(params))]


def contestants(problem: Problem, f, inputs, extra, budget=None) -> list[C.Contestant]:
    if problem.section == "per-sample":
        return _per_sample_contestants(f, inputs, budget)
    if problem.section == "hessian":
        return _hessian_contestants(f, inputs, budget)
    return _params_contestants(f, inputs, extra["params"])


def reference(problem: Problem, quick: bool, batch: int | None, device):
    """The same problem in float64, differentiated by torch.func."""
    f, inputs, extra = problem.build(quick, batch, torch.float64, device)
    if problem.section == "per-sample":
        return torch.func.vmap(torch.func.jacfwd(lambda x: f(x[None])[0]))(inputs)
    if problem.section == "hessian":
        return torch.func.jacfwd(torch.func.jacrev(f))(inputs)
    return torch.func.jacfwd(lambda p: torch.func.functional_call(f, p, (inputs,)))(extra["params"])


def _find(spec: dict):
    device = torch.device(spec["device"])
    problem = BY_NAME[spec["problem"]]
    f, inputs, extra = problem.build(spec["quick"], spec["batch"], problem.dtype, device)
    budget = spec.get("budget")
    c = next(c for c in contestants(problem, f, inputs, extra, budget) if c.name == spec["contestant"])
    return c, device


# --- one problem at one size ---------------------------------------------------------------------------

def run_case(problem: Problem, batch: int | None, budget_run: bool, s: C.Settings, say=print) -> dict:
    device = s.device
    f, inputs, extra = problem.build(s.quick, batch, problem.dtype, device)
    want = reference(problem, s.quick, batch, device)
    case = {"problem": problem.name, "section": problem.section, "what": problem.what, "batch": batch,
            "dtype": str(problem.dtype).replace("torch.", ""), "result_bytes": C.nbytes(want) // 2 if problem.dtype == torch.float32 else C.nbytes(want)}
    cs = contestants(problem, f, inputs, extra)
    spec = {"problem": problem.name, "quick": s.quick, "batch": batch, "device": str(device)}

    def memory_of(c: C.Contestant, row: dict) -> None:
        if s.memory == "off" or row.get("seconds", 0) > 10:
            return
        try:
            row["peak_bytes"], row["memory_method"] = C.peak_memory(c, s, __file__, {**spec, "contestant": c.name,
                                                                                   "budget": c.budget})
        except Exception as exc:  # noqa: BLE001
            row["memory_error"] = C.error_text(exc)

    if budget_run and s.memory != "off":
        # The peers' memory first: the budget is a share of what the vmap(jacrev) / torch.func.hessian habit needs.
        habit = "vmap(jacrev)" if problem.section == "per-sample" else "func.hessian"
        peer = next(c for c in cs if c.name == habit)
        try:
            need, _ = C.peak_memory(peer, s, __file__, {**spec, "contestant": habit, "budget": None})
        except Exception as exc:  # noqa: BLE001
            need, case["budget_note"] = None, f"{habit}'s peak could not be measured: {C.error_text(exc)}"
        if need is not None:
            floor = untracked_reserve(device) + 2 * case["result_bytes"] + 2**20
            budget = max(int(need * BUDGET_SHARE), floor)
            case.update(budget_habit=habit, habit_peak_bytes=need)
            if budget < need:
                case["budget_bytes"] = budget
                cs += contestants(problem, f, inputs, extra, budget)
            else:
                case["budget_note"] = (f"{habit} peaks at {C.mib(need)}, not above the smallest budget autojac can take "
                                       f"here ({C.mib(floor)}: the {C.mib(untracked_reserve(device))} workspace reserve "
                                       "plus twice the result): no budget run")
    rows = C.measure(cs, want, problem.dtype, s, say)
    want = None
    for c in cs:
        row = rows[c.name]
        if "seconds" in row and "peak_bytes" not in row:
            if c.name == case.get("budget_habit") and "habit_peak_bytes" in case:
                row["peak_bytes"], row["memory_method"] = case["habit_peak_bytes"], "as measured for the budget"
            else:
                memory_of(c, row)
    case["rows"] = rows
    return case


# --- report -------------------------------------------------------------------------------------------

def summarize(case: dict) -> dict:
    rows = case["rows"]
    peer = C.best_peer(rows)
    auto = rows.get("autojac", {})
    return {"peer": peer, "warm": C.ratio(auto.get("seconds"), peer and peer["seconds"]),
            "settled": C.ratio(auto.get("settled_seconds"), peer and peer["seconds"]),
            "first": C.ratio(auto.get("first_seconds"), peer and peer["seconds"])}


def label(case: dict) -> str:
    return case["problem"] + (f" B={case['batch']}" if case["batch"] else "")


def acceptance(cases: list[dict]) -> list[str]:
    judged = [c for c in cases if c["section"] in ("per-sample", "hessian")]
    figures, ok = [], None
    for c in judged:
        sm = summarize(c)
        good = sm["warm"] is not None and sm["warm"] <= WARM_RATIO
        ok = good if ok is None else ok and good
        figures.append(f"{label(c)} {C.x_text(sm['warm'])} {'PASS' if good else 'FAIL'}")
    lines = [f"- batch_jacobian and hessian: warm within {WARM_RATIO:.2f}x of the fastest torch way on every benchmark "
             f"problem: {C.verdict(ok)} ({'; '.join(figures) or 'none run'}; autojac's plan after 10 calls over the "
             "fastest torch way)"]
    figures, ok = [], None
    for c in cases:
        if "budget_bytes" not in c:
            if c.get("budget_note"):
                figures.append(f"{label(c)}: {c['budget_note']}")
            continue
        r = c["rows"].get("autojac @budget")
        if r is None:
            figures.append(f"{label(c)}: {c.get('budget_note', 'no budget run')}")
            continue
        peak = r.get("peak_bytes")
        good = "error" not in r and peak is not None and peak <= c["budget_bytes"]
        ok = good if ok is None else ok and good
        what = r.get("error") or f"autojac {C.mib(peak)} in {C.ms(r.get('seconds'))}"
        figures.append(f"{label(c)}: budget {C.mib(c['budget_bytes'])}, {c['budget_habit']} {C.mib(c['habit_peak_bytes'])}, "
                       f"{what} {'PASS' if good else 'FAIL'}")
    lines.append(f"- Within budget where vmap(jacrev) / torch.func.hessian exceed it: {C.verdict(ok)} "
                 f"({'; '.join(figures) or 'no budget run'})")
    return lines


def markdown(cases: list[dict], meta: dict) -> str:
    lines = [f"# The torch.func user's habits against autojac{' (quick: tiny sizes, a smoke test)' if meta['quick'] else ''}",
             "", f"Machine: {meta['machine']}. Device: `{meta['device']}`. Date: {meta['date']}. "
             f"Wall time: {meta['wall_seconds']:.0f} s. {meta['threads']} torch threads.", "",
             "## Acceptance", "", *acceptance(cases), "",
             "## Summary", "", "Ratios are autojac's time over the fastest torch way's warm time (below 1: autojac is faster).",
             "", "| problem | dtype | autojac plan after 10 calls | autojac warm | settled warm | calls to settle "
             "| first call | fastest torch way | warm ratio | settled ratio | first-call ratio | autojac peak | torch way's peak |",
             "|" + "---|" * 13]
    for c in cases:
        rows, sm = c["rows"], summarize(c)
        a, peer = rows.get("autojac", {}), sm["peer"]
        settle = (str(a["settled_at"]) if a.get("settled_at") else
                  (f"not within {a.get('settle_calls_made')}" if "settle_calls_made" in a else "–"))
        lines.append(
            f"| {label(c)} | {c['dtype']} | {a.get('plan', a.get('error', '–'))} | {C.ms(a.get('seconds'))} "
            f"| {C.ms(a.get('settled_seconds'))} | {settle} | {C.ms(a.get('first_seconds'))} "
            f"| {peer['contestant'] + ' ' + C.ms(peer['seconds']) if peer else '–'} | {C.x_text(sm['warm'])} "
            f"| {C.x_text(sm['settled'])} | {C.x_text(sm['first'])} | {C.mib(a.get('peak_bytes'))} "
            f"| {C.mib(peer.get('peak_bytes')) if peer else '–'} |")
    budgeted = [c for c in cases if "budget_bytes" in c or c.get("budget_note")]
    if budgeted:
        lines += ["", "## Memory budgets", "",
                  f"At the largest batch of each per-sample model and on each Hessian problem: the budget is "
                  f"{BUDGET_SHARE:g} of the peak of vmap(jacrev) (per-sample) or torch.func.hessian, never below the "
                  "CPU workspace reserve autojac counts against every budget plus twice the result.", "",
                  "| problem | budget | habit's peak | other torch ways' peaks | autojac @budget: peak | within | time "
                  "| unbudgeted autojac: peak, time | note |", "|---|---|---|---|---|---|---|---|---|"]
        for c in budgeted:
            rows = c["rows"]
            r = rows.get("autojac @budget", {})
            others = ", ".join(f"{n} {C.mib(x.get('peak_bytes'))}" for n, x in rows.items()
                               if x["group"] == "peer" and n != c.get("budget_habit"))
            peak = r.get("peak_bytes")
            within = None if peak is None or "budget_bytes" not in c else peak <= c["budget_bytes"]
            a = rows.get("autojac", {})
            lines.append(f"| {label(c)} | {C.mib(c.get('budget_bytes'))} | {c.get('budget_habit', '–')} "
                         f"{C.mib(c.get('habit_peak_bytes'))} | {others or '–'} | {C.mib(peak)} | "
                         f"{'–' if within is None else ('yes' if within else '**no**')} | {C.ms(r.get('seconds'))} "
                         f"| {C.mib(a.get('peak_bytes'))}, {C.ms(a.get('seconds'))} | {r.get('error') or c.get('budget_note') or r.get('plan', '')} |")
    lines += ["", "## Every contestant", "", C.method_text(meta) + " batch_jacobian's and hessian's plans are looked up with "
              "`autojac.plan(..., kind=\"batch_jacobian\")` and `kind=\"hessian\"`, and "
              "frozen with `plan=`, as `jacobian`'s are.", ""]
    for c in cases:
        lines += [f"### {label(c)}: {c['what']}", "",
                  "| contestant | warm | first call | calls to settle | settled warm | vs fastest torch way | peak memory "
                  "| plan after 10 calls (settled) | how warm was timed |", "|---|---|---|---|---|---|---|---|---|"]
        peer = C.best_peer(c["rows"])
        for name, r in c["rows"].items():
            if "error" in r or "skipped" in r:
                lines.append(f"| {name} | {r.get('error') or r.get('skipped')} |" + " |" * 7)
                continue
            settle = "–"
            if r["group"] == "autojac":
                settle = (str(r["settled_at"]) if r.get("settled_at") else
                          f"not after {r.get('settle_calls_made')} (cap: 200 calls or the time cap)" if not r.get("lookup_error") else
                          f"unknown ({r['lookup_error']})")
            mem = C.mib(r.get("peak_bytes")) if "peak_bytes" in r else r.get("memory_error", "–")
            plan = r.get("plan", r.get("once", "–")) + (f" ({r['settled_plan']})" if r.get("settled_plan") else "")
            lines.append(f"| {name} | {C.ms(r.get('seconds'))} | {C.ms(r.get('first_seconds'))} | {settle} "
                         f"| {C.ms(r.get('settled_seconds'))} | {C.x_text(C.ratio(r.get('seconds'), peer and peer['seconds']))} "
                         f"| {mem} | {plan} | {r.get('warm_how', 'interleaved rounds')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = [label(c) for c in cases]
    sms = [summarize(c) for c in cases]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    xs = range(len(cases))
    ax.bar(xs, [s["warm"] or float("nan") for s in sms], color="tab:blue", label="autojac warm (plan after 10 calls)")
    ax.scatter(xs, [s["settled"] or float("nan") for s in sms], color="tab:green", zorder=3, label="autojac settled")
    ax.scatter(xs, [s["first"] or float("nan") for s in sms], marker="_", s=160, color="black", zorder=3,
               label="autojac first call")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(WARM_RATIO, color="gray", lw=0.8, ls="--", label=f"{WARM_RATIO:.2f}x")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("autojac time / fastest torch way's warm time (log)")
    ax.set_title("autojac against the torch.func habits; below 1 is faster")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------

def main() -> None:
    if C.CHILD_FLAG in sys.argv:
        C.child_main(_find)
        return
    args = C.parse(__doc__.split("\n\n")[0], extra=lambda parser: parser.add_argument(
        "--batches", default="", help="comma-separated batch sizes for the per-sample problems (default 64,512,4096; "
        "--quick 8,32); the largest gets the memory-budget run"))
    s = C.Settings.make(args.quick, args.device, args.memory)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in BY_NAME]
    if unknown:
        sys.exit(f"unknown problem(s) {unknown}; choose from {list(BY_NAME)}")
    problems = [p for p in PROBLEMS if not only or p.name in only]
    batches = [int(b) for b in args.batches.split(",") if b] or BATCHES["quick" if args.quick else "full"]
    out = Path(args.out)
    stem = C.stem_for(args.device, "habits", args.quick)
    print(f"habits: {len(problems)} problems; writing {(out / stem).resolve()}.md, .json and .png; expect "
          f"{EXPECTED['quick' if args.quick else 'full']} (longer on a busy machine)", flush=True)
    started = time.perf_counter()
    cases = []
    for p in problems:
        sizes = batches if p.section == "per-sample" else [None]
        for b in sizes:
            print(f"[{time.perf_counter() - started:5.0f} s] {p.name}" + (f" B={b}" if b else "") + " ...", flush=True)
            budget_run = p.section == "hessian" or (p.section == "per-sample" and b == max(batches))
            cases.append(run_case(p, b, budget_run, s))
            sm = summarize(cases[-1])
            a = cases[-1]["rows"].get("autojac", {})
            print(f"        autojac warm {C.ms(a.get('seconds'))} ({a.get('plan', a.get('error', '–'))}), first "
                  f"{C.ms(a.get('first_seconds'))}; fastest torch way {C.ms((sm['peer'] or {}).get('seconds'))}: "
                  f"ratio {C.x_text(sm['warm'])}", flush=True)
    meta = C.meta_for(args.device, args.quick, started, s)
    C.write(out, stem, {"meta": meta, "cases": cases}, markdown(cases, meta), lambda path: plot(cases, path))
    print("\n".join(acceptance(cases)))


if __name__ == "__main__":
    main()
