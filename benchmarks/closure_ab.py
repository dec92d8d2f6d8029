"""Closure loops of the suite's problems at two commits, side by side: processes alternate between them.

The companion of `first_call_ab.py` and `warm_call_ab.py` for changes to how a plan explores: the suite's closure
loop (20 steps, each building a new `lambda *xs: f(*xs) - target` around a fresh target and computing its Jacobian
once; autojac from `clear_cache()`, so its first step plans and the rest explore) against the same loop with
torch.func.jacrev and jacfwd, for each problem size whose suite call takes under CALL_LIMIT.

    git worktree add /tmp/old <commit>
    python benchmarks/closure_ab.py /tmp/old . --rounds 2 --out benchmarks/results/cpu-2core-closure-ab.md

Each process runs `autojac._bench.measure.closure_loops` (5 interleaved rounds) and reports autojac's loop over the
faster torch.func loop.
"""

from __future__ import annotations

import math
import statistics
import time

# benchmarks/ is the script's directory, first on sys.path
from first_call_ab import alternate, arguments, commit_of, finish, machine

CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, autojac
assert autojac.__file__.startswith(sys.argv[1]), (autojac.__file__, sys.argv[1])
from autojac._bench.measure import closure_loops
from autojac._bench.problems import BY_NAME
from autojac._bench.suite import CLOSURE_PROBLEMS
SLOW = {("transformer", "large"), ("ode_rollout", "small"), ("ode_rollout", "large"), ("transformer", "small"),
        ("decoder", "large")}  # over CALL_LIMIT warm: their loops are not what trials at sub-ms calls cost
out = {}
for name in CLOSURE_PROBLEMS:
    for size in ("small", "large"):
        if (name, size) in SLOW:
            continue
        r = closure_loops(BY_NAME[name], size, torch.device("cpu"), "lambda", steps=20, repeats=5)
        best = r[r["torch_best"] + "_seconds"]
        out[f"{name} {size}"] = (r["autojac_seconds"], best, r["torch_best"], r["evaluations"])
print(json.dumps(out))
"""
CALL_LIMIT = "about 5 ms"


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    began = time.time()
    runs = alternate(args.old, args.new, args.rounds, CHILD)
    names = list(runs["old"][0])
    lines = ["# Closure loops at two commits, alternating processes\n",
             f"{commit_of(args.old)} (old) against {commit_of(args.new)} (new); {args.rounds} process(es) each, "
             f"alternating; each figure the median over processes of each process's median 20-step loop (a new "
             f"lambda around a new target each step, from `clear_cache()`; 5 interleaved rounds with torch.func's "
             f"loops), and its ratio to the faster torch.func loop of the same process. Problems whose call takes "
             f"over {CALL_LIMIT} are left out. {machine()}, {time.strftime('%Y-%m-%d')}, "
             f"{time.time() - began:.0f} s. `benchmarks/closure_ab.py`.\n",
             "| problem | old loop | old ratio | new loop | new ratio | new / old | evaluations old, new |",
             "|---|---|---|---|---|---|---|"]
    logs, ratios = [], {"old": [], "new": []}
    for name in names:
        row = [name]
        loops = {}
        for side in ("old", "new"):
            loop = statistics.median(r[name][0] for r in runs[side])
            ratio = statistics.median(r[name][0] / r[name][1] for r in runs[side])
            loops[side] = loop
            ratios[side].append(ratio)
            row += [f"{loop * 1e3:.2f} ms", f"{ratio:.2f}x"]
        logs.append(math.log(loops["new"] / loops["old"]))
        row += [f"{loops['new'] / loops['old']:.2f}x",
                f"{runs['old'][-1][name][3]}, {runs['new'][-1][name][3]}"]
        lines.append("| " + " | ".join(row) + " |")
    geo = {side: math.exp(sum(map(math.log, v)) / len(v)) for side, v in ratios.items()}
    over = {side: sum(r > 1.2 for r in v) for side, v in ratios.items()}
    lines.append(f"\nGeometric mean new / old: {math.exp(sum(logs) / len(logs)):.3f}x over {len(logs)} problem sizes. "
                 f"Ratio to torch.func's loop, geomean: old {geo['old']:.2f}x ({over['old']} over 1.2x), "
                 f"new {geo['new']:.2f}x ({over['new']} over 1.2x).")
    finish(lines, args.out)


if __name__ == "__main__":
    main()
