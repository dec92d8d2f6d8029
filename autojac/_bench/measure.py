"""Measuring contestants side by side: interleaved median times, first calls, settling, evaluations of `f`,
closures rebuilt every step, peak extra memory, correctness."""

from __future__ import annotations

import dataclasses

import functools
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

import autojac
from autojac._measure.device import untracked_reserve
from autojac._measure.meter import PeakMeter, _kib_field
from autojac._measure.tracker import LiveStorageTracker

from .contestants import BY_NAME as CONTESTANTS_BY_NAME
from .problems import BY_NAME as PROBLEMS_BY_NAME

WARM_CALLS = 10
"""autojac's warm time is the plan it runs after exactly this many calls (acceptance: "after at most 10 calls")."""
SETTLE_CALLS = 200
"""Calls of the default `autojac` contestant until `autojac.plan(f, x).settled`, at most."""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work, device) -> tuple[float, object]:
    """Wall seconds of one `work()` (CUDA synchronized before and after) and its result."""
    _sync(device)
    start = time.perf_counter()
    out = work()
    _sync(device)
    return time.perf_counter() - start, out


def _flat(jac):
    if isinstance(jac, torch.Tensor):
        return [jac]
    return [t for item in jac for t in _flat(item)]


def check(got, want) -> str | None:
    """None if got matches the reference in structure and (float32) value, else what is wrong."""
    g, w = _flat(got), _flat(want)
    if len(g) != len(w):
        return f"wrong structure: {len(g)} blocks, expected {len(w)}"
    for a, b in zip(g, w):
        if a.shape != b.shape:
            return f"wrong shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        scale = float(b.abs().max()) if b.numel() else 1.0
        if not torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-4 * max(scale, 1e-6)):
            return "wrong values"
    return None


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def peak_bytes(work, device) -> int | None:
    """Peak extra bytes of one `work()` in this process.

    CUDA: the caching allocator's peak, read through a region of autojac's own meter. autojac resets the
    allocator's peak statistic inside its calls (when it measures chunks), so reading
    `max_memory_allocated` after the call would only see the peak since autojac's last reset; an
    enclosing region is handed every peak an inner region read before resetting (see
    `autojac._measure.meter.Region`), so its reading covers the whole call. CPU: the live-storage
    tracker (tensor storages only; no RSS, so autojac's VmHWM resets do not matter).
    """
    if device.type == "cuda":
        gc.collect()
        with PeakMeter(device).region() as region:
            work()
        return region.peak_bytes
    tracker = LiveStorageTracker()
    with tracker:
        work()
    return tracker.peak


def _fewer_passes_mode(f, inputs) -> tuple[str, int]:
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        out = f(*xs)
    n_out = sum(y.numel() for y in (out if isinstance(out, tuple) else (out,)))
    n_in = sum(x.numel() for x in xs)
    return ("reverse", n_out) if n_out <= n_in else ("forward-trick", n_in)


def _measured_peak(run, device) -> int:
    run()  # warm: one-time set-up paid
    gc.collect()
    return peak_bytes(run, device)


def vmap_need(f, inputs) -> tuple[int, int]:
    """(peak bytes of the whole Jacobian at once by vmap in the mode with fewer passes, the least of the
    two engines; peak bytes of the same mode's loop one vector at a time), measured on warm calls."""
    device = (inputs[0] if isinstance(inputs, tuple) else inputs).device
    mode, n = _fewer_passes_mode(f, inputs)
    needs = []
    for engine_first in ("func", "autograd"):
        try:
            p = autojac.plan(f, inputs, mode=mode, vectorize="vmap", chunk_size=max(n, 1), cache=False)
            if p.engine != engine_first:
                continue
            needs.append(_measured_peak(lambda p=p: autojac.jacobian(f, inputs, plan=p), device))
        except autojac.AutojacError:
            continue
    smallest = _measured_peak(lambda: autojac.jacobian(f, inputs, mode=mode, vectorize="loop", chunk_size=1), device)
    return (min(needs) if needs else smallest), smallest


unchunked_need = vmap_need


def share_budget(need: int, smallest: int, share: float, device) -> int:
    """A budget of `share` of the unchunked need (never below what the smallest plan needs, +5%), plus the
    workspace reserve autojac keeps back on the CPU (8 MiB; it counts it against every budget, so a budget
    below it fails with MemoryBudgetError however the Jacobian is chunked)."""
    return max(int(need * share), int(smallest * 1.05)) + untracked_reserve(device)


def plan_text(plan) -> str:
    return f"{plan.name} x{plan.chunk_size}"


def _autojac_calls(f, inputs, budget, device, want, calls, until_settled=0, settle_seconds=float("inf")):
    """Call `autojac.jacobian(f, inputs, memory_budget=budget)` `calls` times from a fresh plan (the caller
    cleared the cache), then, if `until_settled`, on until `autojac.plan(f, x).settled` or that many calls
    or `settle_seconds` in all. Returns a dict: per-call facts, the plan after `calls` calls (a `Plan`),
    the plan at the end, and whether the results were right."""
    seq, plan_at, plan = [], None, None
    began = time.perf_counter()
    wrong = None
    while True:
        seconds, got = timed(lambda: autojac.jacobian(f, inputs, memory_budget=budget), device)
        r = autojac.last_report()
        if want is not None and wrong is None and (len(seq) == 0 or len(seq) == calls - 1):
            wrong = check(got, want)  # the first call's result and the last before timing
        got = None
        seq.append({"seconds": seconds, "evaluations": r.evaluations, "method": r.method,
                    "chunks": list(r.chunk_sizes), "planned": r.planned, "trial": r.trial})
        plan = autojac.plan(f, inputs, memory_budget=budget)
        if len(seq) == calls:
            plan_at = plan
        if len(seq) >= calls and (not until_settled or plan.settled or len(seq) >= until_settled
                                  or time.perf_counter() - began > settle_seconds):
            break
    return {"calls": seq, "plan_at": plan_at, "plan": plan, "wrong": wrong}


def _counted(f, counter: list):
    """`f` with a count of its evaluations (a Python call of `f`; under vmap, one per batched call)."""
    def counted(*args, **kwargs):
        counter[0] += 1
        return f(*args, **kwargs)

    return counted


def time_problem(problem, size, names, device, repeats=21, slow_seconds=5.0, few_seconds=0.1, few=5,
                 first_repeats=5, settle_seconds=120.0):
    """Rows of facts for each contestant on one problem: time (median of interleaved runs), errors; for
    autojac also its first calls, the calls until its plan settles, and evaluations of `f`.

    `repeats` rounds for calls under `few_seconds` (their noise is what decides close ratios: with 9
    rounds, bursts of machine noise lasting a few rounds moved the ratio between autojac and its own
    explicit run of the same method by up to 16% on millisecond problems), `few` for slower ones, two for
    calls over `slow_seconds`.

    autojac contestants (group "autojac") make exactly WARM_CALLS calls first; their rounds then run the
    plan they hold after those calls, frozen (`jacobian(f, x, plan=p)`: no exploration), so every round
    times the same thing. The default contestant goes on calling until its plan settles; its settled
    plan is timed in the same rounds through plain `jacobian(f, x)` calls ("settled_seconds").
    """
    f, inputs = problem.build(size, device)
    want = torch.autograd.functional.jacobian(f, inputs)
    needs_budget = any(CONTESTANTS_BY_NAME[n].budget_share is not None for n in names)
    need, smallest = unchunked_need(f, inputs) if needs_budget else (None, None)
    rows, runners, rows_of = {}, {}, {}
    autojac.clear_cache()  # every autojac contestant plans on its first call below; keys differ, so plans coexist
    for name in names:
        c = CONTESTANTS_BY_NAME[name]
        row = {"problem": problem.name, "size": size, "contestant": name, "group": c.group}
        rows[name] = row
        budget = None
        if c.budget_share is not None:
            budget = share_budget(need, smallest, c.budget_share, device)
            row.update(budget_bytes=budget, unchunked_bytes=need, smallest_bytes=smallest,
                       reserve_bytes=untracked_reserve(device))
        try:
            if c.group == "autojac":
                default = name == "autojac"
                seq = _autojac_calls(f, inputs, budget, device, want, WARM_CALLS,
                                     until_settled=SETTLE_CALLS if default else 0, settle_seconds=settle_seconds)
                row["first_seconds"] = seq["calls"][0]["seconds"]
                wrong = seq["wrong"]
            else:
                row["first_seconds"], got = timed(lambda: c.run(f, inputs, budget), device)
                wrong = check(got, want)
                got = None
        except Exception as exc:  # a contestant that cannot run is a result, not a crash
            row["error"] = _error_text(exc)
            continue
        if wrong:
            row["error"] = wrong
            continue
        if c.group == "autojac":
            p10 = seq["plan_at"]
            row["plan"] = plan_text(p10)
            row["settled_at_warm_calls"] = p10.settled
            runners[name] = lambda p=p10: autojac.jacobian(f, inputs, plan=p)
            rows_of[name] = (row, "seconds")
            if name == "autojac":
                row["call_seconds"] = [x["seconds"] for x in seq["calls"]]
                row["call_evaluations"] = [x["evaluations"] for x in seq["calls"]]
                row["call_methods"] = [x["method"] for x in seq["calls"]]
                row["settled"] = seq["plan"].settled
                row["settle_calls"] = len(seq["calls"])
                row["settled_plan"] = plan_text(seq["plan"])
                runners["autojac:settled"] = lambda b=budget: autojac.jacobian(f, inputs, memory_budget=b)
                rows_of["autojac:settled"] = (row, "settled_seconds")
        else:
            runners[name] = lambda c=c, budget=budget: c.run(f, inputs, budget)
            rows_of[name] = (row, "seconds")
    # Sub-millisecond calls are timed in batches of `inner` calls (like timeit's autorange), so one
    # scheduler hiccup on a small machine does not decide a ratio.
    inner = {}
    for name, run in runners.items():
        seconds, _ = timed(run, device)
        inner[name] = max(1, min(200, int(0.01 / max(seconds, 1e-6))))
    times = {name: [] for name in runners}
    order, shuffler = list(runners), random.Random(0)
    for r in range(repeats):
        # A new order each round: in a fixed (or merely rotated) order every contestant follows the
        # same one each time, and what ran before decides the caches it starts on; autojac ran after
        # the slowest peer, 378 us against 360 us for the same plan following a fast, similar run.
        shuffler.shuffle(order)
        for name in order:
            run = runners[name]
            # The fastest timing so far decides (not the first: one burst of machine noise made a 25 ms
            # call look 2.4 s slow, and it was then timed only once).
            if r > 1 and min(times[name]) > slow_seconds:
                continue  # two timings are enough for a method this slow
            if r >= few and min(times[name]) > few_seconds:
                continue
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                run()
            _sync(device)
            times[name].append((time.perf_counter() - start) / inner[name])
    for name, ts in times.items():
        row, key = rows_of[name]
        row[key] = statistics.median(ts)
        row["runs" if key == "seconds" else "settled_runs"] = len(ts)
    # Evaluations of f in one warm call: autojac's own count, a counting wrapper around f for the others.
    for name, row in rows.items():
        if "seconds" not in row:
            continue
        c = CONTESTANTS_BY_NAME[name]
        try:
            if c.group in ("autojac", "autojac-explicit"):
                runners[name]()
                row["evaluations"] = autojac.last_report().evaluations
            else:
                counter = [0]
                c.run(_counted(f, counter), inputs, row.get("budget_bytes"))
                row["evaluations"] = counter[0]
        except Exception as exc:  # noqa: BLE001 - a count is a fact, not a requirement
            row["evaluations_error"] = _error_text(exc)
    auto = rows.get("autojac")
    if auto is not None and "seconds" in auto:
        runners["autojac:settled"]()
        auto["settled_evaluations"] = autojac.last_report().evaluations
        peers = [r for r in rows.values() if r["group"] == "peer" and "seconds" in r]
        peer = min(peers, key=lambda r: r["seconds"], default=None)
        auto.update(first_calls(f, inputs, device, first_repeats,
                                peer and (peer["contestant"], runners[peer["contestant"]])))
    return list(rows.values())


def first_calls(f, inputs, device, repeats, peer=None) -> dict:
    """autojac's first call on a warm process: `repeats` times, each after `clear_cache()` (no plan exists
    for `f` then), with what each did. Run after the rounds, so the only thing left cold is the plan.

    `peer` (name, run): after each first call, one single call of that peer, timed the same way (not in a
    batch), for context: a lone call pays cache misses a batch of calls does not.

    No `gc.collect()` here: on the 2-core machine a collection right before a call made the next call of
    anything ~0.8 ms slower (autojac's cached call 0.25 -> 1.05 ms, jacrev 0.3 -> 1.2 ms): caches it evicts.
    """
    out = {"first_call_samples": [], "first_evaluations": [], "first_methods": [], "first_chunks": []}
    lone = []
    for _ in range(repeats):
        autojac.clear_cache()
        seconds, _ = timed(lambda: autojac.jacobian(f, inputs), device)
        r = autojac.last_report()
        out["first_call_samples"].append(seconds)
        out["first_evaluations"].append(r.evaluations)
        out["first_methods"].append(r.method)
        out["first_chunks"].append(list(r.chunk_sizes))
        if peer is not None:
            lone.append(timed(peer[1], device)[0])
    out["first_call_seconds"] = statistics.median(out["first_call_samples"])
    if lone:
        out["peer_single_call"] = {"contestant": peer[0], "seconds": statistics.median(lone)}
    autojac.clear_cache()
    return out


# --- closures rebuilt every step ------------------------------------------------------------------

def _shifted(f, target, *xs):
    """f(*xs) minus a target of the outputs' shapes (a tensor, or a tuple for tuple outputs)."""
    ys = f(*xs)
    if isinstance(ys, tuple):
        return tuple(y - t for y, t in zip(ys, target))
    return ys - target


def make_closure(style: str, f, target):
    """A new function object each step, capturing a fresh tensor: `lambda *xs: f(*xs) - target` or
    `functools.partial(_shifted, f, target)`. Its Jacobian is f's."""
    if style == "partial":
        return functools.partial(_shifted, f, target)
    if isinstance(target, tuple):
        return lambda *xs: tuple(y - t for y, t in zip(f(*xs), target))
    return lambda *xs: f(*xs) - target


CLOSURE_TRANSFORMS = {"func.jacrev": torch.func.jacrev, "func.jacfwd": torch.func.jacfwd}


def closure_loops(problem, size, device, style="lambda", steps=20, repeats=3) -> dict:
    """A loop of `steps` steps, each building a new closure (see `make_closure`) around a fresh target and
    computing its Jacobian once: autojac from a fresh state (`clear_cache()` before each loop, so its
    first step plans) against the same loop with torch.func.jacrev and jacfwd. Loops are interleaved
    (`repeats` rounds, shuffled); each time is the median over rounds of the whole loop."""
    f, inputs = problem.build(size, device)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    argnums = tuple(range(len(args))) if isinstance(inputs, tuple) else 0
    with torch.no_grad():
        ys = f(*args)
    torch.manual_seed(1)
    targets = [tuple(torch.randn_like(y) for y in ys) if isinstance(ys, tuple) else torch.randn_like(ys)
               for _ in range(steps)]
    want = torch.autograd.functional.jacobian(make_closure(style, f, targets[0]), inputs)
    row = {"problem": problem.name, "size": size, "style": style, "steps": steps}
    facts = {}

    def autojac_loop():
        autojac.clear_cache()
        planned, evaluations = 0, 0
        for s in range(steps):
            jac = autojac.jacobian(make_closure(style, f, targets[s]), inputs)
            if s == 0:
                facts["wrong"] = check(jac, want)
            r = autojac.last_report()
            planned += r.planned
            evaluations += r.evaluations
        facts["planned_steps"], facts["evaluations"] = planned, evaluations
        facts["plan"] = r.method

    def torch_loop(transform):
        def loop():
            for s in range(steps):
                jac = transform(make_closure(style, f, targets[s]), argnums=argnums)(*args)
                if s == 0 and transform not in facts:
                    facts[transform] = check(jac, want)
        return loop

    loops = {"autojac": autojac_loop, **{name: torch_loop(t) for name, t in CLOSURE_TRANSFORMS.items()}}
    times = {name: [] for name in loops}
    shuffler = random.Random(1)
    for _ in range(repeats):
        order = list(loops)
        shuffler.shuffle(order)
        for name in order:
            if name not in loops:
                continue
            try:
                seconds, _ = timed(loops[name], device)
            except Exception as exc:  # noqa: BLE001 - jacfwd needs forward formulas; a failure is a result
                row[f"{name}_error"] = _error_text(exc)
                del loops[name]
                continue
            times[name].append(seconds)
    autojac.clear_cache()
    for name, ts in times.items():
        if ts:
            row[f"{name}_seconds"] = statistics.median(ts)
    for name, t in CLOSURE_TRANSFORMS.items():
        if facts.get(t):
            row[f"{name}_error"] = facts[t]
            row.pop(f"{name}_seconds", None)
    if facts.get("wrong"):
        row["autojac_error"] = facts["wrong"]
        row.pop("autojac_seconds", None)
    row.update(planned_steps=facts.get("planned_steps"), evaluations=facts.get("evaluations"), plan=facts.get("plan"))
    torch_times = {n: row[f"{n}_seconds"] for n in CLOSURE_TRANSFORMS if f"{n}_seconds" in row}
    if torch_times:
        row["torch_best"] = min(torch_times, key=torch_times.get)
        if "autojac_seconds" in row:
            row["ratio"] = row["autojac_seconds"] / torch_times[row["torch_best"]]
    return row


# --- memory -----------------------------------------------------------------------------------------

def _prepared(name, f, inputs, budget, device):
    """The call to measure for a contestant, warm: for autojac contestants the plan they hold after
    WARM_CALLS calls, frozen (as `time_problem` times it); for the others their call after one warm-up."""
    c = CONTESTANTS_BY_NAME[name]
    if c.group == "autojac":
        autojac.clear_cache()
        p = _autojac_calls(f, inputs, budget, device, None, WARM_CALLS)["plan_at"]
        run = lambda: autojac.jacobian(f, inputs, plan=p)  # noqa: E731
    else:
        run = lambda: c.run(f, inputs, budget)  # noqa: E731
    run()
    return run


def tracked_peak(problem, size, name, device, budget=None) -> int | None:
    """Peak extra bytes of a warm call, in process (storage tracker on CPU, allocator on CUDA)."""
    f, inputs = problem.build(size, device)
    run = _prepared(name, f, inputs, budget, device)
    gc.collect()
    return peak_bytes(run, device)


def rss_peak(problem_name, size, name, device, budget=None, timeout=600, cold=False) -> int | None:
    """Peak extra RSS of a warm call (`cold`: of the first call, planning included) in a fresh
    subprocess (CPU, Linux; on CUDA the allocator's peak), or None if it failed."""
    out = child_process(["call", problem_name, size, name, str(device), str(budget or ""), "cold" if cold else "warm"],
                        timeout)
    if out is not None and "error" in out:
        raise RuntimeError(f"the measured call raised {out['error']}")
    return None if out is None else out["extra_bytes"]


def child_process(args: list[str], timeout=600) -> dict | None:
    """Run `python -m autojac._bench.measure ARGS` in a fresh process with MALLOC_MMAP_THRESHOLD_=131072
    (large buffers are mmapped and given back on free, so RSS follows what is live); its JSON line."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-m", "autojac._bench.measure", *args], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


class ProcessPeak:
    """Peak extra memory of the work inside `with ProcessPeak(device) as p:` (`p.extra_bytes`), in a process
    that may run autojac inside: CPU, the peak RSS (VmHWM) over the RSS at entry; CUDA, the allocator's peak
    over what was allocated at entry.

    autojac measures its own chunks by resetting the same counter (writing to /proc/self/clear_refs, or
    `torch.cuda.reset_peak_memory_stats`), so the counter read after the call holds only the peak since
    autojac's last reset, which can be far below the call's peak. `autojac.process_peak_rss()` does not
    fix that alone: it is max(VmHWM now, the highest peak autojac's regions ever read before resetting),
    and that record includes peaks from before our own reset (a warm-up call), so it can be too high.

    The formula we want is max(VmHWM now, every peak autojac read *since our reset*). autojac's regions
    nest: each region, before it resets the counter, hands the peak it read to the innermost region
    still open (`Region._note`), and an inner region hands its own peak to its parent when it closes.
    So we open a region of autojac's meter ourselves around the call: its entry reads the RSS and
    resets the peak (our reset), and at exit its peak is exactly that max, with no autojac region able to
    run between our reset and the call. The region needs the counter's lock, held without waiting: this
    process runs one thread, so it always gets it (`extra_bytes` None would say it did not).
    """

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.extra_bytes: int | None = None
        self.file_bytes: int | None = None
        """CPU: how much the file-backed resident pages grew meanwhile (RssFile): code of kernels run for the
        first time in this process, which the peak RSS counts although it is shared and clean (`extra_bytes`
        minus this is a lower bound of the peak growth of anonymous memory, `extra_bytes` an upper bound)."""

    def __enter__(self):
        gc.collect()
        self._file = _rss_file_bytes() if self.device.type == "cpu" else None
        self._region = PeakMeter(self.device).region()
        self._region.__enter__()
        return self

    def __exit__(self, *exc):
        self._region.__exit__(*exc)
        self.extra_bytes = self._region.peak_bytes
        after = _rss_file_bytes() if self._file is not None else None
        self.file_bytes = None if after is None else max(after - self._file, 0)
        return False


def _rss_file_bytes() -> int | None:
    """This process's resident file-backed pages (RssFile in /proc/self/status), or None where unknown."""
    try:
        with open("/proc/self/status", "rb") as status:
            return _kib_field(status.read(), b"RssFile:")
    except (OSError, ValueError):
        return None


def warm_process(f, inputs) -> None:
    """Run `f`, one backward pass through it and one unbudgeted, uncached autojac call, as the suite's own
    process has before its budgeted contestants plan: the one-time set-up of the kernels (BLAS packing
    buffers, lazy initializations) and of autojac's first call is then paid.

    Without this, a budgeted autojac contestant's first call in a fresh process counted that set-up as its
    forward pass (1.5 MiB for a 64 -> 64 tanh layer) and raised MemoryBudgetError under a budget it holds
    in a warm process (see benchmarks/README.md)."""
    xs = tuple(x.detach().requires_grad_() for x in (inputs if isinstance(inputs, tuple) else (inputs,)))
    with torch.enable_grad():
        ys = f(*xs)
        ys = ys if isinstance(ys, tuple) else (ys,)
        torch.autograd.grad([y.sum() for y in ys], xs, allow_unused=True)
    ys = xs = None
    autojac.jacobian(f, inputs, cache=False)


def _child_call(problem_name, size, name, device, budget, when="warm"):
    """In a fresh process: build, warm up (`warm_process`, then the plan after WARM_CALLS calls for
    autojac) unless `when` is "cold", then measure one call's peak extra memory."""
    device = torch.device(device)
    f, inputs = PROBLEMS_BY_NAME[problem_name].build(size, device)
    budget = int(budget) if budget else None
    try:
        if when != "cold":
            warm_process(f, inputs)
        if when == "cold":
            c = CONTESTANTS_BY_NAME[name]
            run = lambda: c.run(f, inputs, budget)  # noqa: E731
        else:
            run = _prepared(name, f, inputs, budget, device)
        with ProcessPeak(device) as peak:
            run()
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        print(json.dumps({"error": _error_text(exc)}))
        return
    print(json.dumps({"extra_bytes": peak.extra_bytes}))


def _child_budget(problem_name, size, device, budget, warm_calls="3"):
    """In a fresh process (the budget sweep): autojac's first call under `budget` (None: the default),
    then `warm_calls` later calls, each measured (peak extra memory, time) with what it did."""
    device = torch.device(device)
    f, inputs = PROBLEMS_BY_NAME[problem_name].build(size, device)
    budget = int(budget) if budget else None
    calls = []
    for i in range(1 + int(warm_calls)):
        try:
            with ProcessPeak(device) as peak:
                seconds, got = timed(lambda: autojac.jacobian(f, inputs, memory_budget=budget), device)
        except Exception as exc:  # noqa: BLE001 - MemoryBudgetError is a result of the sweep
            calls.append({"error": _error_text(exc), "extra_bytes": peak.extra_bytes, "file_bytes": peak.file_bytes})
            break
        got = None
        r = autojac.last_report()
        plan = autojac.plan(f, inputs, memory_budget=budget)
        calls.append({"extra_bytes": peak.extra_bytes, "file_bytes": peak.file_bytes, "seconds": seconds, "method": r.method,
                      "chunk_sizes": list(r.chunk_sizes), "evaluations": r.evaluations, "planned": r.planned,
                      "trial": r.trial, "events": list(r.events), "plan": plan_text(plan), "n_chunks": plan.n_chunks,
                      "estimated_peak_bytes": plan.estimated_peak_bytes, "budget_bytes": plan.budget_bytes,
                      "settled": plan.settled})
    print(json.dumps({"calls": calls}))


def _child_need(problem_name, size, device):
    """In a fresh process: the peak extra memory of a warm call computing the whole Jacobian at once by vmap
    in the mode with fewer passes, and of the smallest plan (the loop, one vector at a time), measured like
    the budgets. Plans by the rules alone (effort="estimate"), run on each vmap engine the mode has: one call
    computes (the warm-up), the next is measured. The need is the least of them (the engines differ: on
    wide_mlp the autograd engine's whole-basis call peaked at 197 MiB, torch.func's at 131 MiB)."""
    dev = torch.device(device)
    f, x = PROBLEMS_BY_NAME[problem_name].build(size, dev)
    mode, n = _fewer_passes_mode(f, x)
    found = {}
    try:
        p = autojac.plan(f, x, mode=mode, vectorize="vmap", chunk_size=max(n, 1), cache=False, effort="estimate")
        engines = [p.engine] + [e for e in ("func", "autograd") if e != p.engine and mode != "forward"]
        for engine in engines:
            on = dataclasses.replace(p, engine=engine)
            try:
                autojac.jacobian(f, x, plan=on)
                with ProcessPeak(dev) as peak:
                    autojac.jacobian(f, x, plan=on)
            except autojac.AutojacError:
                continue
            if autojac.last_report().method == on.name:  # not a fallback's peak
                found[on.name] = peak.extra_bytes
    except autojac.AutojacError:
        pass
    p = autojac.plan(f, x, mode=mode, vectorize="loop", chunk_size=1, cache=False, effort="estimate")
    autojac.jacobian(f, x, plan=p)
    with ProcessPeak(dev) as peak:
        autojac.jacobian(f, x, plan=p)
    print(json.dumps({"vmap": found, "smallest": peak.extra_bytes, "mode": mode, "passes": n}))


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    {"call": _child_call, "budget": _child_budget, "need": _child_need}[what](*rest)
