"""Index bounds checked on the host before kernels that would assert on the device.

NOTE: [Index bounds checked before the kernel]
On CUDA an out-of-bounds index in a gather, an embedding or a loss's target is a device-side assert, and
a device-side assert leaves the process's CUDA context unusable: every later CUDA call fails. The repeat
trick's batch-aware trial runs `f` on stacked rows that a function which is not batch-aware may index out
of bounds (`x[perm]` with a captured permutation reads perm's entries along the batch dimension). The trial
first runs `f` on fake tensors (shapes only, no kernel); when that cannot tell (a data-dependent branch, an
op without a fake kernel), `f` runs on the real rows under `IndexGuard`, which looks at the index operands
of the asserting ATen ops below before each runs and raises `IndexError` instead, as the CPU kernels do.
Each check reads two numbers back from the device (a synchronization): the guard is for one trial
evaluation, never for the Jacobian's runs. Ops outside the list (custom CUDA extensions) are not guarded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _dim_size(t: torch.Tensor, dim: int) -> int:
    return t.shape[dim] if t.dim() else 1  # a 0-d tensor indexes like one of size 1


def _outside(index: torch.Tensor, low: int, high: int) -> int | None:
    """An entry of the non-empty integer `index` outside [low, high), or None (one read-back of its extremes)."""
    least, most = (int(v) for v in torch.aminmax(index))
    return most if most >= high else least if least < low else None


def _check(index: torch.Tensor | None, size: int, what: str) -> None:
    if index is None or index.numel() == 0 or index.dtype == torch.bool or index.is_floating_point():
        return
    bad = _outside(index, -size, size)
    if bad is not None:
        raise IndexError(f"{what}: index {bad} is out of bounds for size {size}")


def _advanced(self: torch.Tensor, indices: Sequence[torch.Tensor | None], what: str) -> None:
    """`self[indices]` (aten.index and index_put): each long index reads one dimension, a mask as many as it has."""
    dim = 0
    for index in indices:
        if index is None:
            dim += 1
        elif index.dtype in (torch.bool, torch.uint8):
            dim += max(index.dim(), 1)
        else:
            if dim < self.dim():
                _check(index, self.shape[dim], what)
            dim += 1


def _at_dim(self: torch.Tensor, dim: int, index: torch.Tensor, what: str) -> None:
    _check(index, _dim_size(self, dim), what)


def _nll(self: torch.Tensor, target: torch.Tensor, ignore_index: int | None, what: str) -> None:
    classes = self.shape[-1] if self.dim() == 1 else self.shape[1]
    if target.numel() and not target.is_floating_point():
        kept = target if ignore_index is None else target[target != ignore_index]
        bad = _outside(kept, 0, classes) if kept.numel() else None
        if bad is not None:
            raise IndexError(f"{what}: target {bad} is out of bounds for {classes} classes")


def _rules() -> dict[object, Callable[..., None]]:
    rules: dict[object, Callable[..., None]] = {}

    def add(names: Sequence[str], rule: Callable[..., None]) -> None:
        for name in names:
            packet = getattr(aten, name, None)
            if packet is not None:
                for overload in packet.overloads():
                    rules[getattr(packet, overload)] = rule

    add(["index", "_unsafe_index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"],
        lambda a, kw, what: _advanced(a[0], a[1], what))
    add(["index_select", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce",
         "scatter_reduce_", "index_add", "index_add_", "index_copy", "index_copy_", "index_fill", "index_fill_",
         "index_reduce", "index_reduce_"],
        lambda a, kw, what: _at_dim(a[0], a[1], a[2], what) if isinstance(a[2], torch.Tensor) else None)
    add(["take", "put", "put_"], lambda a, kw, what: _check(a[1], a[0].numel(), what))
    add(["embedding"], lambda a, kw, what: _check(a[1], a[0].shape[0], what))
    add(["_embedding_bag", "_embedding_bag_forward_only", "embedding_bag"],
        lambda a, kw, what: _check(a[1], a[0].shape[0], what))
    add(["nll_loss_forward", "nll_loss2d_forward"],
        lambda a, kw, what: _nll(a[0], a[1], a[4] if len(a) > 4 else kw.get("ignore_index", -100), what))
    add(["multi_margin_loss"], lambda a, kw, what: _nll(a[0], a[1], None, what))
    # Class indices ended by -1 (what follows it is not read; checked all the same: a refusal, never a miss).
    add(["multilabel_margin_loss_forward"], lambda a, kw, what: _nll(a[0], a[1], -1, what))
    return rules


_RULES = _rules()


class IndexGuard(TorchDispatchMode):
    """Raise IndexError where an ATen op would index out of bounds, before its kernel runs (NOTE: [Index
    bounds checked before the kernel]). Counts the ops it checked in `checked`."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            self.checked += 1
            rule(args, kwargs, str(func))
        return func(*args, **kwargs)
