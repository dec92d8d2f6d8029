"""How good the progress bar's estimate is: the projected time of a long call when the bar opens, against
the call's real time.

    python benchmarks/progress_estimates.py [--device cuda] [--out benchmarks/results] [--quick]

A call's bar opens once its run is expected to take over 10 s (autojac's `PROGRESS_AFTER_SECONDS`):
on a first call, after the first chunk (sized to about a second when the reference VJP says the run could
be long), from that chunk's pace; on a later call, from the plan's measured time. This script records the
estimate at that moment (the projection `Progress.expect` was given) and the run's real time (from the
start of the run to the bar's close), for a few long Jacobians: first calls, and a later call of the same
plan. The planning issue asks for estimates within 2x of the real time. Writes <machine>-progress.md and
.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import autojac
from autojac._bench.problems import BY_NAME, rk4_step
from autojac._bench.suite import machine_name, machine_text
from autojac._planning import session


def rollout(n: int, steps: int, device: torch.device):
    """`steps` RK4 steps of a periodic 1-D reaction-diffusion system of n unknowns: a dense n x n Jacobian
    built from many cheap ops, so each basis vector costs a long chain of small kernels."""
    def rhs(u):
        return 0.1 * (u.roll(1) - 2 * u + u.roll(-1)) + torch.tanh(u) - 0.1 * u ** 3

    def f(u):
        for _ in range(steps):
            u = rk4_step(rhs, u, 0.01)
        return u

    return f, torch.randn(n, dtype=torch.float64, device=device, generator=None)


def cases(quick: bool, device: torch.device):
    scale = 4 if quick else 1
    # Dense (sparsity=None): with "auto" this rollout's structure is found, and the dense run the first bar
    # was about is abandoned for the compressed one (its bar then times the detection, not the estimate).
    yield ("rollout 3000, 60 RK4 steps, dense", "dense", *rollout(3000 // scale, 60, device), {"sparsity": None})
    f, x = BY_NAME["wide_mlp"].build("large", device)
    yield ("wide_mlp (large), budget 6 MiB", "auto", f, x, {"memory_budget": "6MiB"})
    yield ("wide_mlp (large), budget 4 MiB", "auto", f, x, {"memory_budget": "4MiB"})


def run_one(f, x, options: dict) -> dict:
    """One call of `autojac.jacobian`; the first estimate over the threshold and the run it was about."""
    seen: list[dict] = []
    real_expect, real_close = session.Progress.expect, session.Progress.close

    def expect(self, seconds):
        if seconds is not None and seconds > session.PROGRESS_AFTER_SECONDS and not hasattr(self, "_estimate"):
            self._estimate = (seconds, time.perf_counter() - self.began, self.done, self.total)
        return real_expect(self, seconds)

    def close(self):
        if hasattr(self, "_estimate") and not getattr(self, "_recorded", False):
            self._recorded = True
            estimate, at, done, total = self._estimate
            seen.append({"label": self.label, "estimate_s": estimate, "at_s": at, "done": done, "total": total,
                         "real_s": time.perf_counter() - self.began})
        return real_close(self)

    session.Progress.expect, session.Progress.close = expect, close
    try:
        began = time.perf_counter()
        autojac.jacobian(f, x, **options)
        wall = time.perf_counter() - began
    finally:
        session.Progress.expect, session.Progress.close = real_expect, real_close
    report = autojac.last_report()
    return {"wall_s": wall, "method": report.method, "chunks": len(report.chunk_sizes), "bars": seen}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing {out.resolve() / machine_name(device)}-progress.md and .json; expect about 6 minutes on 2 CPU cores")
    rows = []
    for name, kind, f, x, options in cases(args.quick, device):
        autojac.clear_cache()
        for call in ("first call", "later call"):
            row = {"case": name, "call": call, **run_one(f, x, options)}
            rows.append(row)
            bars = "; ".join(f"{b['label']}: estimated {b['estimate_s']:.1f} s at {b['at_s']:.1f} s "
                             f"({b['done']}/{b['total']}), ran {b['real_s']:.1f} s" for b in row["bars"]) or "no bar"
            print(f"{name}, {call}: {row['wall_s']:.1f} s, {row['method']}; {bars}")
    stem = f"{machine_name(device)}-progress"
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine_text(device), "rows": rows}, indent=1))
    ratios = [b["estimate_s"] / b["real_s"] for r in rows for b in r["bars"]]
    within = sum(1 for q in ratios if 0.5 <= q <= 2.0)
    lines = [
        f"# The progress bar's estimates ({machine_text(device)})", "",
        "The estimate is the projected time of the run when the bar opened (the first projection over 10 s); "
        "real = the run's time from its start to the bar's close. First call: `autojac.clear_cache()` then one "
        "call; later call: the next call with the same plan.", "",
        f"Estimates within 2x of the real time: {within} of {len(ratios)}"
        + (f" (estimate / real from {min(ratios):.2f} to {max(ratios):.2f})" if ratios else "") + ".", "",
        "| case | call | method | call time | bar opened at | estimate | run's real time | estimate / real |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["bars"]:
            lines.append(f"| {r['case']} | {r['call']} | {r['method']} | {r['wall_s']:.1f} s | no bar (expected under 10 s) | – | – | – |")
        for b in r["bars"]:
            lines.append(f"| {r['case']} | {r['call']} | {b['label']} | {r['wall_s']:.1f} s | {b['at_s']:.1f} s "
                         f"({b['done']} of {b['total']} vectors) | {b['estimate_s']:.1f} s | {b['real_s']:.1f} s | "
                         f"{b['estimate_s'] / b['real_s']:.2f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.resolve() / stem}.md and .json")


if __name__ == "__main__":
    main()
