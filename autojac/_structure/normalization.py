"""Rules for layer, group and batch normalisation: each element depends on its whole normalisation group."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import deps as D
from .maps import broadcast_positions, pos_map
from .reductions import reduce_deps
from .registry import Call, rule


def _spread(kept: list[int], shape) -> np.ndarray:
    """Positions in the reduced tensor (kept dims, reduced dims of size 1) for each element of shape."""
    return pos_map(kept).expand(tuple(shape)).reshape(-1).numpy()


def _grouped(d: D.Deps | None, shape, dims: list[int]) -> D.Deps | None:
    """Each element widened to the union over `dims` (the elements normalised together)."""
    red = reduce_deps(d, shape, dims)
    return D.take(red, _spread([1 if i in dims else s for i, s in enumerate(shape)], shape))


def _bcast(call: Call, p, shape, as_shape=None) -> D.Deps | None:
    if not isinstance(p, torch.Tensor) or call.deps(p) is None:
        return None
    return D.take(call.deps(p), broadcast_positions(as_shape or call.shape(p), shape))


@rule("native_layer_norm")
def layer_norm_rule(call: Call) -> list:
    x = call.arg("input")
    shape = call.shape(x)
    dims = list(range(len(shape) - len(call.arg("normalized_shape")), len(shape)))
    out = D.union([_grouped(call.deps(x), shape, dims),
                   _bcast(call, call.arg("weight"), shape), _bcast(call, call.arg("bias"), shape)])
    stats = reduce_deps(call.deps(x), shape, dims)
    return [out, stats, stats][:len(call.results)]


@rule("native_group_norm")
def group_norm_rule(call: Call) -> list:
    x = call.arg("input")
    shape = call.shape(x)
    n, c, g = shape[0], shape[1], call.arg("group")
    grouped = (n, g, math.prod(shape[1:]) // g)
    d = call.deps(x)
    main = _grouped(d, grouped, [2])
    per_channel = [1, c] + [1] * (len(shape) - 2)
    out = D.union([main] + [_bcast(call, call.arg(p), shape, per_channel) for p in ("weight", "bias")])
    stats = reduce_deps(d, grouped, [2])
    return [out, stats, stats][:len(call.results)]


_NO_TRAINING = ("_native_batch_norm_legit_no_training", "_batch_norm_no_update")
_TRAINING = ("_batch_norm_with_update", "_batch_norm_with_update_functional")


@rule("native_batch_norm", "_native_batch_norm_legit", "cudnn_batch_norm", "miopen_batch_norm", "batch_norm",
      *_NO_TRAINING, *_TRAINING, "_native_batch_norm_legit_functional")
def batch_norm_rule(call: Call) -> list:
    x = call.arg("input")
    shape = call.shape(x)
    name = call.info.name
    training = name in _TRAINING or (name not in _NO_TRAINING and bool(call.arg("training", False)))
    per_channel = [1, shape[1]] + [1] * (len(shape) - 2) if len(shape) > 1 else list(shape)
    d = call.deps(x)
    dims = [i for i in range(len(shape)) if i != 1]
    # Training normalises with batch statistics (every element of a channel); eval uses fixed running stats.
    main = _grouped(d, shape, dims) if training and len(shape) > 1 else d
    running = [_bcast(call, call.arg(p), shape, per_channel) for p in ("running_mean", "running_var")]
    out = D.union([main, *running] + [_bcast(call, call.arg(p), shape, per_channel) for p in ("weight", "bias")])
    stats = reduce_deps(d, shape, dims) if training and len(shape) > 1 else None
    extra = [call.deps(call.arg(p)) if isinstance(call.arg(p), torch.Tensor) else None
             for p in ("running_mean", "running_var")]
    rest = [D.dense([stats, *extra], m.numel) for _, m in call.results[1:]]
    return [out] + rest
