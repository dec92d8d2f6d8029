"""The options of one call, checked and normalized once, before any work."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError, InputTypeError
from .units import normalize_budget

MODES = ("reverse", "forward", "forward-trick")
VECTORIZATIONS = ("vmap", "repeat", "loop")
EFFORTS = ("estimate", "measure", "exhaustive")

_TORCH_KEYWORDS = {
    "strategy": "`strategy='reverse-mode'` / `'forward-mode'` of torch.autograd.functional is `mode='reverse'` / `mode='forward'` here",
    "vectorize": "`vectorize=True` of torch.autograd.functional is `vectorize='vmap'` here (False is `vectorize='loop'`); autojac chooses by itself with 'auto'",
    "chunk_size": "torch.func's `chunk_size` is `chunk_size` here too",
    "budget": "the memory budget is `memory_budget`",
    "memory": "the memory budget is `memory_budget`",
    "method": "the method is chosen with `mode` ('reverse', 'forward', 'forward-trick') and `vectorize` ('vmap', 'repeat', 'loop')",
    "time_limit": "`time_limit` belongs to `autojac.tune` (or `autojac.plan(..., effort='exhaustive')`)",
}


@dataclass(frozen=True)
class Options:
    """What the caller asked for. `budget` is None, bytes (int) or a share of free memory (float)."""

    mode: str = "auto"
    vectorize: str = "auto"
    chunk_size: int | None = None
    budget: int | float | None = None
    create_graph: bool = False
    strict: bool = False
    cache: bool = True
    progress: bool | None = None
    sparsity: object = "auto"
    """"auto" (the planner decides), None (dense only), or a user's pattern (a bool tensor)."""
    output: str = "dense"
    """"dense" (torch's structure), "sparse" (torch sparse COO blocks) or "csr" (2-D CSR matrices)."""

    @property
    def fixed_method(self) -> bool:
        """Mode and vectorization both given: nothing is chosen but the engine and the chunk size."""
        return self.mode != "auto" and self.vectorize != "auto"

    @property
    def measures_nothing(self) -> bool:
        """Mode, vectorization and chunk size given, no budget: the default engine runs as told."""
        return self.fixed_method and self.chunk_size is not None and self.budget is None

    def key(self) -> tuple:
        """What a plan depends on among the options (strict and progress do not change the plan)."""
        sparsity = self.sparsity if (self.sparsity is None or isinstance(self.sparsity, str)) else _Same(self.sparsity)
        return (self.mode, self.vectorize, self.chunk_size, self.budget, self.create_graph, sparsity, self.output)


def refuse_unknown(unknown: dict, who: str) -> None:
    """An unknown keyword is an error that says what the torch-style keyword is called here."""
    if not unknown:
        return
    name = next(iter(unknown))
    hint = _TORCH_KEYWORDS.get(name, f"see `help(autojac.{who})` for the options")
    raise InputTypeError(f"{who}: got an unexpected keyword argument `{name}`. {hint[0].upper() + hint[1:]}.")


def check_callable(f: object, who: str) -> None:
    if not callable(f):
        raise InputTypeError(f"{who}: `f` must be callable (a function or an nn.Module), but got {type(f).__name__}.")


def check_flag(who: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InputTypeError(f"{who}: `{name}` must be True or False, but got {value!r}.")


OUTPUTS = ("dense", "sparse", "csr")


class _Same:
    """A user's pattern in a plan key: the same object, held so that its id is never reused while keyed."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


_CHECKED: dict = {}
"""Options already checked, by their raw values (a cached call should not re-check the same ones)."""


def make_options(who: str, *, mode="auto", vectorize="auto", chunk_size=None, memory_budget=None,
                 create_graph=False, strict=False, cache=True, progress=None, sparsity="auto", output="dense") -> Options:
    """Check every option; raise an InputError / InputTypeError that says what to pass instead."""
    values = (mode, vectorize, chunk_size, memory_budget, create_graph, strict, cache, progress, sparsity, output)
    raw = tuple((type(v), v) for v in values)  # types too: 1 == True, but `create_graph=1` is refused
    try:
        known = _CHECKED.get(raw)
    except TypeError:  # an unhashable value (a user's pattern): check it the long way
        known, raw = None, None
    if known is not None:
        return known[0]
    options = _make_options(who, mode, vectorize, chunk_size, memory_budget, create_graph, strict, cache, progress,
                            sparsity, output)
    if raw is not None and len(_CHECKED) < 256:
        _CHECKED[raw] = (options, memory_budget, chunk_size)
    return options


def _make_options(who, mode, vectorize, chunk_size, memory_budget, create_graph, strict, cache, progress, sparsity,
                  output) -> Options:
    if isinstance(vectorize, bool):
        hint = _TORCH_KEYWORDS["vectorize"]
        raise InputError(f"{who}: `vectorize` takes 'auto', 'vmap', 'repeat' or 'loop', but got {vectorize!r}. {hint[0].upper() + hint[1:]}.")
    if mode not in ("auto", *MODES):
        raise InputError(f"{who}: `mode` must be one of 'auto', 'reverse', 'forward', 'forward-trick', but got {mode!r}.")
    if vectorize not in ("auto", *VECTORIZATIONS):
        raise InputError(f"{who}: `vectorize` must be one of 'auto', 'vmap', 'repeat', 'loop', but got {vectorize!r}.")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise InputTypeError(f"{who}: `chunk_size` must be None or a positive int, but got {type(chunk_size).__name__} {chunk_size!r}.")
        if chunk_size <= 0:
            raise InputError(f"{who}: `chunk_size` must be a positive int (basis vectors per pass), but got {chunk_size}. Use 1 for the least memory, or None to let autojac choose.")
    for name, value in (("create_graph", create_graph), ("strict", strict), ("cache", cache)):
        check_flag(who, name, value)
    if progress is not None and not isinstance(progress, bool):
        raise InputTypeError(f"{who}: `progress` must be True, False or None (a bar for runs expected to take over 10 s, on a terminal), but got {progress!r}.")
    if isinstance(sparsity, str) and sparsity != "auto":
        raise InputError(f"{who}: `sparsity` must be 'auto', None, or a bool tensor of the Jacobian's possible nonzeros, but got {sparsity!r}.")
    if output not in OUTPUTS:
        raise InputError(f"{who}: `output` must be one of 'dense', 'sparse' (torch sparse COO in the result's shape) or 'csr' (2-D CSR matrices), but got {output!r}.")
    if output != "dense" and create_graph:
        raise InputError(f"{who}: `create_graph=True` needs `output='dense'` (autograd does not differentiate through sparse results here).")
    return Options(mode, vectorize, chunk_size, normalize_budget(memory_budget, who), create_graph, strict, cache, progress,
                   sparsity, output)
