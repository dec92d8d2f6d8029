"""Checking the user's inputs and outputs, and the facts about them a plan depends on."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from . import pytree
from .errors import InputError, InputTypeError
from .pytree import LEAF, Arguments, TreeSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """The shapes, dtypes and device of the inputs: what a plan is valid for."""

    shapes: tuple[Shape, ...]
    dtypes: tuple[torch.dtype, ...]
    device: torch.device
    spec: TreeSpec = LEAF
    """How the leaves nest (a tensor, a tuple of arguments, dicts, lists, ...)."""

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def is_tuple(self) -> bool:
        return pytree.is_tuple_spec(self.spec)

    def mismatches(self, other: Signature) -> list[str]:
        """One line per field that differs, the planned value beside the given one."""
        rows = []
        for name in ("spec", "shapes", "dtypes", "device"):
            planned, given = getattr(self, name), getattr(other, name)
            if planned != given:
                label = "structure" if name == "spec" else name
                shown = (pytree.describe(planned), pytree.describe(given)) if name == "spec" else (_show(planned), _show(given))
                rows.append(f"{label}: plan has {shown[0]}, call has {shown[1]}")
        return rows


def _show(value: object) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return "(" + ", ".join(str(tuple(s)) for s in value) + ")"
    return str(value)


@dataclass(frozen=True)
class Problem:
    """Everything about one Jacobian that does not depend on how it is computed."""

    inputs: Signature
    out_shapes: tuple[Shape, ...]
    out_dtypes: tuple[torch.dtype, ...]
    out_spec: TreeSpec = LEAF
    """How `f`'s output leaves nest."""
    draws_random: bool = False
    """Whether `f` drew from the global RNG when it was evaluated (dropout, `torch.randn`)."""
    symmetric: bool = False
    """Whether the Jacobian is symmetric by construction (a Hessian: `autojac.hessian`'s gradient)."""
    layout: object = None
    """How the Jacobian is pushed and collected: None for dense (one seed per basis vector), or a
    structured layout (`_execute/layout.py`: colour groups of a sparsity pattern)."""
    tangent_checks: bool = False
    """Whether the safety net checks J v against a forward-mode product instead of w^T J against a VJP: `f` has no
    backward (NOTE: [Checks by tangents] in `_execute/verify.py`); then only forward mode computes it."""

    @property
    def row_passes(self) -> int:
        """Reverse-mode passes for the whole Jacobian: one per output element, or per row colour."""
        return self.n_out if self.layout is None else self.layout.row_passes

    @property
    def col_passes(self) -> int:
        """Forward-mode passes for the whole Jacobian: one per input element, or per column colour."""
        return self.n_in if self.layout is None else self.layout.col_passes

    @property
    def outputs_tuple(self) -> bool:
        return pytree.is_tuple_spec(self.out_spec)

    @cached_property
    def in_sizes(self) -> tuple[int, ...]:
        return self.inputs.sizes

    @cached_property
    def out_sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.out_shapes)

    @cached_property
    def n_in(self) -> int:
        return sum(self.in_sizes)

    @cached_property
    def n_out(self) -> int:
        return sum(self.out_sizes)

    @cached_property
    def in_bytes(self) -> int:
        """Bytes of one input vector (all inputs): what one row of the Jacobian takes."""
        return sum(n * dt.itemsize for n, dt in zip(self.in_sizes, self.inputs.dtypes))

    @cached_property
    def out_bytes(self) -> int:
        """Bytes of one output vector (all outputs): what one column of the Jacobian takes."""
        return sum(m * dt.itemsize for m, dt in zip(self.out_sizes, self.out_dtypes))

    @cached_property
    def dense_result_bytes(self) -> int:
        """Bytes of the Jacobian as dense blocks: one per (output, input) pair."""
        return sum(
            m * n * dt.itemsize
            for m in self.out_sizes
            for n, dt in zip(self.in_sizes, self.inputs.dtypes)
        )

    @cached_property
    def result_bytes(self) -> int:
        """Bytes of the returned Jacobian: dense blocks, or for a structured layout with a sparse output what
        making the sparse blocks takes (see `SparseLayout.result_bytes`)."""
        sparse = getattr(self.layout, "result_bytes", None)
        return self.dense_result_bytes if sparse is None else sparse(self)


def check_inputs(inputs: object, who: str = "jacobian", argnums: object = None) -> tuple[tuple[torch.Tensor, ...], Signature, Arguments]:
    """The differentiated leaves, their signature and how they become `f`'s arguments; or a clear error.

    `inputs` is a tensor, a tuple of positional arguments, or one other pytree
    (dict, list, namedtuple) passed as one argument. With `argnums` (torch.func
    semantics) only those positional arguments are differentiated; the others
    may be anything and are passed through.
    """
    as_args = type(inputs) is tuple
    args = inputs if as_args else (inputs,)
    if as_args and not args:
        raise InputError(f"{who}: `inputs` must hold at least one tensor, but got an empty tuple. Pass a Tensor or a non-empty tuple of Tensors.")
    if argnums is None:
        chosen, positions = inputs, None
    else:
        positions = _check_argnums(argnums, len(args), who)
        chosen = args[positions[0]] if isinstance(argnums, int) else tuple(args[i] for i in positions)
    leaves, spec = pytree.flatten(chosen)
    if not leaves:
        raise InputError(f"{who}: the differentiated inputs hold no tensor ({pytree.describe(spec)}). Pass at least one floating-point tensor.")
    for k, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:  # complex is not floating point
            raise _bad_input(x, _where(chosen, spec, k, as_args, positions, argnums), who)
    device = leaves[0].device
    if len(leaves) > 1 and any(x.device != device for x in leaves):
        listed = ", ".join(str(x.device) for x in leaves)
        raise InputError(f"{who}: all inputs must be on one device, but got inputs on {listed}. Move them with `.to(device)` first.")
    signature = Signature(
        shapes=tuple(tuple(x.shape) for x in leaves),
        dtypes=tuple(x.dtype for x in leaves),
        device=device,
        spec=spec,
    )
    if positions is None:
        arguments = Arguments(spec, as_args=as_args)
    else:
        fixed = tuple(None if i in positions else a for i, a in enumerate(args))
        arguments = Arguments(spec, as_args=True, argnums=positions, argnums_int=isinstance(argnums, int),
                              fixed=fixed, n_args=len(args))
    return tuple(leaves), signature, arguments


def _check_argnums(argnums: object, n_args: int, who: str) -> tuple[int, ...]:
    many = isinstance(argnums, tuple)
    items = argnums if many else (argnums,)
    if (many and not items) or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise InputTypeError(f"{who}: `argnums` must be an int or a non-empty tuple of ints (as in torch.func), but got {argnums!r}.")
    positions = []
    for i in items:
        if not -n_args <= i < n_args:
            raise InputError(f"{who}: `argnums` has {i}, but `f` gets {n_args} positional argument(s) from `inputs`. Pass the arguments as a tuple: `inputs=(x, y, ...)`.")
        positions.append(i % n_args)
    if len(set(positions)) != len(positions):
        raise InputError(f"{who}: `argnums` names an argument twice: {argnums!r}.")
    return tuple(positions)


def _where(chosen: object, spec: TreeSpec, k: int, as_args: bool, positions, argnums) -> str:
    """Where leaf k sits, as the user would index it: `inputs`, `inputs[1]`, `inputs[0]['w']`."""
    if spec.is_leaf():
        return "`inputs`" if positions is None else f"`inputs[{positions[0]}]`"
    path = pytree.leaf_path(chosen, k)
    text = "".join(str(entry) for entry in path)
    if positions is not None and isinstance(argnums, int):
        return f"`inputs[{positions[0]}]{text}`"
    if positions is not None and path:  # inside the tuple of chosen arguments: map back to the argument's index
        first, rest = path[0], "".join(str(entry) for entry in path[1:])
        return f"`inputs[{positions[getattr(first, 'idx', 0)]}]{rest}`"
    return f"`inputs{text}`"


def _bad_input(x: object, where: str, who: str) -> InputTypeError:
    if not isinstance(x, torch.Tensor):
        return InputTypeError(f"{who}: {where} must be a torch.Tensor, but got {type(x).__name__}. Pass a Tensor or a tuple of Tensors; convert data with `torch.as_tensor(..., dtype=torch.float64)`.")
    if x.dtype.is_complex:
        return InputTypeError(f"{who}: {where} must be a real floating-point tensor, but got dtype {x.dtype}; complex Jacobians are not supported. Split it into real and imaginary parts with `torch.view_as_real`.")
    return InputTypeError(f"{who}: {where} must be a floating-point tensor, but got dtype {x.dtype}; only floating-point inputs have derivatives. Convert it with `.double()` or `.float()`.")


def check_outputs(out: object, who: str = "jacobian") -> tuple[tuple[torch.Tensor, ...], TreeSpec]:
    """What `f` returned as (leaves, structure), or a clear error. Runs on every pass of `f`: cheap."""
    ys, spec = pytree.flatten(out)
    if not ys:
        raise InputTypeError(f"{who}: `f` must return a Tensor or a structure of Tensors, but it returned {pytree.describe(spec)} with no tensor in it.")
    for i, y in enumerate(ys):  # error text only when raising
        if not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point:  # complex is not floating point
            where = "`f`'s output" if spec.is_leaf() else f"output {i} of `f`"
            raise _bad_output(y, where, who)
    return tuple(ys), spec


def _bad_output(y: object, where: str, who: str) -> InputTypeError:
    if not isinstance(y, torch.Tensor):
        return InputTypeError(f"{who}: {where} must be a torch.Tensor, but got {type(y).__name__}. Make `f` return a Tensor or a tuple, list or dict of Tensors (return other values as aux, with `has_aux=True`).")
    return InputTypeError(f"{who}: {where} must be a real floating-point tensor, but got dtype {y.dtype}. Return a float tensor (integer and complex outputs have no real Jacobian).")


def describe(f: Callable, xs: Sequence[torch.Tensor], signature: Signature, who: str = "jacobian") -> Problem:
    """Evaluate `f` once to learn the output shapes.

    `f` runs as torch's own `jacobian` runs it: grad enabled, on copies of the
    inputs that require grad, so an `f` that calls `torch.autograd.grad` itself
    works and a function that writes into its inputs cannot change the user's
    tensors. Its own exceptions propagate unchanged.
    """
    with torch.enable_grad():
        out = f(*[x.detach().clone().requires_grad_() for x in xs])
    ys, out_spec = check_outputs(out, who)
    return Problem(
        inputs=signature,
        out_shapes=tuple(tuple(y.shape) for y in ys),
        out_dtypes=tuple(y.dtype for y in ys),
        out_spec=out_spec,
    )
