"""Jacobians inside other transforms: under `torch.func` (jacrev, jacfwd, vmap, grad, jvp) or forward-mode AD.

NOTE: [Why composed calls take their own path]
The planned methods detach the inputs (the caller's graph is kept only for
`create_graph`), run under `no_grad`, and write chunks into preallocated blocks.
Under an outer transform each of these loses the outer derivative: a detached
input carries no tangent, `no_grad` inside `torch.func.jacrev` hides the
computation from it, and functorch refuses in-place writes into captured tensors.
The Jacobian of a Jacobian then came back as zeros. Here the products are
`torch.func.vjp`/`jvp` on the inputs as given (cloned, never detached), batched
with `vmap` or looped one vector at a time if vmap cannot batch `f`, and the
result is concatenated, not written in place: what `torch.func.jacrev` and
`jacfwd` do, which compose with every outer transform. Forward mode is not used
inside forward-mode AD (PyTorch has one forward-AD level per process: see
NOTE: [Forward AD is process-wide]). Nothing is probed or cached: timings taken
inside an outer transform would be the outer transform's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch._C._functorch import is_functorch_wrapped_tensor, maybe_current_level

from .._execute.basis import balanced_chunks, basis_chunk
from .._core.errors import UnsupportedFunctionError
from .._methods.base import forward_ad_lock
from .._core.problem import Signature, check_outputs
from .._core.pytree import nest


def _forward_ad_active_here() -> bool:
    """Whether a forward-AD level is active around this call (not another thread's autojac pass)."""
    return fwAD._current_level >= 0 and not forward_ad_lock.held_by_another_thread()


def outer_transform(xs: Sequence[torch.Tensor]) -> str | None:
    """What outer transform this call runs inside, or None."""
    if maybe_current_level() is not None or any(is_functorch_wrapped_tensor(x) for x in xs):
        return "a torch.func transform"
    if _forward_ad_active_here():
        return "forward-mode AD"
    return None


def composed_jacobian(f: Callable, xs: Sequence[torch.Tensor], signature: Signature, mode: str, chunk_size: int | None,
                      who: str = "jacobian"):
    """The Jacobian by torch.func products that every outer transform can differentiate."""
    forward_allowed = not _forward_ad_active_here()
    if mode == "forward" and not forward_allowed:
        raise UnsupportedFunctionError(
            f"{who}: mode='forward' cannot run inside forward-mode AD (torch.func.jvp/jacfwd, or an autojac "
            "forward pass): PyTorch supports one forward-AD level at a time. Use mode='reverse' or 'forward-trick'."
        )

    def fn(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return check_outputs(f(*a))[0]

    out_specs: list = []

    def fn_recording(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = f(*a)
        ys, spec = check_outputs(out)
        out_specs.append(spec)
        return ys

    ys, vjp_fn = torch.func.vjp(fn_recording, *xs)
    out_shapes = [tuple(y.shape) for y in ys]
    n_in, n_out = sum(signature.sizes), sum(math.prod(s) for s in out_shapes)
    if mode == "auto":
        mode = "forward" if (forward_allowed and n_in < n_out) else "reverse"
    if mode == "reverse":
        columns = False
        chunks = _products(vjp_fn, [y.shape for y in ys], [y.dtype for y in ys], n_out, xs[0].device, chunk_size)
    elif mode == "forward":
        columns = True

        def jvp_fn(*tangents):
            with forward_ad_lock:
                return torch.func.jvp(fn, tuple(xs), tuple(tangents))[1]

        chunks = _products(lambda t: jvp_fn(*t), signature.shapes, signature.dtypes, n_in, xs[0].device, chunk_size)
    else:  # forward-trick: J u is the VJP, in the cotangent v, of v -> J^T v
        columns = True
        zeros = tuple(torch.zeros_like(y) for y in ys)
        _, trick_fn = torch.func.vjp(lambda *v: tuple(vjp_fn(tuple(v))), *zeros)
        chunks = _products(lambda u: tuple(trick_fn(tuple(u))), signature.shapes, signature.dtypes, n_in, xs[0].device, chunk_size)
    return _assemble(chunks, ys, xs, signature, out_shapes, columns, out_specs[0])


def _products(push: Callable, shapes, dtypes, n: int, device, chunk_size: int | None) -> list[tuple[torch.Tensor, ...]]:
    """Push the basis through `push` in chunks (vmap), or one vector at a time where vmap cannot batch it."""
    sizes = [math.prod(s) for s in shapes]
    shapes = [tuple(s) for s in shapes]
    out = []
    for start, stop in balanced_chunks(n, chunk_size or max(n, 1)):
        basis = basis_chunk(start, stop, shapes, sizes, dtypes, device)
        if stop - start > 1:
            try:
                out.append(tuple(torch.func.vmap(lambda *b: tuple(push(b)))(*basis)))
                continue
            except Exception:  # no batching rule for some op of f: one vector at a time
                pass
        out.append(tuple(torch.stack(col) for col in zip(*[tuple(push(tuple(b[r] for b in basis))) for r in range(stop - start)])))
    return out


def _assemble(chunks, ys, xs, signature: Signature, out_shapes, columns: bool, out_spec):
    """Blocks by concatenation (no in-place writes, which outer functorch transforms refuse)."""
    in_shapes = [tuple(s) for s in signature.shapes]
    rows = []
    for i, y in enumerate(ys):
        row = []
        for j, x in enumerate(xs):
            if columns:  # parts per output, basis over inputs: keep input j's share of the basis
                offset = sum(math.prod(s) for s in in_shapes[:j])
                full = torch.cat([c[i].reshape(c[i].shape[0], -1) for c in chunks], 0) if chunks else y.new_zeros(0, y.numel())
                block = full[offset:offset + math.prod(in_shapes[j])].T
            else:  # parts per input, basis over outputs: keep output i's share
                offset = sum(math.prod(s) for s in out_shapes[:i])
                full = torch.cat([c[j].reshape(c[j].shape[0], -1) for c in chunks], 0) if chunks else x.new_zeros(0, x.numel())
                block = full[offset:offset + math.prod(out_shapes[i])]
            row.append(block.to(x.dtype).contiguous().reshape(*out_shapes[i], *in_shapes[j]))
        rows.append(row)
    return nest(rows, out_spec, signature.spec)
