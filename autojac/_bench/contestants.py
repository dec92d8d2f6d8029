"""Everyone measured: autojac (auto, budgets, explicit methods), torch's three APIs, and the seed's methods."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import autojac

from . import seeds


@dataclass(frozen=True)
class Contestant:
    name: str
    group: str  # "autojac", "autojac-explicit", "peer", "seed"
    run: Callable  # (f, inputs, budget_bytes | None) -> jacobian
    budget_share: float | None = None  # share of the unchunked need, for budgeted autojac runs


def _argnums(inputs):
    return tuple(range(len(inputs))) if isinstance(inputs, tuple) else 0


def _as_args(inputs):
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _func(transform, **kw):
    def run(f, inputs, budget=None):
        return transform(f, argnums=_argnums(inputs), **kw)(*_as_args(inputs))

    return run


def _autograd(**kw):
    return lambda f, inputs, budget=None: torch.autograd.functional.jacobian(f, inputs, **kw)


def _autojac(**kw):
    return lambda f, inputs, budget=None: autojac.jacobian(f, inputs, memory_budget=budget, **kw)


def _seed(fn):
    return lambda f, inputs, budget=None: fn(f, inputs)


CONTESTANTS = [
    Contestant("autojac", "autojac", _autojac()),
    Contestant("autojac @1/4 mem", "autojac", _autojac(), budget_share=0.25),
    Contestant("autojac @1/16 mem", "autojac", _autojac(), budget_share=1 / 16),
    *[
        Contestant(f"autojac {m}/{v}", "autojac-explicit", _autojac(mode=m, vectorize=v))
        for m in ("reverse", "forward", "forward-trick") for v in ("vmap", "repeat", "loop")
    ],
    Contestant("func.jacrev", "peer", _func(torch.func.jacrev)),
    Contestant("func.jacrev chunk=16", "peer", _func(torch.func.jacrev, chunk_size=16)),
    Contestant("func.jacfwd", "peer", _func(torch.func.jacfwd)),
    Contestant("autograd loop", "peer", _autograd()),
    Contestant("autograd vec rev", "peer", _autograd(vectorize=True)),
    Contestant("autograd vec fwd", "peer", _autograd(vectorize=True, strategy="forward-mode")),
    Contestant("seed repeat-trick", "seed", _seed(seeds.repeat_trick_reverse)),
    Contestant("seed double-VJP loop", "seed", _seed(seeds.double_vjp_loop)),
    Contestant("seed simple loop", "seed", _seed(seeds.simple_loop)),
]

BY_NAME = {c.name: c for c in CONTESTANTS}
