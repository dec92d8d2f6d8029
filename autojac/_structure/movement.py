"""Rules for ops that copy elements around: run the op itself on position maps to see where each element comes from.

Floating-point arguments are the data (replaced by position maps); integer and boolean arguments
(indices, masks) must be known constants, else the op falls back to dense.
"""

from __future__ import annotations

import torch

from . import deps as D
from .maps import pos_map
from .registry import Call, rule

# Scalar arguments that fill output elements with a constant: set to 0, which means "no source".
_FILL_ARGS = ("value", "fill_value")


def _run(call: Call, dtype: torch.dtype):
    data, seen = [], set()
    subst: dict[int, torch.Tensor] = {}
    offset = 0
    for t in call.tensor_args():
        if id(t) in seen:
            continue
        seen.add(id(t))
        m = call.meta(t)
        if m.floating:
            p = pos_map(m.shape, offset).to(dtype)
            subst[id(t)] = p.clone() if id(t) in call.mutated_ids else p
            data.append((call.deps(t), m.numel))
            offset += m.numel
        else:
            v = call.value(t)
            if v is None:
                return None, None, offset
            subst[id(t)] = v
    scalars = {n: 0 for n in _FILL_ARGS if isinstance(call.arg(n), (int, float, bool))}
    for n in ("self", "other"):  # where.ScalarSelf / where.ScalarOther
        if isinstance(call.arg(n), (int, float)) and not isinstance(call.arg(n), bool):
            scalars[n] = 0
    args, kwargs = call.substituted(subst, device="cpu", scalars=scalars)
    out = call.op.func(*args, **kwargs)
    outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
    if call.info.mutated:
        outs = [subst[id(t)] for t, _ in call.results]
    return outs, data, offset


def movement_rule(call: Call) -> list:
    outs, data = None, None
    for dtype in (torch.int64, torch.float64):  # some kernels (upsampling, im2col) exist for floats only
        try:
            outs, data, total = _run(call, dtype)
        except (RuntimeError, NotImplementedError, TypeError, IndexError, ValueError):
            continue
        if outs is None:
            return call.dense("input-dependent index")
        break
    if outs is None or len(outs) != len(call.results):
        return call.dense("no position-map evaluation")
    combined = D.concat(data)
    result = []
    for o, (_, m) in zip(outs, call.results):
        if tuple(o.shape) != m.shape:
            return call.dense("position map changed shape")
        pos = o.reshape(-1)
        if pos.dtype != torch.int64:
            pos = pos.round().to(torch.int64)
        pos = pos.numpy()
        if pos.size and (pos.min() < 0 or pos.max() > total):
            return call.dense("not a pure data movement")
        result.append(D.take(combined, pos))
    return result


rule("roll", "flip", "repeat", "cat", "stack", "hstack", "vstack", "index_select", "gather", "index", "_unsafe_index",
     "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
     "replication_pad2d", "replication_pad3d", "_pad_circular", "tril", "triu", "diag", "diag_embed", "masked_scatter",
     "take", "embedding", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
     "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "pixel_shuffle",
     "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "slice_scatter", "select_scatter",
     "diagonal_scatter", "narrow_copy", "im2col", "view_copy", "permute_copy", "expand_copy", "t_copy",
     "transpose_copy", "squeeze_copy", "unsqueeze_copy", "slice_copy", "select_copy", "split_copy", "unbind_copy",
     "split_with_sizes_copy", "diagonal_copy", "unfold_copy", "_reshape_copy", "reshape", "movedim", "rot90",
     "unflatten", "flatten", "tile", "block_diag", "_unsafe_view", "view", "permute", "expand", "squeeze", "unsqueeze",
     "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "narrow", "diagonal", "unfold", "t",
     "transpose", "alias", "lift_fresh", "_reshape_alias", "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk",
     "swapaxes", "swapdims", "moveaxis", "narrow", "expand_as", "view_as", "reshape_as",
     # backward formulas that put a gradient back where a view took it from (zeros elsewhere)
     "slice_backward", "select_backward", "diagonal_backward", "unfold_backward", "index_select_backward",
     "permute_backward", "expand_backward", "_unsafe_index_put")(movement_rule)


@rule("as_strided", "as_strided_copy", "as_strided_scatter")
def as_strided_rule(call: Call) -> list:
    """as_strided addresses storage, not elements: exact only on a tensor that is its whole storage."""
    self_meta = call.meta(call.arg("self"))
    if not self_meta.whole:
        return call.dense("as_strided of a non-contiguous tensor")
    return movement_rule(call)
