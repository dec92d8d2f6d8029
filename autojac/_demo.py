"""`autojac demo`: what autojac chose for a few built-in functions, against torch.func, in under a minute."""

from __future__ import annotations

import time

import torch

import autojac

from ._bench.problems import BY_NAME


def _best_time(run, repeats=5):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def demo(say=print) -> None:
    device = torch.device("cpu")
    say("autojac demo: Jacobians of built-in functions; autojac's choice against torch.func (CPU, median of 5).\n")
    f, x = BY_NAME["tiny"].build("small", device)
    J = autojac.jacobian(f, x)
    say(f"tiny 3 -> 3 at x = {[round(v, 3) for v in x.tolist()]}:\n{J}\n")
    plans = {}
    for name in ("decoder", "classifier", "custom_function", "transformer"):
        f, x = BY_NAME[name].build("small", device)
        plan = plans[name] = autojac.plan(f, x)
        ours = _best_time(lambda: autojac.jacobian(f, x))
        line = f"{name:16s} {plan.problem.n_out:5d} x {plan.problem.n_in:<5d} autojac {plan.name} " \
               f"(chunk {plan.chunk_size}): {ours * 1e3:7.2f} ms"
        for label, transform in (("jacrev", torch.func.jacrev), ("jacfwd", torch.func.jacfwd)):
            try:
                t = _best_time(lambda: transform(f)(x))
                line += f" | {label} {t * 1e3:7.2f} ms"
            except Exception as exc:
                line += f" | {label} fails ({type(exc).__name__})"
        say(line)
    say("\nWhy, for the decoder:")
    say(str(plans["decoder"]))
