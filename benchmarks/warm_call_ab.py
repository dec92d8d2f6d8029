"""Warm calls of the suite's problems at two commits, side by side: processes alternate between them.

A companion of `first_call_ab.py` for changes to the per-call path: for each problem size whose call takes under
CALL_LIMIT, and for `batch_jacobian` of the habits benchmark's MLP at B = 64 and 512, a process makes 12 calls
from a fresh plan, then times the plan it holds frozen (`plan=p`: no exploration) and its plain call (which goes
on exploring while the plan is not settled), interleaved, one call at a time, and reports each median.

    git worktree add /tmp/old <commit>
    python benchmarks/warm_call_ab.py /tmp/old . --rounds 2 --out benchmarks/results/cpu-2core-warm-call-ab.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

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


def run(checkout: str) -> dict:
    root = str(pathlib.Path(checkout).resolve())
    done = subprocess.run([sys.executable, "-c", CHILD, root], env=dict(os.environ, PYTHONPATH=root),
                          cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def commit_of(checkout: str) -> str:
    return subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(args.new).resolve()))
    from autojac._bench.suite import machine_text
    import torch

    began = time.time()
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for side in ("old", "new"):
            runs[side].append(run(getattr(args, side)))
    names = [n for n in runs["old"][0] if all(n in r for side in runs.values() for r in side)]
    lines = ["# Warm calls at two commits, alternating processes\n",
             f"{commit_of(args.old)} (old) against {commit_of(args.new)} (new); {args.rounds} process(es) each, "
             f"alternating; each figure the median over processes of each process's median call (12 calls from "
             f"a fresh plan first; frozen: `plan=` the plan held then, plain: the plain call, exploring while the "
             f"plan is not settled). {machine_text(torch.device('cpu'))}, {time.strftime('%Y-%m-%d')}, "
             f"{time.time() - began:.0f} s. `benchmarks/warm_call_ab.py`.\n",
             "| problem | plan (new) | old frozen | new frozen | new / old | old plain | new plain | new / old |",
             "|---|---|---|---|---|---|---|---|"]
    logs = {"frozen": [], "plain": []}
    for name in names:
        row = [name, runs["new"][-1][name][2]]
        for k, kind in enumerate(("frozen", "plain")):
            old = statistics.median(r[name][k] for r in runs["old"])
            new = statistics.median(r[name][k] for r in runs["new"])
            logs[kind].append(math.log(new / old))
            row += [f"{old * 1e3:.3f} ms", f"{new * 1e3:.3f} ms", f"{new / old:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    for kind, values in logs.items():
        lines.append(f"\nGeometric mean new / old, {kind}: {math.exp(sum(values) / len(values)):.3f}x over "
                     f"{len(values)} problems.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
