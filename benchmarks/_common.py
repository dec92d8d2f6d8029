"""What benchmarks/structured.py and benchmarks/habits.py share: contestants, interleaved timing, autojac's
warm / first-call / settling protocol, peak memory (fresh subprocesses or in process), correctness checks,
and small formatting helpers.

The protocol is the suite's (autojac/_bench/measure.py, described in benchmarks/README.md):

- warm time: the median of interleaved rounds, each round in a new shuffled order (seeded); calls under
  10 ms are timed in batches (like timeit's autorange); CUDA is synchronized around every timing. An
  autojac contestant first makes exactly WARM_CALLS calls from a fresh plan; the rounds then time the plan
  it holds after them, frozen (`jacobian(..., plan=p)`: no exploration), and separately its plain call once
  its plan has settled.
- settling: after the WARM_CALLS calls, autojac is called on until its plan reports `settled` (at most
  SETTLE_CAP calls in all, and a time cap); the count is the first call after which it was settled.
- first call: `autojac.clear_cache()` then one call, a few times (interleaved across contestants); the
  median. The torch peers have no plan: their "first call" is one lone call (not batched) in the same
  interleaving.
- peak memory: the peak extra memory of one warm call. CPU full runs: a fresh subprocess per measurement
  with MALLOC_MMAP_THRESHOLD_=131072, reading the peak RSS through a region of autojac's own meter
  (`autojac._measure.meter.PeakMeter`), as `ProcessPeak` in autojac/_bench/measure.py does, so autojac's own
  VmHWM resets inside the call cannot hide the call's peak. Quick CPU runs: in process, with
  `autojac._measure.tracker.measure_peak_bytes` (a dispatch-mode tracker of live tensor storages: no BLAS
  workspaces, no allocator slack). CUDA: in process, the allocator's peak (`max_memory_allocated`) through
  the same meter region.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree

import autojac
from autojac._bench.suite import machine_name, machine_text
from autojac._measure.meter import PeakMeter
from autojac._measure.tracker import measure_peak_bytes

WARM_CALLS = 10
SETTLE_CAP = 200
RESULTS = Path(__file__).resolve().parent / "results"
CHILD_FLAG = "--child-memory"


# --- small helpers ------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of one `work()`, CUDA synchronized before and after, and its result."""
    sync(device)
    start = time.perf_counter()
    out = work()
    sync(device)
    return time.perf_counter() - start, out


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:240]


def ms(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def x_text(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}x"


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**PASS**" if ok else "**FAIL**")


def leaves(tree: Any) -> list[torch.Tensor]:
    out = []
    for t in _pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            out.append(t.to_dense() if t.layout != torch.strided else t)
    return out


def check(got: Any, want: Any, dtype: torch.dtype) -> str | None:
    """None if `got` matches the float64 reference `want` (same structure, shapes and values), else what is
    wrong. Tolerances follow the result's dtype: float64 tight, float32 as the suite's check."""
    g, w = leaves(got), leaves(want)
    if len(g) != len(w):
        return f"wrong structure: {len(g)} blocks, expected {len(w)}"
    rtol, atol = (1e-7, 1e-9) if dtype == torch.float64 else (1e-3, 1e-4)
    for a, b in zip(g, w):
        if a.shape != b.shape:
            return f"wrong shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        scale = float(b64.abs().max()) if b64.numel() else 1.0
        if not torch.allclose(a64, b64, rtol=rtol, atol=atol * max(scale, 1e-6)):
            worst = float((a64 - b64).abs().max())
            return f"wrong values (largest difference {worst:.3g}, reference scale {scale:.3g})"
    return None


def nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in leaves(tree))


# --- contestants ---------------------------------------------------------------------------------------

@dataclass
class Contestant:
    """One way of computing a problem's Jacobian.

    `run`: one plain call. For autojac contestants (`group == "autojac"`): `plan` returns the plan plain calls
    use now (None where autojac has no public way to look it up), and `frozen(p)` a call that runs exactly
    plan `p` (None where the API takes no `plan=`: then the warm figure is the median of calls
    WARM_CALLS+1 .. 2*WARM_CALLS, each timed alone, the plan still exploring).
    """

    name: str
    group: str  # "autojac" or "peer"
    run: Callable[[], Any]
    plan: Callable[[], Any] | None = None
    frozen: Callable[[Any], Callable[[], Any]] | None = None
    budget: int | None = None
    note: str = ""
    skip: str | None = None  # why it is not run (e.g. a plain loop that would take too long)
    extra: dict = field(default_factory=dict)


def private_plan(f, inputs, *, argnums=None, **options):
    """The plan `autojac.jacobian(f, inputs, **options)` uses, also for `sparsity=` and `output=`, which
    `autojac.plan` does not take (reported as an API gap). Goes through the private `_plan` that
    `autojac.plan` calls, with the options `jacobian` would pass; effort "measure" returns the cached plan."""
    from autojac._api.jacobian import _plan

    raw = dict(mode="auto", vectorize="auto", chunk_size=None, memory_budget=None, create_graph=False, strict=False,
               cache=True)
    raw.update(options)
    return _plan("plan", f, inputs, "measure", None, argnums, False, raw)


def plan_side(p) -> str:
    """Which colouring a compressed plan pushes: row colours (VJPs, reverse mode) or column colours (JVPs)."""
    if p is None or getattr(p.problem, "layout", None) is None:
        return "dense"
    return "rows" if p.mode == "reverse" else "columns"


# --- timing --------------------------------------------------------------------------------------------

@dataclass
class Settings:
    quick: bool
    device: torch.device
    repeats: int  # rounds for calls under `few_seconds`
    few: int = 5  # rounds for slower calls
    few_seconds: float = 0.1
    slow_seconds: float = 5.0  # one round for calls slower than this
    first_repeats: int = 9
    """First calls timed per contestant (their median is reported). 9, not 5: a dense result fresh from the kernel in
    2 MiB pages (numpy asks for them) faulted in 2 ms in most calls on the 2-core VM but 31 ms in 10-20% of them (a
    33.5 MB Brusselator result; never in 4 KiB pages, which take a steady 6.5-7.8 ms), so two slow samples in five
    decided a median (Brusselator first calls 10.2, 10.7, 18.8, 33.6, 52.7 ms in one run)."""
    settle_seconds: float = 120.0
    memory: str = "rss"  # "rss" (fresh subprocesses), "tracker" (in process), "cuda", "off"
    once_seconds: float = 10.0  # a peer whose first (checked) call takes longer is timed by that call alone

    @classmethod
    def make(cls, quick: bool, device: torch.device, memory: str = "auto") -> Settings:
        if memory == "auto":
            memory = "cuda" if device.type == "cuda" else ("tracker" if quick else "rss")
        if quick:
            return cls(True, device, repeats=3, few=3, slow_seconds=1.0, first_repeats=2, settle_seconds=10.0,
                       memory=memory, once_seconds=1.0)
        return cls(False, device, repeats=21, memory=memory)


def autojac_calls(c: Contestant, device, want, dtype, min_calls: int, settle_seconds: float) -> dict:
    """WARM_CALLS calls of `c` from a fresh plan (the caller cleared the cache), then on until its plan is
    settled (at most SETTLE_CAP calls, `settle_seconds` in all) and at least `min_calls`. Checks the first
    and the WARM_CALLS-th result."""
    seconds, methods, wrong = [], [], None
    settled_at, p10, plan = None, None, None
    began = time.perf_counter()
    lookup_error = None
    while True:
        t, got = timed(c.run, device)
        seconds.append(t)
        r = autojac.last_report()
        methods.append(r.method if r is not None else None)
        if wrong is None and len(seconds) in (1, WARM_CALLS):
            wrong = check(got, want, dtype)
        got = None
        if c.plan is not None and lookup_error is None:
            try:
                plan = c.plan()
            except Exception as exc:  # noqa: BLE001 - a private lookup that broke is a fact to report
                lookup_error, plan = error_text(exc), None
        if plan is not None and plan.settled and settled_at is None:
            settled_at = len(seconds)
        if len(seconds) == WARM_CALLS:
            p10 = plan
            if p10 is not None and p10.calls < WARM_CALLS:
                # The lookup found another key's plan (made it afresh): its `settled` says nothing here.
                lookup_error = f"the plan looked up has {p10.calls} calls after {WARM_CALLS}: another key"
                plan = p10 = None
        n = len(seconds)
        if n >= max(WARM_CALLS, min_calls) and (settled_at is not None or plan is None or n >= SETTLE_CAP
                                                or time.perf_counter() - began > settle_seconds):
            break
    return {"seconds": seconds, "methods": methods, "wrong": wrong, "p10": p10, "plan": plan,
            "settled_at": settled_at, "lookup_error": lookup_error}


def _inner_count(run, device) -> int:
    t, _ = timed(run, device)
    return max(1, min(200, int(0.01 / max(t, 1e-6))))


def interleaved(runners: dict[str, Callable[[], Any]], s: Settings, seed: int = 0) -> dict[str, tuple[float, int]]:
    """{name: (median seconds, rounds)} over interleaved rounds in a new shuffled order each round."""
    inner = {name: _inner_count(run, s.device) for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    order, shuffler = list(runners), random.Random(seed)
    for r in range(s.repeats):
        shuffler.shuffle(order)
        for name in order:
            ts = times[name]
            if r > 0 and ts and ts[0] > s.slow_seconds:
                continue
            if r >= s.few and ts and ts[0] > s.few_seconds:
                continue
            sync(s.device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                runners[name]()
            sync(s.device)
            ts.append((time.perf_counter() - start) / inner[name])
    return {name: (statistics.median(ts), len(ts)) for name, ts in times.items()}


def measure(contestants: list[Contestant], want, dtype, s: Settings, say=print) -> dict[str, dict]:
    """Time every contestant of one problem: rows {name: facts}. Memory is measured separately
    (`peak_memory`), since it may need fresh processes."""
    rows: dict[str, dict] = {}
    runners: dict[str, Callable[[], Any]] = {}
    autojac.clear_cache()  # every autojac contestant plans below; their keys differ, so their plans coexist
    for c in contestants:
        row = rows[c.name] = {"contestant": c.name, "group": c.group, "note": c.note}
        if c.budget is not None:
            row["budget_bytes"] = c.budget
        if c.skip:
            row["skipped"] = c.skip
            continue
        try:
            if c.group == "autojac":
                unfrozen = c.frozen is None or c.plan is None
                seq = autojac_calls(c, s.device, want, dtype, 2 * WARM_CALLS if unfrozen else 0, s.settle_seconds)
                wrong = seq["wrong"]
            else:
                t, got = timed(c.run, s.device)
                wrong = check(got, want, dtype)
                got = None
                if not wrong and t > s.once_seconds:  # too slow to repeat: this one call is its figure
                    row.update(seconds=t, runs=1, once=f"timed once: its first call took {ms(t)} (> {ms(s.once_seconds)})",
                               warm_how="its first (checked) call alone: too slow to repeat")
        except Exception as exc:  # a contestant that cannot run is a result, not a crash
            row["error"] = error_text(exc)
            continue
        if wrong:
            row["error"] = wrong
            continue
        if c.group != "autojac":
            if "once" not in row:
                runners[c.name] = c.run
            continue
        calls = seq["seconds"]
        row.update(calls_seconds=calls, calls_methods=seq["methods"], settled_at=seq["settled_at"],
                   settle_calls_made=len(calls), lookup_error=seq["lookup_error"])
        p10, plan = seq["p10"], seq["plan"]
        if p10 is not None:
            row.update(plan=f"{p10.name} x{p10.chunk_size} ({p10.n_chunks} chunk(s))", side=plan_side(p10),
                       layout=p10.problem.layout.describe() if p10.problem.layout is not None else None)
        if plan is not None:
            row.update(settled_plan=f"{plan.name} x{plan.chunk_size}", settled_side=plan_side(plan))
        if c.frozen is not None and p10 is not None:
            runners[c.name] = c.frozen(p10)
            row["warm_how"] = f"its plan after {WARM_CALLS} calls, frozen, in the interleaved rounds"
        else:
            while len(calls) < 2 * WARM_CALLS:  # the plan lookup failed before calls 11..20 were made
                calls.append(timed(c.run, s.device)[0])
            row["seconds"] = statistics.median(calls[WARM_CALLS:2 * WARM_CALLS])
            row["warm_how"] = (f"median of calls {WARM_CALLS + 1}..{2 * WARM_CALLS}, each timed alone "
                               "(the API takes no plan=, so the plan after 10 calls cannot be frozen)")
        runners[c.name + " :settled"] = c.run
    if runners:
        for name, (sec, n) in interleaved(runners, s).items():
            if name.endswith(" :settled"):
                rows[name[:-len(" :settled")]].update(settled_seconds=sec, settled_runs=n)
            else:
                rows[name].update(seconds=sec, runs=n)
    # First calls (autojac) and lone calls (peers), interleaved, after the rounds: only the plan is cold.
    firsts = {c.name: [] for c in contestants if "seconds" in rows[c.name] and "once" not in rows[c.name]}
    structure = {name: [] for name in firsts}
    methods = {name: [] for name in firsts}
    by_name = {c.name: c for c in contestants}
    shuffler = random.Random(1)
    for _ in range(s.first_repeats):
        order = list(firsts)
        shuffler.shuffle(order)
        for name in order:
            c = by_name[name]
            if c.group == "autojac":
                autojac.clear_cache()
            try:
                t, _ = timed(c.run, s.device)
            except Exception as exc:  # noqa: BLE001
                rows[name]["first_error"] = error_text(exc)
                continue
            firsts[name].append(t)
            if c.group == "autojac":
                r = autojac.last_report()
                methods[name].append(r.method if r is not None else None)
                try:
                    p = c.plan() if c.plan is not None else None
                except Exception:  # noqa: BLE001
                    p = None
                structure[name].append(None if p is None else plan_side(p))
    autojac.clear_cache()
    for name, ts in firsts.items():
        if ts:
            rows[name]["first_seconds"] = statistics.median(ts)
            rows[name]["first_samples"] = ts
        if by_name[name].group == "autojac":
            rows[name]["first_methods"] = methods[name]
            rows[name]["first_sides"] = structure[name]
    return rows


def best_peer(rows: dict[str, dict], key: str = "seconds") -> dict | None:
    peers = [r for r in rows.values() if r["group"] == "peer" and r.get(key) is not None]
    return min(peers, key=lambda r: r[key], default=None)


# --- memory --------------------------------------------------------------------------------------------

def meter_peak(work: Callable[[], Any], device: torch.device) -> int | None:
    """Peak extra memory of `work()` in this process through a region of autojac's meter (peak RSS on Linux,
    the allocator's peak on CUDA). autojac's own regions inside `work` hand their peaks to this one before
    they reset the counter, so the reading covers the whole call (see ProcessPeak in autojac/_bench/measure.py)."""
    gc.collect()
    region = PeakMeter(device).region()
    with region:
        work()
    return region.peak_bytes


def warm_then(c: Contestant, device: torch.device) -> Callable[[], Any]:
    """The warm call to measure: autojac after WARM_CALLS calls from a fresh plan (frozen where it can be),
    a peer after one warm-up call."""
    if c.group == "autojac":
        autojac.clear_cache()
        for _ in range(WARM_CALLS):
            c.run()
        p = c.plan() if c.plan is not None else None
        run = c.frozen(p) if (c.frozen is not None and p is not None) else c.run
    else:
        run = c.run
    run()
    return run


def peak_in_process(c: Contestant, s: Settings) -> tuple[int | None, str]:
    run = warm_then(c, s.device)
    gc.collect()
    if s.device.type == "cuda":
        return meter_peak(run, s.device), "CUDA allocator peak (max_memory_allocated), in process"
    return measure_peak_bytes(run, s.device)[0], "live-storage tracker (tensor storages only), in process"


def peak_in_child(script: str, spec: dict, timeout: float = 900) -> tuple[int | None, str]:
    """Run `python script --child-memory SPEC` in a fresh process with MALLOC_MMAP_THRESHOLD_=131072 (large
    buffers mmapped and returned on free, so RSS follows what is live); its peak extra RSS."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    how = "peak RSS over RSS before the call, fresh subprocess (MALLOC_MMAP_THRESHOLD_=131072)"
    try:
        out = subprocess.run([sys.executable, script, CHILD_FLAG, json.dumps(spec)], capture_output=True, text=True,
                             env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the measuring subprocess ran over {timeout:.0f} s") from None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the measuring subprocess failed (rc {out.returncode}): {tail[:200]}")
    facts = json.loads(lines[-1])
    if "error" in facts:
        raise RuntimeError(f"the measured call raised {facts['error']}")
    if facts.get("extra_bytes") is None:
        raise RuntimeError("the peak RSS could not be read (no writable /proc/self/clear_refs?)")
    return facts["extra_bytes"], how


def child_main(find: Callable[[dict], tuple[Contestant, torch.device]]) -> None:
    """The subprocess side of `peak_in_child`: build the contestant named in argv, warm it, measure one call."""
    spec = json.loads(sys.argv[sys.argv.index(CHILD_FLAG) + 1])
    try:
        c, device = find(spec)
        run = warm_then(c, device)
        peak = meter_peak(run, device)
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        print(json.dumps({"error": error_text(exc)}))
        return
    print(json.dumps({"extra_bytes": peak}))


def peak_memory(c: Contestant, s: Settings, script: str, spec: dict) -> tuple[int | None, str]:
    if s.memory == "rss" and s.device.type == "cpu":
        return peak_in_child(script, spec)
    return peak_in_process(c, s)


# --- the command line and files --------------------------------------------------------------------------

def parse(description: str, extra: Callable[[argparse.ArgumentParser], Any] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds, in-process memory: a smoke test")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results (default benchmarks/results)")
    parser.add_argument("--only", default="", help="comma-separated problem names to run (default: all)")
    parser.add_argument("--memory", default="auto", choices=["auto", "rss", "tracker", "off"],
                        help="auto: fresh subprocesses (peak RSS) for full CPU runs, the in-process tracker for "
                        "--quick, the allocator on CUDA")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device} needs CUDA, but torch {torch.__version__} sees no CUDA device")
    return args


def loop_args(doc: str, device: bool = False) -> tuple[argparse.Namespace, int, int]:
    """(arguments, steps, rounds) of a step-loop benchmark: `--quick` (6 steps, 2 rounds, at most 2 threads),
    `--out`, and with `device` `--device`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: checks that it works")
    parser.add_argument("--out", type=Path, default=RESULTS)
    if device:
        parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.quick else torch.get_num_threads())
    steps, rounds = (6, 2) if args.quick else (20, 3)
    return args, steps, rounds


def loop_rounds(run_loop: Callable[[str], tuple[list[float], int]], contestants: list[str], rounds: int,
                rng: random.Random) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """Each contestant's loop `rounds` times, in a shuffled order each round: (step times after the first two,
    whole-loop times, wrong results), per contestant."""
    times: dict[str, list[float]] = {c: [] for c in contestants}
    totals: dict[str, list[float]] = {c: [] for c in contestants}
    wrong = 0
    for _ in range(rounds):
        for contestant in rng.sample(contestants, len(contestants)):
            t, w = run_loop(contestant)
            times[contestant] += t[2:]
            totals[contestant].append(sum(t))
            wrong += w
    return times, totals, wrong


def commit() -> str:
    """The checkout's short commit hash, or "unknown" outside a git checkout. AUTOJAC_COMMIT, when set, is taken
    instead: a working tree copied onto a lent GPU machine can carry a `.git` whose HEAD is an older commit (the
    H200 results named one), so `gpu_session.sh`'s caller passes the commit it copied."""
    if os.environ.get("AUTOJAC_COMMIT"):
        return os.environ["AUTOJAC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stem_for(device: torch.device, what: str, quick: bool) -> str:
    return f"{machine_name(device)}-{what}" + ("-quick" if quick else "")


def meta_for(device: torch.device, quick: bool, started: float, s: Settings) -> dict:
    return {"machine": machine_text(device), "device": str(device), "quick": quick, "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - started,
            "rounds": s.repeats, "first_repeats": s.first_repeats, "warm_calls": WARM_CALLS, "settle_cap": SETTLE_CAP,
            "memory": s.memory}


def method_text(meta: dict) -> str:
    mem = {"rss": "peak RSS of one warm call over the RSS before it, each in a fresh subprocess "
                  "(MALLOC_MMAP_THRESHOLD_=131072), read through autojac's meter so its own VmHWM resets do not hide "
                  "the peak",
           "tracker": "the in-process live-storage tracker (`autojac._measure.tracker.measure_peak_bytes`: tensor "
                      "storages only, no BLAS workspaces or allocator slack)",
           "cuda": "the CUDA allocator's peak over what was allocated before the call",
           "off": "not measured"}[meta["memory"]]
    return (f"Warm: median of {meta['rounds']} interleaved rounds (5 for calls over 0.1 s, 1 over 5 s; {'1 s' if meta['quick'] else '5 s'} "
            f"in quick runs), shuffled order each round, sub-10 ms calls timed in batches; autojac after exactly "
            f"{meta['warm_calls']} calls, its plan frozen. Settled: autojac's plain call once its plan reports settled "
            f"(calls to settle capped at {meta['settle_cap']}). First call: `autojac.clear_cache()` then one call, median of "
            f"{meta['first_repeats']}, process warm; for torch peers one lone call (a peer whose first call took over "
            f"{'1 s' if meta['quick'] else '10 s'} is timed by that call alone). Memory: {mem}. Every result is "
            "compared with a float64 torch reference; a wrong one is an error row, never timed.")


def write(out_dir: Path, stem: str, data: dict, text: str, plotter: Callable[[Path], None] | None, say=print) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    (out_dir / f"{stem}.md").write_text(text)
    wrote = [f"{out_dir / stem}.md", f"{out_dir / stem}.json"]
    if plotter is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            plotter(out_dir / f"{stem}.png")
            wrote.append(f"{out_dir / stem}.png")
        except ImportError:
            say("matplotlib is not importable: no plot")
    say("wrote " + ", ".join(wrote))
