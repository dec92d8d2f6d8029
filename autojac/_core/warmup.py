"""One-time costs paid at `import autojac`, not inside the first call (and not against its budget).

NOTE: [Why autojac warms torch.func up at import]
The first `torch.func.vmap` of a process imports some 800 modules (torch._dynamo
and friends): 0.8 s and about 80 MiB of resident memory on the 2-core CPU machine;
the first `torch.func.jvp` another 0.1 s and 10 MiB. Inside a call that would be
charged to the call's time and, worse, to its memory budget, where no plan can
avoid it. A vmap and a jvp over a 2-element tensor at import pay it once, up front.
Set AUTOJAC_LAZY_IMPORTS=1 to skip this (the first call then pays it).

NOTE: [Kernel code a first call runs]
The first Jacobian of a process also runs, for the first time, some 6.5 MiB of
libtorch_cpu's code (autograd's engine and formulas, vmap's batching rules, the
matrix kernels): the kernel maps those pages on first use, and they count in the
process's resident memory, so they were charged to the first call's budget (a
first call of `wide_mlp` under an 8.7 MiB budget peaked at 8.6-8.8 MiB, 7.0 MiB of
it those pages, against 1.6-1.8 MiB of its own). One small Jacobian per common
dtype at import (a residual MLP: linear layers, tanh, relu, a sum), planned and
checked as any first call but not cached, runs most of that code here. It draws
nothing from the global RNG and leaves no plan, report or cache entry behind.
"""

from __future__ import annotations

import os

import torch


def lazy() -> bool:
    return os.environ.get("AUTOJAC_LAZY_IMPORTS", "") not in ("", "0")


def warm_up() -> None:
    if lazy():
        return
    x = torch.zeros(2)
    with torch.no_grad():
        _, vjp_fn = torch.func.vjp(torch.sin, x)
        torch.func.vmap(vjp_fn)(torch.eye(2))
        torch.func.vmap(lambda t: torch.func.jvp(torch.sin, (x,), (t,))[1])(torch.eye(2))


def first_call_code(jacobian, forget_report) -> None:
    """NOTE: [Kernel code a first call runs]: one uncached Jacobian per dtype, with deterministic values."""
    if lazy():
        return
    try:
        for dtype in (torch.float32, torch.float64):
            w1 = torch.linspace(-1.0, 1.0, 48, dtype=dtype, device="cpu").reshape(6, 8)
            w2 = torch.linspace(1.0, -1.0, 48, dtype=dtype, device="cpu").reshape(8, 6)
            b = torch.linspace(-0.5, 0.5, 6, dtype=dtype, device="cpu")

            def mlp(x, w1=w1, w2=w2, b=b):
                h = torch.tanh(torch.nn.functional.linear(x, w1, b))
                return x + torch.relu(h) @ w2.T + x.sum()

            jacobian(mlp, torch.linspace(-1.0, 1.0, 8, dtype=dtype, device="cpu"), cache=False)
    except Exception:  # noqa: BLE001 - a head start, never a reason for the import to fail
        pass
    finally:
        forget_report()
