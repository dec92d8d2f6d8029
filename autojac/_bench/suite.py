"""Running the whole suite and writing the markdown report (with the planning issue's acceptance), the raw
JSON and the plots."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import psutil
import torch

from .contestants import CONTESTANTS
from .measure import SETTLE_CALLS, WARM_CALLS, closure_loops, rss_peak, time_problem, tracked_peak
from .problems import BY_NAME as PROBLEMS_BY_NAME
from .problems import PROBLEMS

QUICK_PROBLEMS = ["classifier", "decoder", "transformer", "custom_function", "tiny", "tuple_inputs"]
QUICK_CONTESTANTS = ["autojac", "autojac @1/4 mem", "autojac reverse/vmap", "autojac forward/vmap",
                     "func.jacrev", "func.jacfwd", "autograd loop", "autograd vec rev", "seed repeat-trick"]
CLOSURE_PROBLEMS = ["classifier", "decoder", "robot_arm", "transformer", "ode_rollout", "pde_residual", "tiny",
                    "tuple_inputs"]
"""Closure loops run on those of these that the run includes (quick: classifier, decoder, transformer, tiny,
tuple_inputs)."""
CLOSURE_STEPS = 20

FIRST_CALL_RATIO = 1.5  # acceptance 1: geomean of first call / fastest torch peer's warm call
FIRST_CALL_EACH = 3.0  # acceptance 1: on every problem, at most max(3x, peer + 1 ms)
FIRST_CALL_SLACK = 1e-3
WARM_RATIO = 1.10  # acceptance 2
EVALUATIONS_RATIO = 2.0  # acceptance 3: first call's evaluations / a warm call's
CLOSURE_RATIO = 1.2  # acceptance 4
BUDGET_FACTORS = (4, 10, 15)  # acceptance 5: need / budget

TRACKED_SECONDS = 0.05
"""In-process memory tracking (`--quick`, CPU) skips contestants slower than this per call."""

EXPECTED = {"quick": "about 3 minutes on 2 CPU cores", "full": "40-50 minutes on 2 CPU cores (less on a GPU)"}


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{psutil.cpu_count(logical=True)}core"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the architecture: memory readings differ between
    CPU vendors (the matrix kernels' workspaces), so results say which one they came from."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_text(device: torch.device) -> str:
    text = f"{cpu_model()}, {psutil.cpu_count(logical=True)} logical cores, " \
           f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host: " + text
    return text


def run_suite(quick: bool, device: torch.device, out_dir: Path, memory: str = "auto", say=print) -> list[dict]:
    problems = [p for p in PROBLEMS if not quick or p.name in QUICK_PROBLEMS]
    names = QUICK_CONTESTANTS if quick else [c.name for c in CONTESTANTS]
    sizes = ["small"] if quick else ["small", "large"]
    use_rss = memory == "rss" or (memory == "auto" and not quick and device.type == "cpu")
    stem = machine_name(device) + ("-quick" if quick else "")
    rows: list[dict] = []
    closures: list[dict] = []
    started = time.perf_counter()
    say(f"{'quick' if quick else 'full'} suite: {len(problems)} problems x {len(sizes)} size(s), {len(names)} "
        f"contestants, closure loops; expect {EXPECTED['quick' if quick else 'full']}; "
        f"results go to {out_dir / stem}.md and .json")
    for problem in problems:
        for size in sizes:
            say(f"[{time.perf_counter() - started:4.0f} s] {problem.name} ({size}) ...")
            found = time_problem(problem, size, names, device, repeats=3 if quick else 21,
                                 slow_seconds=1.0 if quick else 5.0, first_repeats=3 if quick else 7,
                                 settle_seconds=10.0 if quick else 120.0)
            for row in found:
                if "seconds" not in row:
                    continue
                if row["seconds"] > 10:
                    row["memory_error"] = "not measured: one call takes over 10 s"
                    continue
                if not use_rss and device.type == "cpu" and row["seconds"] > TRACKED_SECONDS:
                    # The tracker runs Python for every op: autograd's loop on decoder (1024 backward
                    # passes, 0.12 s) took 33 s under it, most of a quick run.
                    row["memory_error"] = f"not measured: over {TRACKED_SECONDS * 1e3:.0f} ms a call (the tracker is slow)"
                    continue
                budget = row.get("budget_bytes")
                try:
                    row["peak_bytes"] = (rss_peak(problem.name, size, row["contestant"], device, budget) if use_rss
                                         else tracked_peak(problem, size, row["contestant"], device, budget))
                    row["memory_method"] = (
                        ("CUDA allocator peak" if device.type == "cuda" else "peak RSS") + ", fresh subprocess"
                        if use_rss else ("CUDA allocator peak" if device.type == "cuda" else "live-storage tracker"))
                except Exception as exc:
                    row["memory_error"] = str(exc)[:200]
            rows.extend(found)
    if "autojac" in names:
        for name in CLOSURE_PROBLEMS:
            if name not in [p.name for p in problems]:
                continue
            for size in sizes:
                for style in ("lambda", "partial"):
                    say(f"[{time.perf_counter() - started:4.0f} s] closures: {name} ({size}), a new {style} each step ...")
                    closures.append(closure_loops(PROBLEMS_BY_NAME[name], size, device, style, steps=CLOSURE_STEPS,
                                                  repeats=3 if quick else 7))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_text(device), "device": str(device), "quick": quick,
            "wall_seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d"),
            "budgets": _budget_results(out_dir, device)}
    data = {"meta": meta, "rows": rows, "closures": closures}
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(rows, meta, closures))
    try:
        plot(rows, out_dir, stem)
        wrote = (f"wrote {out_dir / stem}.md, .json and plots ({stem}-ratios.png, {stem}-first-call.png, "
                 f"{stem}-time-vs-memory.png)")
    except ImportError:
        say("matplotlib is not installed: no plots (pip install 'autojac[bench]')")
        wrote = f"wrote {out_dir / stem}.md and .json (no plots: matplotlib is not installed)"
    say(summary_table(rows))
    say("")
    say(acceptance_table(rows, meta, closures))
    say(wrote)
    return rows


def _budget_results(out_dir: Path, device: torch.device) -> dict | None:
    """The budget sweep's results for this machine (benchmarks/budget_sweep.py writes them), if present: the
    full sweep's, else the quick one's."""
    for path in (out_dir / f"{machine_name(device)}-budgets.json", out_dir / f"{machine_name(device)}-budgets-quick.json"):
        try:
            data = json.loads(path.read_text())
            break
        except (OSError, ValueError):
            continue
    else:
        return None
    if not isinstance(data, dict) or "rows" not in data:
        return {"file": path.name, "old_format": True}
    return {"file": path.name, **data}


# --- formatting -------------------------------------------------------------------------------------

def _fmt_s(s):
    return "–" if s is None else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def _fmt_b(b):
    return "–" if b is None else f"{b / 2**20:.1f} MiB"


def _fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}x"


def _geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _verdict(ok) -> str:
    return "–" if ok is None else ("PASS" if ok else "**FAIL**")


def _problem_order(key):
    order = [p.name for p in PROBLEMS]
    return (order.index(key[0]) if key[0] in order else len(order), key[1] != "small")


# --- per problem: the figures every table reads -------------------------------------------------------

def ratios(rows: list[dict]) -> list[dict]:
    """Per problem and size: autojac's warm time (its plan after 10 calls) against the fastest torch peer
    and the fastest of the peers and autojac's explicit methods; its first call against the fastest peer's
    warm call; evaluations; settling."""
    out = []
    keys = sorted({(r["problem"], r["size"]) for r in rows}, key=_problem_order)
    for key in keys:
        group = [r for r in rows if (r["problem"], r["size"]) == key and "seconds" in r]
        auto = next((r for r in group if r["contestant"] == "autojac"), None)
        peers = [r for r in group if r["group"] == "peer"]
        others = [r for r in group if r["group"] in ("peer", "autojac-explicit")]
        seeds = [r for r in group if r["group"] == "seed"]
        best_peer = min(peers, key=lambda r: r["seconds"], default=None)
        best_any = min(others, key=lambda r: r["seconds"], default=None)
        best_seed = min(seeds, key=lambda r: r["seconds"], default=None)
        first = auto.get("first_call_seconds") if auto else None
        entry = {
            "problem": key[0], "size": key[1], "autojac": auto, "best_peer": best_peer, "best_any": best_any,
            "best_seed": best_seed,
            "vs_peer": auto["seconds"] / best_peer["seconds"] if auto and best_peer else None,
            "vs_any": auto["seconds"] / best_any["seconds"] if auto and best_any else None,
            "vs_seed": auto["seconds"] / best_seed["seconds"] if auto and best_seed else None,
            "first": first,
            "first_vs_peer": first / best_peer["seconds"] if first is not None and best_peer else None,
            "first_bar": max(FIRST_CALL_EACH * best_peer["seconds"], best_peer["seconds"] + FIRST_CALL_SLACK)
            if best_peer else None,
        }
        entry["first_ok"] = None if first is None or not best_peer else first <= entry["first_bar"]
        if auto:
            first_evals = max(auto["first_evaluations"]) if auto.get("first_evaluations") else None
            warm_evals = auto.get("evaluations")
            entry["first_evaluations"], entry["warm_evaluations"] = first_evals, warm_evals
            entry["evaluations_ratio"] = first_evals / warm_evals if first_evals is not None and warm_evals else None
            entry["exploration"] = exploration_cost(auto)
        out.append(entry)
    return out


def exploration_cost(auto: dict) -> dict | None:
    """What exploring cost: calls 2..N (N: the call at which the plan was settled, or the last one made) took
    `total`; at the settled plan's warm time they would have taken (N - 1) x that; `extra` is the
    difference and `share` its part of `total`."""
    calls, warm = auto.get("call_seconds"), auto.get("settled_seconds")
    if not calls or len(calls) < 2 or warm is None:
        return None
    total = sum(calls[1:])
    extra = total - (len(calls) - 1) * warm
    return {"total": total, "extra": extra, "share": extra / total if total > 0 else None}


# --- tables -----------------------------------------------------------------------------------------

def summary_table(rows: list[dict]) -> str:
    lines = [
        f"| problem | size | autojac plan after {WARM_CALLS} calls | autojac warm | autojac first call | fastest torch peer "
        "| warm ratio | first-call ratio | fastest of peers + autojac explicit | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ratios(rows):
        a, p, b = r["autojac"], r["best_peer"], r["best_any"]
        lines.append(
            f"| {r['problem']} | {r['size']} | {a.get('plan', '') if a else 'failed'} | {_fmt_s(a and a['seconds'])} | "
            f"{_fmt_s(r['first'])} | "
            f"{p['contestant'] + ' ' + _fmt_s(p['seconds']) if p else 'all failed'} | "
            f"{_fmt_ratio(r['vs_peer'])} | {_fmt_ratio(r['first_vs_peer'])}{'' if r['first_ok'] is not False else ' **!**'} | "
            f"{b['contestant'] + ' ' + _fmt_s(b['seconds']) if b else '–'} | {_fmt_ratio(r['vs_any'])} |"
        )
    return "\n".join(lines)


def first_call_table(rows: list[dict]) -> str:
    lines = ["| problem | size | autojac first call (median) | samples | what it ran | evaluations of f | fastest torch peer, one warm call "
             "| ratio | bar: max(3x, peer + 1 ms) | within | the peer's lone call beside each first call |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    table = ratios(rows)
    for r in table:
        a, p = r["autojac"], r["best_peer"]
        if not a or r["first"] is None:
            continue
        samples = ", ".join(_fmt_s(s) for s in a["first_call_samples"])
        ran = a["first_methods"][0] + " " + str(a["first_chunks"][0])
        lines.append(f"| {r['problem']} | {r['size']} | {_fmt_s(r['first'])} | {samples} | {ran} | "
                     f"{'/'.join(str(e) for e in a['first_evaluations'])} | "
                     f"{p['contestant'] + ' ' + _fmt_s(p['seconds']) if p else '–'} | {_fmt_ratio(r['first_vs_peer'])} | "
                     f"{_fmt_s(r['first_bar'])} | {'–' if r['first_ok'] is None else ('yes' if r['first_ok'] else '**no**')} | "
                     f"{_fmt_s(a.get('peer_single_call', {}).get('seconds'))} |")
    g = _geomean([r["first_vs_peer"] for r in table])
    lines += ["", "The ratio and the bar use the peer's warm time from the interleaved rounds (batched when under 10 ms); "
                  "the last column times that peer alone right after each first call, as the first call is timed.",
              "", f"Geometric mean of the first-call ratios over the {sum(r['first_vs_peer'] is not None for r in table)} "
                  f"problem sizes: {_fmt_ratio(g)} (acceptance: at most {FIRST_CALL_RATIO}x)."]
    return "\n".join(lines)


def settling_table(rows: list[dict]) -> str:
    lines = [f"| problem | size | plan after {WARM_CALLS} calls | settled by then | calls until settled | settled plan "
             f"| warm after {WARM_CALLS} calls | warm once settled | calls 2..N | extra over settled | share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ratios(rows):
        a = r["autojac"]
        if not a or "call_seconds" not in a:
            continue
        n = a["settle_calls"]
        calls = str(n) if a["settled"] else f"not after {n}"
        cost = r.get("exploration")
        lines.append(f"| {r['problem']} | {r['size']} | {a['plan']} | {'yes' if a['settled_at_warm_calls'] else 'no'} | "
                     f"{calls} | {a['settled_plan']} | {_fmt_s(a['seconds'])} | {_fmt_s(a.get('settled_seconds'))} | "
                     f"{_fmt_s(cost and cost['total'])} | {_fmt_s(cost and max(cost['extra'], 0.0))} | "
                     f"{_share(cost)} |")
    return "\n".join(lines)


def _share(cost) -> str:
    if not cost or cost["share"] is None:
        return "–"
    return f"{max(cost['share'], 0.0):.0%}"


def evaluations_table(rows: list[dict]) -> str:
    peer_names = [c.name for c in CONTESTANTS if c.group == "peer" and any(r["contestant"] == c.name for r in rows)]
    lines = ["| problem | size | autojac first call | autojac warm | first / warm | within 2x | "
             + " | ".join(peer_names) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(peer_names)]
    for r in ratios(rows):
        if not r["autojac"]:
            continue
        counts = []
        for name in peer_names:
            x = next((x for x in rows if (x["problem"], x["size"], x["contestant"]) == (r["problem"], r["size"], name)), {})
            counts.append(str(x["evaluations"]) if "evaluations" in x else "–")
        ratio = r.get("evaluations_ratio")
        ok = None if ratio is None else ratio <= EVALUATIONS_RATIO
        lines.append(f"| {r['problem']} | {r['size']} | {_value(r.get('first_evaluations'))} | "
                     f"{_value(r.get('warm_evaluations'))} | {_fmt_ratio(ratio)} | "
                     f"{'–' if ok is None else ('yes' if ok else '**no**')} | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def _value(x):
    return "–" if x is None else str(x)


def closures_table(closures: list[dict]) -> str:
    if not closures:
        return "(not measured)"
    lines = [f"| problem | size | new each step | autojac, {CLOSURE_STEPS} steps | plans made | evaluations of f "
             "| torch.func.jacrev | torch.func.jacfwd | ratio to the faster | within 1.2x |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in closures:
        def cell(name):
            return _fmt_s(c[f"{name}_seconds"]) if f"{name}_seconds" in c else f"failed ({c.get(f'{name}_error', '')[:60]})"
        ratio = c.get("ratio")
        lines.append(f"| {c['problem']} | {c['size']} | {c['style']} | {cell('autojac')} | {_value(c.get('planned_steps'))} | "
                     f"{_value(c.get('evaluations'))} | {cell('func.jacrev')} | {cell('func.jacfwd')} | {_fmt_ratio(ratio)} | "
                     f"{'–' if ratio is None else ('yes' if ratio <= CLOSURE_RATIO else '**no**')} |")
    return "\n".join(lines)


def budget_table(rows: list[dict]) -> str:
    """Budgeted autojac runs: the budget, the measured peak, whether it held, and the time cost."""
    lines = ["| problem | size | contestant | budget | (unchunked need + reserve) / budget | plan | peak extra memory | within budget | time | time without budget |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("budget_bytes") is None or r["group"] != "autojac":
            continue
        base = next((x for x in rows if (x["problem"], x["size"], x["contestant"]) == (r["problem"], r["size"], "autojac")), {})
        peak = r.get("peak_bytes")
        held = "–" if peak is None else ("yes" if peak <= r["budget_bytes"] else "**no**")
        # The unchunked need plus the CPU workspace reserve autojac counts against every budget (0 on CUDA).
        ratio = (r["unchunked_bytes"] + r.get("reserve_bytes", 0)) / r["budget_bytes"]
        lines.append(f"| {r['problem']} | {r['size']} | {r['contestant']} | {_fmt_b(r['budget_bytes'])} | {ratio:.1f}x | "
                     f"{r.get('plan') or r.get('error', '')} | "
                     f"{_fmt_b(peak)} | {held} | {_fmt_s(r.get('seconds'))} | {_fmt_s(base.get('seconds'))} |")
    return "\n".join(lines)


def overhead_text(rows: list[dict]) -> str:
    tiny = {r["contestant"]: r for r in rows if r["problem"] == "tiny" and r["size"] == "small" and "seconds" in r}
    if "autojac" not in tiny:
        return "(not measured)"
    direct = [tiny[n] for n in ("func.jacrev", "func.jacfwd") if n in tiny]
    if not direct:
        return "(torch.func not measured)"
    best = min(direct, key=lambda r: r["seconds"])
    return (f"A warm autojac call (its plan after {WARM_CALLS} calls) took {_fmt_s(tiny['autojac']['seconds'])} against "
            f"{_fmt_s(best['seconds'])} for the faster direct torch.func call ({best['contestant']}): "
            f"{tiny['autojac']['seconds'] / best['seconds']:.2f}x.")


# --- acceptance ---------------------------------------------------------------------------------------

def _where(r) -> str:
    return f"{r['problem']} {r['size']}"


def acceptance(rows: list[dict], meta: dict, closures: list[dict]) -> list[dict]:
    """The planning issue's acceptance items, each with the measured figure and a verdict (None: not measured)."""
    table = ratios(rows)
    items = []

    firsts = [r for r in table if r["first_vs_peer"] is not None]
    if firsts:
        g = _geomean([r["first_vs_peer"] for r in firsts])
        worst = max(firsts, key=lambda r: r["first_vs_peer"])
        broken = [r for r in firsts if not r["first_ok"]]
        figure = (f"geomean {g:.2f}x over {len(firsts)} problem sizes; worst {worst['first_vs_peer']:.2f}x "
                  f"({_where(worst)}: {_fmt_s(worst['first'])} against {_fmt_s(worst['best_peer']['seconds'])}); "
                  f"{len(broken)} over max(3x, peer + 1 ms)" + (f": {', '.join(_where(r) for r in broken)}" if broken else ""))
        items.append({"item": 1, "text": "First call (fresh plan, process warm) <= 1.5x one call of the fastest torch peer "
                      "(geomean), <= max(3x, peer + 1 ms) on every problem", "figure": figure,
                      "ok": g <= FIRST_CALL_RATIO and not broken})
    else:
        items.append({"item": 1, "text": "First call", "figure": "not measured", "ok": None})

    warm = [r for r in table if r["vs_any"] is not None]
    autos = [r["autojac"] for r in table if r["autojac"] and "settle_calls" in r["autojac"]]
    if warm:
        worst = max(warm, key=lambda r: r["vs_any"])
        broken = [r for r in warm if r["vs_any"] > WARM_RATIO]
        settle = sorted(a["settle_calls"] for a in autos if a["settled"])
        unsettled = [a for a in autos if not a["settled"]]
        figure = (f"after {WARM_CALLS} calls: worst {worst['vs_any']:.2f}x ({_where(worst)}, against "
                  f"{worst['best_any']['contestant']}); geomean {_geomean([r['vs_any'] for r in warm]):.2f}x; "
                  f"{len(broken)} over {WARM_RATIO}x" + (f": {', '.join(_where(r) for r in broken)}" if broken else "")
                  + (f". Plans settled after {settle[len(settle) // 2] if settle else '–'} calls (median; "
                     f"max {settle[-1] if settle else '–'}); {sum(a['settled_at_warm_calls'] for a in autos)} of {len(autos)} "
                     f"settled within {WARM_CALLS}" + (f"; {len(unsettled)} not settled within the cap" if unsettled else "")
                     if autos else ""))
        items.append({"item": 2, "text": f"Warm, after {WARM_CALLS} calls: within {WARM_RATIO}x of the fastest of the torch "
                      "peers and autojac's explicit methods on every problem", "figure": figure, "ok": not broken})
    else:
        items.append({"item": 2, "text": "Warm", "figure": "not measured", "ok": None})

    evals = [r for r in table if r.get("evaluations_ratio") is not None]
    if evals:
        worst = max(evals, key=lambda r: r["evaluations_ratio"])
        broken = [r for r in evals if r["evaluations_ratio"] > EVALUATIONS_RATIO]
        figure = (f"worst {worst['first_evaluations']} against {worst['warm_evaluations']} ({_where(worst)}); "
                  f"{len(broken)} over {EVALUATIONS_RATIO:g}x; torch's peers: "
                  f"{_torch_evaluations(rows)}")
        items.append({"item": 3, "text": "Evaluations of f: a first call at most 2x a warm call's", "figure": figure,
                      "ok": not broken})
    else:
        items.append({"item": 3, "text": "Evaluations of f", "figure": "not measured", "ok": None})

    measured = [c for c in closures if c.get("ratio") is not None]
    if measured:
        worst = max(measured, key=lambda c: c["ratio"])
        broken = [c for c in measured if c["ratio"] > CLOSURE_RATIO]
        failed = [c for c in closures if c.get("ratio") is None]
        figure = (f"{len(measured)} loops of {CLOSURE_STEPS} steps; worst {worst['ratio']:.2f}x ({_where(worst)}, "
                  f"{worst['style']}); geomean {_geomean([c['ratio'] for c in measured]):.2f}x; {len(broken)} over "
                  f"{CLOSURE_RATIO}x" + (f"; {len(failed)} not compared (a failure)" if failed else ""))
        items.append({"item": 4, "text": f"Closures: {CLOSURE_STEPS} steps with a new lambda / partial each step <= "
                      f"{CLOSURE_RATIO}x the same loop with torch.func", "figure": figure,
                      "ok": not broken and not failed})
    else:
        items.append({"item": 4, "text": "Closures", "figure": "not measured", "ok": None})

    items.append(_budget_item(meta.get("budgets")))
    if str(meta.get("device", "cpu")).startswith("cuda"):
        items.append({"item": 6, "text": "On a GPU: the same tables on CUDA", "figure": "this file", "ok": True})
    else:
        items.append({"item": 6, "text": "On a GPU: the same tables on CUDA",
                      "figure": "not measured here (a CPU run): `autojac bench --device cuda` and "
                                "`python benchmarks/budget_sweep.py --device cuda` write their own files", "ok": None})
    return items


def _torch_evaluations(rows) -> str:
    counts = {}
    for r in rows:
        if r["group"] == "peer" and "evaluations" in r:
            counts.setdefault(r["contestant"], set()).add(r["evaluations"])
    return ", ".join(f"{n} {'/'.join(map(str, sorted(v)))}" for n, v in counts.items()) or "–"


def _budget_item(budgets: dict | None) -> dict:
    text = "Budget: first calls in fresh processes at 4x, 10x and 15x below the unchunked need all within budget"
    if not budgets:
        return {"item": 5, "text": text, "figure": "not measured: run `python benchmarks/budget_sweep.py` first "
                "(it writes <machine>-budgets.json, which this report reads)", "ok": None}
    if budgets.get("old_format"):
        return {"item": 5, "text": text, "figure": f"{budgets['file']} is from an older sweep; rerun "
                "`python benchmarks/budget_sweep.py`", "ok": None}
    swept = [r for r in budgets["rows"] if r.get("target_factor") in BUDGET_FACTORS]
    held = [r for r in swept if r.get("first_within")]
    unknown = [r for r in swept if r.get("first_within") is None]
    parts = []
    for r in swept:
        first = r.get("first") or {}
        est = first.get("estimated_peak_bytes")
        if "error" in r:
            parts.append(f"{r['factor']:.1f}x ({_fmt_b(r['budget_bytes'])}): raised {r['error'].split(':')[0]}")
            continue
        parts.append(f"{r['factor']:.1f}x: {_fmt_b(first.get('extra_bytes'))} of {_fmt_b(r['budget_bytes'])}"
                     f" (estimated {_fmt_b(est) if est is not None else 'none'})")
    meta = budgets.get("meta", {})
    figure = (f"{budgets['file']} ({meta.get('problem', '?')} {meta.get('size', '')}, {meta.get('date', '?')}): "
              f"{len(held)} of {len(swept)} first calls within budget; " + "; ".join(parts))
    ok = None if unknown or not swept else len(held) == len(swept)
    return {"item": 5, "text": text, "figure": figure, "ok": ok}


def acceptance_table(rows: list[dict], meta: dict, closures: list[dict]) -> str:
    lines = ["| # | acceptance | measured | result |", "|---|---|---|---|"]
    for a in acceptance(rows, meta, closures):
        lines.append(f"| {a['item']} | {a['text']} | {a['figure']} | {_verdict(a['ok'])} |")
    return "\n".join(lines)


# --- the report ---------------------------------------------------------------------------------------

def regenerate(json_path: Path) -> None:
    """Rewrite the markdown and plots from a results JSON (after changing the report, not the measurements)."""
    data = json.loads(json_path.read_text())
    stem = json_path.stem
    (json_path.parent / f"{stem}.md").write_text(markdown(data["rows"], data["meta"], data.get("closures", [])))
    plot(data["rows"], json_path.parent, stem)


def markdown(rows: list[dict], meta: dict, closures: list[dict] | None = None) -> str:
    closures = closures or []
    memory = next((r["memory_method"] for r in rows if "memory_method" in r), "not measured")
    parts = [
        f"# autojac benchmark results{' (quick)' if meta['quick'] else ''}",
        "",
        f"Machine: {meta['machine']}. Device: `{meta['device']}`. Date: {meta['date']}. "
        f"Suite wall time: {meta['wall_seconds']:.0f} s.",
        "",
        ("**Quick run**: 3 rounds per contestant and 3 first calls per problem; the figures show that the "
         "benchmark works, not how fast autojac is. " if meta["quick"] else "")
        + f"Warm times are medians of interleaved rounds; autojac's is the plan it holds after exactly {WARM_CALLS} "
        "calls, run frozen (`jacobian(f, x, plan=p)`). A first call is autojac's call right after "
        "`autojac.clear_cache()` on a warm process (median of several), against one warm call of the fastest "
        "torch peer. Ratio = autojac time / the other's (below 1: autojac is faster). Memory is the peak extra "
        f"memory of one warm call ({memory}). See benchmarks/README.md for the method.",
        "",
        "## Acceptance (the planning issue)",
        "",
        acceptance_table(rows, meta, closures),
        "",
        "## Summary: warm and first calls",
        "",
        summary_table(rows),
        "",
        "**!**: a first call over max(3x, peer + 1 ms). Seeds are not part of the bar; the fastest seed method is in "
        "the tables per problem below.",
        "",
        "## First calls",
        "",
        first_call_table(rows),
        "",
        "## Settling",
        "",
        f"Calls of `autojac.jacobian(f, x)` from a fresh plan until `autojac.plan(f, x).settled` (at most "
        f"{SETTLE_CALLS}, and a time cap); each call timed on its own. \"Warm once settled\" is the settled plan's "
        "plain `jacobian(f, x)` call in the same interleaved rounds. Exploration's cost: the time of calls 2..N "
        "beyond (N - 1) x the settled warm time, and that as a share of calls 2..N.",
        "",
        settling_table(rows),
        "",
        "## Evaluations of f",
        "",
        f"autojac's counts are `last_report().evaluations` (first call: the most over the first-call samples; warm: "
        f"the plan after {WARM_CALLS} calls); torch's come from a counting wrapper around `f`, one call each (a "
        "vmapped evaluation counts once).",
        "",
        evaluations_table(rows),
        "",
        "## Closures rebuilt every step",
        "",
        f"A loop of {CLOSURE_STEPS} steps; each builds a new `lambda *xs: f(*xs) - target` (or "
        "`functools.partial(shifted, f, target)`) capturing a fresh target tensor, and computes its Jacobian once. "
        "autojac starts each loop from `clear_cache()`, so its first step plans. Median of interleaved loops.",
        "",
        closures_table(closures),
        "",
        "## Memory budgets in the suite",
        "",
        budget_table(rows),
        "",
        "## Overhead on the 3 -> 3 function",
        "",
        overhead_text(rows),
        "",
        "## Every contestant",
    ]
    for r in ratios(rows):
        group = [x for x in rows if (x["problem"], x["size"]) == (r["problem"], r["size"])]
        fastest = min((x["seconds"] for x in group if "seconds" in x), default=None)
        parts += ["", f"### {r['problem']} ({r['size']})", "",
                  "| contestant | time | first call in this run | evaluations of f | peak extra memory | note |",
                  "|---|---|---|---|---|---|"]
        for x in group:
            mark = " **(fastest)**" if x.get("seconds") == fastest else ""
            note = x.get("error") or x.get("plan", "")
            if x.get("budget_bytes"):
                note += f" (budget {_fmt_b(x['budget_bytes'])})"
            parts.append(f"| {x['contestant']}{mark} | {_fmt_s(x.get('seconds'))} | {_fmt_s(x.get('first_seconds'))} | "
                         f"{_value(x.get('evaluations'))} | {_fmt_b(x.get('peak_bytes'))} | {note} |")
    return "\n".join(parts) + "\n"


def plot(rows: list[dict], out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = ratios(rows)
    labels = [f"{r['problem']}\n{r['size']}" for r in table]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar(range(len(table)), [r["vs_any"] or 0 for r in table], color="tab:blue",
           label="vs fastest of peers + autojac explicit")
    ax.scatter(range(len(table)), [r["vs_peer"] or float("nan") for r in table], color="tab:red", zorder=3, label="vs fastest torch API")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(WARM_RATIO, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(table)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("autojac time / fastest time")
    ax.set_title(f"autojac warm (its plan after {WARM_CALLS} calls) against the fastest alternative; below 1 is faster")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}-ratios.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    firsts = [r["first_vs_peer"] or 0 for r in table]
    colors = ["tab:orange" if r["first_ok"] is not False else "tab:red" for r in table]
    ax.bar(range(len(table)), firsts, color=colors, label="first call / fastest torch peer's warm call")
    bars = [r["first_bar"] / r["best_peer"]["seconds"] if r["first_bar"] else float("nan") for r in table]
    ax.scatter(range(len(table)), bars, marker="_", s=200, color="black", zorder=3, label="bar: max(3x, peer + 1 ms)")
    g = _geomean([r["first_vs_peer"] for r in table])
    ax.axhline(FIRST_CALL_RATIO, color="gray", lw=0.8, ls="--", label=f"geomean bar {FIRST_CALL_RATIO}x")
    if g:
        ax.axhline(g, color="tab:orange", lw=0.8, ls=":", label=f"geomean {g:.2f}x")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(table)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("first call / peer (log)")
    ax.set_title("autojac's first call (no plan yet, process warm) against one warm call of the fastest torch peer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}-first-call.png", dpi=110)
    plt.close(fig)

    keys = [(r["problem"], r["size"]) for r in table]
    cols = 4
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(4 * cols, 3.2 * -(-len(keys) // cols)), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        group = [x for x in rows if (x["problem"], x["size"]) == key and "seconds" in x and x.get("peak_bytes") is not None]
        auto = sorted([x for x in group if x["group"] == "autojac"], key=lambda x: x["peak_bytes"])
        others = [x for x in group if x["group"] != "autojac"]
        def mib(x):  # RSS moves in pages: show anything below one page at one page
            return max(x["peak_bytes"], 4096) / 2**20

        for x in others:
            ax.scatter(mib(x), x["seconds"] * 1e3, s=12,
                       color={"peer": "tab:red", "seed": "tab:green"}.get(x["group"], "tab:gray"))
        if auto:
            ax.plot([mib(x) for x in auto], [x["seconds"] * 1e3 for x in auto], "o-", color="tab:blue")
            for x in auto:
                if x.get("budget_bytes"):
                    ax.axvline(x["budget_bytes"] / 2**20, color="tab:blue", lw=0.6, ls=":")
        ax.set_title(f"{key[0]} ({key[1]})", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("peak extra MiB", fontsize=7)
        ax.set_ylabel("ms", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("Time against peak extra memory: autojac at default and tighter budgets (blue line; budgets dotted), "
                 "torch APIs (red), seed methods (green), autojac explicit methods (gray)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out_dir / f"{stem}-time-vs-memory.png", dpi=100)
    plt.close(fig)
