"""The per-op rule table and the `Call` view that rules read their arguments through.

A rule takes a `Call` and returns one `Deps | None` per result tensor of the op (for in-place
ops: the functional result that is written back). Lookup order for ATen ops: "name.overload",
then the base name, then the `pointwise` tag, then position maps for undeclared view ops, and
last the conservative dense fallback (the only choice for ops outside the aten namespace).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import deps as D
from .deps import Deps
from .trace import Meta, OpRecord

Rule = Callable[["Call"], list]

_BY_NAME: dict[str, Rule] = {}
_BY_OVERLOAD: dict[tuple[str, str], Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for ATen ops by base name ("sum") or "name.overload" ("max.other")."""
    def deco(fn: Rule) -> Rule:
        for n in names:
            if "." in n:
                base, overload = n.split(".", 1)
                _BY_OVERLOAD[(base, overload)] = fn
            else:
                _BY_NAME[n] = fn
        return fn
    return deco


@dataclass(frozen=True)
class OpInfo:
    name: str  # base name without namespace or in-place underscore: "add" for aten.add_.Tensor
    overload: str
    view_like: bool
    mutated: tuple[int, ...]  # schema positions of arguments the op writes to
    out_names: frozenset[str]  # mutated keyword-only arguments: out= destinations
    random: bool
    pointwise: bool
    rule: Rule
    arg_names: tuple[str, ...]
    defaults: tuple


_INFO: dict = {}


def op_info(func: torch._ops.OpOverload) -> OpInfo:
    info = _INFO.get(func)
    if info is None:
        info = _make_info(func)
        _INFO[func] = info
    return info


def _make_info(func) -> OpInfo:
    from . import rules  # noqa: F401  (fills the tables on first use)

    schema = func._schema
    namespace, packet = schema.name.split("::", 1) if "::" in schema.name else ("aten", schema.name)
    name = packet[:-1] if packet.endswith("_") and not packet.endswith("__") else packet
    overload = func._overloadname
    tags = set(func.tags)
    mutated = tuple(i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write)
    out_names = frozenset(schema.arguments[i].name for i in mutated if schema.arguments[i].kwarg_only)
    view_like = (func.is_view or torch.Tag.inplace_view in tags) and not (mutated and torch.Tag.inplace_view not in tags)
    pointwise = torch.Tag.pointwise in tags
    fn = (_BY_OVERLOAD.get((name, overload)) or _BY_NAME.get(name)) if namespace == "aten" else None
    if fn is None:
        from .pointwise import pointwise_rule
        from .movement import movement_rule
        from .fallback import dense_rule
        fn = pointwise_rule if pointwise else movement_rule if func.is_view and namespace == "aten" else dense_rule
    args = schema.arguments
    return OpInfo(name, overload, view_like, mutated, out_names,
                  torch.Tag.nondeterministic_seeded in tags, pointwise, fn,
                  tuple(a.name for a in args), tuple(a.default_value if a.has_default_value() else None for a in args))


class Call:
    """One op of the tape as a rule sees it: arguments by name, their Deps, values and metadata."""

    def __init__(self, engine, op: OpRecord, info: OpInfo) -> None:
        self.engine = engine
        self.op = op
        self.info = info
        self.results: list[tuple[torch.Tensor, Meta]] = list(zip(op.outs, op.out_metas))
        self._deps: dict[int, Deps | None] = {}
        self._bound: dict | None = None
        self.mutated_ids = {id(t) for t in self.mutated_tensors()}
        self.out_ids = {id(v) for k, v in op.kwargs.items() if k in info.out_names and isinstance(v, torch.Tensor)}

    # -- arguments ------------------------------------------------------------------------
    def arg(self, name: str, default=None):
        if self._bound is None:
            bound = {}
            names = self.info.arg_names
            for i, a in enumerate(self.op.args):
                if i < len(names):
                    bound[names[i]] = a
            bound.update(self.op.kwargs)
            self._bound = bound
        if name in self._bound:
            return self._bound[name]
        if name in self.info.arg_names:
            v = self.info.defaults[self.info.arg_names.index(name)]
            return default if v is None else v
        return default

    def all_tensor_args(self) -> Iterator[torch.Tensor]:
        for a in (*self.op.args, *self.op.kwargs.values()):
            if isinstance(a, torch.Tensor):
                yield a
            elif isinstance(a, (list, tuple)):
                for x in a:
                    if isinstance(x, torch.Tensor):
                        yield x

    def tensor_args(self) -> list[torch.Tensor]:
        """Tensor arguments the result is computed from (out= destinations excluded)."""
        return [t for t in self.all_tensor_args() if id(t) not in self.out_ids]

    def mutated_tensors(self) -> list[torch.Tensor]:
        out = []
        for i in self.info.mutated:
            name = self.info.arg_names[i]
            v = self.op.args[i] if i < len(self.op.args) else self.op.kwargs.get(name)
            if isinstance(v, torch.Tensor):
                out.append(v)
        return out

    def meta(self, t: torch.Tensor) -> Meta:
        return self.op.arg_metas[id(t)]

    def deps(self, t) -> Deps | None:
        if not isinstance(t, torch.Tensor):
            return None
        key = id(t)
        if key not in self._deps:
            self._deps[key] = self.engine.deps_of(t, self.meta(t))
        return self._deps[key]

    def value(self, t) -> torch.Tensor | None:
        if not isinstance(t, torch.Tensor):
            return None
        return self.engine.value_of(self.meta(t))

    def nonzeros(self, t) -> int | None:
        """How many elements of a constant operand are nonzero, without loading its value; None when unknown."""
        if not isinstance(t, torch.Tensor):
            return None
        return self.engine.nonzeros_of(self.meta(t))

    def shape(self, t) -> tuple[int, ...]:
        return self.meta(t).shape if isinstance(t, torch.Tensor) else ()

    @property
    def n_in(self) -> int:
        return self.engine.n_in

    def out_shape(self, k: int = 0) -> tuple[int, ...]:
        return self.results[k][1].shape

    def out_numel(self, k: int = 0) -> int:
        return self.results[k][1].numel

    def substituted(self, subst: dict[int, object], device: str | None = None, scalars: dict | None = None):
        """Arguments with tensors replaced from `subst` (by id) and devices moved to `device`."""
        def sub(a):
            if isinstance(a, torch.Tensor):
                return subst.get(id(a), a)
            if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
                return type(a)(sub(x) for x in a)
            return a
        names = self.info.arg_names
        args = []
        for i, a in enumerate(self.op.args):
            if scalars and i < len(names) and names[i] in scalars:
                a = scalars[names[i]]
            args.append(sub(a))
        kwargs = {}
        for k, v in self.op.kwargs.items():
            if k in self.info.out_names:
                continue
            if scalars and k in scalars:
                v = scalars[k]
            kwargs[k] = sub(v)
        if device is not None and "device" in kwargs:
            kwargs["device"] = torch.device(device)
        if device is not None and "pin_memory" in kwargs:
            kwargs["pin_memory"] = False
        return tuple(args), kwargs

    # -- conservative answers ---------------------------------------------------------------
    def dense(self, why: str = "") -> list[Deps | None]:
        """Every result element depends on everything the op's arguments depend on."""
        label = f"aten.{self.info.name}.{self.info.overload}" + (f" ({why})" if why else "")
        self.engine.dense_ops.append(label)
        ds = [self.deps(t) for t in self.tensor_args()]
        return [D.dense(ds, m.numel) for _, m in self.results]
