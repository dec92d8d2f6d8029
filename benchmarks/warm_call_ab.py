"""Warm calls of the suite's problems at two commits, side by side: processes alternate between them.

A companion of `first_call_ab.py` for changes to the per-call path: for each problem size whose call takes under
CALL_LIMIT, and for `batch_jacobian` of the habits benchmark's MLP at B = 64 and 512, a process makes 12 calls
from a fresh plan, then times the plan it holds frozen (`plan=p`: no exploration) and its plain call (which goes
on exploring while the plan is not settled), interleaved, one call at a time, and reports each median.

    git worktree add /tmp/old <commit>
    python benchmarks/warm_call_ab.py /tmp/old . --rounds 2 --out benchmarks/results/cpu-2core-warm-call-ab.md
"""

from __future__ import annotations

import math
import statistics
import time

# benchmarks/ is the script's directory, first on sys.path
from first_call_ab import alternate, arguments, commit_of, finish, machine

CHILD = r"""
import json, statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch, autojac
from torch import nn
assert autojac.__file__.startswith(sys.argv[1]), (autojac.__file__, sys.argv[1])
from autojac._bench.problems import PROBLEMS
CALL_LIMIT, ROUNDS, BUDGET = 0.01, 300, 1.5

def medians(frozen, plain):
    times = {"frozen": [], "plain": []}
    began = time.perf_counter()
    for r in range(ROUNDS):
        for name, fn in (("frozen", frozen), ("plain", plain)) if r % 2 else (("plain", plain), ("frozen", frozen)):
            t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
        if time.perf_counter() - began > BUDGET and r >= 20:
            break
    return statistics.median(times["frozen"]), statistics.median(times["plain"])

out = {}
for p in PROBLEMS:
    for size in ("small", "large"):
        f, x = p.build(size, "cpu")
        t = time.perf_counter(); autojac.jacobian(f, x); first = time.perf_counter() - t
        if first > 4 * CALL_LIMIT:
            continue
        for _ in range(11):
            autojac.jacobian(f, x)
        plan = autojac.plan(f, x)
        if plan.estimated_seconds is not None and plan.estimated_seconds > CALL_LIMIT:
            continue
        frozen, plain = medians(lambda: autojac.jacobian(f, x, plan=plan), lambda: autojac.jacobian(f, x))
        out[f"{p.name} {size}"] = (frozen, plain, plan.name)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).eval()
for batch in (64, 512):
    X = torch.randn(batch, 16)
    for _ in range(12):
        autojac.batch_jacobian(net, X)
    plan = autojac.plan(net, X, kind="batch_jacobian")
    frozen, plain = medians(lambda: autojac.batch_jacobian(net, X, plan=plan), lambda: autojac.batch_jacobian(net, X))
    out[f"batch_jacobian mlp B={batch}"] = (frozen, plain, plan.name)
print(json.dumps(out))
"""


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    began = time.time()
    runs = alternate(args.old, args.new, args.rounds, CHILD)
    names = [n for n in runs["old"][0] if all(n in r for side in runs.values() for r in side)]
    lines = ["# Warm calls at two commits, alternating processes\n",
             f"{commit_of(args.old)} (old) against {commit_of(args.new)} (new); {args.rounds} process(es) each, "
             f"alternating; each figure the median over processes of each process's median call (12 calls from "
             f"a fresh plan first; frozen: `plan=` the plan held then, plain: the plain call, exploring while the "
             f"plan is not settled; the plans each side held, which can differ between processes). "
             f"{machine()}, {time.strftime('%Y-%m-%d')}, "
             f"{time.time() - began:.0f} s. `benchmarks/warm_call_ab.py`.\n",
             "| problem | plan (old) | plan (new) | old frozen | new frozen | new / old | old plain | new plain "
             "| new / old |",
             "|---|---|---|---|---|---|---|---|---|"]
    logs = {"frozen": [], "plain": []}
    for name in names:
        row = [name, *(", ".join(sorted({r[name][2] for r in runs[side]})) for side in ("old", "new"))]
        for k, kind in enumerate(("frozen", "plain")):
            old = statistics.median(r[name][k] for r in runs["old"])
            new = statistics.median(r[name][k] for r in runs["new"])
            logs[kind].append(math.log(new / old))
            row += [f"{old * 1e3:.3f} ms", f"{new * 1e3:.3f} ms", f"{new / old:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    for kind, values in logs.items():
        lines.append(f"\nGeometric mean new / old, {kind}: {math.exp(sum(values) / len(values)):.3f}x over "
                     f"{len(values)} problems.")
    finish(lines, args.out)


if __name__ == "__main__":
    main()
