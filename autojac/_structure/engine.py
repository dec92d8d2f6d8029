"""Replays a recorded tape, keeping per storage element its dependency set and, for constants, its value.

Views need no rule: a view reads its storage through its own geometry. In-place ops write their
functional result back into the storage they mutate. Constant tensors (that never depend on an
input) are evaluated for real, so rules can use the actual nonzeros of weights and index tensors.
"""

from __future__ import annotations

import time

from dataclasses import dataclass, field

import numpy as np
import torch

from . import deps as D
from .deps import Deps
from .trace import Meta, OpRecord, Tape, storage_flat

_ARANGE = torch.arange(1, 1025, dtype=torch.int64)


def arange1(n: int) -> torch.Tensor:
    """1..n as an int64 tensor (a shared buffer; never write to it)."""
    global _ARANGE
    if _ARANGE.numel() < n:
        _ARANGE = torch.arange(1, 2 * n + 1, dtype=torch.int64)
    return _ARANGE[:n]


COUNT_PIECE = 1 << 20
"""Elements counted at once by `_count_nonzero`: `torch.count_nonzero` of a whole 2048 x 131072 weight on an
H200 held about 9 bytes an element of temporaries (2.3 GiB), a first call's peak 17x over a 139 MiB budget."""


def _count_nonzero(view: torch.Tensor) -> int:
    """Nonzero elements of a tensor of any size with at most COUNT_PIECE elements' temporaries at a time (one
    synchronization on a GPU)."""
    if view.dim() == 0 or view.numel() <= COUNT_PIECE:
        return int(torch.count_nonzero(view))
    if _dense_block(view):  # a transposed weight: its elements in memory order, counted in contiguous pieces
        view = view.as_strided((view.numel(),), (1,), view.storage_offset())
    total = torch.zeros((), dtype=torch.int64, device=view.device)
    _count_into(view, total)
    return int(total)


def _dense_block(view: torch.Tensor) -> bool:
    """Whether a view's elements fill one block of memory without gaps or overlap (any order of its dims)."""
    dims = sorted((st, sz) for st, sz in zip(view.stride(), view.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def _count_into(view: torch.Tensor, total: torch.Tensor) -> None:
    if view.dim() == 0 or view.numel() <= COUNT_PIECE:
        total += torch.count_nonzero(view)
        return
    per_row = view.numel() // view.shape[0]
    if per_row >= COUNT_PIECE:
        for row in view:
            _count_into(row, total)
        return
    step = COUNT_PIECE // per_row
    for lo in range(0, view.shape[0], step):
        total += torch.count_nonzero(view[lo:lo + step])


def positions(meta: Meta) -> np.ndarray:
    """1-based storage positions of a tensor's elements, row-major."""
    if meta.whole:
        return arange1(meta.numel).numpy()
    base = arange1(max(meta.storage_numel, 1))
    return base.as_strided(meta.shape, meta.stride, meta.offset).reshape(-1).numpy()


@dataclass
class Store:
    numel: int
    deps: Deps | None = None
    shadow: torch.Tensor | None = None  # flat CPU copy of the storage when it holds known constants
    owned: bool = True  # False while `shadow` aliases a user tensor: copy before writing
    pending: list = field(default_factory=list)  # externals whose values are loaded on first use
    written: np.ndarray | None = None  # per element: index of the op that last wrote it (-1: none since creation)


# Ops whose result values do not depend on the values of their `self` argument.
_SELF_VALUE_FREE = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
                    "fill", "zero", "copy", "empty_like", "new_empty"}
# Ops whose result values are unknown even from known arguments (uninitialised memory).
_UNKNOWN_VALUE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                  "empty_permuted", "resize", "set"}


class Engine:
    """Holds the replay state; rules call back into it through `Call`."""

    def __init__(self, tape: Tape, values: bool = False) -> None:
        self.tape = tape
        self.values = values
        """Track what each value depends on, not only its derivative: detached tensors, piecewise-constant ops and
        integer and boolean results (masks, indices) carry their operands' sets (NOTE: [Batch-aware at every
        point])."""
        self.n_in = sum(m.numel for m in tape.input_metas)
        self.stores: dict[tuple[int, int], Store] = {}  # by Meta.skey
        self.detached: dict[int, int] = {}  # tensor id -> index of the op that detached it
        self.step = 0
        self.dense_ops: list[str] = []
        self.read_captured = False
        """Whether a rule read the value of a tensor `f` holds (a captured index, a weight's zeros, a mask made from
        one): the pattern then holds for those values only (NOTE: [A pattern that read no captured values])."""
        self._views: dict[tuple, tuple[Deps, Deps]] = {}  # a view's sets, with the storage's sets they came from
        offset = 0
        for m in tape.input_metas:
            store = Store(m.storage_numel)
            ident = D.identity(m.numel, offset, self.n_in)
            store.deps = self._place(ident, m, None)
            self.stores[m.skey] = store
            offset += m.numel

    # -- storage access -------------------------------------------------------------------
    def store(self, meta: Meta) -> Store:
        store = self.stores.get(meta.skey)
        if store is None:
            store = Store(meta.storage_numel)
            exts = [e for e in self.tape.externals.get(meta.key, ()) if e.meta.skey == meta.skey]
            if exts:
                store.pending = list(exts)
            self.stores[meta.skey] = store
        return store

    def _load(self, store: Store) -> None:
        exts, store.pending = store.pending, []
        self.read_captured = True
        if self.tape.mode == "real":
            ext = exts[0]
            if ext.snapshot is not None:
                store.shadow, store.owned = ext.snapshot.cpu(), True
            else:
                flat = storage_flat(ext.tensor).detach()
                store.shadow, store.owned = flat.cpu(), flat.device.type != "cpu"
            return
        # Fake trace: lay the real tensors' values out in the fake storage's geometry.
        shadow = torch.zeros(store.numel, dtype=exts[0].meta.dtype)
        for ext in exts:
            m = ext.meta
            if m.dtype == shadow.dtype:
                shadow.as_strided(m.shape, m.stride, m.offset).copy_(ext.tensor.detach().cpu())
        store.shadow, store.owned = shadow, True

    def deps_of(self, t: torch.Tensor, meta: Meta) -> Deps | None:
        store = self.store(meta)
        if store.deps is None:
            return None
        since = None if self.values else self.detached.get(id(t))
        if meta.whole:
            pos, d = None, store.deps
        else:
            # A view read by several ops (a stencil's `u[0]`, in every term) is taken once while its storage's sets
            # stay the same object (a write replaces them).
            view = (meta.skey, meta.shape, meta.stride, meta.offset)
            taken = self._views.get(view)
            if since is None and taken is not None and taken[0] is store.deps:
                return taken[1]
            pos = positions(meta)
            d = D.take(store.deps, pos)
            if since is None:
                self._views[view] = (store.deps, d)
        if since is not None and d is not None:
            # A detached tensor carries no derivative, except through what was written into it afterwards.
            if store.written is None:
                return None
            fresh = store.written[(pos if pos is not None else positions(meta)) - 1] > since
            d = D.take(d, np.where(fresh, np.arange(1, d.numel + 1), 0))
        return d

    def nonzeros_of(self, meta: Meta) -> int | None:
        """How many of a constant's elements are nonzero, counted where its value lives (a GPU tensor is not
        copied to the host for it); None when unknown. NOTE: [A dense constant is known before it is loaded]"""
        store = self.store(meta)
        if store.pending:
            self.read_captured = True
            if len(store.pending) != 1:
                return None
            ext = store.pending[0]
            if self.tape.mode == "real":
                flat = ext.snapshot if ext.snapshot is not None else storage_flat(ext.tensor).detach()
            else:  # a fake storage laid out as the real one (what `from_tensor` keeps): the same positions
                real = ext.tensor
                if (tuple(real.stride()), real.storage_offset()) != (tuple(ext.meta.stride), ext.meta.offset):
                    return None
                flat = storage_flat(real).detach()
            if flat.dtype != meta.dtype:
                return None
            try:
                view = flat.as_strided(meta.shape, meta.stride, meta.offset)
            except RuntimeError:  # beyond the real storage: unknown here
                return None
        else:
            view = self.value_of(meta)
            if view is None:
                return None
        return _count_nonzero(view)

    def _may_have_value(self, meta: Meta) -> bool:
        """Whether `value_of` could give a value, without loading one."""
        store = self.store(meta)
        return bool(store.pending) or (store.shadow is not None and store.shadow.dtype == meta.dtype)

    def value_of(self, meta: Meta) -> torch.Tensor | None:
        store = self.store(meta)
        if store.pending:
            self._load(store)
        shadow = store.shadow
        if shadow is None or shadow.dtype != meta.dtype:
            return None
        if meta.whole:
            return shadow.view(meta.shape)
        return shadow.as_strided(meta.shape, meta.stride, meta.offset)

    def _place(self, d: Deps | None, meta: Meta, old: Deps | None) -> Deps | None:
        if meta.whole and old is None:
            return d
        return D.write(old, meta.storage_numel, positions(meta) - 1, d)

    def set_fresh(self, t: torch.Tensor, meta: Meta, d: Deps | None, value: torch.Tensor | None) -> None:
        store = Store(meta.storage_numel)
        store.deps = self._place(d, meta, None)
        if value is not None and meta.storage_numel == meta.numel:
            store.shadow = torch.empty(meta.storage_numel, dtype=meta.dtype)
            store.shadow.as_strided(meta.shape, meta.stride, meta.offset).copy_(value)
        self.stores[meta.skey] = store

    def write(self, meta: Meta, d: Deps | None, value: torch.Tensor | None) -> None:
        store = self.store(meta)
        if store.pending:
            self._load(store)
        pos0 = positions(meta) - 1
        store.deps = D.write(store.deps, store.numel, pos0, d)
        if store.written is None:
            store.written = np.full(store.numel, -1, np.int64)
        store.written[pos0] = self.step
        covers = D.sorted_unique(pos0).size == store.numel
        if value is None:
            store.shadow = None
            return
        if store.shadow is None or store.shadow.dtype != meta.dtype:
            if not covers:
                store.shadow = None
                return
            store.shadow, store.owned = torch.empty(store.numel, dtype=meta.dtype), True
        elif not store.owned:
            store.shadow, store.owned = store.shadow.clone(), True
        store.shadow.as_strided(meta.shape, meta.stride, meta.offset).copy_(value)

    # -- replay ---------------------------------------------------------------------------
    def run(self, deadline: float | None = None, max_stored: int | None = None) -> list[Deps | None]:
        """Propagate dependency sets through the tape; past `deadline` (a `time.perf_counter()` value), raise
        `detect.TooLong` before the next op; an op whose dependency sets store more than `max_stored` entries
        (row map and table) raises `detect.TooDense` (a memory bound: the sets of several ops are alive at once)."""
        D.capped().clear()  # notes an aborted detection in this thread left behind
        # Read by `deps.reduce` (matmuls, reductions, convolutions) and the convolution rule, which refuse
        # before building their sets, and by the check below after every op.
        D.set_stored_limit(max_stored)
        try:
            return self._propagate(deadline)
        finally:
            D.set_stored_limit(None)

    def _propagate(self, deadline: float | None) -> list[Deps | None]:
        from .registry import Call, op_info  # the rules import this module

        for step, op in enumerate(self.tape.ops):
            if deadline is not None and time.perf_counter() > deadline:
                from .detect import TooLong

                raise TooLong(0.0, step, len(self.tape.ops))
            self.step = step
            info = op_info(op.func)
            if info.view_like and self._alias(op, info):
                continue
            call = Call(self, op, info)
            values = self._fold(call)
            results = call.results
            if ((not self.values and all(not m.floating for _, m in results))
                    or all(call.deps(t) is None for t in call.tensor_args())):
                out_deps: list[Deps | None] = [None] * len(results)
            else:
                try:
                    out_deps = self._value_rule(call, info) if self.values else info.rule(call)
                except D.TooDense:  # a rule that foresaw it would hold more than the bound (`deps.check_stored`)
                    raise
                except Exception as e:  # a rule that cannot handle these arguments: stay conservative
                    out_deps = call.dense(f"rule failed: {type(e).__name__}: {str(e)[:80]}")
                notes = D.capped()
                if notes:
                    self.dense_ops.append(f"aten.{info.name}.{info.overload} ({notes[0]})")
                    notes.clear()
                if D.stored_limit() is not None:
                    D.check_stored(sum(d.numel + d.table.nnz for d in out_deps if d is not None))
            for k, (t, m) in enumerate(results):
                d = out_deps[k] if m.floating or self.values else None
                v = values[k] if values is not None else None
                if id(t) in call.mutated_ids:
                    self.write(m, d, v)
                elif m.skey in self.stores or self._external(m):
                    continue  # an alias the schema does not declare (unsafe_split): the storage says it all
                else:
                    self.set_fresh(t, m, d, v)
            self._unreturned_writes(call)
        return [self.deps_of(t, m) for t, m in zip(self.tape.outputs, self.tape.output_metas)]

    def _value_rule(self, call, info) -> list[Deps | None]:
        """An op's sets in `values` mode: a piecewise-constant op (sign, floor, a detach, a logical op) as an
        element-wise one; and where an op that is not element-wise takes an integer or boolean tensor that depends
        on the inputs (an index, a mask), every result element also depends on all of that tensor's sets (where it
        reads is decided by them: conservative, never missing a dependency)."""
        from .pointwise import PIECEWISE, pointwise_rule, zero_rule  # the rules import this module

        if info.rule is zero_rule and info.name in PIECEWISE:
            return pointwise_rule(call)
        out = info.rule(call)
        if info.pointwise:
            return out
        steering = [call.deps(t) for t in call.tensor_args() if not t.is_floating_point()]
        steering = [d for d in steering if d is not None]
        if not steering:
            return out
        return [D.union([d, D.dense(steering, m.numel)]) for d, (_, m) in zip(out, call.results)]

    def _unreturned_writes(self, call) -> None:
        """Arguments an op mutates without returning them get every argument's dependencies."""
        returned = {id(t) for t, _ in call.results}
        for t in call.mutated_tensors():
            if id(t) not in returned:
                m = call.meta(t)
                self.write(m, D.dense([call.deps(a) for a in call.tensor_args()], m.numel), None)

    def _external(self, m: Meta) -> bool:
        return any(e.meta.skey == m.skey for e in self.tape.externals.get(m.key, ()))

    def _alias(self, op: OpRecord, info) -> bool:
        """Views share their input's storage: only the detach flag needs carrying over."""
        ins = [a for a in op.args if isinstance(a, torch.Tensor)]
        if not all(m.skey in self.stores or self._external(m) for m in op.out_metas):
            return False  # a view into a storage we never saw: fall back to a rule
        if ins and any(m.dtype != op.arg_metas[id(ins[0])].dtype for m in op.out_metas):
            return False  # a dtype reinterpretation (view_as_real): element positions differ
        if info.name in ("detach", "detach_"):
            self.detached.update((id(t), self.step) for t in op.outs)
        else:
            since = max((self.detached[id(a)] for a in ins if id(a) in self.detached), default=None)
            if since is not None:
                self.detached.update((id(t), since) for t in op.outs)
        return True

    def _fold(self, call) -> list[torch.Tensor | None] | None:
        """Evaluate the op for real when all its tensor arguments are known constants."""
        info = call.info
        if info.random or info.name in _UNKNOWN_VALUE:
            return None
        tensors = list(call.all_tensor_args())
        for i, t in enumerate(tensors):  # a value missing is found before any is loaded (a GPU weight's copy)
            if not self._may_have_value(call.meta(t)) and not (
                    (info.name in _SELF_VALUE_FREE and i == 0) or id(t) in call.out_ids):
                return None
        subst: dict[int, torch.Tensor] = {}
        for i, t in enumerate(tensors):
            v = self.value_of(call.meta(t))
            if v is None:
                if (info.name in _SELF_VALUE_FREE and i == 0) or id(t) in call.out_ids:
                    m = call.meta(t)
                    v = torch.zeros(m.shape, dtype=m.dtype)
                else:
                    return None
            if id(t) in call.mutated_ids:
                v = v.clone()
            subst[id(t)] = v
        args, kwargs = call.substituted(subst, device="cpu")
        try:
            out = call.op.func(*args, **kwargs)
        except Exception:  # a kernel missing on this device or dtype: values stay unknown
            return None
        if info.mutated:
            return [subst.get(id(t)) for t, _ in call.results]
        outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
        return outs if len(outs) == len(call.results) else None
