"""What the safety net (verification of a method's first Jacobian of a function) costs.

    python benchmarks/safety_net.py [--device cuda] [--out benchmarks/results] [--sizes small,large]

For every suite problem: the first call of `autojac.jacobian` with no plan yet
(the rules' method, the Jacobian and its check), the time of the check inside it
(the reference vector-Jacobian product on the plain evaluation the call starts
from, and the comparison `w^T J` against it, each timed where it runs), the
evaluations of `f` the check added, and a warm call of the plan once settled
(median of 21; a plan's method is checked once). Writes <machine>-safety-net.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import autojac
from autojac._execute import verify
from autojac._planning import session
from autojac._bench.problems import BY_NAME
from autojac._bench.suite import machine_name, machine_text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, size: str, device: torch.device) -> dict:
    f, x = BY_NAME[name].build(size, device)
    counted = []

    def g(*args):  # a fresh function object, counting evaluations
        counted.append(1)
        return f(*args)

    spent = []
    real_check, real_reference = verify.check_against, session.Call.reference

    def timed(real):
        def run(*args):
            before = len(counted)
            _sync(device)
            start = time.perf_counter()
            try:
                return real(*args)
            finally:
                _sync(device)
                spent.append((time.perf_counter() - start, len(counted) - before))
        return run

    verify.check_against, session.Call.reference = timed(real_check), timed(real_reference)
    try:
        autojac.clear_cache()
        _sync(device)
        start = time.perf_counter()
        autojac.jacobian(g, x)
        _sync(device)
        first = time.perf_counter() - start
        first_method = autojac.last_report().method
    finally:
        verify.check_against, session.Call.reference = real_check, real_reference
    first_evaluations = len(counted)
    plan = autojac.tune(g, x, time_limit=30)
    warm = []
    for _ in range(21):
        counted.clear()
        _sync(device)
        start = time.perf_counter()
        autojac.jacobian(g, x)
        _sync(device)
        warm.append(time.perf_counter() - start)
    check_seconds = sum(s for s, _ in spent)
    return {
        "problem": name, "size": size, "first_method": first_method, "plan": plan.name, "first_call_s": first,
        "check_s": check_seconds, "check_share_of_first_call": check_seconds / first,
        "check_evaluations": sum(n for _, n in spent), "first_call_evaluations": first_evaluations,
        "warm_s": statistics.median(warm), "warm_evaluations": len(counted),
        "check_vs_warm": check_seconds / statistics.median(warm),
    }


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sizes", default="small,large")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in BY_NAME:
        if name == "wide_mlp":
            continue  # the budget sweep's problem: its first call is planning-bound, not check-bound
        for size in args.sizes.split(","):
            row = measure(name, size, device)
            rows.append(row)
            print(f"{name} {size}: {row['plan']}, first call {_ms(row['first_call_s'])}, check {_ms(row['check_s'])} "
                  f"({row['check_share_of_first_call']:.1%}), warm {_ms(row['warm_s'])}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{machine_name(device)}-safety-net"
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine_text(device), "rows": rows}, indent=1))
    shares = sorted(r["check_share_of_first_call"] for r in rows)
    lines = [
        f"# The safety net's cost ({machine_text(device)})", "",
        "A first call of `autojac.jacobian` checks the Jacobian of the method the rules chose against an "
        "independent vector-Jacobian product: one plain backward pass on the evaluation the call starts from "
        "(none when the method is torch's own loop on it), then the comparison of w^T J with it. A plan's "
        "methods are checked once each; settled calls are not checked.", "",
        f"Verification share of the first call: median {statistics.median(shares):.2%}, at most {shares[-1]:.2%}.", "",
        "| problem | size | first call's method | first call | verification | share | evaluations added | evaluations, first call | settled plan (tuned) | its warm call | verification / warm call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['size']} | {r['first_method']} | {_ms(r['first_call_s'])} | {_ms(r['check_s'])} | "
                     f"{r['check_share_of_first_call']:.2%} | {r['check_evaluations']} | {r['first_call_evaluations']} | "
                     f"{r['plan']} | {_ms(r['warm_s'])} | {r['check_vs_warm']:.2f}x |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.resolve() / stem}.md and .json")


if __name__ == "__main__":
    main()
