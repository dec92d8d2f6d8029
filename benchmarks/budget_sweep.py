"""Peak memory and time of autojac under memory budgets far below the unchunked need (CPU or CUDA).

    python benchmarks/budget_sweep.py [--device cuda] [--out benchmarks/results]

The unchunked need is the least any vmap method needs for the whole Jacobian at once (the
planner's measured estimate), so "need / budget" is conservative. For each budget B (a share
of that need, at least the smallest plan), fresh subprocesses measure the peak extra memory
(CPU: peak RSS with MALLOC_MMAP_THRESHOLD_=131072; CUDA: max_memory_allocated) of a warm
call with the plan cached ("within budget" judges this one), and, for information, of the
first call in a fresh process: planning, probes and the process's one-time library set-up
(lazy imports, BLAS buffers) included. Time is the median of 5 warm calls in this process. Writes <machine>-budgets.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import autojac
from autojac._bench.measure import rss_peak, vmap_need
from autojac._bench.problems import BY_NAME
from autojac._bench.suite import machine_name, machine_text

SHARES = [None, 1 / 4, 1 / 10, 1 / 16, 1 / 20]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--problem", default="wide_mlp")
    args = parser.parse_args()
    device = torch.device(args.device)
    problem = BY_NAME[args.problem]
    f, x = problem.build("large", device)
    need, smallest = vmap_need(f, x)
    rows, budgets = [], []
    for share in SHARES:
        budget = None if share is None else max(int(need * share), int(smallest * 1.05))
        if budget in budgets:
            continue  # a share below the smallest plan: already swept at the smallest
        budgets.append(budget)
        plan = autojac.plan(f, x, memory_budget=budget)
        autojac.jacobian(f, x, plan=plan)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            autojac.jacobian(f, x, plan=plan)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        peak = rss_peak(problem.name, "large", "autojac", device, budget)
        cold = rss_peak(problem.name, "large", "autojac", device, budget, cold=True)
        row = {"share": share, "budget_bytes": budget, "unchunked_bytes": need, "smallest_bytes": smallest,
               "plan": f"{plan.name} x{plan.chunk_size} ({plan.n_chunks} chunks)",
               "estimated_peak_bytes": plan.estimated_peak_bytes, "peak_bytes": peak, "first_call_peak_bytes": cold, "seconds": statistics.median(times)}
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["seconds"]
    lines = [
        f"# autojac under memory budgets: {problem.name} (large), {problem.kind}",
        "",
        f"Machine: {machine_text(device)}. Date: {time.strftime('%Y-%m-%d')}. Unchunked need: "
        f"{need / 2**20:.1f} MiB (the least of the vmap methods); the smallest plan needs {smallest / 2**20:.1f} MiB.",
        "",
        "| budget | need / budget | plan | estimated peak | measured peak extra | within budget | first call in a fresh process | time | vs no budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    def mib(n):
        return "–" if n is None else f"{n / 2**20:.1f} MiB"

    for r in rows:
        b = r["budget_bytes"]
        held = "–" if b is None or r["peak_bytes"] is None else ("yes" if r["peak_bytes"] <= b else "**no**")
        lines.append(
            f"| {'default' if b is None else mib(b)} | {'–' if b is None else f'{need / b:.1f}x'} | {r['plan']} | "
            f"{mib(r['estimated_peak_bytes'])} | {mib(r['peak_bytes'])} | {held} | {mib(r['first_call_peak_bytes'])} | {r['seconds'] * 1e3:.1f} ms | {r['seconds'] / base:.2f}x |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = machine_name(device) + "-budgets"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
