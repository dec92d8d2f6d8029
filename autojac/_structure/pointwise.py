"""Rules for element-wise ops: unions of the operands' sets at their broadcast source positions."""

from __future__ import annotations

import numpy as np
import torch

from . import deps as D
from .maps import broadcast_positions, pos_map
from .registry import Call, rule


@rule("sign", "sgn", "floor", "ceil", "round", "trunc", "fix", "heaviside", "floor_divide", "signbit",
      "bernoulli", "rand_like", "randn_like", "randint_like", "poisson", "detach", "detach_copy",
      "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_full",
      "new_empty", "new_empty_strided", "zero", "fill.Scalar", "scalar_tensor", "isnan", "isinf",
      "isfinite", "isposinf", "isneginf", "logical_not", "logical_and", "logical_or", "logical_xor")
def zero_rule(call: Call) -> list:
    """Piecewise-constant ops and value-free creations: zero derivative everywhere."""
    return [None] * len(call.results)


PIECEWISE = frozenset({"sign", "sgn", "floor", "ceil", "round", "trunc", "fix", "heaviside", "floor_divide", "signbit",
                       "bernoulli", "poisson", "detach", "detach_copy", "isnan", "isinf", "isfinite", "isposinf",
                       "isneginf", "logical_not", "logical_and", "logical_or", "logical_xor"})
"""The ops of `zero_rule` whose values still depend on their operands' (the rest create values from shapes alone):
element-wise when an engine tracks values (`Engine.values`)."""


def _operand(call: Call, t, out_shape, drop: np.ndarray | None = None):
    d = call.deps(t)
    if d is None:
        return None
    pos = broadcast_positions(call.shape(t), out_shape)
    if drop is not None:
        pos = (pos if pos is not None else np.arange(1, len(drop) + 1, dtype=np.int64)).copy()
        pos[drop] = 0
    return d if pos is None else D.take(d, pos)


def _zeros_of(call: Call, t, out_shape) -> np.ndarray | None:
    """Flat output positions where constant operand t is exactly zero (None if t is not a known constant)."""
    v = call.value(t)
    if v is None:
        return None
    z = (v == 0).expand(tuple(out_shape)).reshape(-1).numpy()
    return z if z.any() else None


def pointwise_rule(call: Call) -> list:
    out_shape = call.out_shape()
    tensors = call.tensor_args()
    drops: dict[int, np.ndarray] = {}
    name = call.info.name
    if name in ("mul", "div", "true_divide") and len(tensors) == 2:
        a, b = tensors
        # a * b has zero derivative wherever the other factor is a constant zero; so does c / x where c == 0.
        if call.deps(a) is not None and name == "mul":
            z = _zeros_of(call, b, out_shape)
            if z is not None:
                drops[id(a)] = z
        if call.deps(b) is not None:
            z = _zeros_of(call, a, out_shape)
            if z is not None:
                drops[id(b)] = z
    parts = [_operand(call, t, out_shape, drops.get(id(t))) for t in tensors]
    u = D.union(parts)
    return [u] * len(call.results)


@rule("max.other", "min.other", "normal", "native_dropout", "clamp", "clip", "lerp", "threshold_backward",
      "hardswish", "hardsigmoid", "log_sigmoid_forward", "mish", "softshrink", "hardshrink", "rrelu_with_noise",
      "_prelu_kernel", "prelu", "celu", "selu", "silu", "elu", "gelu",
      # backward formulas of element-wise ops (what a Hessian's trace of the gradient is made of)
      "softplus_backward", "tanh_backward", "sigmoid_backward", "gelu_backward", "silu_backward", "elu_backward",
      "hardtanh_backward", "leaky_relu_backward", "mish_backward", "hardsigmoid_backward", "hardswish_backward",
      "log_sigmoid_backward", "softshrink_backward", "hardshrink_backward", "logit_backward", "rrelu_with_noise_backward",
      "_prelu_kernel_backward", "masked_fill_backward")
def plain_pointwise(call: Call) -> list:
    """Element-wise ops the ATen `pointwise` tag does not mark."""
    return pointwise_rule(call)


@rule("glu")
def glu_rule(call: Call) -> list:
    """glu(x, dim) = a * sigmoid(b) with a, b the two halves of x along dim."""
    t = call.arg("self")
    shape = call.shape(t)
    dim = call.arg("dim", -1) % len(shape)
    half = shape[dim] // 2
    p = pos_map(shape)
    a, b = p.narrow(dim, 0, half), p.narrow(dim, half, half)
    d = call.deps(t)
    return [D.union([D.take(d, a.reshape(-1).numpy()), D.take(d, b.reshape(-1).numpy())])]


@rule("view_as_real")
def view_as_real_rule(call: Call) -> list:
    d = call.deps(call.arg("self"))
    n = call.meta(call.arg("self")).numel
    return [D.take(d, np.repeat(np.arange(1, n + 1, dtype=np.int64), 2))]


@rule("view_as_complex")
def view_as_complex_rule(call: Call) -> list:
    d = call.deps(call.arg("self"))
    n = call.out_numel()
    pairs = np.arange(1, 2 * n + 1, dtype=np.int64)
    return [D.union([D.take(d, pairs[0::2]), D.take(d, pairs[1::2])])]


@rule("_to_copy", "clone", "lift_fresh_copy", "alias_copy", "contiguous", "to", "type_as", "_unsafe_view_copy",
      "positive", "resolve_conj", "resolve_neg")
def identity_rule(call: Call) -> list:
    t = call.tensor_args()[0]
    d = call.deps(t)
    if call.shape(t) != call.out_shape():
        return call.dense("shape changed")
    return [d] * len(call.results)


@rule("copy")
def copy_rule(call: Call) -> list:
    """copy(self, src): the result is src broadcast to self's shape; self's old contents are gone."""
    src = call.arg("src")
    return [_operand(call, src, call.out_shape())]


@rule("fill.Tensor")
def fill_tensor_rule(call: Call) -> list:
    return [_operand(call, call.arg("value"), call.out_shape())]


def _select(call: Call, cond: torch.Tensor, a, b) -> list:
    """Element-wise choice under a known condition: each output comes from a or from b."""
    out_shape = call.out_shape()
    numel_a = call.meta(a).numel if isinstance(a, torch.Tensor) else 0
    pa = pos_map(call.shape(a)) if isinstance(a, torch.Tensor) else torch.zeros((), dtype=torch.int64)
    pb = pos_map(call.shape(b), numel_a) if isinstance(b, torch.Tensor) else torch.zeros((), dtype=torch.int64)
    pos = torch.where(cond, pa, pb).expand(out_shape).reshape(-1).numpy()
    parts = [(call.deps(a), numel_a if isinstance(a, torch.Tensor) else 0),
             (call.deps(b), call.meta(b).numel if isinstance(b, torch.Tensor) else 0)]
    return [D.take(D.concat(parts), pos)]


@rule("where")
def where_rule(call: Call) -> list:
    cond = call.value(call.arg("condition"))
    if cond is None:
        return pointwise_rule(call)
    return _select(call, cond, call.arg("self"), call.arg("other"))


@rule("masked_fill")
def masked_fill_rule(call: Call) -> list:
    mask = call.value(call.arg("mask"))
    if mask is None:
        return pointwise_rule(call)
    return _select(call, mask, call.arg("value"), call.arg("self"))
