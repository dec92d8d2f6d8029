"""The shared shape of the nine methods: prepare once, then push chunks of basis vectors."""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._core.batched_gate import batched_backward
from .._core.errors import NotBatchAwareError
from .._core.evaluation import Evaluator
from .._core.index_guard import IndexGuard
from .._core.problem import Problem, check_outputs
from .._core.pytree import LEAF, TreeSpec

from .._core.options import MODES as MODES
from .._core.options import VECTORIZATIONS as VECTORIZATIONS

Parts = tuple[torch.Tensor | None, ...]


def method_name(mode: str, vectorize: str, engine: str = "") -> str:
    return f"{mode}/{vectorize}" + (f" [{engine}]" if engine else "")


class Method(abc.ABC):
    """One way to compute a Jacobian: a mode (which products) and a vectorization (how batched).

    `prepare` does the work shared by all chunks (for example the forward pass
    whose graph every VJP reuses); `chunk` turns k basis vectors into k rows
    (reverse) or k columns (forward modes) of the Jacobian.
    """

    mode: ClassVar[str]
    vectorize: ClassVar[str]
    engine: str = ""
    """Which machinery a vmap method runs on: "func" (torch.func) or "autograd"; "" for the others."""
    evaluates_once: ClassVar[bool] = False
    """Whether the whole Jacobian comes from one evaluation of `f` (one graph), not one per chunk or vector."""

    @property
    def name(self) -> str:
        return method_name(self.mode, self.vectorize, self.engine)

    @property
    def by_rows(self) -> bool:
        return self.mode == "reverse"

    def evaluations(self, n_vectors: int, n_chunks: int) -> int:
        """How many times a whole Jacobian in `n_chunks` chunks evaluates `f` (the README's table)."""
        if self.evaluates_once:
            return 1
        return n_vectors if self.vectorize == "loop" else n_chunks

    def basis_size(self, problem: Problem) -> int:
        """How many basis vectors (passes) the whole Jacobian needs."""
        return problem.row_passes if self.by_rows else problem.col_passes

    def basis_layout(self, problem: Problem) -> tuple[Sequence, Sequence[int], Sequence[torch.dtype]]:
        if self.by_rows:
            return problem.out_shapes, problem.out_sizes, problem.out_dtypes
        return problem.inputs.shapes, problem.in_sizes, problem.inputs.dtypes

    @abc.abstractmethod
    def prepare(self, f: Callable, xs: Sequence[torch.Tensor], problem: Problem, create_graph: bool) -> Any:
        """Work shared by every chunk of one Jacobian."""

    def adopt(self, graph: "Graph") -> Any | None:
        """The state `prepare` would make, from an evaluation of `f` already done (None if it cannot use it).

        The first call of a function evaluates it once to learn its output shapes;
        a method that starts from that same evaluation wastes none of it.
        """
        return None

    @abc.abstractmethod
    def chunk(self, state: Any, basis: Sequence[torch.Tensor]) -> Parts:
        """Push basis vectors (one tensor per part, leading dim k) through; one result per other side."""

    def same_realization_vjp(self, state: Any, cotangents: Sequence[torch.Tensor]) -> Parts | None:
        """One unbatched VJP on the evaluation of `f` the chunks came from, or None if there is no single one.

        The safety net (`_verify`) checks a method's Jacobian against it.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass
class PlainGraph:
    """One evaluation of `f` recorded by plain autograd: what reverse/loop and the autograd engines run on."""

    xs: tuple[torch.Tensor, ...]
    ys: tuple[torch.Tensor, ...]
    create_graph: bool
    out_spec: TreeSpec = LEAF
    """How `f`'s output leaves nest."""


@dataclass
class FuncGraph:
    """One evaluation of `f` under `torch.func.vjp`: what the torch.func engines run on."""

    ys: tuple[torch.Tensor, ...]
    vjp_fn: Callable
    create_graph: bool


Graph = PlainGraph | FuncGraph


def evaluate_plain(f: Callable, xs: Sequence[torch.Tensor], create_graph: bool) -> PlainGraph:
    """`f` on inputs that require grad, recorded by autograd (as torch's own `jacobian` runs it)."""
    leaves = grad_inputs(xs, create_graph)
    with torch.enable_grad():
        ys, out_spec = check_outputs(f(*leaves))
    return PlainGraph(leaves, ys, create_graph, out_spec)


def func_primals(xs: Sequence[torch.Tensor], create_graph: bool) -> tuple[torch.Tensor, ...]:
    """Inputs for torch.func transforms: detached, or (with `create_graph`) connected leaves, as for autograd."""
    return grad_inputs(xs, create_graph) if create_graph else tuple(x.detach() for x in xs)


def evaluate_func(f: Callable, xs: Sequence[torch.Tensor], create_graph: bool) -> FuncGraph:
    """`f` under `torch.func.vjp`; raises whatever torch.func raises for an `f` it cannot transform."""
    with torch.set_grad_enabled(create_graph):
        ys, vjp_fn = torch.func.vjp(lambda *a: call(f, a), *func_primals(xs, create_graph))
    return FuncGraph(tuple(ys), vjp_fn, create_graph)


def grad_mode(create_graph: bool):
    """The grad mode every prepare and chunk runs under.

    NOTE: [Why chunks run under no_grad]
    Without `create_graph`, nothing outside a method should record a graph. But
    `f`'s own parameters (an nn.Module's weights) require grad, so torch.func and
    forward-AD results would carry a graph back to them; copying each chunk into
    the result then kept every chunk's intermediates alive (measured: 1.6 MiB per
    chunk of 16 on a transformer layer, 209 MiB over a 2048-row Jacobian). Under
    no_grad, torch.func transforms and forward AD still work, and the methods
    that need a graph of their own build it under `torch.enable_grad()`.
    """
    return torch.set_grad_enabled(create_graph)  # enable_grad or no_grad, at half the cost


def grad_inputs(xs: Sequence[torch.Tensor], create_graph: bool) -> tuple[torch.Tensor, ...]:
    """Inputs to differentiate: detached leaves, or views that keep the caller's graph.

    As in `torch.autograd.functional`, with `create_graph=True` an input that
    already requires grad stays connected so the Jacobian can be differentiated.
    """
    with torch.enable_grad():  # under no_grad a view would not require grad: a Jacobian of zeros, "checked"
        return tuple(
            x.view_as(x) if (create_graph and x.requires_grad) else x.detach().requires_grad_()
            for x in xs
        )


def plain_inputs(xs: Sequence[torch.Tensor], create_graph: bool) -> tuple[torch.Tensor, ...]:
    """Inputs for forward-mode passes: no backward graph unless one was asked for.

    With `create_graph`, they are the same as reverse mode's, so the Jacobian is
    differentiable whichever mode computed it.
    """
    if create_graph:
        return tuple(_own_elements(x) for x in grad_inputs(xs, create_graph))
    return tuple(_own_elements(x.detach()) for x in xs)


def _own_elements(x: torch.Tensor) -> torch.Tensor:
    """`x`, or a contiguous copy when its elements may share memory (an expanded tensor, stride 0, or any
    layout whose strides do not nest): forward-mode AD lays a tangent out like its primal and cannot write one
    into shared memory (`torch.func.jacfwd` fails there too). The copy is differentiable, so a graph the
    caller asked to keep stays connected."""
    return x.contiguous() if _may_overlap(x) else x


def _may_overlap(x: torch.Tensor) -> bool:
    """False when the strides prove no two elements share memory: taken from the smallest up, each stride
    reaches past everything the smaller ones span (true of every permutation of a contiguous layout)."""
    span = 1
    for stride, size in sorted((s, n) for s, n in zip(x.stride(), x.shape) if n > 1):
        if stride < span:
            return True
        span = stride * size
    return False


class _ForwardAdLock:
    """Serializes forward-mode AD across threads.

    NOTE: [Forward AD is process-wide]
    PyTorch has one forward-AD level for the whole process (`fwAD.dual_level` and
    `torch.func.jvp` both enter it), and entering it twice raises "Nested forward
    mode AD is not supported". Two threads running forward mode at once would
    make one of them fail, so every forward pass holds this lock. It is reentrant
    and knows its owner, so a call running inside this thread's own forward pass
    (autojac inside autojac) can tell that the active level is an outer one.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        self._lock.release()

    def held_by_another_thread(self) -> bool:
        owner = self._owner
        return owner is not None and owner != threading.get_ident()


forward_ad_lock = _ForwardAdLock()


def call(f: Callable, xs: Sequence[torch.Tensor], private: bool = False) -> tuple[torch.Tensor, ...]:
    """`f`'s outputs as a tuple; `private`: the inputs were made for this evaluation alone (no copy needed)."""
    if private and isinstance(f, Evaluator):
        return check_outputs(f(*xs, private=True))[0]
    return check_outputs(f(*xs))[0]


def vjp(
    ys: Sequence[torch.Tensor],
    xs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    create_graph: bool,
    batched: bool = False,
) -> Parts:
    """`torch.autograd.grad` (or the engine call it makes: NOTE: [The engine called as torch.autograd.grad calls
    it]) that treats outputs without a graph as independent (None)."""
    pairs = [(y, v) for y, v in zip(ys, cotangents) if y is not None and y.requires_grad]
    if not pairs:
        return (None,) * len(xs)
    outs, vs, xs = tuple(y for y, _ in pairs), tuple(v for _, v in pairs), tuple(xs)
    with batched_backward() if batched else contextlib.nullcontext():  # NOTE: [Batched backwards wait for an
        if _lean_fits(outs, xs, vs, batched):                          # open loop probe]
            return _lean_grad(outs, xs, vs, create_graph, batched)
        return torch.autograd.grad(outs, xs, vs, retain_graph=True, create_graph=create_graph, allow_unused=True,
                                   is_grads_batched=batched)


# NOTE: [The engine called as torch.autograd.grad calls it]
# `torch.autograd.grad` spends as long in Python as the autograd engine spends on a small graph: for a batched
# backward it flattens the cotangents with pytree, checks them (indexing each batch's first entry), and wraps
# the engine call in the legacy vmap's own flatten, batch-dim and unflatten steps; 0.1 ms of a 3 x 3 Jacobian's
# 0.42 ms call (py-spy, 2-core CPU, torch 2.13), which torch's own vectorized jacobian pays too. The cotangents
# autojac passes are its own seeds, made for the outputs' shapes and dtypes, so for plain tensors with no
# __torch_function__ override in play (a subclass or a mode), `vjp` calls the engine as `grad` does after its
# checks: `_engine_run_backward` (outputs, cotangents, retain, create_graph, inputs, allow_unused, no
# accumulation), batched through the legacy vmap's nesting level and `_add_batch_dim`/`_remove_batch_dim` as
# `_vmap_internals._vmap` does. Anything else (and a torch without those internals) goes through `grad`. The
# engine's own checks (shapes, grad requirements) still raise as they did. The safety net's reference product
# takes the unbatched form: the engine alone, no vmap, as independent of a batched run as before.

try:
    from torch.autograd.graph import _engine_run_backward
    _VMAP_LEVEL_IN, _VMAP_LEVEL_OUT = torch._C._vmapmode_increment_nesting, torch._C._vmapmode_decrement_nesting
    _ADD_BATCH_DIM, _REMOVE_BATCH_DIM = torch._add_batch_dim, torch._remove_batch_dim
    from torch.overrides import has_torch_function as _has_torch_function
except (ImportError, AttributeError):  # pragma: no cover - another torch: `grad` as documented
    _engine_run_backward = None


def _lean_fits(outs: tuple, xs: tuple, vs: tuple, batched: bool) -> bool:
    """Whether `vjp` may call the engine directly (NOTE: [The engine called as torch.autograd.grad calls it])."""
    if _engine_run_backward is None or _has_torch_function(outs + xs + vs):
        return False
    k = vs[0].shape[0] if batched and vs[0].dim() else None
    for y, v in zip(outs, vs):
        if (type(y) is not torch.Tensor or type(v) is not torch.Tensor or y.is_nested or v.is_nested
                or v.dtype != y.dtype or v.device != y.device):
            return False
        if batched:
            if v.dim() == 0 or v.shape[0] != k or v.shape[1:] != y.shape:
                return False
        elif v.shape != y.shape:
            return False
    return all(type(x) is torch.Tensor for x in xs)


def _lean_grad(outs: tuple, xs: tuple, vs: tuple, create_graph: bool, batched: bool) -> Parts:
    if not batched:
        return _engine_run_backward(outs, vs, True, create_graph, xs, True, accumulate_grad=False)
    level = _VMAP_LEVEL_IN()
    try:
        k = vs[0].shape[0]
        got = _engine_run_backward(outs, tuple(_ADD_BATCH_DIM(v, 0, level) for v in vs), True, create_graph, xs, True,
                                   accumulate_grad=False)
        return tuple(None if g is None else _REMOVE_BATCH_DIM(g, level, k, 0) for g in got)
    finally:
        _VMAP_LEVEL_OUT()


def stack_parts(rows: Sequence[Parts]) -> Parts:
    """Stack per-vector results into per-part chunks; a part that is None in every row stays None."""
    if len(rows) == 1:  # a view, not a copy
        return tuple(None if r is None else r.unsqueeze(0) for r in rows[0])
    out: list[torch.Tensor | None] = []
    for q in range(len(rows[0])):
        column = [row[q] for row in rows]
        if all(c is None for c in column):
            out.append(None)
            continue
        like = next(c for c in column if c is not None)
        out.append(torch.stack([torch.zeros_like(like) if c is None else c for c in column]))
    return tuple(out)


def batched_copies(xs: Sequence[torch.Tensor], k: int) -> tuple[torch.Tensor, ...]:
    """k copies of each input along a new leading dimension (the seed's repeat trick), contiguous and always
    fresh memory (`f` may write into them). An expanded view copied once: `repeat` took 15-31 us for 3 copies of
    3 numbers, this 5-12 us, and 95 against 69 us for 256 copies of 4096 (2-core CPU, torch 2.13)."""
    return tuple(x.unsqueeze(0).expand(k, *x.shape).clone(memory_format=torch.contiguous_format) for x in xs)


def check_batched_outputs(ys: Sequence[torch.Tensor], problem: Problem, k: int) -> None:
    expected = [(k, *s) for s in problem.out_shapes]
    got = [tuple(y.shape) for y in ys]
    if got != expected:
        raise NotBatchAwareError(
            f"vectorize='repeat' needs `f` to map inputs with a leading batch dimension of {k} "
            f"to outputs of shapes {expected}, but got {got}. Use vectorize='vmap' or 'loop', "
            "or make `f` accept a batch."
        )


def check_batch_aware(f: Callable, xs: Sequence[torch.Tensor], problem: Problem) -> None:
    """Raise NotBatchAwareError unless `f` on a batch of two different rows gives each row's own output.

    NOTE: [Batch-aware, checked on different rows]
    The repeat trick runs `f` on identical copies, and its Jacobian's check runs
    at the caller's point: both can miss an `f` that is not batch-aware. Copies
    of x give `x * x[0]` (first row times all) the same rows; at x = 0 every
    Jacobian of it is zero, so a wrong one passes; a roll over 64 copies of a
    64-element input happens to be right. So before a repeat method is first
    checked in a plan, `f` runs on the rows [x, x + d] (d random, from a private
    generator, about a tenth of x's scale) and plainly on x and on x + d: each
    batched row must match within sqrt(eps), relative to the output's largest
    element (batched kernels sum in other orders; NaN where both give NaN). Three
    evaluations, under no_grad, once per plan.
    """
    generator = torch.Generator(device=problem.inputs.device).manual_seed(0xBA7C)
    shifted = []
    for x in xs:
        scale = 0.1 * (x.detach().abs().mean() + 1.0) if x.numel() else 1.0
        d = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * scale
        shifted.append(x.detach() + d)
    rows = tuple(torch.stack([x.detach(), s]) for x, s in zip(xs, shifted))
    guard = contextlib.nullcontext()
    if _asserts_on_device(problem.inputs.device) and not _check_shapes_on_fake_rows(f, rows, problem):
        guard = IndexGuard()  # NOTE: [A batched trial must not run kernels that assert]
    with torch.no_grad(), guard:
        batched = call(f, rows, private=True)
        check_batched_outputs(batched, problem, 2)
        plain = (call(f, tuple(x.detach() for x in xs)), call(f, tuple(shifted)))
    for i, y in enumerate(batched):
        for r in range(2):
            if not rows_agree(y[r], plain[r][i]):
                raise NotBatchAwareError(
                    f"vectorize='repeat' needs `f` to treat a leading batch dimension as independent rows, but "
                    f"`f` on a batch of two different inputs gave row {r} of output {i} unlike `f` on that input "
                    f"alone (it mixes rows, or reads the first dimension as data). Use vectorize='vmap' or 'loop'.")


def rows_agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether one row of a batched evaluation matches `f` on that row alone: within sqrt(eps), relative to the
    row's largest element (batched kernels sum in other orders); NaN where both give NaN."""
    tol = torch.finfo(want.dtype).eps ** 0.5 if want.is_floating_point() else 0.0
    scale = float(want.abs().nan_to_num(posinf=0.0).max()) if want.numel() else 0.0
    return torch.allclose(got, want, rtol=tol, atol=tol * scale, equal_nan=True)


def _asserts_on_device(device: torch.device) -> bool:
    """Whether an out-of-bounds index is a device-side assert there (CUDA) rather than an error (the CPU)."""
    return device.type == "cuda"


def _check_shapes_on_fake_rows(f: Callable, rows: Sequence[torch.Tensor], problem: Problem) -> bool:
    """The batched outputs' shapes from `f` on fake rows (no kernel runs), before it runs on real ones: raises
    NotBatchAwareError when they are wrong, returns False when the fake run cannot tell, True when they are right.

    NOTE: [A batched trial must not run kernels that assert]
    An `f` that is not batch-aware can index out of bounds on stacked rows (`x[perm]` with a captured
    permutation reads perm's entries along the batch dimension). On the CPU that is an IndexError the trial
    catches; on CUDA it is a device-side assert that leaves the process's CUDA context unusable, every later
    call failing (seen on an H200: one repeat trial took 23 tests down with it). On fake tensors the same call
    only computes shapes, so on CUDA such an `f` is found not batch-aware without a kernel. Where the fake run
    cannot tell (a data-dependent branch such as `if x.sum() > 0`, an op without a fake kernel, an error that
    the real run will name), the real trial runs under `IndexGuard`, which checks the index operands of the ops
    that would assert on the host first (NOTE: [Index bounds checked before the kernel]). The CPU does not pay
    for either: its real check fails safely, and the fake run (a few ms, charged to the trial) cost a
    custom-Function function's exploration a trial of another method."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .._structure.trace import QuietFakeLog

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [fake_mode.from_tensor(r) for r in rows]

    def run(raw: Callable) -> object:
        with QuietFakeLog(), fake_mode, torch.no_grad():  # a failed fake op logs its traceback at ERROR
            return raw(*fake)

    try:
        out = f.isolated(run) if isinstance(f, Evaluator) else run(f)  # RNG and buffers put back
        ys = check_outputs(out)[0]
    except Exception:  # noqa: BLE001 - the fake run cannot tell; the guarded real run will
        return False
    check_batched_outputs(ys, problem, 2)
    return True


@dataclass
class BatchState:
    """What a repeat-trick chunk needs: it reruns `f` on every chunk, so nothing is precomputed."""

    f: Callable
    xs: tuple[torch.Tensor, ...]
    problem: Problem
    create_graph: bool


def call_on_copies(state: BatchState, k: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The repeat trick's forward pass: `f` on k copies of the inputs, with a graph; (copies, outputs)."""
    with torch.enable_grad():
        copies = batched_copies(state.xs, k)
        ys = call(state.f, copies, private=True)
    check_batched_outputs(ys, state.problem, k)
    return copies, ys
