"""Realistic functions a user would differentiate, each at a small and a large size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Problem:
    name: str
    kind: str
    build: Callable[[str, torch.device], tuple[Callable, object]]  # size -> (f, inputs)
    batch_aware: bool = True


def _seeded(fn):
    def build(size, device):
        torch.manual_seed(0)
        return fn(size, device)

    return build


@_seeded
def classifier(size, device):
    """Image classifier w.r.t. its input image: wide in, 10 out."""
    side = 16 if size == "small" else 32
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(-3), nn.Linear(8 * (side // 2) ** 2, 10),
    ).to(device).eval()
    return net, torch.randn(3, side, side, device=device)


@_seeded
def decoder(size, device):
    """Decoder from a small latent to a large output: narrow in, wide out."""
    out = 1024 if size == "small" else 4096
    net = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 512), nn.Tanh(), nn.Linear(512, out)).to(device)
    return net, torch.randn(8, device=device)


@_seeded
def robot_arm(size, device):
    """Planar kinematic chain: joint angles -> positions of every joint."""
    n = 6 if size == "small" else 24
    lengths = torch.rand(n, device=device) + 0.5

    def f(theta):
        angles = torch.cumsum(theta, -1)
        xs = torch.cumsum(lengths * torch.cos(angles), -1)
        ys = torch.cumsum(lengths * torch.sin(angles), -1)
        return torch.stack([xs, ys], -1)

    return f, torch.randn(n, device=device)


@_seeded
def transformer(size, device):
    """A transformer encoder layer w.r.t. its tokens: square."""
    seq, d = (8, 32) if size == "small" else (32, 64)
    layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True).to(device).eval()
    return (lambda tokens: layer(tokens)), torch.randn(seq, d, device=device)


def rk4_step(rhs, y, h):
    """One classical Runge-Kutta step of dy/dt = rhs(y): what the rollouts of the benchmarks repeat."""
    k1 = rhs(y)
    k2 = rhs(y + h / 2 * k1)
    k3 = rhs(y + h / 2 * k2)
    k4 = rhs(y + h * k3)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


@_seeded
def ode_rollout(size, device):
    """RK4 rollout of a small neural ODE: state -> final state, many steps deep."""
    dim, steps = (16, 20) if size == "small" else (64, 40)
    net = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, dim)).to(device)

    def f(y):
        h = 0.05
        for _ in range(steps):
            y = rk4_step(net, y, h)
        return y

    return f, torch.randn(dim, device=device)


@_seeded
def pde_residual(size, device):
    """Residual of a nonlinear Poisson problem on a grid: square and sparse."""
    n = 16 if size == "small" else 40

    def f(u):
        lap = -4 * u
        lap = lap + torch.roll(u, 1, -1) + torch.roll(u, -1, -1) + torch.roll(u, 1, -2) + torch.roll(u, -1, -2)
        return lap + u ** 3 - 1.0

    return f, torch.randn(n, n, device=device)


@_seeded
def per_sample_mlp(size, device):
    """A batch of samples through an MLP: block-diagonal Jacobian."""
    batch = 16 if size == "small" else 64
    net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
    return net, torch.randn(batch, 10, device=device)


@_seeded
def loss_wrt_weights(size, device):
    """A scalar loss w.r.t. a weight matrix: wide in, one out."""
    out_f, in_f = (32, 64) if size == "small" else (64, 128)
    data, target = torch.randn(100, in_f, device=device), torch.randn(100, out_f, device=device)

    def f(W):
        return ((torch.tanh(data @ W.transpose(-1, -2)) - target) ** 2).mean((-1, -2))

    return f, torch.randn(out_f, in_f, device=device) / in_f ** 0.5


class LegacySoftplus(torch.autograd.Function):
    """Old-style custom Function: no setup_context, no jvp; torch.func and forward AD refuse it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.softplus(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


@_seeded
def custom_function(size, device):
    """Old-style custom autograd.Function inside a narrow-in, wide-out map."""
    n_in, n_out = (16, 512) if size == "small" else (32, 2048)
    W1, W2 = torch.randn(256, n_in, device=device), torch.randn(n_out, 256, device=device) / 16
    return (lambda x: LegacySoftplus.apply(x @ W1.T) @ W2.T), torch.randn(n_in, device=device)


@_seeded
def tiny(size, device):
    """A 3 -> 3 map: overhead dominates."""
    A = torch.randn(3, 3, device=device)
    return (lambda x: torch.sin(x @ A.T) * x), torch.randn(3, device=device)


@_seeded
def tuple_inputs(size, device):
    """Two inputs, two outputs: a gated layer w.r.t. its input and its state."""
    d = 32 if size == "small" else 128
    Wx, Wh = torch.randn(d, d, device=device) / d ** 0.5, torch.randn(d, d, device=device) / d ** 0.5

    def f(x, h):
        gate = torch.sigmoid(x @ Wx.T + h @ Wh.T)
        return gate * torch.tanh(x), (1 - gate) * h

    return f, (torch.randn(d, device=device), torch.randn(d, device=device))


@_seeded
def wide_mlp(size, device):
    """512 -> 512 through 4 residual blocks 32768 wide: each basis vector carries wide activations,
    so the vectorized Jacobian needs far more memory than its result. For budget sweeps. Size "gpu" (2048 ->
    2048, 131072 wide: 8 GiB of weights, an unchunked need of about 2 GiB) is for a GPU: there a fresh process's
    first matmul allocates cuBLAS's workspace (32 MiB on Hopper) inside the first evaluation, which a first call
    must count, so "large"'s budgets (33, 13 and 9 MiB at 4x, 10x, 15x below its need) fall under it."""
    width, dim = {"gpu": (131072, 2048), "large": (32768, 512)}.get(size, (2048, 64))
    blocks = [(torch.randn(width, dim, device=device) / dim ** 0.5, torch.randn(dim, width, device=device) / width ** 0.5)
              for _ in range(4)]

    def f(x):
        for W1, W2 in blocks:
            x = x + torch.tanh(x @ W1.T) @ W2.T
        return x

    return f, torch.randn(dim, device=device)


PROBLEMS = [
    Problem("classifier", "conv, wide in / narrow out", classifier),
    Problem("decoder", "narrow in / wide out", decoder),
    Problem("robot_arm", "kinematic chain, small", robot_arm),
    Problem("transformer", "transformer layer, square", transformer),
    Problem("ode_rollout", "RK4 rollout, deep", ode_rollout),
    Problem("pde_residual", "grid residual, square sparse", pde_residual),
    Problem("per_sample_mlp", "batch of samples, block diagonal", per_sample_mlp, batch_aware=False),
    Problem("loss_wrt_weights", "scalar loss w.r.t. a matrix", loss_wrt_weights),
    Problem("custom_function", "old-style autograd.Function", custom_function),
    Problem("tiny", "3 -> 3", tiny),
    Problem("tuple_inputs", "tuple inputs and outputs", tuple_inputs),
]

BUDGET_PROBLEMS = [Problem("wide_mlp", "residual MLP, 512 -> 512 through four 32768-wide blocks (size gpu: 2048 -> 2048, 131072 wide)", wide_mlp)]

BY_NAME = {p.name: p for p in PROBLEMS + BUDGET_PROBLEMS}
