"""First calls of the suite's problems at two commits, side by side: processes alternate between them.

The full suite's first-call figures move by up to 1.5x between runs on the shared 2-core VMs (the peers' own
times by up to 2x between days), more than most planning changes do; alternating processes of two checkouts in
one time window puts both under the same conditions.

    git worktree add /tmp/old <commit>
    python benchmarks/first_call_ab.py /tmp/old . --rounds 2 --out benchmarks/results/cpu-2core-first-call-ab.md

Each process times `clear_cache()` + one call, 12 times per problem size (the first 2 dropped), and reports the
median and what the call ran.
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
import autojac
assert autojac.__file__.startswith(sys.argv[1]), (autojac.__file__, sys.argv[1])
from autojac._bench.problems import PROBLEMS
out = {}
for p in PROBLEMS:
    for size in ("small", "large"):
        f, x = p.build(size, "cpu")
        times = []
        for r in range(12):
            autojac.clear_cache()
            t = time.perf_counter(); autojac.jacobian(f, x); t = time.perf_counter() - t
            if r >= 2:
                times.append(t)
        report = autojac.last_report()
        out[f"{p.name} {size}"] = (statistics.median(times), report.method, list(report.chunk_sizes), report.evaluations)
print(json.dumps(out))
"""


def run(checkout: str, child: str = CHILD) -> dict:
    """The child's JSON, run on `checkout`'s autojac (also used by warm_call_ab.py)."""
    root = str(pathlib.Path(checkout).resolve())
    # Run from the checkout: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH.
    done = subprocess.run([sys.executable, "-c", child, root], env=dict(os.environ, PYTHONPATH=root), cwd=root,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternate(old: str, new: str, rounds: int, child: str = CHILD) -> dict[str, list[dict]]:
    """`rounds` runs of each checkout, old and new alternating."""
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(rounds):
        runs["old"].append(run(old, child))
        runs["new"].append(run(new, child))
    return runs


def finish(lines: list[str], out: str | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        pathlib.Path(out).write_text(text)


def machine() -> str:
    """This machine and torch, in the suite's words (from the newer checkout's autojac, on sys.path here)."""
    import torch
    from autojac._bench.suite import machine_text
    return machine_text(torch.device("cpu"))


def commit_of(checkout: str) -> str:
    return subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def arguments(description: str) -> argparse.Namespace:
    """The two checkouts, the rounds and the output file (also warm_call_ab.py's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    began = time.time()
    runs = alternate(args.old, args.new, args.rounds)
    names = list(runs["old"][0])
    lines = ["# First calls at two commits, alternating processes\n",
             f"{commit_of(args.old)} (old) against {commit_of(args.new)} (new); {args.rounds} process(es) each, "
             f"alternating; each figure the median over processes of each process's median of 10 first calls. "
             f"{machine()}, {time.strftime('%Y-%m-%d')}, {time.time() - began:.0f} s. "
             f"`benchmarks/first_call_ab.py`.\n",
             "| problem | old | old ran | new | new ran | new / old |", "|---|---|---|---|---|---|"]
    logs = []
    for name in names:
        old = statistics.median(r[name][0] for r in runs["old"])
        new = statistics.median(r[name][0] for r in runs["new"])
        o, n = runs["old"][-1][name], runs["new"][-1][name]
        logs.append(math.log(new / old))
        lines.append(f"| {name} | {old * 1e3:.2f} ms | {o[1]} {o[2]} ({o[3]} ev.) | {new * 1e3:.2f} ms | "
                     f"{n[1]} {n[2]} ({n[3]} ev.) | {new / old:.2f}x |")
    lines.append(f"\nGeometric mean new / old: {math.exp(sum(logs) / len(logs)):.3f}x over {len(logs)} problem sizes.")
    finish(lines, args.out)


if __name__ == "__main__":
    main()
