"""Rules for ops that write or accumulate a source into chosen positions of `self` (constant indices only).

With duplicate targets the winner of an overwrite is unspecified, so every writer counts.
"""

from __future__ import annotations

import numpy as np
import torch

from . import deps as D
from .maps import pos_map
from .registry import Call, rule

aten = torch.ops.aten


def _combine(call: Call, targets: torch.Tensor, src, src_pos: np.ndarray | None, overwrite: bool) -> list:
    """targets: 1-based output positions written; src_pos: 1-based source element for each (aligned)."""
    out_numel = call.out_numel()
    tgt = targets.reshape(-1).numpy().astype(np.int64)
    base = call.deps(call.arg("self"))
    if overwrite and base is not None:
        keep = np.arange(1, out_numel + 1, dtype=np.int64)
        keep[tgt - 1] = 0
        base = D.take(base, keep)
    contrib = None
    src_d = call.deps(src) if isinstance(src, torch.Tensor) else None
    if src_d is not None and tgt.size:
        groups = D.csr_from_pairs(tgt - 1, src_pos - 1, (out_numel, src_d.numel))
        contrib = D.reduce(src_d, groups)
    return [D.union([base, contrib])]


def _known(call: Call, name: str):
    v = call.arg(name)
    if isinstance(v, torch.Tensor):
        return call.value(v)
    if isinstance(v, (list, tuple)):
        vals = [None if x is None else call.value(x) for x in v]
        return None if any(x is None and y is not None for x, y in zip(vals, v)) else vals
    return v


@rule("index_put", "_unsafe_index_put", "_index_put_impl")
def index_put_rule(call: Call) -> list:
    indices = _known(call, "indices")
    if indices is None:
        return call.dense("input-dependent index")
    self_shape = call.shape(call.arg("self"))
    targets = aten.index.Tensor(pos_map(self_shape), indices)
    values = call.arg("values")
    src_pos = pos_map(call.shape(values)).expand(targets.shape).reshape(-1).numpy()
    return _combine(call, targets, values, src_pos, overwrite=not call.arg("accumulate", False))


def _along_dim(call: Call, source_name: str | None, overwrite: bool) -> list:
    index = _known(call, "index")
    if index is None:
        return call.dense("input-dependent index")
    dim = call.arg("dim")
    targets = aten.index_select(pos_map(call.shape(call.arg("self"))), dim, index.reshape(-1) if index.dim() else index.reshape(1))
    src = call.arg(source_name) if source_name else None
    if isinstance(src, torch.Tensor):
        src_pos = pos_map(call.shape(src)).expand(targets.shape).reshape(-1).numpy()
    else:
        src_pos = np.ones(targets.numel(), np.int64)
    return _combine(call, targets, src, src_pos, overwrite)


@rule("index_add")
def index_add_rule(call: Call) -> list:
    return _along_dim(call, "source", overwrite=False)


@rule("index_copy")
def index_copy_rule(call: Call) -> list:
    return _along_dim(call, "source", overwrite=True)


@rule("index_fill")
def index_fill_rule(call: Call) -> list:
    return _along_dim(call, "value", overwrite=True)


@rule("index_reduce")
def index_reduce_rule(call: Call) -> list:
    return _along_dim(call, "source", overwrite=not call.arg("include_self", True))


def _scatter(call: Call, overwrite: bool) -> list:
    index = _known(call, "index")
    if index is None:
        return call.dense("input-dependent index")
    self_shape = call.shape(call.arg("self"))
    targets = torch.gather(pos_map(self_shape), call.arg("dim"), index)
    src = call.arg("src")
    if isinstance(src, torch.Tensor):
        region = tuple(slice(0, s) for s in index.shape)
        src_pos = pos_map(call.shape(src))[region].reshape(-1).numpy()
    else:
        src = call.arg("value")
        src_pos = np.ones(targets.numel(), np.int64)
    return _combine(call, targets, src, src_pos, overwrite)


@rule("scatter")
def scatter_rule(call: Call) -> list:
    return _scatter(call, overwrite=call.arg("reduce") is None)


@rule("scatter_add")
def scatter_add_rule(call: Call) -> list:
    return _scatter(call, overwrite=False)


@rule("scatter_reduce")
def scatter_reduce_rule(call: Call) -> list:
    return _scatter(call, overwrite=not call.arg("include_self", True))


@rule("put")
def put_rule(call: Call) -> list:
    index = _known(call, "index")
    if index is None:
        return call.dense("input-dependent index")
    targets = pos_map(call.shape(call.arg("self"))).reshape(-1)[index.reshape(-1)]
    src = call.arg("source")
    src_pos = pos_map(call.shape(src)).reshape(-1).numpy()
    return _combine(call, targets, src, src_pos, overwrite=not call.arg("accumulate", False))
