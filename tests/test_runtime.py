"""Plans at run time: reuse, mismatch, caching, out-of-memory retries and fallback to the next method."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from reference import assert_same_structure_and_close, reference

import autojac
from autojac import _methods as _execute
from autojac._execute.run import is_out_of_memory

W = torch.randn(30, 8, dtype=torch.float64)


def f(x):
    return torch.tanh(x @ W.T)


def test_plan_then_run_the_plan():
    x = torch.randn(8, dtype=torch.float64)
    p = autojac.plan(f, x)
    assert isinstance(p, autojac.Plan)
    assert {c.name for c in p.candidates} >= {"forward/vmap", "reverse/vmap"}
    assert p.estimated_seconds > 0 and p.estimated_peak_bytes > 0 and p.budget_bytes > 0
    assert_same_structure_and_close(autojac.jacobian(f, x, plan=p), reference(f, x))


def test_plan_reused_with_other_shapes_lists_each_mismatch():
    p = autojac.plan(f, torch.randn(8, dtype=torch.float64))
    with pytest.raises(autojac.PlanMismatchError) as info:
        autojac.jacobian(f, torch.randn(2, 8, dtype=torch.float32), plan=p)
    text = str(info.value)
    assert "shapes: plan has ((8,)), call has ((2, 8))" in text
    assert "dtypes: plan has (torch.float64,), call has (torch.float32,)" in text
    assert isinstance(info.value, ValueError)


def test_plan_together_with_options_is_refused():
    x = torch.randn(8, dtype=torch.float64)
    p = autojac.plan(f, x)
    with pytest.raises(autojac.InputError, match="already fixes"):
        autojac.jacobian(f, x, plan=p, mode="reverse")


def test_plans_are_cached_per_function_and_signature(monkeypatch):
    x = torch.randn(8, dtype=torch.float64)
    p1 = autojac.plan(f, x)
    assert autojac.plan(f, x) is p1
    assert autojac.plan(f, torch.randn(4, 8, dtype=torch.float64).sum(0)) is p1  # same signature
    assert autojac.plan(f, x, memory_budget="1GiB") is not p1
    assert autojac.plan(f, x, cache=False) is not p1

    probes = []
    real = autojac._jacobian.probe
    monkeypatch.setattr(autojac._jacobian, "probe", lambda *a, **k: probes.append(1) or real(*a, **k))
    autojac.jacobian(f, x)
    assert probes == []  # the cached plan was used


def test_cache_follows_bound_methods_and_modules():
    net = torch.nn.Linear(3, 2).double()
    x = torch.randn(3, dtype=torch.float64)
    assert autojac.plan(net, x) is autojac.plan(net, x)
    assert autojac.plan(net.forward, x) is autojac.plan(net.forward, x)


def test_out_of_memory_halves_the_chunk_and_keeps_the_result(monkeypatch):
    x = torch.randn(8, dtype=torch.float64)
    method = _execute.method("reverse", "vmap")
    real = type(method).chunk
    sizes = []

    def chunk_that_runs_out_above_4(self, state, basis):
        sizes.append(basis[0].shape[0])
        if basis[0].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, state, basis)

    monkeypatch.setattr(type(method), "chunk", chunk_that_runs_out_above_4)
    p = autojac.plan(f, x, mode="reverse", vectorize="vmap", chunk_size=30)
    sizes.clear()  # forget the capability probe's chunk
    got = autojac.jacobian(f, x, plan=p)
    assert_same_structure_and_close(got, reference(f, x))
    assert sizes[:3] == [30, 15, 6]  # 30 fails, 15 fails, 7 balances to 6 and fails
    assert all(k <= 4 for k in sizes[3:]) and sum(sizes[3:]) == 30
    assert any("out of memory at chunk size 30" in h for h in p.history)


def test_cpu_allocator_error_counts_as_out_of_memory():
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 800000000000 bytes."))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_method_that_fails_at_run_time_hands_over_to_the_next(monkeypatch):
    x = torch.randn(8, dtype=torch.float64)
    p = autojac.plan(f, x, mode="reverse")
    chosen = _execute.method(p.mode, p.vectorize, p.engine)

    def broken(self, state, basis):
        raise RuntimeError("something the probe did not see")

    monkeypatch.setattr(type(chosen), "chunk", broken)
    got = autojac.jacobian(f, x, plan=p)
    assert_same_structure_and_close(got, reference(f, x))
    assert p.history[0].startswith(f"{p.mode}/{p.vectorize} failed (RuntimeError: something the probe did not see")


def test_explicit_method_that_fails_at_run_time_says_what_to_do(monkeypatch):
    x = torch.randn(8, dtype=torch.float64)
    p = autojac.plan(f, x, mode="forward", vectorize="vmap", chunk_size=4)
    monkeypatch.setattr(type(_execute.method("forward", "vmap")), "chunk",
                        lambda self, s, b: (_ for _ in ()).throw(RuntimeError("vmap: no batching rule")))
    with pytest.raises(autojac.UnsupportedFunctionError, match="forward/vmap could not differentiate") as info:
        autojac.jacobian(f, x, plan=p)
    assert "forward-trick" in str(info.value) and "loop" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_f_failing_later_with_its_own_error_propagates_unchanged():
    x = torch.randn(8, dtype=torch.float64)
    state = {"fail": False}

    def g(t):
        if state["fail"]:
            raise KeyError("g's own")
        return torch.tanh(t @ W.T)

    autojac.jacobian(g, x)
    state["fail"] = True
    with pytest.raises(KeyError, match="g's own"):
        autojac.jacobian(g, x)


def test_nothing_fits_is_raised_before_the_work():
    x = torch.randn(64, dtype=torch.float64)
    runs = []

    def g(t):
        runs.append(1)
        return t.sin() * 2

    with pytest.raises(autojac.MemoryBudgetError, match=r"the Jacobian alone \(64 x 64\) takes 32.0 KiB, plus the 8.0 MiB workspace reserve"):
        autojac.jacobian(g, x, memory_budget=1000)
    assert len(runs) == 1  # the one evaluation that tells the output shape


def test_when_only_the_probes_show_nothing_fits_the_error_says_what_the_smallest_plan_needs():
    x = torch.randn(64, dtype=torch.float64)
    # The result (32 KiB) and the reserve fit; a 16 MiB intermediate in every pass of f does not.
    budget = 8 * 2**20 + 2**20
    with pytest.raises(autojac.MemoryBudgetError, match="the smallest plan"):
        autojac.jacobian(lambda t: t.repeat(2**15).sin().reshape(-1, 64).sum(0), x, memory_budget=budget)


def test_debug_log_tells_the_decision(caplog):
    with caplog.at_level("DEBUG", logger="autojac"):
        autojac.jacobian(f, torch.randn(8, dtype=torch.float64))
    assert any(r.getMessage().startswith("Plan: ") for r in caplog.records)


def test_progress_bar_when_asked(capsys):
    autojac.jacobian(f, torch.randn(8, dtype=torch.float64), progress=True, mode="reverse", vectorize="loop", chunk_size=3)
    assert "autojac reverse/loop" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak RSS")
def test_cpu_budget_is_kept_in_a_fresh_process():
    """Peak RSS of a subprocess stays within the budget although the unchunked vmap needs 10x more."""
    script = textwrap.dedent("""
        import json, gc, torch, autojac
        torch.manual_seed(0)
        W1 = torch.randn(4096, 256); W2 = torch.randn(4096, 4096); W3 = torch.randn(3072, 4096)
        f = lambda x: torch.tanh(torch.tanh(torch.tanh(x @ W1.T) @ W2.T) @ W3.T)   # 256 -> 3072
        x = torch.randn(256)
        budget = 12 * 2**20
        p = autojac.plan(f, x, memory_budget=budget, mode="reverse", vectorize="vmap")
        cost = p.candidates[0].cost
        unchunked = cost.bytes_fixed + cost.bytes_per_vector * 3072 + 3072 * 256 * 4
        gc.collect()
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        before = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM) to the current RSS
        J = autojac.jacobian(f, x, plan=p)
        print(json.dumps({"extra": status("VmHWM") - before, "budget": budget, "unchunked": unchunked,
                          "chunk": p.chunk_size, "shape": list(J.shape)}))
    """)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["shape"] == [3072, 256]
    assert facts["unchunked"] >= 10 * facts["budget"]  # a budget that really forces chunking
    assert facts["chunk"] < 3072
    print(facts)
    assert facts["extra"] <= facts["budget"], facts


def test_refine_interleaves_contenders_skips_the_warm_up_and_keeps_the_fastest_round(monkeypatch):
    from autojac import _probe

    x = torch.randn(8, dtype=torch.float64)
    p = autojac.plan(f, x, mode="reverse", cache=False)
    costs = {(c.cost.mode, c.cost.vectorize): c.cost for c in p.candidates}
    names = ["reverse/vmap", "reverse/loop", "reverse/repeat"]
    contenders = [(costs[tuple(n.split("/"))], _execute.method(*n.split("/")), 8) for n in names]
    script = {  # seconds per run, the warm-up first; reverse/repeat fails at its second timed run
        "reverse/vmap": iter([9.0, 0.15, 0.05, 0.1]),
        "reverse/loop": iter([9.0, 0.25, 0.2, 0.3]),
        "reverse/repeat": iter([9.0, 0.05, "out of memory"]),
    }
    calls = []

    def fake_run_method(method, *args):
        calls.append(method.name)
        seconds = next(script[method.name])
        if isinstance(seconds, str):
            raise RuntimeError(seconds)
        return seconds

    monkeypatch.setattr(_probe, "run_method", fake_run_method)
    monkeypatch.setattr(_probe, "timed", lambda work, device: (work(), None))
    refined = _probe.refine(contenders, f, (x,), p.problem, False)
    # warm-ups in order, then rounds that rotate who goes first; 3 rounds, as they took over REFINE_SECONDS
    assert calls == names + names + ["reverse/loop", "reverse/repeat", "reverse/vmap"] + ["reverse/vmap", "reverse/loop"]
    assert refined[0].measured_run == (8, 0.05)
    assert refined[1].measured_run == (8, 0.2)
    assert refined[2] is contenders[2][0]  # failed at full size: keeps its extrapolated estimate


def test_a_best_slower_than_extrapolated_brings_the_others_into_further_timed_passes(monkeypatch):
    import dataclasses

    from autojac import _jacobian

    x = torch.randn(8, dtype=torch.float64)
    passes = []

    def fake_refine(contenders, f, xs, problem, create_graph):
        passes.append({m.name for _, m, _ in contenders})
        # Every pass's runs take longer than the last's, and far longer than extrapolated.
        return [dataclasses.replace(c, measured_run=(k, float(len(passes)))) for c, _, k in contenders]

    monkeypatch.setattr(_jacobian, "REFINE_WITHIN", 1.0)
    monkeypatch.setattr(_jacobian, "REFINE_MAX_SECONDS", 10.0)
    monkeypatch.setattr(_jacobian, "refine", fake_refine)
    p = autojac.plan(f, x, mode="forward", cache=False)  # 3 candidates: vmap, repeat, loop
    # Only the extrapolated best is close at first (within 1x of itself); each timed run brings
    # the next-best extrapolation within reach, which is timed together with those timed before.
    assert [len(names) for names in passes] == [1, 2, 3]
    assert passes[0] < passes[1] < passes[2] == {"forward/vmap", "forward/repeat", "forward/loop"}
    assert p.estimated_seconds == 3.0  # the choice is between the last pass's timed runs


def test_the_large_probe_chunk_is_cut_to_what_surely_fits_the_budget():
    from autojac._probe import _large_within
    from autojac._planner import SAFETY

    assert _large_within(None, 2, 10**9, 16) == 16  # no budget: the usual probe
    assert _large_within(10**9, 2, 1000, 16) == 16  # plenty of room
    # 2 vectors peaked at 1 MiB: at most 0.5 MiB per vector, so 3 MiB of room surely holds 6 / SAFETY vectors.
    assert _large_within(3 * 2**20, 2, 2**20, 16) == int(6 / SAFETY)
    assert _large_within(2**20, 2, 2**20, 16) == 2  # no room for more: the large probe is skipped



def test_probes_under_a_budget_hold_no_more_than_it_leaves_them(monkeypatch):
    from autojac import _probe
    from autojac._measure import device as _memory

    W1, W2 = torch.randn(8192, 128) / 11, torch.randn(128, 8192) / 90

    def g(x):  # 128 -> 128 through an 8192-wide layer: ~0.1-0.3 MiB per basis vector
        return x + torch.tanh(x @ W1.T) @ W2.T

    peaks = []
    real = _probe.measure_peak_bytes

    def recording(work, device):
        peak, result = real(work, device)
        peaks.append(peak)
        return peak, result

    monkeypatch.setattr(_probe, "measure_peak_bytes", recording)
    budget = _memory.CPU_WORKSPACE_RESERVE + 2**20
    # Reverse mode only: forward mode's fixed part alone (a weight-sized copy of the weight's zero
    # tangent, see NOTE: [Copies inside matrix kernels]) is 4 MiB here, and a capability run at 2
    # vectors is how any probe learns that; the cap can only bound the larger probe.
    p = autojac.plan(g, torch.randn(128), mode="reverse", memory_budget=budget, cache=False)
    assert any("to stay within the budget" in c.cost.note for c in p.candidates)  # 16 vectors would not fit
    assert max(peaks) <= budget - _memory.CPU_WORKSPACE_RESERVE
