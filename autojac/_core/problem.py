"""Checking the user's inputs and outputs, and the facts about them a plan depends on."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from .errors import InputError, InputTypeError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """The shapes, dtypes and device of the inputs: what a plan is valid for."""

    shapes: tuple[Shape, ...]
    dtypes: tuple[torch.dtype, ...]
    device: torch.device
    is_tuple: bool

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    def mismatches(self, other: Signature) -> list[str]:
        """One line per field that differs, the planned value beside the given one."""
        rows = []
        for name in ("is_tuple", "shapes", "dtypes", "device"):
            planned, given = getattr(self, name), getattr(other, name)
            if planned != given:
                rows.append(f"{name}: plan has {_show(planned)}, call has {_show(given)}")
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
    outputs_tuple: bool
    draws_random: bool = False
    """Whether `f` drew from the global RNG when it was evaluated (dropout, `torch.randn`)."""

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
        return sum(n * torch.empty((), dtype=dt).element_size() for n, dt in zip(self.in_sizes, self.inputs.dtypes))

    @cached_property
    def out_bytes(self) -> int:
        """Bytes of one output vector (all outputs): what one column of the Jacobian takes."""
        return sum(m * torch.empty((), dtype=dt).element_size() for m, dt in zip(self.out_sizes, self.out_dtypes))

    @cached_property
    def result_bytes(self) -> int:
        """Bytes of the returned Jacobian: one block per (output, input) pair."""
        return sum(
            m * n * torch.empty((), dtype=dt).element_size()
            for m in self.out_sizes
            for n, dt in zip(self.in_sizes, self.inputs.dtypes)
        )


def check_inputs(inputs: object, who: str = "jacobian") -> tuple[tuple[torch.Tensor, ...], Signature]:
    """Return the inputs as a tuple, or raise a clear error before any work is done."""
    is_tuple = isinstance(inputs, tuple)
    xs = inputs if is_tuple else (inputs,)
    if is_tuple and not xs:
        raise InputError(f"{who}: `inputs` must hold at least one tensor, but got an empty tuple. Pass a Tensor or a non-empty tuple of Tensors.")
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:  # complex is not floating point
            raise _bad_input(x, f"`inputs[{i}]`" if is_tuple else "`inputs`", who)
    device = xs[0].device
    if len(xs) > 1 and any(x.device != device for x in xs):
        listed = ", ".join(str(x.device) for x in xs)
        raise InputError(f"{who}: all inputs must be on one device, but got inputs on {listed}. Move them with `.to(device)` first.")
    signature = Signature(
        shapes=tuple(tuple(x.shape) for x in xs),
        dtypes=tuple(x.dtype for x in xs),
        device=device,
        is_tuple=is_tuple,
    )
    return xs, signature


def _bad_input(x: object, where: str, who: str) -> InputTypeError:
    if not isinstance(x, torch.Tensor):
        return InputTypeError(f"{who}: {where} must be a torch.Tensor, but got {type(x).__name__}. Pass a Tensor or a tuple of Tensors; convert data with `torch.as_tensor(..., dtype=torch.float64)`.")
    if x.dtype.is_complex:
        return InputTypeError(f"{who}: {where} must be a real floating-point tensor, but got dtype {x.dtype}; complex Jacobians are not supported. Split it into real and imaginary parts with `torch.view_as_real`.")
    return InputTypeError(f"{who}: {where} must be a floating-point tensor, but got dtype {x.dtype}; only floating-point inputs have derivatives. Convert it with `.double()` or `.float()`.")


def check_outputs(out: object, who: str = "jacobian") -> tuple[tuple[torch.Tensor, ...], bool]:
    """Return what `f` returned as a tuple of tensors, or raise a clear error."""
    is_tuple = isinstance(out, tuple)
    ys = out if is_tuple else (out,)
    if is_tuple and not ys:
        raise InputTypeError(f"{who}: `f` must return a Tensor or a non-empty tuple of Tensors, but it returned an empty tuple.")
    for i, y in enumerate(ys):  # runs on every pass of `f`: error text only when raising
        if not isinstance(y, torch.Tensor) or not y.dtype.is_floating_point:  # complex is not floating point
            raise _bad_output(y, f"output {i} of `f`" if is_tuple else "`f`'s output", who)
    return ys, is_tuple


def _bad_output(y: object, where: str, who: str) -> InputTypeError:
    if not isinstance(y, torch.Tensor):
        return InputTypeError(f"{who}: {where} must be a torch.Tensor, but got {type(y).__name__}. Make `f` return a Tensor or a tuple (not a list) of Tensors.")
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
    ys, outputs_tuple = check_outputs(out, who)
    return Problem(
        inputs=signature,
        out_shapes=tuple(tuple(y.shape) for y in ys),
        out_dtypes=tuple(y.dtype for y in ys),
        outputs_tuple=outputs_tuple,
    )
