"""What a plan is keyed by: a function's code and the signature of what it captures, not its identity.

NOTE: [Plans keyed by code]
Users build a new lambda, closure or `functools.partial` every training step. Keyed
by object identity, each step planned afresh. A function is keyed instead by its code
object and a signature of what it captures: captured tensors by shape, dtype, device
and requires_grad (not values), modules by identity, plain values (numbers, strings)
by value, tuples by their items, lists and dicts holding tensors by their items (a
dict of parameters rebuilt every step), other lists and dicts by identity (more
likely state that `f` changes, such as a counter), nested functions recursively,
other objects by identity (the modules they hold, `trainer.model`, join the
modules whose training flags are part of the key). What such objects hold is
watched where a verdict depends on it (`Evaluator.value_sources`). Two functions with the same key compute the same kind of
thing on different numbers, so they share a plan and what the safety net verified.
A function whose Python control flow depends on captured *values* (an `if` on a
captured tensor's sign choosing other code paths) should be run with `cache=False`.
The key is only ever a speed decision: a plan whose outputs no longer match is
re-made, and a method that fails falls back.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_SMALL = 64
"""Containers with more items than this are keyed by identity (their signature would cost more than it saves)."""
_DEPTH = 3


class Identity:
    """An object keyed by identity; held strongly by the key, so its id cannot be reused while the key lives."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other.obj is self.obj

    def __repr__(self) -> str:
        return f"<{type(self.obj).__name__} at {id(self.obj):#x}>"


class ModuleRef:
    """A module keyed by identity, held weakly (a module must not be kept alive by a cached plan)."""

    __slots__ = ("ref", "ident", "__weakref__")

    def __init__(self, module: nn.Module) -> None:
        self.ref = weakref.ref(module)
        self.ident = id(module)

    def __hash__(self) -> int:
        return self.ident

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModuleRef) or other.ident != self.ident:
            return False
        mine = self.ref()
        return mine is not None and mine is other.ref()

    def __repr__(self) -> str:
        module = self.ref()
        return f"<{type(module).__name__ if module is not None else 'dead module'} at {self.ident:#x}>"


def _signature(value: object, modules: dict[int, nn.Module], depth: int) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, nn.Module):
        modules.setdefault(id(value), value)
        return ("M", ModuleRef(value))
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return ("V", type(value), value)
    if depth <= 0:
        return ("O", Identity(value))
    if isinstance(value, (types.FunctionType, functools.partial, types.MethodType)):
        return ("F", function_signature(value, modules, depth - 1))
    if isinstance(value, tuple) and len(value) <= _SMALL:
        return (tuple, tuple(_signature(v, modules, depth - 1) for v in value))
    if isinstance(value, (list, dict)) and len(value) <= _SMALL and _holds_tensors(value):
        # Data rebuilt every step (a dict of parameters for functional_call): keyed by its items' signatures.
        # A list or dict of plain values is more likely state that `f` changes (a counter): keyed by identity.
        items = value.items() if isinstance(value, dict) else enumerate(value)
        try:
            return (type(value), tuple((k, _signature(v, modules, depth - 1)) for k, v in items))
        except TypeError:  # unhashable keys
            return ("O", Identity(value))
    _modules_within(value, modules, depth)
    return ("O", Identity(value))


def _may_hold_modules(value: object) -> bool:
    """A container or a plain object whose items or attributes may be modules (not a class, a Python module, a
    function or a tensor)."""
    return isinstance(value, (list, tuple, dict)) or (hasattr(value, "__dict__") and not isinstance(
        value, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, torch.Tensor)))


def _modules_within(value: object, modules: dict[int, nn.Module], depth: int) -> None:
    """Register the modules an object keyed by identity holds (`trainer.model`, a list of layers): their training
    flags are part of the key and their buffers are put back between evaluations, like a captured module's."""
    if depth <= 0:
        return
    if isinstance(value, nn.Module):
        modules.setdefault(id(value), value)
        return
    if not _may_hold_modules(value):
        return
    if isinstance(value, (list, tuple)):
        items = value if len(value) <= _SMALL else ()
    elif isinstance(value, dict):
        items = tuple(value.values()) if len(value) <= _SMALL else ()
    else:
        attributes = getattr(value, "__dict__", None)
        items = tuple(attributes.values()) if isinstance(attributes, dict) and len(attributes) <= _SMALL else ()
    for item in items:
        if isinstance(item, nn.Module):
            modules.setdefault(id(item), item)
        elif _may_hold_modules(item):
            _modules_within(item, modules, depth - 1)


def _holds_tensors(value: list | dict) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(v, (torch.Tensor, nn.Module)) for v in items)


def argument_signature(value: object, modules: dict[int, nn.Module]) -> Hashable:
    """The key part for an argument passed through undifferentiated (argnums): as a captured value is keyed."""
    return _signature(value, modules, _DEPTH)


def function_signature(f: Callable, modules: dict[int, nn.Module], depth: int = _DEPTH) -> Hashable:
    """The part of a plan's key that stands for `f`; fills `modules` with the modules `f` uses."""
    if isinstance(f, nn.Module):
        modules.setdefault(id(f), f)
        return ("module", ModuleRef(f))
    key_of = getattr(type(f), "__autojac_key__", None)
    if key_of is not None:  # autojac's own wrappers (hessian's gradient, batch_jacobian's sum): keyed by what they wrap
        return (type(f).__qualname__, key_of(f, lambda value: _signature(value, modules, depth)))
    if isinstance(f, types.MethodType):
        return ("method", f.__func__, _signature(f.__self__, modules, depth))
    if isinstance(f, functools.partial):
        return ("partial", _signature(f.func, modules, depth),
                tuple(_signature(a, modules, depth - 1) for a in f.args),
                tuple(sorted((k, _signature(v, modules, depth - 1)) for k, v in f.keywords.items())))
    if isinstance(f, types.FunctionType):
        cells = []
        for cell in f.__closure__ or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                content = None
            cells.append(_signature(content, modules, depth))
        for name in _global_names(f.__code__):  # modules named as globals: their training flags matter
            value = f.__globals__.get(name)
            if isinstance(value, nn.Module):
                modules.setdefault(id(value), value)
            elif isinstance(value, types.FunctionType) and value is not f and depth > 0:
                function_signature(value, modules, depth - 1)
            elif _may_hold_modules(value):
                _modules_within(value, modules, depth)  # a global list of layers, an object holding a model
        defaults = tuple(_signature(v, modules, depth - 1) for v in f.__defaults__ or ())
        return ("function", f.__code__, tuple(cells), defaults)
    return ("callable", Identity(f))


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    return tuple(code.co_names)


def describe_function(f: Callable) -> tuple[Hashable, tuple[nn.Module, ...]]:
    """(key part for `f`, the modules `f` is or uses): one walk for both."""
    modules: dict[int, nn.Module] = {}
    signature = function_signature(f, modules)
    return signature, tuple(modules.values())


def largest_captured_bytes(f: Callable, function_key: Hashable, modules: tuple[nn.Module, ...]) -> int:
    """The largest tensor `f` captures (the tensor signatures in its key), names as a global, or its modules hold.

    Forward-mode AD gives such a tensor a zero tangent, which CPU matrix kernels copy
    whole (see NOTE: [Copies inside matrix kernels]): a forward method's fixed memory.
    """
    largest = 0
    stack: list = [(function_key, _DEPTH)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Identity):  # containers keyed by identity (a list of weight tuples) are looked into
            item = item.obj
            if isinstance(item, torch.Tensor):
                largest = max(largest, item.numel() * item.element_size())
                continue
            if isinstance(item, dict):
                item = tuple(item.values())
            elif isinstance(item, list):
                item = tuple(item)
            if not isinstance(item, tuple) or len(item) > _SMALL or depth <= 0:
                continue
            depth -= 1
        if isinstance(item, torch.Tensor):
            largest = max(largest, item.numel() * item.element_size())
        elif isinstance(item, tuple):
            if len(item) == 5 and isinstance(item[0], str) and item[0] == "T" and isinstance(item[2], torch.dtype):
                largest = max(largest, math.prod(item[1]) * item[2].itemsize)
            else:
                stack.extend((i, depth) for i in item if isinstance(i, (tuple, Identity, torch.Tensor)))
    if isinstance(f, types.FunctionType):  # globals are not part of the key (their values may change freely)
        for name in _global_names(f.__code__):
            value = f.__globals__.get(name)
            if isinstance(value, torch.Tensor):
                largest = max(largest, value.numel() * value.element_size())
    for module in modules:
        for t in itertools.chain(module.parameters(), module.buffers()):
            largest = max(largest, t.numel() * t.element_size())
    return largest


def stable_code_id(code: types.CodeType) -> str:
    """A key for a code object that is the same in another process running the same source."""
    digest = hashlib.sha1()

    def feed(c: types.CodeType) -> None:
        digest.update(c.co_code)
        digest.update(repr(c.co_names).encode())
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                feed(const)
            else:
                digest.update(repr(const).encode())

    feed(code)
    return f"{code.co_qualname if hasattr(code, 'co_qualname') else code.co_name}@{digest.hexdigest()[:16]}"


def stable(key: Any) -> Any:
    """The key in a form that means the same in another process (for saved plans), or None if it has none.

    Code objects become a hash of their bytecode and constants; modules their
    class and parameter shapes; objects known only by identity have no stable form.
    """
    if isinstance(key, types.CodeType):
        return stable_code_id(key)
    if isinstance(key, ModuleRef):
        module = key.ref()
        if module is None:
            return None
        shapes = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters())
        return f"{type(module).__module__}.{type(module).__qualname__}{shapes}"
    if isinstance(key, Identity):
        return None
    if isinstance(key, (torch.dtype, torch.device)):
        return str(key)
    if isinstance(key, type):
        return f"{key.__module__}.{key.__qualname__}"
    if isinstance(key, (tuple, list)):
        items = [stable(k) for k in key]
        return None if any(i is None and k is not None for i, k in zip(items, key)) else items
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, (types.FunctionType,)):
        return stable(key.__code__)
    return None


Hashable = Any
