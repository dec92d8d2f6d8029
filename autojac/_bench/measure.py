"""Measuring contestants side by side: interleaved median times, peak extra memory, correctness."""

from __future__ import annotations

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
from autojac._measure.tracker import measure_peak_bytes

from .contestants import BY_NAME as CONTESTANTS_BY_NAME
from .problems import BY_NAME as PROBLEMS_BY_NAME


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _measured_peak(run, device) -> int:
    run()  # warm: the plan is made, one-time set-up paid
    gc.collect()
    return measure_peak_bytes(run, device)[0]


def _fewer_passes_mode(f, inputs) -> tuple[str, int]:
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        out = f(*xs)
    n_out = sum(y.numel() for y in (out if isinstance(out, tuple) else (out,)))
    n_in = sum(x.numel() for x in xs)
    return ("reverse", n_out) if n_out <= n_in else ("forward-trick", n_in)


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


def time_problem(problem, size, names, device, repeats=21, slow_seconds=5.0, few_seconds=0.1, few=5):
    """Rows of facts for each contestant on one problem: time (median of interleaved runs), errors.

    `repeats` rounds for calls under `few_seconds` (their noise is what decides close ratios: with 9
    rounds, bursts of machine noise lasting a few rounds moved the ratio between autojac and its own
    explicit run of the same method by up to 16% on millisecond problems), `few` for slower ones, one for
    calls over `slow_seconds`.
    """
    f, inputs = problem.build(size, device)
    want = torch.autograd.functional.jacobian(f, inputs)
    need, smallest = unchunked_need(f, inputs)
    rows, runners = {}, {}
    autojac.clear_cache()  # every autojac contestant plans on its first call below; keys differ, so plans coexist
    for name in names:
        c = CONTESTANTS_BY_NAME[name]
        row = {"problem": problem.name, "size": size, "contestant": name, "group": c.group}
        rows[name] = row
        budget = None
        if c.budget_share is not None:
            # A share of the unchunked need, but never below what the smallest plan needs (+5%).
            budget = max(int(need * c.budget_share), int(smallest * 1.05))
            row.update(budget_bytes=budget, unchunked_bytes=need, smallest_bytes=smallest)
        try:
            _sync(device)
            start = time.perf_counter()
            got = c.run(f, inputs, budget)
            _sync(device)
            row["first_seconds"] = time.perf_counter() - start
        except Exception as exc:  # a contestant that cannot run is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            continue
        wrong = check(got, want)
        if wrong:
            row["error"] = wrong
            continue
        if budget is not None or name == "autojac":
            plan = autojac.plan(f, inputs, memory_budget=budget)
            row["plan"] = f"{plan.name} x{plan.chunk_size}"
        runners[name] = lambda c=c, budget=budget: c.run(f, inputs, budget)
    # Sub-millisecond calls are timed in batches of `inner` calls (like timeit's autorange), so one
    # scheduler hiccup on a small machine does not decide a ratio.
    inner = {}
    for name, run in runners.items():
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        inner[name] = max(1, min(200, int(0.01 / max(time.perf_counter() - start, 1e-6))))
    times = {name: [] for name in runners}
    order, shuffler = list(runners), random.Random(0)
    for r in range(repeats):
        # A new order each round: in a fixed (or merely rotated) order every contestant follows the
        # same one each time, and what ran before decides the caches it starts on; autojac ran after
        # the slowest peer, 378 us against 360 us for the same plan following a fast, similar run.
        shuffler.shuffle(order)
        for name in order:
            run = runners[name]
            if r > 0 and times[name] and times[name][0] > slow_seconds:
                continue  # one timing is enough for a method this slow
            if r >= few and times[name] and times[name][0] > few_seconds:
                continue
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                run()
            _sync(device)
            times[name].append((time.perf_counter() - start) / inner[name])
    for name, ts in times.items():
        rows[name]["seconds"] = statistics.median(ts)
        rows[name]["runs"] = len(ts)
    return list(rows.values())


def tracked_peak(problem, size, name, device, budget=None) -> int:
    """Peak extra bytes of a warm call, in process (storage tracker on CPU, allocator on CUDA)."""
    f, inputs = problem.build(size, device)
    run = CONTESTANTS_BY_NAME[name].run
    run(f, inputs, budget)
    gc.collect()
    return measure_peak_bytes(lambda: run(f, inputs, budget), device)[0]


def rss_peak(problem_name, size, name, device, budget=None, timeout=600, cold=False) -> int | None:
    """Peak extra RSS of a warm call (`cold`: of the first call, planning included) in a fresh
    subprocess (CPU, Linux), or None if it failed."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    args = [sys.executable, "-m", "autojac._bench.measure", problem_name, size, name, str(device), str(budget or ""),
            "cold" if cold else "warm"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _child(problem_name, size, name, device, budget, when="warm"):
    """In a fresh process: build, warm up (planning happens here) unless `when` is "cold",
    then measure one call's peak extra memory."""
    device = torch.device(device)
    f, inputs = PROBLEMS_BY_NAME[problem_name].build(size, device)
    run = CONTESTANTS_BY_NAME[name].run
    budget = int(budget) if budget else None
    if when != "cold":
        run(f, inputs, budget)
    gc.collect()
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(f, inputs, budget)
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS to the current RSS
        run(f, inputs, budget)
        extra = _status("VmHWM") - before
    print(json.dumps({"extra_bytes": extra}))


if __name__ == "__main__":
    _child(*sys.argv[1:7])
