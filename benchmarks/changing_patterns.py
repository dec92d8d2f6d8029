"""Closures rebuilt every step around new captured tensors: patterns that change with them, and values that do not.

A training or simulation loop often builds `f` anew each step around that step's data: a gather through a new
permutation, a new mask. Such an `f` has the same code and captured shapes every step, so autojac reuses one plan
(keyed by what determines cost), but its sparsity pattern is the new values' (NOTE: [A pattern found again] in
autojac/_planning/first_call.py). Each loop runs STEPS steps, one Jacobian per step, for every contestant in turn;
the loops are repeated ROUNDS times in a shuffled order (seeded) and the median step time of each contestant's
steps after the first two is reported, with its whole-loop time. autojac starts each loop from an empty cache
(its first step plans). Every autojac Jacobian is compared with `torch.func.jacrev`'s in float64.

    python benchmarks/changing_patterns.py [--quick] [--out DIR]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import autojac  # noqa: E402

D = torch.float64


def permutation_loop(n: int):
    """x[perm] * w + sin(x), a new permutation every step (a shuffled gather): the pattern changes every step."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g, dtype=D)

    def step(k: int):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + k))
        return lambda x: x[perm] * w + x.sin()

    return step, torch.randn(n, generator=g, dtype=D)


def masked_stencil_loop(n: int):
    """A 1-D diffusion stencil through a new random mask every step (links cut where the mask is 0)."""
    g = torch.Generator().manual_seed(1)

    def step(k: int):
        mask = (torch.rand(n, generator=torch.Generator().manual_seed(2000 + k)) > 0.3).to(D)

        def f(u):
            flux = mask * (u.roll(-1, 0) - u)
            return flux - flux.roll(1, 0) - u ** 3

        return f

    return step, torch.randn(n, generator=g, dtype=D)


def updated_weight_loop(n: int):
    """tanh(W x) with a tridiagonal W that an optimizer-like step writes in place every step: new values, the
    same pattern (only checked again, never found again)."""
    g = torch.Generator().manual_seed(2)
    W = (torch.diag(torch.randn(n, generator=g, dtype=D)) + torch.diag(torch.randn(n - 1, generator=g, dtype=D), 1)
         + torch.diag(torch.randn(n - 1, generator=g, dtype=D), -1)) / 2
    band = W != 0

    def step(k: int):
        with torch.no_grad():
            W.add_(0.01 * torch.randn(n, n, generator=torch.Generator().manual_seed(3000 + k), dtype=D) * band)
        return lambda x: torch.tanh(W @ x)

    return step, torch.randn(n, generator=g, dtype=D)


PROBLEMS = {
    "permutation": ("a gather through a new permutation every step", permutation_loop, 2500, 400),
    "masked_stencil": ("a 1-D stencil through a new random mask every step", masked_stencil_loop, 3000, 400),
    "updated_weight": ("a tridiagonal weight updated in place every step (pattern unchanged)", updated_weight_loop,
                       2000, 400),
}

CONTESTANTS = {
    "autojac": lambda f, x: autojac.jacobian(f, x),
    "autojac dense": lambda f, x: autojac.jacobian(f, x, sparsity=None),
    "jacrev": lambda f, x: torch.func.jacrev(f)(x),
    "jacfwd": lambda f, x: torch.func.jacfwd(f)(x),
}


def run_loop(name: str, contestant: str, steps: int, n: int) -> tuple[list[float], int]:
    _, build, _, _ = PROBLEMS[name]
    step, x = build(n)
    fn = CONTESTANTS[contestant]
    autojac.clear_cache()
    times, wrong = [], 0
    for k in range(steps):
        f = step(k)
        began = time.perf_counter()
        J = fn(f, x)
        times.append(time.perf_counter() - began)
        if contestant.startswith("autojac"):
            wrong += not torch.allclose(J, torch.func.jacrev(f)(x), rtol=1e-10, atol=1e-12)
        del J
    return times, wrong


def main() -> None:
    args, steps, rounds = C.loop_args(__doc__)
    rng = random.Random(0)
    rows = []
    for name, (what, _, n_full, n_quick) in PROBLEMS.items():
        n = n_quick if args.quick else n_full
        times, totals, wrong = C.loop_rounds(lambda c: run_loop(name, c, steps, n), list(CONTESTANTS), rounds, rng)
        med = {c: statistics.median(v) for c, v in times.items()}
        peer = min(("jacrev", "jacfwd"), key=med.get)
        autojac.clear_cache()
        step, x = PROBLEMS[name][1](n)
        for k in range(3):
            autojac.jacobian(step(k), x)
        rows.append(dict(problem=name, what=what, n=n, steps=steps, rounds=rounds, step_seconds=med,
                         loop_seconds={c: statistics.median(v) for c, v in totals.items()}, fastest_peer=peer,
                         ratio=med["autojac"] / med[peer], wrong=wrong, plan=str(autojac.plan(step(3), x))))
        print(f"{name}: " + ", ".join(f"{c} {C.ms(v)}" for c, v in med.items()) + f"; wrong {wrong}", flush=True)
    meta = dict(machine=C.machine_text(torch.device("cpu")), date=time.strftime("%Y-%m-%d"), quick=args.quick,
                commit=C.commit(), torch=torch.__version__)
    stem = C.stem_for(torch.device("cpu"), "changing-patterns", args.quick)
    C.write(args.out, stem, dict(meta=meta, rows=rows), report(rows, meta), None)


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"# Closures rebuilt every step around new captured tensors{' (quick)' if meta['quick'] else ''}", "",
             f"Machine: {meta['machine']}. Commit {meta['commit']}. Date: {meta['date']}.", "",
             "Median time of one step (steps 3 onwards of each loop, all rounds), each contestant's loops interleaved "
             "with the others' in a shuffled order; autojac starts each loop from an empty cache. Ratio = autojac / "
             "the faster of jacrev and jacfwd (below 1: autojac is faster).", "",
             "| problem | n | autojac | autojac `sparsity=None` | jacrev | jacfwd | ratio | wrong | loop of 20: autojac / fastest peer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, loop = r["step_seconds"], r["loop_seconds"]
        lines.append(f"| {r['problem']}: {r['what']} | {r['n']} | {C.ms(s['autojac'])} | {C.ms(s['autojac dense'])} | "
                     f"{C.ms(s['jacrev'])} | {C.ms(s['jacfwd'])} | {r['ratio']:.2f}x | {r['wrong']} | "
                     f"{C.ms(loop['autojac'])} / {C.ms(loop[r['fastest_peer']])} |")
    lines += ["", "Plans after 4 steps:", ""] + [f"- {r['problem']}: {r['plan']}" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
