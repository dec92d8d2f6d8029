"""Rules for reductions over dims, whole-line ops (softmax, sort), prefix scans, and loss functions."""

from __future__ import annotations

import numpy as np
import torch

from . import deps as D
from .maps import group_positions, line_positions, norm_dims, pos_map
from .registry import Call, rule


def reduce_dims(call: Call, t, dims) -> D.Deps | None:
    """Deps of the reduction of t over `dims`, ordered as the kept dims row-major."""
    return reduce_deps(call.deps(t), call.shape(t), dims)


def reduce_deps(d: D.Deps | None, shape, dims) -> D.Deps | None:
    if d is None:
        return None
    dims = norm_dims(dims, len(shape))
    if len(dims) == len(shape):
        return D.dense([d], 1)
    groups = group_positions(shape, dims)
    return D.reduce(d, D.groups_from_positions(groups, d.numel))


def _same_for_all(call: Call, d) -> list:
    return [d if m.numel == (d.numel if d is not None else m.numel) else D.dense([d], m.numel)
            for _, m in call.results]


@rule("sum", "mean", "nansum", "nanmean", "amax", "amin", "logsumexp", "linalg_vector_norm", "norm", "var", "std",
      "var_mean", "std_mean", "aminmax", "median", "nanmedian", "mode", "max", "min", "prod", "all", "any",
      "count_nonzero", "argmax", "argmin", "kthvalue")
def reduction_rule(call: Call) -> list:
    t = call.arg("self")
    dims = call.arg("dim")  # absent (the .default overloads) or None or []: every dim
    return _same_for_all(call, reduce_dims(call, t, dims))


def along_lines(call: Call, t, dim: int, k: int = 0) -> D.Deps | None:
    """Each element of result k depends on its whole line of t along dim."""
    shape = call.shape(t)
    if not shape:
        return call.deps(t)
    dim %= len(shape)
    lines = reduce_dims(call, t, [dim])
    return D.take(lines, line_positions(shape, dim, call.out_shape(k)))


@rule("_softmax", "_log_softmax", "softmax", "log_softmax", "_safe_softmax", "sort", "topk", "msort")
def line_rule(call: Call) -> list:
    t = call.arg("self")
    dim = call.arg("dim", -1)
    if call.info.name == "msort":
        dim = 0
    return [along_lines(call, t, dim if dim is not None else -1, k) for k in range(len(call.results))]


@rule("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "_cummax_helper", "_cummin_helper")
def prefix_rule(call: Call) -> list:
    t = call.arg("self")
    d = call.deps(t)
    shape = call.shape(t)
    if not shape or d is None:
        return [d] * len(call.results)
    dim = call.arg("dim") % len(shape)
    lines = pos_map(shape).movedim(dim, -1).reshape(-1, shape[dim]).numpy()
    ii, jj = np.tril_indices(shape[dim])
    rows, cols = lines[:, ii].reshape(-1) - 1, lines[:, jj].reshape(-1) - 1
    groups = D.csr_from_pairs(rows, cols, (d.numel, d.numel))
    out = D.reduce(d, groups)
    return [out] * len(call.results)


@rule("trace")
def trace_rule(call: Call) -> list:
    t = call.arg("self")
    diag = torch.diagonal(pos_map(call.shape(t))).reshape(1, -1).numpy()
    d = call.deps(t)
    return [D.reduce(d, D.groups_from_positions(diag, d.numel)) if d is not None else None]


# Loss functions: element-wise when reduction is "none" (0), otherwise one scalar depending on everything.
@rule("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
      "binary_cross_entropy_with_logits", "soft_margin_loss", "kl_div", "poisson_nll_loss", "hinge_embedding_loss")
def loss_rule(call: Call) -> list:
    if call.arg("reduction", 1) == 0:
        from .pointwise import pointwise_rule
        return pointwise_rule(call)
    return [D.dense([call.deps(t) for t in call.tensor_args()], 1)]


@rule("nll_loss_forward", "nll_loss2d_forward", "nll_loss_nd")
def nll_rule(call: Call) -> list:
    """nll_loss picks -self[n, target[n]] (times weight): only the picked elements matter when target is known."""
    self_t, target = call.arg("self"), call.arg("target")
    tv = call.value(target)
    weight = call.arg("weight")
    if tv is None:
        return call.dense("input-dependent target")
    shape = call.shape(self_t)
    cdim = 0 if len(shape) == 1 else 1
    ignore = call.arg("ignore_index", -100)
    safe = torch.where(tv == ignore, torch.zeros_like(tv), tv)
    picked = torch.gather(pos_map(shape), cdim, safe.unsqueeze(cdim)).squeeze(cdim)
    picked = torch.where(tv == ignore, torch.zeros_like(picked), picked)
    d = call.deps(self_t)
    wd = call.deps(weight) if isinstance(weight, torch.Tensor) else None
    if call.arg("reduction", 1) == 0:
        out = D.take(d, picked.reshape(-1).numpy())
        if wd is not None:
            out = D.union([out, D.take(wd, (safe.reshape(-1) + 1).numpy())])
        return [out, D.dense([wd], 1)][:len(call.results)]
    flat = picked.reshape(1, -1).numpy()
    total = D.reduce(d, D.groups_from_positions(flat, d.numel)) if d is not None else None
    total = D.union([total, D.dense([wd], 1)])
    return [total, D.dense([wd], 1)][:len(call.results)]


@rule("_fft_r2c", "_fft_c2c", "_fft_c2r")
def fft_rule(call: Call) -> list:
    """A discrete Fourier transform mixes whole lines along the transformed dims, nothing else."""
    t = call.arg("self")
    shape = call.shape(t)
    dims = norm_dims(call.arg("dim"), len(shape))
    red = reduce_dims(call, t, dims)
    out = call.out_shape()
    kept = [1 if i in dims else s for i, s in enumerate(out)]
    return [D.take(red, pos_map(kept).expand(tuple(out)).reshape(-1).numpy())]
