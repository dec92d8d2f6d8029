"""Rules for pooling and interpolation: separable windows along each spatial dim, combined by Kronecker products."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from . import deps as D
from .registry import Call, rule


def _window(length: int, out: int, k: int, stride: int, pad: int, dil: int) -> np.ndarray:
    """(out, length) bool: which input positions each pooling window covers."""
    m = np.zeros((out, length), bool)
    starts = np.arange(out) * stride - pad
    for t in range(k):
        idx = starts + t * dil
        ok = (idx >= 0) & (idx < length)
        m[np.nonzero(ok)[0], idx[ok]] = True
    return m


def _adaptive(length: int, out: int) -> np.ndarray:
    m = np.zeros((out, length), bool)
    for o in range(out):
        m[o, (o * length) // out: -((-(o + 1) * length) // out)] = True
    return m


def _separable(call: Call, t, mats: list[np.ndarray]) -> D.Deps | None:
    d = call.deps(t)
    if d is None:
        return None
    shape = call.shape(t)
    lead = math.prod(shape[: len(shape) - len(mats)])
    m = sp.csr_array(np.ones((1, 1), bool))
    for mat in mats:
        m = sp.kron(m, sp.csr_array(mat), format="csr")
    full = sp.kron(sp.identity(lead, dtype=bool, format="csr"), m, format="csr")
    full.sum_duplicates()
    return D.reduce(d, full)


def _list(v, nd: int) -> list[int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return []
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * nd if len(v) == 1 else v


def _nd(call: Call) -> int:
    return int(next(c for c in reversed(call.info.name) if c.isdigit()))


@rule("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
      "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d")
def pool_rule(call: Call) -> list:
    t = call.arg("self")
    nd = _nd(call)
    k = _list(call.arg("kernel_size"), nd)
    stride = _list(call.arg("stride"), nd) or k
    pad = _list(call.arg("padding", 0), nd)
    dil = _list(call.arg("dilation", 1), nd) or [1] * nd
    shape, out = call.shape(t), call.out_shape()
    mats = [_window(shape[-nd + i], out[-nd + i], k[i], stride[i], pad[i], dil[i]) for i in range(nd)]
    d = _separable(call, t, mats)
    return [d] * len(call.results)


@rule("adaptive_avg_pool1d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool2d",
      "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")
def adaptive_rule(call: Call) -> list:
    t = call.arg("self")
    nd = _nd(call)
    shape, out = call.shape(t), call.out_shape()
    mats = [_adaptive(shape[-nd + i], out[-nd + i]) for i in range(nd)]
    d = _separable(call, t, mats)
    return [d] * len(call.results)


_SCALES = {1: ("scales",), 2: ("scales_h", "scales_w"), 3: ("scales_d", "scales_h", "scales_w")}


@rule("upsample_linear1d.default", "upsample_bilinear2d.default", "upsample_trilinear3d.default",
      "upsample_bicubic2d.default", "_upsample_bilinear2d_aa.default", "_upsample_bicubic2d_aa.default")
def interpolate_rule(call: Call) -> list:
    """Probe the op one spatial dim at a time on one-hot inputs: exact, including exactly-zero weights."""
    t = call.arg("self")
    nd = _nd(call)
    shape, out = call.shape(t), call.out_shape()
    align = call.arg("align_corners")
    mats = []
    for i in range(nd):
        length, o = shape[-nd + i], out[-nd + i]
        probe_shape = [length, 1] + [1] * nd
        probe_shape[2 + i] = length
        probe = torch.zeros(probe_shape, dtype=torch.float64)
        idx = [torch.arange(length), 0] + [0] * nd
        idx[2 + i] = torch.arange(length)
        probe[tuple(idx)] = 1.0
        size = [1] * nd
        size[i] = o
        scales = {n: (call.arg(n) if j == i else None) for j, n in enumerate(_SCALES[nd])}
        res = call.op.func(probe, size, align, **scales)
        mats.append((res.reshape(length, o) != 0).numpy().T)
    return [_separable(call, t, mats)]
