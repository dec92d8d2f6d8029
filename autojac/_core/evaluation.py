"""Every evaluation of the user's `f` goes through one `Evaluator` per call.

It gives `f` private copies of its inputs (so `f` may write into them), keeps
evaluations of a random or stateful `f` alike (the global RNG and the buffers of
the modules `f` uses are put back before each evaluation after the first), and
leaves that state at the end as one evaluation of `f` leaves it, as after
`torch.autograd.functional.jacobian`.
"""

from __future__ import annotations

import collections
import functools
import threading
import types
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .pytree import Arguments, flatten

PLAIN_ARGS = Arguments(None, as_args=True)  # leaves are the positional arguments: f(*leaves)


# NOTE: [Why evaluations are pinned]
# Methods evaluate `f` different numbers of times: once (reverse, the double-VJP
# trick on one graph), once per chunk (repeat, forward/vmap) or once per basis
# vector (forward/loop). A Jacobian assembled from several evaluations is only
# right if they compute the same function: dropout must draw the same mask, a
# BatchNorm in training mode must see the same running statistics. Restoring the
# global RNG and the module buffers before each later evaluation makes them
# agree; the planner still prefers one-evaluation methods for an `f` that draws
# random numbers (see `Problem.draws_random`), because the global RNG is shared
# by threads and a generator of `f`'s own cannot be put back.


def captured_tensors(f: Callable, modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Tensors `f` can reach besides its inputs and module buffers (see `captured`)."""
    return captured(f, modules)[0]


_SCALARS = (bool, int, float, complex, str)
_NEVER_TENSORS = frozenset({bool, int, float, complex, str, type(None), dict, collections.OrderedDict, set, list,
                            tuple})
_CAPTURE_DEPTH = 4
_CAPTURE_WIDTH = 64


_PLAIN_WIDTH = 4096
"""A container wider than _CAPTURE_WIDTH but no wider than this is watched through the numbers and strings it
holds, as one fingerprint (a permutation kept as a list of ints, a large config dict)."""


def _plain_fingerprint(items) -> object:
    """One value standing for the numbers and strings among `items`, in order (their hash and count)."""
    plain = tuple(v for v in items if isinstance(v, _SCALARS))
    return ("plain", len(plain), hash(plain))


def captured(f: Callable, modules: Sequence[nn.Module]) -> tuple[list[torch.Tensor], list[object]]:
    """(tensors, plain values) `f` can reach besides its inputs and module buffers: through closure cells,
    the globals it names, defaults, the arguments of a `functools.partial`, the object of a bound method,
    and the attributes of objects, containers and namespaces on the way (up to _CAPTURE_DEPTH deep and
    _CAPTURE_WIDTH items wide); and the parameters and plain tensor attributes (a recurrent cell's
    state) of the modules it uses. Plain values are numbers and strings, in the order met (not those in
    lists, often a log `f` appends to): a shift, an index or a flag read from a global, a dict or an
    attribute changes what `f` computes as much as a tensor does."""
    found: dict[int, torch.Tensor] = {}
    values: list[object] = []
    visited: set[int] = set()
    roots = {id(m) for m in modules}
    reached: list[nn.Module] = []  # modules met on the way (`trainer.model`): watched as the roots are

    def visit(obj: object, depth: int, names: tuple[str, ...] = ()) -> None:
        if isinstance(obj, torch.Tensor):
            found.setdefault(id(obj), obj)
            return
        if isinstance(obj, _SCALARS):
            values.append(obj)
            return
        if depth > _CAPTURE_DEPTH or obj is None or id(obj) in visited:
            return
        if isinstance(obj, np.ndarray):  # a flag or an index kept in a NumPy array: by content where small
            visited.add(id(obj))
            if obj.size <= _PLAIN_WIDTH and obj.dtype != object:
                values.append(("ndarray", obj.dtype.str, obj.shape, obj.tobytes()))
            return
        if isinstance(obj, nn.Module):
            visited.add(id(obj))
            if id(obj) not in roots:
                reached.append(obj)
            return
        if isinstance(obj, (type, types.ModuleType)):
            # A class or a Python module `f` names as a global: only the attributes its code names (`cfg.MIX`).
            visited.add(id(obj))
            attributes = vars(obj)
            for name in names:
                if name in attributes:
                    visit(attributes[name], depth + 1)
            return
        visited.add(id(obj))
        if isinstance(obj, (tuple, list)):
            # A list's numbers count too (a flag kept in a list); a log `f` appends to then makes every call one
            # on new values, which costs checks, never a wrong answer.
            if len(obj) <= _CAPTURE_WIDTH:
                for item in obj:
                    visit(item, depth + 1)
            elif len(obj) <= _PLAIN_WIDTH:
                values.append(_plain_fingerprint(obj))
        elif isinstance(obj, dict):
            if len(obj) <= _CAPTURE_WIDTH:
                for item in obj.values():
                    visit(item, depth + 1)
            elif len(obj) <= _PLAIN_WIDTH:
                values.append(_plain_fingerprint(obj.values()))
        elif isinstance(obj, types.MethodType):
            visit(obj.__self__, depth + 1)
            visit(obj.__func__, depth + 1)
        elif isinstance(obj, functools.partial):
            for item in (obj.func, *obj.args, *obj.keywords.values()):
                visit(item, depth + 1)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # an empty cell
                    continue
            for item in obj.__defaults__ or ():
                visit(item, depth + 1)
            for name in obj.__code__.co_names:
                if name in obj.__globals__:
                    visit(obj.__globals__[name], depth + 1, obj.__code__.co_names)
        elif not isinstance(obj, types.BuiltinFunctionType) and hasattr(obj, "__dict__"):
            attributes = vars(obj)
            if len(attributes) <= _CAPTURE_WIDTH:  # autojac's own wrappers, user objects, namespaces, configs
                for item in attributes.values():
                    visit(item, depth + 1)

    visit(f, 0)
    covered = {id(m) for root in modules for m in _all_submodules(root)} if reached else set()
    for root in (*modules, *reached):
        for m in _all_submodules(root):
            for t in m._parameters.values():
                if t is not None:
                    found.setdefault(id(t), t)
            for t in vars(m).values():
                # Most attributes are flags, sizes and a module's own dicts: skipped before isinstance, which
                # torch.Tensor's metaclass makes five times slower (a 5-layer MLP's walk: 43 -> 12 us a call).
                kind = type(t)
                if kind in _MODULE_PLAIN:  # `training`, a dropout's `p`, a flag of one's own module
                    values.append(t)
                elif kind not in _NEVER_TENSORS and isinstance(t, torch.Tensor):
                    found.setdefault(id(t), t)
            if id(root) not in roots and id(m) not in covered:
                # A module reached only through an object: its buffers are not put back between evaluations (the
                # roots' are, and are no captured tensors: a BatchNorm in training mode writes them every call).
                for b in m._buffers.values():
                    if b is not None:
                        found.setdefault(id(b), b)
    return list(found.values()), values


_MODULE_PLAIN = frozenset({bool, int, float, str})


def _user_function(f: Callable) -> Callable:
    """The user's function behind one of autojac's stand-ins (`__autojac_wraps__`): what it captures is what
    `f` computes with; the stand-in's own state (an aux recorder's evaluator, the aux it kept) changes every
    call and would make every call look like one on new values."""
    return getattr(f, "__autojac_wraps__", f)


def module_buffers(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Every buffer of the modules and their submodules, each once."""
    seen: dict[int, torch.Tensor] = {}
    for root in modules:
        for m in _all_submodules(root):
            for b in m._buffers.values():
                if b is not None:
                    seen.setdefault(id(b), b)
    return list(seen.values())


_submodules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _all_submodules(root: nn.Module) -> list[nn.Module]:
    """`root.modules()` as a list, remembered per root: walking a large model costs more than a Jacobian call.

    Refreshed when the root's direct children change (a layer added or replaced).
    """
    children = tuple(id(m) for m in root._modules.values())
    cached = _submodules.get(root)
    if cached is None or cached[0] != children:
        cached = _submodules[root] = (children, list(root.modules()))
    return cached[1]


def module_modes(modules: Sequence[nn.Module]) -> tuple[bool, ...]:
    """The `training` flag of every submodule: part of a plan's cache key, as it changes what `f` computes."""
    return tuple(m.training for root in modules for m in _all_submodules(root))


def rng_state(device: torch.device) -> tuple[torch.Tensor, ...]:
    """The global RNG's state for `device` (CPU, and CUDA on a CUDA device), for `Evaluator.isolated(replay=)`."""
    states = [torch.default_generator.get_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return tuple(states)


def _set_rng_state(device: torch.device, states: tuple[torch.Tensor, ...]) -> None:
    torch.default_generator.set_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def _put(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Write a saved value back into a module buffer without bumping its version counter.

    Every put-back leaves the buffer with the values it had when the graphs still in use
    were recorded (the state before an evaluation, just before `f` runs again, or the state
    the first evaluation left), so a graph that saved the buffer stays valid. Through
    `copy_` the version bump broke them: batch norm in training mode saves its running
    statistics for backward, and after a put-back every method that pushes vectors through
    the plain evaluation's graph (torch's own loop included) failed with "modified by an
    inplace operation". Writes `f` itself makes still bump versions as before.
    """
    buffer.data.copy_(value)


_CONTENT_ELEMENTS = 1 << 16


def version_of(t: torch.Tensor) -> int:
    """`t._version`, or -1 for an inference tensor (which keeps no version counter: a constant built under
    `torch.inference_mode()`; it is compared by content where small, see `_by_content`)."""
    return -1 if t.is_inference() else t._version


class ValuesSeen:
    """Tensors by identity (held weakly) and version counter, and plain values by value: equal only if
    every tensor is the same one, not written since (an in-place write bumps the version), and every plain
    value is equal. Small integer and bool tensors (indices, masks) are also compared by content: a write
    through `.data` does not bump the version."""

    __slots__ = ("refs", "versions", "plain", "contents")

    def __init__(self, tensors: Sequence[torch.Tensor], plain: Sequence[object] = ()) -> None:
        self.refs = [weakref.ref(t) for t in tensors]
        self.versions = [version_of(t) for t in tensors]
        self.plain = list(plain)
        self.contents = [(i, t.detach().clone()) for i, t in enumerate(tensors) if _by_content(t)]

    def __eq__(self, other: object) -> bool:
        if (not isinstance(other, ValuesSeen) or len(other.refs) != len(self.refs) or other.versions != self.versions
                or other.plain != self.plain):
            return False
        for mine, theirs in zip(self.refs, other.refs):
            t = mine()
            if t is None or t is not theirs():
                return False
        if len(self.contents) != len(other.contents):
            return False
        for (i, mine), (j, theirs) in zip(self.contents, other.contents):  # both are snapshots
            if i != j or not torch.equal(mine, theirs):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


def _by_content(t: torch.Tensor) -> bool:
    return ((t.is_inference() or (not t.is_floating_point() and not t.is_complex())) and t.numel() <= _CONTENT_ELEMENTS
            and t.layout == torch.strided and t.device.type != "meta")


_inside = threading.local()


def inside_evaluation() -> int:
    """How many autojac evaluations of a user's `f` this thread is inside (a Jacobian taken within `f`: > 0)."""
    return getattr(_inside, "depth", 0)


class evaluating:
    """`with evaluating():` around a call of the user's `f` marks it as an autojac evaluation, so a Jacobian `f`
    takes inside builds its graph (NOTE: [A Jacobian inside f]). A plain class: it wraps every evaluation."""

    __slots__ = ()

    def __enter__(self) -> None:
        _inside.depth = inside_evaluation() + 1

    def __exit__(self, *exc: object) -> None:
        _inside.depth -= 1


class Evaluator:
    """Stands in for `f` during one call: `evaluator(*xs)` returns what `f` returns.

    Inputs are cloned before `f` sees them (a clone is differentiable in every
    mode, so derivatives still reach the caller's tensors, which are never
    written); `private=True` skips that for tensors made for this evaluation
    alone (the repeat trick's copies). What the first evaluation did (whether it
    drew from the global RNG, which module buffers it wrote) is learnt when a
    second evaluation begins or `draws_random` is read, so a call that evaluates
    `f` once pays only for one snapshot. Each later evaluation starts from the
    state the first one started from; `finish()` leaves RNG and buffers as the
    first evaluation left them.
    """

    def __init__(self, f: Callable, device: torch.device, modules: Sequence[nn.Module] = (), once: bool = False,
                 arguments: Arguments = PLAIN_ARGS, watch_captured: bool = False) -> None:
        self.f = f
        self._watch_captured = watch_captured
        """Whether to learn if the first evaluation wrote a tensor `f` captures (see `writes_captured`)."""
        self._captured: list[tuple[torch.Tensor, int]] = []
        self._writes_captured = False
        self.arguments = arguments
        self.plain_call = True
        """Whether the evaluation under way runs on the inputs as given (not the repeat trick's copies)."""
        """How the leaves autojac differentiates become `f`'s arguments (pytrees, argnums)."""
        self.device = device
        self.count = 0
        """Evaluations of `f` that returned."""
        self.started = 0
        """Evaluations of `f` begun, the ones that raised included."""
        self._modules = modules
        self._snapshot_taken = False
        if not once:
            self._snapshot()
        self._learnt = False
        self._draws_random = False
        self._rng_after: tuple[torch.Tensor, ...] | None = None
        self._written: list[int] = []
        self._buffers_after: list[torch.Tensor] = []
        self._raised = False
        """Whether the latest evaluation raised."""
        self._completed = 0
        """Evaluations that returned since the snapshot the others are restored to."""

    def _snapshot(self) -> None:
        """The state the first (counted) evaluation starts from."""
        self._buffers = module_buffers(self._modules)
        self._versions = [version_of(b) for b in self._buffers]
        self._buffers_before = [b.detach().clone() for b in self._buffers]
        self._rng_before = rng_state(self.device)
        if self._watch_captured:
            self._captured = [(t, version_of(t)) for t in captured_tensors(_user_function(self.f), self._modules)]
        self._snapshot_taken = True

    def __call__(self, *xs: torch.Tensor, private: bool = False) -> object:
        if self.started and not self._snapshot_taken:
            # A call expected to evaluate `f` once evaluates it again (a fallback, a check):
            # from here on, this evaluation is the first one the others must agree with.
            self._snapshot()
            self.started = self._completed = 0
        if self.started:
            if not self._completed:
                # Every evaluation so far raised: none of them is the one the others agree with.
                self._undo_all()
            else:
                self._learn()
                self._note_writes(values=self._raised)
                self._restore(self._rng_before if self._draws_random else None, self._buffers_before)
        self.started += 1
        self.plain_call = not private
        self._raised = True
        with evaluating():
            out = self.arguments.call(self.f, xs if private else [x.clone() for x in xs])
        self._raised = False
        self.count += 1
        self._completed += 1
        return out

    def _undo_all(self) -> None:
        """Put the RNG and every buffer back as before the first evaluation (which raised)."""
        _set_rng_state(self.device, self._rng_before)
        with torch.no_grad():
            for i in self._changed(range(len(self._buffers)), values=True):
                _put(self._buffers[i], self._buffers_before[i])

    def _changed(self, indices, values: bool) -> list[int]:
        return [i for i in indices
                if version_of(self._buffers[i]) != self._versions[i]
                or (values and not torch.equal(self._buffers[i], self._buffers_before[i]))]

    def _note_writes(self, values: bool) -> None:
        """Buffers a later evaluation wrote that the first (completed) one did not: put back too, and
        left at their value before (which is what the first evaluation left). Version counters always;
        values after an evaluation that raised (a raise can stop `f` before writes it would have made)."""
        written = set(self._written)
        unwritten = [i for i in range(len(self._buffers)) if i not in written]
        more = self._changed(unwritten, values)
        if more:
            self._written += more
            self._buffers_after += [self._buffers_before[i] for i in more]

    @property
    def draws_random(self) -> bool:
        """Whether the first evaluation drew from the global RNG (read it before a second one begins)."""
        if self.started and self._snapshot_taken:
            self._learn()
        return self._draws_random

    def value_sources(self) -> "ValuesSeen":
        """Every tensor besides the inputs whose values `f`'s sparsity pattern may depend on (an index it
        gathers with, a weight's zeros): captured tensors, module parameters and buffers, arguments passed
        through undifferentiated; as identities and version counters."""
        tensors, plain = captured(_user_function(self.f), self._modules)
        seen = {id(t) for t in tensors}
        tensors += [b for b in module_buffers(self._modules) if id(b) not in seen]
        fixed = flatten(self.arguments.fixed)[0]
        tensors += [t for t in fixed if isinstance(t, torch.Tensor)]
        plain += [v for v in fixed if isinstance(v, _SCALARS)]
        return ValuesSeen(tensors, plain)

    @property
    def writes_captured(self) -> bool:
        """Whether the first evaluation wrote in place into a tensor `f` captures (not a module buffer):
        state autojac cannot put back, so every further evaluation is a step the caller sees, and
        evaluations disagree (read it before a second one begins; needs `watch_captured`)."""
        if self.started and self._snapshot_taken:
            self._learn()
        return self._writes_captured

    def _learn(self) -> None:
        """Compare the state now, after the first evaluation, with the state before it."""
        if self._learnt:
            return
        self._learnt = True
        self._writes_captured = any(version_of(t) != v for t, v in self._captured)
        after = rng_state(self.device)
        self._draws_random = any(not torch.equal(a, b) for a, b in zip(after, self._rng_before))
        self._rng_after = after if self._draws_random else None
        # Values too, not only version counters: batch norm's kernel updates its running
        # statistics in place without bumping their version.
        self._written = [
            i for i, b in enumerate(self._buffers)
            if version_of(b) != self._versions[i] or not torch.equal(b, self._buffers_before[i])
        ]
        self._buffers_after = [self._buffers[i].detach().clone() for i in self._written]

    def _restore(self, rng: tuple[torch.Tensor, ...] | None, buffers: Sequence[torch.Tensor], indices=None) -> None:
        if rng is not None:
            _set_rng_state(self.device, rng)
        if self._written:
            with torch.no_grad():
                if indices is None:  # the state before: one saved copy per buffer
                    for i in self._written:
                        _put(self._buffers[i], buffers[i])
                else:
                    for i, saved in zip(indices, buffers):
                        _put(self._buffers[i], saved)

    def isolated(self, work: Callable[[Callable], object], replay: tuple[torch.Tensor, ...] | None = None) -> object:
        """Run `work(raw)` where `raw(*leaves)` calls `f` directly (for tracing it), leaving the RNG and
        module buffers exactly as they were before: the trace is not an evaluation anyone sees. With `replay`
        (an RNG state from `rng_state`), `f` draws what it drew from that state (an earlier evaluation's
        realization)."""
        if not self._snapshot_taken:
            self._snapshot()
        rng = rng_state(self.device)
        saved = [b.detach().clone() for b in self._buffers]
        if replay is not None:
            _set_rng_state(self.device, replay)
        # A stand-in's raw form (`__autojac_raw__`): an aux recorder must not keep the aux of a trace on fake
        # tensors as the call's aux (a later call's look for structure runs before its plain evaluation).
        raw = getattr(self.f, "__autojac_raw__", self.f)
        try:
            return work(lambda *leaves: self.arguments.call(raw, leaves))
        finally:
            _set_rng_state(self.device, rng)
            with torch.no_grad():
                for b, value in zip(self._buffers, saved):
                    _put(b, value)

    def finish(self) -> None:
        """Leave the RNG and module buffers as the first evaluation left them.

        Nothing to do if no evaluation but the first began; if the first raised,
        the state is what it left, as after torch's one evaluation.
        """
        if self._learnt and self.started > 1 and self._snapshot_taken:
            self._note_writes(values=self._raised)
            self._restore(self._rng_after, self._buffers_after, self._written)
