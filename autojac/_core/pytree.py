"""Nested inputs and outputs (tuples, lists, dicts, namedtuples of tensors): flattened to leaves and back.

The planner and the methods see flat tuples of tensors; only the edges know the
structure. The Jacobian nests output-major, as `torch.func.jacrev` does: the
output's structure, with each output leaf replaced by the input's structure of
blocks of shape `output_leaf.shape + input_leaf.shape`. A tensor or a tuple of
tensors on either side gives exactly `torch.autograd.functional.jacobian`'s nesting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

TreeSpec = pytree.TreeSpec
LEAF = pytree.tree_flatten(torch.empty(0))[1]


@functools.lru_cache(maxsize=64)
def tuple_spec(n: int) -> TreeSpec:
    """The spec of a plain tuple of n tensors (cached: the common case is checked by identity of type)."""
    return pytree.tree_flatten(tuple(range(n)))[1]


def flatten(tree: Any) -> tuple[list, TreeSpec]:
    """(leaves, spec), with the two common cases (a tensor, a tuple of tensors) done without the general walk."""
    if isinstance(tree, torch.Tensor):
        return [tree], LEAF
    if type(tree) is tuple and all(isinstance(t, torch.Tensor) for t in tree):
        return list(tree), tuple_spec(len(tree))
    return pytree.tree_flatten(tree)


def leaves(tree: Any) -> list:
    """The leaves of `tree` in `flatten`'s order; a tuple of tuples of tensors (a Jacobian of several inputs and
    outputs) without the general walk (pytree's took 30 us for 2 x 2 blocks, this 2)."""
    if type(tree) is tuple and all(type(row) is tuple for row in tree):
        flat = [t for row in tree for t in row]
        if all(isinstance(t, torch.Tensor) for t in flat):
            return flat
    return flatten(tree)[0]


def unflatten(leaves: Sequence, spec: TreeSpec) -> Any:
    if spec is LEAF or spec.is_leaf():
        return leaves[0]
    if spec is tuple_spec(spec.num_leaves) and len(leaves) == spec.num_leaves:
        return tuple(leaves)
    return pytree.tree_unflatten(list(leaves), spec)


def nest(blocks: Sequence[Sequence[torch.Tensor]], out_spec: TreeSpec, in_spec: TreeSpec) -> Any:
    """The Jacobian's structure from blocks[i][j] (output leaf i, input leaf j)."""
    return unflatten([unflatten(row, in_spec) for row in blocks], out_spec)


def leaf_path(tree: Any, k: int) -> tuple:
    """The key path of leaf k (entries print as `[0]`, `['w']`, `.a`)."""
    return tuple(pytree.tree_flatten_with_path(tree)[0][k][0])


def is_tuple_spec(spec: TreeSpec) -> bool:
    return not spec.is_leaf() and spec.type is tuple


def describe(spec: TreeSpec) -> str:
    """A short text of a structure, for error messages."""
    if spec.is_leaf():
        return "a tensor"
    return str(spec).replace("\n", "").replace("  ", "")


def dumps(spec: TreeSpec) -> str | None:
    """The structure as text that another process can read back, or None (a namedtuple of a local class)."""
    try:
        return pytree.treespec_dumps(spec)
    except Exception:  # noqa: BLE001 - some node types have no serialized form
        return None


def loads(text: str) -> TreeSpec:
    return pytree.treespec_loads(text)


@dataclass(frozen=True)
class Arguments:
    """How the differentiated leaves become `f`'s positional arguments.

    `spec` is the structure of what is differentiated (the Jacobian's input
    side). Without `argnums`, that is the arguments themselves: one argument
    (`as_args` False: a tensor or a dict, list, namedtuple) or a tuple of
    positional arguments (`as_args` True). With `argnums`, the others are kept
    in `fixed` and put back in their places.
    """

    spec: TreeSpec
    as_args: bool
    argnums: tuple[int, ...] | None = None
    argnums_int: bool = False
    fixed: tuple = ()
    n_args: int = 0

    def args(self, leaves: Sequence[torch.Tensor]) -> tuple:
        if self.argnums is None:
            if self.spec is LEAF:
                return (leaves[0],)
            tree = unflatten(leaves, self.spec)
            return tree if self.as_args else (tree,)
        tree = unflatten(leaves, self.spec)
        chosen = (tree,) if self.argnums_int else tree
        out = list(self.fixed)
        for i, value in zip(self.argnums, chosen):
            out[i] = value
        return tuple(out)

    def call(self, f: Callable, leaves: Sequence[torch.Tensor]) -> Any:
        if self.argnums is None and self.as_args and (self.spec is None or self.spec is tuple_spec(len(leaves))):
            return f(*leaves)
        return f(*self.args(leaves))


PLAIN = Arguments(LEAF, as_args=False)
