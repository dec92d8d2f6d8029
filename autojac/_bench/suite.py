"""Running the whole suite and writing the markdown table, the raw JSON and the plots."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import psutil
import torch

from .contestants import CONTESTANTS
from .measure import rss_peak, time_problem, tracked_peak
from .problems import PROBLEMS

QUICK_PROBLEMS = ["classifier", "decoder", "transformer", "custom_function", "tiny", "tuple_inputs"]
QUICK_CONTESTANTS = ["autojac", "autojac @1/4 mem", "autojac reverse/vmap", "autojac forward/vmap",
                     "func.jacrev", "func.jacfwd", "autograd loop", "autograd vec rev", "seed repeat-trick"]


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{psutil.cpu_count(logical=True)}core"


def machine_text(device: torch.device) -> str:
    text = f"{platform.processor() or platform.machine()}, {psutil.cpu_count(logical=True)} logical cores, " \
           f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host: " + text
    return text


def run_suite(quick: bool, device: torch.device, out_dir: Path, memory: str = "auto", say=print) -> list[dict]:
    problems = [p for p in PROBLEMS if not quick or p.name in QUICK_PROBLEMS]
    names = QUICK_CONTESTANTS if quick else [c.name for c in CONTESTANTS]
    sizes = ["small"] if quick else ["small", "large"]
    use_rss = memory == "rss" or (memory == "auto" and not quick and device.type == "cpu")
    rows: list[dict] = []
    started = time.perf_counter()
    for problem in problems:
        for size in sizes:
            say(f"{problem.name} ({size}) ...")
            found = time_problem(problem, size, names, device, repeats=3 if quick else 21,
                                 slow_seconds=1.0 if quick else 5.0)
            for row in found:
                if "seconds" not in row:
                    continue
                if row["seconds"] > 10:
                    row["memory_error"] = "not measured: one call takes over 10 s"
                    continue
                budget = row.get("budget_bytes")
                try:
                    row["peak_bytes"] = (rss_peak(problem.name, size, row["contestant"], device, budget) if use_rss
                                         else tracked_peak(problem, size, row["contestant"], device, budget))
                    row["memory_method"] = "peak RSS, fresh subprocess" if use_rss else (
                        "CUDA max_memory_allocated" if device.type == "cuda" else "live-storage tracker")
                except Exception as exc:
                    row["memory_error"] = str(exc)[:200]
            rows.extend(found)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = machine_name(device) + ("-quick" if quick else "")
    meta = {"machine": machine_text(device), "device": str(device), "quick": quick,
            "wall_seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d")}
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(rows, meta))
    try:
        plot(rows, out_dir, stem)
        wrote = f"wrote {out_dir / stem}.md, .json and plots ({stem}-ratios.png, {stem}-time-vs-memory.png)"
    except ImportError:
        say("matplotlib is not installed: no plots (pip install 'autojac[bench]')")
        wrote = f"wrote {out_dir / stem}.md and .json (no plots: matplotlib is not installed)"
    say(summary_table(rows))
    say(wrote)
    return rows


def _fmt_s(s):
    return "–" if s is None else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def _fmt_b(b):
    return "–" if b is None else f"{b / 2**20:.1f} MiB"


def _fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}x"


def ratios(rows: list[dict]) -> list[dict]:
    """Per problem and size: autojac's time against the fastest peer and the fastest explicit method."""
    out = []
    keys = sorted({(r["problem"], r["size"]) for r in rows}, key=lambda k: ([p.name for p in PROBLEMS].index(k[0]), k[1] != "small"))
    for key in keys:
        group = [r for r in rows if (r["problem"], r["size"]) == key and "seconds" in r]
        auto = next((r for r in group if r["contestant"] == "autojac"), None)
        peers = [r for r in group if r["group"] == "peer"]
        explicit = [r for r in group if r["group"] in ("peer", "autojac-explicit", "seed")]
        best_peer = min(peers, key=lambda r: r["seconds"], default=None)
        best_any = min(explicit, key=lambda r: r["seconds"], default=None)
        out.append({
            "problem": key[0], "size": key[1], "autojac": auto, "best_peer": best_peer, "best_any": best_any,
            "vs_peer": auto["seconds"] / best_peer["seconds"] if auto and best_peer else None,
            "vs_any": auto["seconds"] / best_any["seconds"] if auto and best_any else None,
        })
    return out


def summary_table(rows: list[dict]) -> str:
    lines = [
        "| problem | size | autojac plan | autojac | fastest torch peer | ratio | fastest of all others | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ratios(rows):
        a, p, b = r["autojac"], r["best_peer"], r["best_any"]
        lines.append(
            f"| {r['problem']} | {r['size']} | {a.get('plan', '') if a else 'failed'} | {_fmt_s(a and a['seconds'])} | "
            f"{p['contestant'] + ' ' + _fmt_s(p['seconds']) if p else 'all failed'} | "
            f"{_fmt_ratio(r['vs_peer'])} | "
            f"{b['contestant'] + ' ' + _fmt_s(b['seconds']) if b else '–'} | {_fmt_ratio(r['vs_any'])} |"
        )
    return "\n".join(lines)


def budget_table(rows: list[dict]) -> str:
    """Budgeted autojac runs: the budget, the measured peak, whether it held, and the time cost."""
    lines = ["| problem | size | budget | unchunked need / budget | plan | peak extra memory | within budget | time | time without budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("budget_bytes") is None or r["group"] != "autojac":
            continue
        base = next((x for x in rows if (x["problem"], x["size"], x["contestant"]) == (r["problem"], r["size"], "autojac")), {})
        peak = r.get("peak_bytes")
        held = "–" if peak is None else ("yes" if peak <= r["budget_bytes"] else "**no**")
        ratio = r["unchunked_bytes"] / r["budget_bytes"]
        lines.append(f"| {r['problem']} | {r['size']} | {_fmt_b(r['budget_bytes'])} | {ratio:.1f}x | {r.get('plan') or r.get('error', '')} | "
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
    return (f"A cached autojac call took {_fmt_s(tiny['autojac']['seconds'])} against {_fmt_s(best['seconds'])} "
            f"for the faster direct torch.func call ({best['contestant']}): "
            f"{tiny['autojac']['seconds'] / best['seconds']:.2f}x.")


def regenerate(json_path: Path) -> None:
    """Rewrite the markdown and plots from a results JSON (after changing the report, not the measurements)."""
    data = json.loads(json_path.read_text())
    stem = json_path.stem
    (json_path.parent / f"{stem}.md").write_text(markdown(data["rows"], data["meta"]))
    plot(data["rows"], json_path.parent, stem)


def markdown(rows: list[dict], meta: dict) -> str:
    parts = [
        f"# autojac benchmark results{' (quick)' if meta['quick'] else ''}",
        "",
        f"Machine: {meta['machine']}. Device: `{meta['device']}`. Date: {meta['date']}. "
        f"Suite wall time: {meta['wall_seconds']:.0f} s.",
        "",
        "Times are medians of interleaved runs after a warm-up call (autojac's plan is cached by then); "
        "ratio = autojac time / fastest contestant's time (below 1: autojac is faster). "
        "Memory is the peak extra memory of one warm call "
        f"({next((r['memory_method'] for r in rows if 'memory_method' in r), 'not measured')}).",
        "",
        "## Summary",
        "",
        summary_table(rows),
        "",
        "## Memory budgets",
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
        parts += ["", f"### {r['problem']} ({r['size']})", "", "| contestant | time | first call | peak extra memory | note |", "|---|---|---|---|---|"]
        for x in group:
            mark = " **(fastest)**" if x.get("seconds") == fastest else ""
            note = x.get("error") or x.get("plan", "")
            if x.get("budget_bytes"):
                note += f" (budget {_fmt_b(x['budget_bytes'])})"
            parts.append(f"| {x['contestant']}{mark} | {_fmt_s(x.get('seconds'))} | {_fmt_s(x.get('first_seconds'))} | "
                         f"{_fmt_b(x.get('peak_bytes'))} | {note} |")
    return "\n".join(parts) + "\n"


def plot(rows: list[dict], out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = ratios(rows)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['problem']}\n{r['size']}" for r in table]
    ax.bar(range(len(table)), [r["vs_any"] or 0 for r in table], color="tab:blue", label="vs fastest of all others")
    ax.scatter(range(len(table)), [r["vs_peer"] or float("nan") for r in table], color="tab:red", zorder=3, label="vs fastest torch API")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.1, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(table)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("autojac time / fastest time")
    ax.set_title("autojac (auto, cached plan) against the fastest alternative; below 1 is faster")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}-ratios.png", dpi=110)
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
