"""Peak memory and time of autojac's first call (and later calls) under memory budgets far below the
unchunked need, each budget in a fresh process (CPU or CUDA).

    python benchmarks/budget_sweep.py [--device cuda] [--out benchmarks/results] [--quick]

The unchunked need is measured as the budget is judged: the peak extra memory of one warm call that
computes the whole Jacobian at once by vmap in the mode with fewer passes (the engine autojac's
rules pick), in a fresh process (CPU: peak RSS over the RSS before the call, MALLOC_MMAP_THRESHOLD_=131072;
CUDA: the allocator's peak over what was allocated before). Budgets are that need / 4, / 10 and / 15
(never below what the smallest plan, one vector at a time, needs +5%: the table says the factor
reached), plus the default budget. For each, a fresh process runs autojac's first call under that
budget, then a few later calls, each measured the same way; the peaks are right although autojac resets
the kernel's and the allocator's peak counters inside its calls (see `ProcessPeak` in
autojac/_bench/measure.py). Writes <machine>-budgets.md and .json, which `autojac bench` reads for its
acceptance summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from autojac._bench.measure import child_process
from autojac._bench.problems import BY_NAME
from autojac._bench.suite import machine_name, machine_text

FACTORS = [None, 4, 10, 15]  # need / budget; None: the default budget


def mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def ms(s) -> str:
    return "–" if s is None else (f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--problem", default="wide_mlp")
    parser.add_argument("--size", default="large", help="large (default); small (too small: its forward pass "
                        "and result alone are near budgets 4x below its need); gpu (for --device cuda: an "
                        "unchunked need of about 2 GiB, 8 GiB of weights, so that budgets 15x below it stay far "
                        "above the cuBLAS workspace a fresh process's first matmul allocates)")
    parser.add_argument("--warm-calls", type=int, default=None, help="later calls measured after the first (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one later call per budget instead of 3: checks that the script works")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"budget_sweep: --device {args.device} needs CUDA, but torch {torch.__version__} sees no CUDA device")
    size = args.size
    warm_calls = args.warm_calls if args.warm_calls is not None else (1 if args.quick else 3)
    problem = BY_NAME[args.problem]
    out = Path(args.out)
    stem = machine_name(device) + "-budgets" + ("-quick" if args.quick else "")
    print(f"writing {(out / stem).resolve()}.md and .json; expect "
          f"{'under a minute' if size == 'small' else 'a few minutes on a GPU' if size == 'gpu' else ('about 3' if args.quick else 'about 5') + ' minutes on 2 CPU cores'}",
          flush=True)
    started = time.perf_counter()

    need_facts = child_process(["need", problem.name, size, str(device)], timeout=1800)
    if need_facts is None or not need_facts["vmap"]:
        sys.exit("budget_sweep: measuring the unchunked need in a fresh process failed")
    need = min(need_facts["vmap"].values())
    smallest = need_facts["smallest"]
    print(f"unchunked need {mib(need)} ({', '.join(f'{k} {mib(v)}' for k, v in need_facts['vmap'].items())}); "
          f"smallest plan {mib(smallest)}", flush=True)

    rows, budgets = [], []
    for factor in FACTORS:
        budget = None if factor is None else max(int(need / factor), int(smallest * 1.05))
        if budget is not None and budget in budgets:
            continue  # a factor below the smallest plan: already swept at the smallest
        budgets.append(budget)
        facts = child_process(["budget", problem.name, size, str(device), str(budget or ""), str(warm_calls)],
                              timeout=3600)
        row = {"target_factor": factor, "budget_bytes": budget, "factor": None if budget is None else need / budget}
        if facts is None:
            row["error"] = ("the fresh process crashed: rerun `python -m autojac._bench.measure budget "
                            f"{problem.name} {size} {device} {budget or ''} {warm_calls}` to see why")
            rows.append(row)
            print(row, flush=True)
            continue
        if "error" in facts["calls"][0]:
            row.update(error=facts["calls"][0]["error"], first=facts["calls"][0], first_within=False)
            rows.append(row)
            print(f"budget {mib(budget)}: the first call raised {row['error']}", flush=True)
            continue
        warm_errors = [c["error"] for c in facts["calls"][1:] if "error" in c]
        if warm_errors:
            row["warm_error"] = warm_errors[0]
        first, warm = facts["calls"][0], [c for c in facts["calls"][1:] if "error" not in c]
        limit = budget if budget is not None else first["budget_bytes"]  # the default resolves to a number
        row.update(first=first, warm=warm, limit_bytes=limit)
        row["first_within"] = None if first["extra_bytes"] is None or limit is None else first["extra_bytes"] <= limit
        peaks = [c["extra_bytes"] for c in warm if c["extra_bytes"] is not None]
        row["warm_peak_bytes"] = max(peaks) if peaks else None
        row["warm_within"] = None if not peaks or limit is None else max(peaks) <= limit
        row["warm_seconds"] = statistics.median(c["seconds"] for c in warm) if warm else None
        rows.append(row)
        print(f"budget {mib(budget) if budget else 'default'}: first call {ms(first['seconds'])}, peak {mib(first['extra_bytes'])}, "
              f"estimated {mib(first['estimated_peak_bytes'])}, chunks {first['chunk_sizes'][:6]}"
              f"{'...' if len(first['chunk_sizes']) > 6 else ''}", flush=True)

    meta = {"problem": problem.name, "size": size, "kind": problem.kind, "machine": machine_text(device),
            "device": str(device), "date": time.strftime("%Y-%m-%d"), "need_bytes": need, "need_by_method": need_facts["vmap"],
            "smallest_bytes": smallest,
            "warm_calls": warm_calls, "quick": args.quick, "wall_seconds": time.perf_counter() - started}
    text = report(rows, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(text)
    print(f"wrote {(out / stem).resolve()}.md and .json in {meta['wall_seconds']:.0f} s")


def report(rows: list[dict], meta: dict) -> str:
    base = next((r.get("warm_seconds") for r in rows if r["target_factor"] is None), None)
    swept = [r for r in rows if r["target_factor"] is not None]
    held = [r for r in swept if r.get("first_within")]
    lines = [
        f"# autojac under memory budgets: {meta['problem']} ({meta['size']}), {meta['kind']}",
        "",
        f"Machine: {meta['machine']}. Device: `{meta['device']}`. Date: {meta['date']}. Wall time: {meta['wall_seconds']:.0f} s.",
        "",
        f"Unchunked need: {mib(meta['need_bytes'])}, the whole Jacobian at once by vmap "
        f"({', '.join(f'{k} {mib(v)}' for k, v in meta['need_by_method'].items())}), measured as the budgets are judged: "
        f"the peak extra {'allocated bytes' if meta['device'].startswith('cuda') else 'RSS'} of one warm call in a fresh "
        f"process. The smallest plan (one vector at a time) needs {mib(meta['smallest_bytes'])}. Against every budget "
        "autojac counts the result and the forward pass, and on the CPU an eighth of the budget (at most 8 MiB) for memory "
        "no region measures (the check's reference VJP, kernels' first-use pages and workspaces).",
        "",
        f"**Acceptance 5** (first calls in fresh processes at 4x, 10x and 15x below the unchunked need, all within budget): "
        f"{len(held)} of {len(swept)} within budget: **{'PASS' if swept and len(held) == len(swept) else 'FAIL'}**.",
        "",
        "Each budget runs in a fresh process: its first call (the plan is made there, with the process's one-time "
        f"set-up), then {meta['warm_calls']} later call(s) (which may try an alternative method on a slice while the "
        "plan is not settled). Peak = peak extra memory over the memory before the call (on the CPU, peak RSS: it "
        "also counts the file-backed pages of kernel code a fresh process runs for the first time, shared and clean; "
        "\"kernel code first run\" is how much those grew during the call, so peak minus it bounds the growth of "
        "anonymous memory from below). Estimated = "
        "`autojac.plan(f, x).estimated_peak_bytes` after the call: the plan's own prediction from the chunk peaks it "
        "measured (none when it measured nothing: the prior said the whole basis fits, so no chunk was metered).",
        "",
        "| budget | need / budget | first call: plan | chunk sizes | evaluations | estimated peak | measured peak "
        "| measured / estimated | of it, kernel code first run | within budget | time | later calls: peak | within | time | vs default |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["budget_bytes"]
        label = "default" + (f" ({mib(r.get('limit_bytes'))})" if r.get("limit_bytes") else "") if b is None else mib(b)
        factor = "–" if b is None else f"{r['factor']:.1f}x"
        if "error" in r:
            lines.append(f"| {label} | {factor} | {r['error']} |" + " |" * 12)
            continue
        first = r["first"]
        est, peak = first["estimated_peak_bytes"], first["extra_bytes"]
        chunks = first["chunk_sizes"]
        chunk_text = (str(chunks) if len(chunks) <= 8 else
                      f"{len(chunks)} chunks: {chunks[:4]} ... {chunks[-2:]}".replace("] ... [", ", ..., "))
        ratio = "–" if est is None or peak is None or est == 0 else f"{peak / est:.2f}"
        vs = "–" if base is None or r.get("warm_seconds") is None else f"{r['warm_seconds'] / base:.2f}x"
        lines.append(
            f"| {label} | {factor} | {first['plan']} ({first['n_chunks']} chunks) | "
            f"{chunk_text} | {first['evaluations']} | {mib(est) if est is not None else 'none (nothing measured)'} | "
            f"{mib(peak)} | {ratio} | {mib(first.get('file_bytes'))} | {_yes(r['first_within'])} | {ms(first['seconds'])} | "
            f"{mib(r.get('warm_peak_bytes'))} | {_yes(r.get('warm_within'))} | {ms(r.get('warm_seconds'))} | {vs} |")
    lines += ["", "Later calls: what each did (method, chunks, trial):", ""]
    for r in rows:
        if r.get("warm_error"):
            lines.append(f"- {mib(r['budget_bytes']) if r['budget_bytes'] else 'default'}: a later call raised {r['warm_error']}")
        for i, c in enumerate(r.get("warm", []), 2):
            lines.append(f"- {mib(r['budget_bytes']) if r['budget_bytes'] else 'default'}, call {i}: {c['method']}, "
                         f"{len(c['chunk_sizes'])} chunk(s), {mib(c['extra_bytes'])}, {ms(c['seconds'])}"
                         + (f"; tried {c['trial']}" if c.get("trial") else "") + (f"; {'; '.join(c['events'])}" if c.get("events") else ""))
    return "\n".join(lines) + "\n"


def _yes(ok) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


if __name__ == "__main__":
    main()
