"""`has_aux=True`: `f` returns (output, aux); the Jacobian is of the output, aux comes from one plain evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch._C._functorch import maybe_current_level
from torch.utils import _pytree

from .._core.errors import InputTypeError


class AuxRecorder:
    """Stands in for `f`: returns its output, keeps the aux of the first *plain* evaluation.

    Plain: not inside a transform autojac opened (torch.func.vjp, vmap, a dual
    level), and not on the repeat trick's batched copies. Methods that evaluate
    `f` only inside such transforms leave no plain aux; then `aux()` evaluates
    `f` once more, under no_grad (the README counts it).
    """

    def __init__(self, f: Callable, who: str) -> None:
        self.f = f
        self.__autojac_wraps__ = f  # what the evaluator walks for captured tensors (not this recorder's state)
        self.who = who
        self.level = maybe_current_level()
        self.forward_level = fwAD._current_level
        self.evaluator = None
        self.found = False
        self.value: Any = None

    def _pair(self, *args: Any) -> tuple[Any, Any]:
        out = self.f(*args)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise InputTypeError(f"{self.who}: with has_aux=True, `f` must return a pair (output, aux), but it returned "
                                 f"{type(out).__name__}{'' if not isinstance(out, tuple) else f' of {len(out)}'}.")
        return out

    def __autojac_raw__(self, *args: Any) -> Any:
        """`f`'s output without keeping its aux: for evaluations no one sees (a structure trace, whose aux can be
        a fake tensor; see `Evaluator.isolated`)."""
        return self._pair(*args)[0]

    def __call__(self, *args: Any) -> Any:
        output, aux = self._pair(*args)
        if (not self.found and maybe_current_level() == self.level and fwAD._current_level == self.forward_level
                and (self.evaluator is None or self.evaluator.plain_call)):
            self.found, self.value = True, aux
        return output

    def aux(self, xs, create_graph: bool) -> Any:
        if not self.found:
            with torch.no_grad():
                self.evaluator(*xs)
        value = self.value
        self.found, self.value = False, None
        if create_graph:
            return value
        return _pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, value)
