"""Rules for matrix products and convolutions: a constant operand contributes its actual nonzero pattern.

A varying operand (one that depends on the inputs, or a constant of unknown value) counts as
nonzero everywhere, so bilinear products take the union of both sides' contributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import deps as D
from .maps import broadcast_positions, pos_map
from .reductions import reduce_deps
from .registry import Call, rule


def _view3(call: Call, t, pos: torch.Tensor):
    """Deps and value of t rearranged by a 1-based position tensor of shape (b, r, c)."""
    d = D.take(call.deps(t), pos.reshape(-1).numpy()) if call.deps(t) is not None else None
    v = call.value(t)
    if v is not None:
        flat = v.reshape(-1)
        if (pos.is_contiguous() and pos.numel() == flat.numel()
                and torch.equal(pos.reshape(-1), torch.arange(1, flat.numel() + 1, dtype=pos.dtype, device=pos.device))):
            v = flat.reshape(pos.shape)  # the layout as it is (an mm's operands): no gather of a large weight
        else:
            v = flat[pos - 1]
    return d, v


EXACT_PAIRS_LIMIT = 4_000_000
"""A constant operand's exact pattern is spelled out up to this many (output, input) pairs; beyond, the operand
is taken as dense (every entry may be nonzero: a superset, never a missed nonzero) and the op is listed among
those treated as dense. A 32768 x 512 weight with a few exact zeros built 16.7 million pairs: 13 s and 3 GB
for a pattern that came out dense anyway (wide_mlp, a later call's look for structure)."""


def _nearly_dense(nonzero: int, size: int, repeats: int) -> bool:
    """Whether to take a constant operand's pattern as dense: no zero in it, or too many pairs to spell out
    (each of its nonzeros times `repeats` rows or columns of the other side)."""
    if nonzero == size:
        return True
    if nonzero * max(repeats, 1) > EXACT_PAIRS_LIMIT:
        D.capped().append(f"a constant operand of {nonzero} nonzeros too large to spell out")
        return True
    return False


def bmm_deps(a: tuple, b: tuple, shape_a: tuple, shape_b: tuple) -> D.Deps | None:
    """Deps of (B, n, k) @ (B, k, m) given (deps, value) of each side in that layout."""
    (da, va), (db, vb) = a, b
    nb, n, k = shape_a
    m = shape_b[2]
    parts = []
    if da is not None and k:
        pat = None if vb is None else (vb != 0).numpy()
        if pat is None or _nearly_dense(int(np.count_nonzero(pat)), pat.size, n):
            rows = reduce_deps(da, shape_a, [2])  # (B, n): union over the row of A
            parts.append(D.take(rows, pos_map((nb, n)).unsqueeze(-1).expand(nb, n, m).reshape(-1).numpy()))
        else:
            bb, ll, jj = np.nonzero(pat)
            i = np.arange(n, dtype=np.int64)[:, None]
            out_rows = bb * n * m + i * m + jj
            in_cols = bb * n * k + i * k + ll
            groups = D.csr_from_pairs(out_rows.reshape(-1), in_cols.reshape(-1), (nb * n * m, nb * n * k))
            parts.append(D.reduce(da, groups))
    if db is not None and k:
        pat = None if va is None else (va != 0).numpy()
        if pat is None or _nearly_dense(int(np.count_nonzero(pat)), pat.size, m):
            cols = reduce_deps(db, shape_b, [1])  # (B, m): union over the column of B
            parts.append(D.take(cols, pos_map((nb, m)).unsqueeze(1).expand(nb, n, m).reshape(-1).numpy()))
        else:
            bb, ii, ll = np.nonzero(pat)
            j = np.arange(m, dtype=np.int64)[:, None]
            out_rows = bb * n * m + ii * m + j
            in_cols = bb * k * m + ll * m + j
            groups = D.csr_from_pairs(out_rows.reshape(-1), in_cols.reshape(-1), (nb * n * m, nb * k * m))
            parts.append(D.reduce(db, groups))
    return D.union(parts)


def _product(call: Call, a, b, sa: tuple[int, int, int], sb: tuple[int, int, int],
             pb: Callable[[], torch.Tensor] | None = None) -> D.Deps | None:
    """Deps of a @ b viewed as (B, n, k) @ (B, k, m) of shapes `sa`, `sb`: each operand's elements in their own
    order, except where `pb` gives b's position map in that layout (a transposed weight), built only if needed.

    NOTE: [A dense constant is known before it is loaded]
    A constant operand's exact pattern is wanted only when it has zeros and few enough pairs (EXACT_PAIRS_LIMIT),
    so its nonzeros are counted first where it lives, and a dense one is never copied to the host or laid out
    by a position map. A 2048 x 131072 weight on a GPU took 2.7 s an mm that way (its 1 GiB copied to the host,
    reshaped, a 268-million-entry position map built, compared and counted): 22 of a first call's 24 s on an
    H200 (wide_mlp, size gpu, under a budget), for a pattern that came out dense."""
    return bmm_deps(_side(call, a, lambda: pos_map(sa), sb[2]), _side(call, b, pb or (lambda: pos_map(sb)), sa[1]),
                    sa, sb)


def _side(call: Call, t, pos: Callable[[], torch.Tensor], repeats: int) -> tuple:
    if isinstance(t, torch.Tensor) and call.deps(t) is None:
        nonzero = call.nonzeros(t)
        if nonzero is not None and _nearly_dense(nonzero, math.prod(call.shape(t)), repeats):
            return None, None  # a constant without a usable pattern: the other side's contribution is dense
    return _view3(call, t, pos())


def _mm(call: Call, a, b) -> tuple:
    """(B, n, k), (B, k, m) of a matrix product a @ b (B = 1)."""
    return (1, *call.shape(a)), (1, *call.shape(b))


def _mv(call: Call, a) -> tuple:
    return (1, *call.shape(a)), (1, call.shape(a)[1], 1)


def _plus_self(call: Call, prod: D.Deps | None) -> list:
    s = call.arg("self")
    beta = call.arg("beta", 1)
    if isinstance(s, torch.Tensor) and beta != 0 and call.deps(s) is not None:
        pos = broadcast_positions(call.shape(s), call.out_shape())
        sd = call.deps(s) if pos is None else D.take(call.deps(s), pos)
        prod = D.union([prod, sd])
    return [prod]


@rule("mm")
def mm_rule(call: Call) -> list:
    a, b = call.arg("self"), call.arg("mat2")
    return [_product(call, a, b, *_mm(call, a, b))]


@rule("bmm")
def bmm_rule(call: Call) -> list:
    a, b = call.arg("self"), call.arg("mat2")
    return [_product(call, a, b, call.shape(a), call.shape(b))]


@rule("mv")
def mv_rule(call: Call) -> list:
    a, v = call.arg("self"), call.arg("vec")
    return [_product(call, a, v, *_mv(call, a))]


@rule("dot", "vdot", "inner")
def dot_rule(call: Call) -> list:
    a, b = call.arg("self"), call.arg("tensor", call.arg("other"))
    sa, sb = (1, 1, call.shape(a)[0]), (1, call.shape(b)[0], 1)
    return [_product(call, a, b, sa, sb)]


@rule("addmm")
def addmm_rule(call: Call) -> list:
    a, b = call.arg("mat1"), call.arg("mat2")
    return _plus_self(call, _product(call, a, b, *_mm(call, a, b)))


@rule("addmv")
def addmv_rule(call: Call) -> list:
    a, v = call.arg("mat"), call.arg("vec")
    return _plus_self(call, _product(call, a, v, *_mv(call, a)))


@rule("baddbmm")
def baddbmm_rule(call: Call) -> list:
    a, b = call.arg("batch1"), call.arg("batch2")
    return _plus_self(call, _product(call, a, b, call.shape(a), call.shape(b)))


@rule("addbmm")
def addbmm_rule(call: Call) -> list:
    a, b = call.arg("batch1"), call.arg("batch2")
    (nb, n, _), (_, _, m) = call.shape(a), call.shape(b)
    prod = _product(call, a, b, call.shape(a), call.shape(b))
    return _plus_self(call, reduce_deps(prod, (nb, n, m), [0]))


@rule("addr", "outer", "ger")
def outer_rule(call: Call) -> list:
    if call.info.name == "addr":
        a, b = call.arg("vec1"), call.arg("vec2")
    else:
        a, b = call.arg("self"), call.arg("vec2")
    sa, sb = (1, call.shape(a)[0], 1), (1, 1, call.shape(b)[0])
    prod = _product(call, a, b, sa, sb)
    return _plus_self(call, prod) if call.info.name == "addr" else [prod]


@rule("linear")
def linear_rule(call: Call) -> list:
    x, w, bias = call.arg("input"), call.arg("weight"), call.arg("bias")
    k = call.shape(w)[-1]
    rows, outs = math.prod(call.shape(x)) // max(k, 1), math.prod(call.shape(w)) // max(k, 1)
    prod = _product(call, x, w, (1, rows, k), (1, k, outs),
                    lambda: pos_map(call.shape(w)).reshape(outs, k).t().unsqueeze(0))
    if isinstance(bias, torch.Tensor) and call.deps(bias) is not None:
        prod = D.union([prod, D.take(call.deps(bias), broadcast_positions(call.shape(bias), call.out_shape()))])
    return [prod]


# -- convolution ----------------------------------------------------------------------------------

def _patches(in_shape, k, stride, padding, dilation, out_spatial, groups) -> torch.Tensor:
    """(N, G, S, Cg*K) 1-based input positions under each kernel tap of each output position (0 = padding)."""
    nd = len(k)
    p = pos_map(in_shape)
    pads = []
    for i in reversed(range(nd)):
        need = (out_spatial[i] - 1) * stride[i] + (k[i] - 1) * dilation[i] + 1
        extra = max(0, need - (in_shape[2 + i] + 2 * padding[i]))
        pads += [padding[i], padding[i] + extra]
    if any(pads):
        p = F.pad(p, pads, value=0)
    for i in range(nd):
        p = p.unfold(2 + i, (k[i] - 1) * dilation[i] + 1, stride[i])[..., ::dilation[i]]
    p = p[(slice(None), slice(None), *(slice(0, o) for o in out_spatial))]
    n, cin = in_shape[0], in_shape[1]
    s = int(np.prod(out_spatial)) if nd else 1
    kk = int(np.prod(k)) if nd else 1
    return p.reshape(n, groups, cin // groups, s, kk).permute(0, 1, 3, 2, 4).reshape(n, groups, s, -1)


def _tuple(v, nd):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * nd if len(v) == 1 and nd > 1 else v


@rule("convolution", "_convolution")
def conv_rule(call: Call) -> list:
    x, w, bias = call.arg("input"), call.arg("weight"), call.arg("bias")
    xs, ws, out = call.shape(x), call.shape(w), call.out_shape()
    nd = len(xs) - 2
    stride, padding, dilation = (_tuple(call.arg(n), nd) for n in ("stride", "padding", "dilation"))
    groups = call.arg("groups", 1)
    transposed = call.arg("transposed", False)
    parts = []
    dx, dw = call.deps(x), call.deps(w)
    wv = call.value(w)
    if dx is not None and not transposed and D.stored_limit() is not None:  # structure first, under a budget
        # Its transient is several times its result: refuse before building it.
        taps = int(np.prod(ws[1:])) if wv is None or wv.numel() == 0 else int((wv != 0).reshape(ws[0], -1).sum(1).max())
        D.check_stored(int(np.prod(out)) * taps * _largest_set(dx))
    if dx is not None:
        if transposed:
            parts.append(_transposed_input(call, dx, xs, ws, wv, out, stride, padding, dilation, groups))
        else:
            parts.append(_conv_input(dx, xs, ws, wv, out, stride, padding, dilation, groups))
    if dw is not None:
        if transposed:
            parts.append(D.dense([dw], int(np.prod(out))))
        else:
            per_co = reduce_deps(dw, ws, list(range(1, len(ws))))  # (Cout,): everything in that filter
            parts.append(D.take(per_co, broadcast_positions((1, ws[0]) + (1,) * nd, out)))
    if isinstance(bias, torch.Tensor) and call.deps(bias) is not None:
        parts.append(D.take(call.deps(bias), broadcast_positions((1, out[1]) + (1,) * nd, out)))
    return [D.union(parts)]


@rule("convolution_backward")
def conv_backward_rule(call: Call) -> list:
    """(grad_input, grad_weight, grad_bias) of a convolution: grad_input is the transposed convolution of
    grad_output with the weight (exact for a constant weight); the other two are sums over positions."""
    g, x, w = call.arg("grad_output"), call.arg("input"), call.arg("weight")
    gs, xs, ws = call.shape(g), call.shape(x), call.shape(w)
    nd = len(xs) - 2
    stride, padding, dilation = (_tuple(call.arg(n), nd) for n in ("stride", "padding", "dilation"))
    groups = call.arg("groups", 1)
    dg, dx, dw = call.deps(g), call.deps(x), call.deps(w)
    wv = call.value(w)
    everything = [d for d in (dg, dx, dw) if d is not None]
    results = []
    for k, (_, meta) in enumerate(call.results):
        if not everything:
            results.append(None)
        elif k == 0 and tuple(meta.shape) == tuple(xs) and not call.arg("transposed", False) and all(o == 0 for o in _tuple(call.arg("output_padding", 0), nd)):
            parts = [] if dg is None else [_transposed_input(call, dg, gs, ws, wv, xs, stride, padding, dilation, groups)]
            if dw is not None:
                parts.append(D.dense([dw], meta.numel))
            results.append(D.union(parts))
        else:
            results.append(D.dense(everything, meta.numel))
    return results


def _largest_set(d: D.Deps) -> int:
    """The most input elements one element of d depends on."""
    lens = np.diff(d.table.indptr)
    return int(lens.max()) if lens.size else 0


def _conv_input(dx, xs, ws, wv, out, stride, padding, dilation, groups) -> D.Deps | None:
    n, cout = xs[0], ws[0]
    kshape = ws[2:]
    pat = np.ones((cout, int(np.prod(ws[1:]))), bool) if wv is None else (wv != 0).reshape(cout, -1).numpy()
    patches = _patches(xs, kshape, stride, padding, dilation, out[2:], groups).numpy()
    s = patches.shape[2]
    gid = np.arange(cout) // (cout // groups)
    # Output channels with the same group and the same filter pattern have the same dependency sets.
    keys = np.concatenate([gid[:, None], pat.astype(np.int64)], 1)
    uniq, which = np.unique(keys, axis=0, return_inverse=True)
    rows, cols = [], []
    base = np.arange(n * s, dtype=np.int64).reshape(n, s, 1)
    for u, key in enumerate(uniq):
        taps = np.nonzero(key[1:])[0]
        if taps.size == 0:
            continue
        src = patches[:, key[0]][:, :, taps]  # (N, S, taps)
        valid = src > 0
        rows.append(np.broadcast_to(base + u * n * s, src.shape)[valid])
        cols.append(src[valid] - 1)
    if not rows:
        return None
    groups_m = D.csr_from_pairs(np.concatenate(rows), np.concatenate(cols), (uniq.shape[0] * n * s, dx.numel))
    virtual = D.reduce(dx, groups_m)
    pos = (which.reshape(-1)[None, :, None] * n * s + np.arange(n)[:, None, None] * s
           + np.arange(s)[None, None, :] + 1)
    return D.take(virtual, pos.reshape(-1).astype(np.int64))


def _transposed_input(call, dx, xs, ws, wv, out, stride, padding, dilation, groups) -> D.Deps | None:
    """conv_transpose is the adjoint of a convolution from the output's shape to the input's: transpose its pattern."""
    cin = ws[0]
    k = ws[2:]
    pat = np.ones((cin, int(np.prod(ws[1:]))), bool) if wv is None else (wv != 0).reshape(cin, -1).numpy()
    patches = _patches(tuple(out), k, stride, padding, dilation, xs[2:], groups).numpy()  # over out positions
    n, s = patches.shape[0], patches.shape[2]
    gid = np.arange(cin) // (cin // groups)
    co_e, f_e = np.nonzero(pat)
    src = patches[:, gid[co_e], :, f_e]  # (E, N, S): output positions feeding forward row (n, ci, s)
    fwd_rows = (np.arange(n)[None, :, None] * cin * s + co_e[:, None, None] * s + np.arange(s)[None, None, :])
    fwd_rows = np.broadcast_to(fwd_rows, src.shape)
    valid = src > 0
    out_numel = int(np.prod(out))
    groups_m = D.csr_from_pairs(src[valid] - 1, fwd_rows[valid], (out_numel, dx.numel))
    return D.reduce(dx, groups_m)
