"""Records the ATen ops a function runs, on fake tensors (no values, valid for every input) or, failing that, on real ones.

The tape keeps each op with its arguments and, for every tensor, the storage it lives in and its
view geometry at that moment, so aliasing and in-place writes can be replayed exactly later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Meta:
    """Where a tensor's elements live: storage identity, size, element strides, offset, dtype."""

    key: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    storage_numel: int

    @property
    def skey(self) -> tuple[int, int]:
        """Storage identity plus element size: a dtype-reinterpreting view gets its own element layout."""
        return (self.key, self.dtype.itemsize)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex

    @property
    def whole(self) -> bool:
        """True when the tensor is its storage, element for element, in row-major order."""
        if self.offset != 0 or self.numel != self.storage_numel:
            return False
        expected = 1
        for size, st in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and st != expected:
                return False
            expected *= size
        return True


def meta_of(t: torch.Tensor) -> Meta:
    storage = t.untyped_storage()
    size = t.element_size()
    return Meta(storage._cdata, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype,
                storage.nbytes() // size if size else 0)


@dataclass
class OpRecord:
    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    arg_metas: dict[int, Meta]
    outs: list[torch.Tensor]
    out_metas: list[Meta]


@dataclass
class External:
    """A tensor that f read but did not compute (a weight, a buffer, a closure constant)."""

    tensor: torch.Tensor
    meta: Meta
    snapshot: torch.Tensor | None = None  # storage contents before f first wrote to them (real traces)


@dataclass
class Tape:
    mode: str  # "fake" or "real"
    inputs: list[torch.Tensor]
    input_metas: list[Meta]
    ops: list[OpRecord]
    outputs: list[torch.Tensor]
    output_metas: list[Meta]
    externals: dict[int, list[External]]  # by storage key
    keepalive: list = field(default_factory=list)


def _flat_tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def _mutated_positions(func: torch._ops.OpOverload) -> tuple[int, ...]:
    cached = _MUTATED.get(func)
    if cached is None:
        cached = tuple(i for i, a in enumerate(func._schema.arguments)
                       if a.alias_info is not None and a.alias_info.is_write)
        _MUTATED[func] = cached
    return cached


_MUTATED: dict = {}


def storage_flat(t: torch.Tensor) -> torch.Tensor:
    """All elements of t's storage as one flat tensor of t's dtype (aliasing, no copy)."""
    n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (n,), (1,))


class _Recorder(TorchDispatchMode):
    def __init__(self, fake_mode: FakeTensorMode | None, known: set[int]) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.known = known  # ids of tensors f computed or received: everything else is external
        self.ops: list[OpRecord] = []
        self.externals: dict[int, list[External]] = {}
        self.keepalive: list = []
        self._fakes: dict[int, torch.Tensor] = {}

    def _external(self, t: torch.Tensor) -> torch.Tensor:
        if self.fake_mode is not None:
            fake = self._fakes.get(id(t))
            if fake is None:
                fake = self.fake_mode.from_tensor(t)
                self._fakes[id(t)] = fake
                m = meta_of(fake)
                self.externals.setdefault(m.key, []).append(External(t, m))
                self.keepalive += [t, fake, fake.untyped_storage()]
                self.known.add(id(fake))
            return fake
        m = meta_of(t)
        if id(t) not in self._fakes:
            self._fakes[id(t)] = t
            self.externals.setdefault(m.key, []).append(External(t, m))
            self.keepalive += [t, t.untyped_storage()]
        return t

    def _convert(self, a: object) -> object:
        if isinstance(a, torch.Tensor):
            if id(a) in self.known:
                return a
            if self.fake_mode is not None and isinstance(a, FakeTensor):
                return a
            return self._external(a)
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(self._convert(x) for x in a)
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        args = tuple(self._convert(a) for a in args)
        kwargs = {k: self._convert(v) for k, v in kwargs.items()}
        metas: dict[int, Meta] = {}
        for a in (*args, *kwargs.values()):
            for t in _flat_tensors(a) if not isinstance(a, torch.Tensor) else [a]:
                metas[id(t)] = meta_of(t)
        if self.fake_mode is None:
            self._snapshot_before_write(func, args, metas)
        out = func(*args, **kwargs)
        outs = _flat_tensors(out)
        if outs or _mutated_positions(func):
            out_metas = [meta_of(t) for t in outs]
            for t in outs:
                self.known.add(id(t))
            self.ops.append(OpRecord(func, args, kwargs, metas, outs, out_metas))
            self.keepalive += [t.untyped_storage() for t in outs]
        return out

    def _snapshot_before_write(self, func, args, metas) -> None:
        # A real trace runs f for real: keep what an external buffer held before f overwrote it.
        for i in _mutated_positions(func):
            if i < len(args) and isinstance(args[i], torch.Tensor):
                for ext in self.externals.get(metas[id(args[i])].key, ()):
                    if ext.snapshot is None:
                        ext.snapshot = storage_flat(ext.tensor).detach().clone()


class _QuietInThisThread(logging.Filter):
    """Drops the records of threads inside a `QuietFakeLog`; every other thread's pass."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0)


_QUIET = _QuietInThisThread()
logging.getLogger("torch._subclasses.fake_tensor").addFilter(_QUIET)


class QuietFakeLog:
    """Silences fake-tensor error logs (a failed fake op logs its traceback at ERROR) in this thread while a
    trace runs. NOTE: [Quiet by a thread's filter, not the logger's level]: setting the logger's level and
    back was global state two threads could leave at CRITICAL (A saves NOTSET, B saves CRITICAL, A restores,
    B restores), and each `setLevel` clears every logger's cache (17 us for the pair with torch's 221
    loggers). A filter installed once on import drops only the quiet threads' records. Unlike a
    level, a logger's filter does not reach its child loggers; torch logs there at DEBUG only."""

    def __enter__(self):
        _QUIET.local.depth = getattr(_QUIET.local, "depth", 0) + 1

    def __exit__(self, *exc):
        _QUIET.local.depth -= 1


def record(f: Callable, xs: Sequence[torch.Tensor], mode: str) -> Tape:
    """Run f(*xs) once under a recorder: on fake tensors (mode "fake") or on real clones ("real")."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if mode == "fake" else None
    if fake_mode is not None:
        inputs = [fake_mode.from_tensor(x.detach().contiguous()) for x in xs]
    else:
        inputs = [x.detach().clone() for x in xs]
    known = {id(t) for t in inputs}
    recorder = _Recorder(fake_mode, known)
    input_metas = [meta_of(t) for t in inputs]
    with QuietFakeLog():
        if fake_mode is not None:
            with fake_mode, recorder:
                out = f(*inputs)
        else:
            with recorder:
                out = f(*inputs)
    outputs = _outputs(out)
    return Tape(mode, inputs, input_metas, recorder.ops, outputs, [meta_of(t) for t in outputs],
                recorder.externals, recorder.keepalive + inputs)


def _outputs(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out) and out:
        return list(out)
    raise TypeError(
        f"f returned {type(out).__name__}; structure detection needs f to return a tensor or a "
        "non-empty tuple of tensors: return the outputs as a tuple")
