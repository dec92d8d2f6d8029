"""The table of functions every method is checked on, each built for a given dtype and device.

`batch_aware` says whether `f` treats a leading dimension as independent rows
(needed by vectorize="repeat"); `refuses` lists the (mode, vectorize) pairs the
function cannot support, with the reason, so a refusal is as exact as a value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from conftest import DEVICE


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable  # (dtype, device) -> (f, inputs)
    batch_aware: bool = True
    refuses: dict = field(default_factory=dict)

    def build(self, dtype=torch.float64, device=DEVICE):
        torch.manual_seed(0)
        return self.make(dtype, device)

    def refused(self, mode: str, vectorize: str, chunk_size: int, engine: str = "") -> str | None:
        """Why (mode, vectorize[, engine]) must refuse this case, or None. Key "vmap>1": only when vmap really runs;
        "vmap[func]": the torch.func engine at any chunk size."""
        if vectorize == "repeat" and not self.batch_aware:
            return "not batch-aware"
        batched = "vmap>1" if vectorize == "vmap" and chunk_size > 1 else None
        return (self.refuses.get((mode, vectorize)) or self.refuses.get((mode, "*")) or self.refuses.get((mode, batched))
                or (self.refuses.get((mode, f"{vectorize}[{engine}]")) if engine else None))


def _randn(*shape, dtype, device):
    # Drawn in float64 then cast, so the float32 and float64 builds hold the same numbers.
    return torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)


def wide_in(dtype, device):
    W = _randn(3, 20, dtype=dtype, device=device)
    return (lambda x: torch.tanh(x @ W.T)), _randn(20, dtype=dtype, device=device)


def narrow_in(dtype, device):
    W = _randn(20, 3, dtype=dtype, device=device)
    return (lambda x: torch.sin(x @ W.T) * x.sum(-1, keepdim=True)), _randn(3, dtype=dtype, device=device)


def matrix_input(dtype, device):
    A = _randn(5, 2, dtype=dtype, device=device)
    return (lambda X: torch.sin(X) @ A), _randn(4, 5, dtype=dtype, device=device)


def scalar_output(dtype, device):
    return (lambda x: (x.exp() * x).sum(-1)), _randn(6, dtype=dtype, device=device)


def scalar_input(dtype, device):
    return (lambda s: torch.stack([s.sin(), s ** 3, s.exp()], -1)), torch.tensor(0.7, dtype=dtype, device=device)


def tuple_in_out(dtype, device):
    def f(x, y):
        return x * y.sum((-1, -2)).unsqueeze(-1), (y ** 2).sum(-1) + x[..., :2].cos()

    return f, (_randn(3, dtype=dtype, device=device), _randn(2, 2, dtype=dtype, device=device))


def module(dtype, device):
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype=dtype, device=device)
    return net, _randn(4, dtype=dtype, device=device)


class OldStyleSquare(torch.autograd.Function):
    """Old-style: forward takes ctx, no setup_context and no jvp, so torch.func refuses it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2 * 0.5 + x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x + 1)


def old_style_function(dtype, device):
    W = _randn(5, 4, dtype=dtype, device=device)
    return (lambda x: OldStyleSquare.apply(x) @ W.T), _randn(4, dtype=dtype, device=device)


class ListBackwardExp(torch.autograd.Function):
    """Its backward leaves torch through Python lists: fine for one VJP, not vmappable, not differentiable."""

    @staticmethod
    def forward(x):
        return x.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.tensor(grad.tolist(), dtype=grad.dtype, device=grad.device) * y.detach()


def list_backward(dtype, device):
    W = _randn(3, 4, dtype=dtype, device=device)
    return (lambda x: ListBackwardExp.apply(x) @ W.T), _randn(4, dtype=dtype, device=device)


def control_flow(dtype, device):
    def f(x):
        if float(x.sum()) > 0:  # data-dependent Python branch
            return torch.sin(x) * 2
        return torch.cos(x)

    return f, _randn(5, dtype=dtype, device=device).abs()


def preallocated_buffer(dtype, device):
    def f(x):
        out = torch.empty(3, dtype=x.dtype, device=x.device)
        out[0] = x[0] * x[1]
        out[1] = x[1].exp()
        out[2] = x[2] / (1 + x[0] ** 2)
        return out

    return f, _randn(3, dtype=dtype, device=device)


def independent_output(dtype, device):
    return (lambda x: (x * 2, torch.ones_like(x))), _randn(4, dtype=dtype, device=device)


def partly_independent(dtype, device):
    def f(x, y):
        return x.sin(), y * 3

    return f, (_randn(2, dtype=dtype, device=device), _randn(3, dtype=dtype, device=device))


CASES = [
    Case("wide_in", wide_in),
    Case("narrow_in", narrow_in),
    Case("matrix_input", matrix_input),
    Case("scalar_output", scalar_output),
    Case("scalar_input", scalar_input),
    Case("tuple_in_out", tuple_in_out),
    Case("module", module),
    Case("old_style_function", old_style_function, refuses={
        ("forward", "*"): "no jvp formula; torch.func refuses old-style Functions",
        ("reverse", "vmap[func]"): "torch.func refuses old-style Functions (no setup_context)",
        ("forward-trick", "vmap[func]"): "torch.func refuses old-style Functions (no setup_context)",
    }),
    Case("list_backward", list_backward, refuses={
        ("forward", "*"): "no jvp formula",
        ("forward-trick", "*"): "backward is not differentiable (caught by the dot-product check)",
        ("reverse", "vmap>1"): "backward calls .tolist(), which vmap cannot batch",
    }),
    # The branch reads the whole batch, but all rows of a repeat batch are copies, so it still agrees.
    Case("control_flow", control_flow),
    Case("preallocated_buffer", preallocated_buffer, batch_aware=False),
    Case("independent_output", independent_output),
    Case("partly_independent", partly_independent),
]
