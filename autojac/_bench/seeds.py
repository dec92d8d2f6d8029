"""The seed thread's three hand-written Jacobians, written afresh from its description.

They take one input tensor and return the Jacobian as (n_outputs, *x.shape)
reshaped like torch's; tuple inputs are not supported by them (they fail).
"""

from __future__ import annotations

import torch


def _single(inputs):
    if isinstance(inputs, tuple):
        raise TypeError("the seed's methods take a single input tensor")
    return inputs


def repeat_trick_reverse(f, inputs):
    """Evaluate f on n_out copies of x and push the identity back in one backward pass."""
    x = _single(inputs)
    y_shape = f(x).shape
    n_out = y_shape.numel()
    xr = x.detach().unsqueeze(0).repeat(n_out, *([1] * x.dim())).requires_grad_()
    y = f(xr).reshape(n_out, n_out)
    (J,) = torch.autograd.grad(y, xr, torch.eye(n_out, dtype=y.dtype, device=y.device))
    return J.reshape(*y_shape, *x.shape)


def double_vjp_loop(f, inputs):
    """Townsend's trick as a loop: one VJP with a dummy cotangent, then d/dv of it per input element."""
    x = _single(inputs).detach().requires_grad_()
    y = f(x)
    v = torch.zeros_like(y, requires_grad=True)
    (g,) = torch.autograd.grad(y, x, v, create_graph=True)
    n_in = x.numel()
    eye = torch.eye(n_in, dtype=x.dtype, device=x.device)
    cols = [torch.autograd.grad(g, v, eye[i].view_as(x), retain_graph=True)[0].reshape(-1) for i in range(n_in)]
    return torch.stack(cols, 1).reshape(*y.shape, *x.shape)


def simple_loop(f, inputs):
    """One backward pass per output element."""
    x = _single(inputs).detach().requires_grad_()
    y = f(x).reshape(-1)
    rows = [torch.autograd.grad(y[i], x, retain_graph=True)[0] for i in range(y.numel())]
    return torch.stack(rows).reshape(*f(x).shape, *x.shape)
