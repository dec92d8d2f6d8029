"""The safety net: a method's first Jacobian of a function is checked against an independent product.

NOTE: [The verification product]
For a random cotangent w (one per output), the Jacobian J that a method built must
satisfy w^T J = (J^T w), where the right side is one plain, unbatched
`torch.autograd` VJP: the product torch's own loop Jacobian is made of. Methods
that evaluate `f` once (reverse, the double-VJP trick on one graph) are checked on
their own graph, so a random `f` is checked on the realization it was
differentiated at, and the check costs one backward pass. Methods that evaluate
`f` many times (forward, repeat) are checked against a fresh evaluation, which
also catches evaluations that disagree (a generator of `f`'s own, state `f` keeps
and changes): one forward and one backward pass. Each component is compared
within a tolerance scaled by |w|^T |J| (the size of the terms it sums), so a
wrong or missing column fails it by orders of magnitude while rounding does not.
The random w comes from a private generator, never the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._core.errors import AutojacError
from .._methods.base import Method, call, grad_inputs, vjp
from .._core.problem import Problem


class VerificationError(AutojacError, ArithmeticError):
    """A method's Jacobian disagreed with an independent vector-Jacobian product."""


def _tolerance(dtype: torch.dtype) -> float:
    return 2.0 * torch.finfo(dtype).eps ** 0.5


def blocks_of(result: object, problem: Problem) -> list[list[torch.Tensor]]:
    """The result's (output, input) blocks, each viewed as (output size, input size)."""
    rows = result if problem.outputs_tuple else (result,)
    blocks = []
    for i, row in enumerate(rows):
        row = row if problem.inputs.is_tuple else (row,)
        blocks.append([b.detach().reshape(problem.out_sizes[i], problem.in_sizes[j]) for j, b in enumerate(row)])
    return blocks


def check_result(
    method: Method,
    state: object,
    result: object,
    f: Callable,
    xs: Sequence[torch.Tensor],
    problem: Problem,
) -> None:
    """Raise VerificationError unless w^T J matches an independent VJP (see NOTE above)."""
    if problem.n_in == 0 or problem.n_out == 0:
        return
    device = problem.inputs.device
    generator = torch.Generator(device=device).manual_seed(0x5AFE)
    w = tuple(torch.randn(s, generator=generator, dtype=d, device=device) for s, d in zip(problem.out_shapes, problem.out_dtypes))
    with torch.enable_grad():
        want = method.same_realization_vjp(state, w)
        if want is None:
            leaves = grad_inputs(xs, create_graph=False)
            want = vjp(call(f, leaves), leaves, w, create_graph=False)
    blocks = blocks_of(result, problem)
    with torch.no_grad():
        for j, size in enumerate(problem.in_sizes):
            dtype = problem.inputs.dtypes[j]
            got = torch.zeros(size, dtype=dtype, device=device)
            scale = torch.zeros(size, dtype=dtype, device=device)
            for i, wi in enumerate(w):
                flat = wi.reshape(-1).to(dtype)
                got += flat @ blocks[i][j]
                scale += flat.abs() @ blocks[i][j].abs()
            ref = torch.zeros(size, dtype=dtype, device=device) if want[j] is None else want[j].detach().reshape(-1).to(dtype)
            if not bool(torch.isfinite(ref).all()):
                continue  # NaN or Inf at this point: the check cannot tell here
            bad = (got - ref).abs() > _tolerance(dtype) * (scale + ref.abs()) + torch.finfo(dtype).tiny
            if bool(bad.any()):
                k = int(bad.nonzero()[0, 0])
                raise VerificationError(
                    f"{method.name} gave a Jacobian whose product with a random vector disagrees with an "
                    f"independent vector-Jacobian product (input {j}, element {k}: {float(got[k]):.6g} against "
                    f"{float(ref[k]):.6g}; {int(bad.sum())} of {size} elements differ)"
                )
