"""Reference Jacobians: torch.autograd.functional.jacobian (plain loop) in float64, and finite differences."""

from __future__ import annotations

import torch


def reference(f, inputs):
    """torch's own loop Jacobian; the inputs are float64 copies when the case is built in float64."""
    return torch.autograd.functional.jacobian(f, inputs, vectorize=False)


def flat(jac) -> list[torch.Tensor]:
    if isinstance(jac, torch.Tensor):
        return [jac]
    return [t for item in jac for t in flat(item)]


def assert_same_structure_and_close(got, want, rtol=1e-7, atol=1e-9):
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same_structure_and_close(g, w, rtol, atol)
        return
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.device == want.device
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def central_differences(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d f / d x by central differences, for one tensor input and output, in float64."""
    x = x.detach().double()
    y0 = f(x)
    J = torch.empty(y0.numel(), x.numel(), dtype=torch.float64)
    for j in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=torch.float64)
        e[j] = eps
        e = e.view_as(x)
        J[:, j] = ((f(x + e) - f(x - e)) / (2 * eps)).reshape(-1)
    return J.view(*y0.shape, *x.shape)
