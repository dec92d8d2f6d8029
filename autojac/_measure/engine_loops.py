"""Whether torch.autograd's own vmap loops over a chunk: the ops of a backward pass it has no batching rule for.

NOTE: [The autograd engine's vmap loops]
`torch.autograd.grad(..., is_grads_batched=True)` (the "autograd" engine of the
vmap methods, and what `torch.autograd.functional.jacobian(vectorize=True)` uses)
batches with torch's legacy vmap, whose batching rules cover far fewer ops than
torch.func's. For any other op it runs the op once per vector of the chunk, silently.
Measured on torch 2.13: the backward of 39 of 65 common ops loops there, among them
tanh, gelu, silu, softmax, layer and group norm, conv, pooling, where/clamp,
indexing, gather, cumsum, roll, flip and pad. A grid residual built from `roll`
took 0.03 ms per vector this way against 0.01 ms on the torch.func engine.

torch reports each loop as a warning only while a debug flag is set. `LoopProbe`
sets it around one batched backward and counts those warnings. It touches the
warnings machinery as little as it can, since filters and `showwarning` belong to
the whole process: one filter, in front, that lets the loop warnings through
(`"always"`, for that message only), and a `showwarning` that keeps them and hands
every other warning to the one it replaced, so the caller's filters, registries
and display decide as before. Both are taken out afterwards. If another thread's
`catch_warnings` interleaves and puts them back, what stays is harmless: the
filter matches only what the debug flag (off again) makes torch say, and the hook
forwards everything once no probe is open. One probe runs at a time (a thread
that finds another probe open skips probing: it is only advice). The flag is
global too: autojac's own batched backward passes in other threads wait while a
probe is open, and a probe opens only when none is running (NOTE: [Batched
backwards wait for an open loop probe]); a loop in a batched backward of the
user's own in another thread meanwhile counts as this probe's, which can only
change which engine goes first.

NOTE: [Loops read off the graph]
Which backward nodes fall back is a fact about torch, not about `f`: `benchmarks/fallback_table.py`
measures it once per torch version for 90-odd common ops (38 of them loop on torch 2.13: CumsumBackward0
three times, RollBackward0, TanhBackward0 once...) into `fallback_table.py`. A first call already holds an
autograd graph (its first evaluation), so `backward_fallbacks` walks it and adds up the table: the loops a
batched backward would make, and the graph's size, with no batched pass run and no warning raised. A node
the table does not know (a custom Function, a rarer op) counts as none and is named, so that the caller can
fall back to a probe.
"""

from __future__ import annotations

import re
import threading
import warnings

import torch

from .._core.batched_gate import close_probe, open_probe
from .._core.once import walk  # one walk, one bound (WALK_LIMIT), for every autograd graph
from .fallback_table import FALLBACKS

_LOCK = threading.Lock()
_FLAG = getattr(torch._C, "_debug_only_display_vmap_fallback_warnings", None)
_FLAG_NOW = getattr(torch._C, "_debug_only_are_vmap_fallback_warnings_enabled", None)
_OP = re.compile(r"batching rule for (\S+?)\.")
_MARK = "There is a performance drop because we have not yet implemented the batching rule"


class _Hook:
    """The `showwarning` a probe installs: loop warnings to the open probe, everything else to `saved`."""

    def __init__(self, saved) -> None:
        self.saved = saved
        self.probe: LoopProbe | None = None

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        probe = self.probe
        if probe is not None and str(message).startswith(_MARK):
            probe._note(str(message))
            return None
        return self.saved(message, category, filename, lineno, file, line)


class LoopProbe:
    """`with LoopProbe() as probe: <one batched backward>`; then `probe.loops` (looped op calls) and `probe.ops`.

    `probe.active` is False where nothing could be watched (another thread probing,
    the debug flag already on by the caller's wish, or a torch without it); `loops`
    is then 0 and means nothing.
    """

    def __init__(self) -> None:
        self.active = False
        self._open = False
        self.loops = 0
        self._ops: dict[str, None] = {}
        self._hook: _Hook | None = None
        self._filter = None

    @property
    def ops(self) -> list[str]:
        return list(self._ops)

    def _note(self, text: str) -> None:
        self.loops += 1
        match = _OP.search(text)
        if match:
            self._ops.setdefault(match.group(1))

    def __enter__(self) -> LoopProbe:
        if _FLAG is None or _FLAG_NOW is None or not _LOCK.acquire(blocking=False):
            return self
        if _FLAG_NOW():  # the caller's own debugging: theirs to see, and nothing to count
            _LOCK.release()
            return self
        try:
            opened = open_probe()  # False while another thread's batched backward is under way (NOTE: [Batched
        except BaseException:      # backwards wait for an open loop probe]): its loops would count here
            _LOCK.release()
            raise
        if not opened:
            _LOCK.release()
            return self
        self.active = self._open = True
        try:
            warnings.filterwarnings("always", message=re.escape(_MARK), category=UserWarning)
            self._filter = warnings.filters[0]
            self._hook = _Hook(warnings.showwarning)
            self._hook.probe = self
            warnings.showwarning = self._hook
            _FLAG(True)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open:  # closing twice is harmless
            self._release()

    def _release(self) -> None:
        self._open = False
        try:
            if _FLAG is not None:
                _FLAG(False)
        finally:
            try:
                hook, self._hook = self._hook, None
                if hook is not None:
                    hook.probe = None  # if it stays installed (see the NOTE), it only forwards
                    if warnings.showwarning is hook:
                        warnings.showwarning = hook.saved
                if self._filter is not None:
                    try:
                        warnings.filters.remove(self._filter)
                    except ValueError:
                        pass
                    getattr(warnings, "_filters_mutated", lambda: None)()  # (private; the filters' cache key)
                    self._filter = None
            finally:  # whatever happened above: other threads' batched backwards must not wait on a dead probe
                try:
                    close_probe()
                finally:
                    _LOCK.release()


class GraphLoops:
    """What a graph's nodes say about one batched backward through it (NOTE: [Loops read off the graph])."""

    def __init__(self, fallbacks: int, nodes: int, looping: list[str], unknown: list[str]) -> None:
        self.fallbacks = fallbacks
        """Looped op calls, from the table."""
        self.nodes = nodes
        """Backward nodes (leaves' AccumulateGrad included): what a transform pays for per op."""
        self.looping = looping
        """The kinds of node that loop, most looped first."""
        self.unknown = unknown
        """The kinds of node the table does not know (they count as none)."""


def backward_fallbacks(ys) -> GraphLoops | None:
    """Walk the autograd graph behind `ys` (NOTE: [Loops read off the graph]); None past WALK_LIMIT nodes, or
    where a node cannot be read (only advice: the methods find out for themselves what fails)."""
    try:
        return _walk(ys)
    except Exception:  # noqa: BLE001
        return None


def _walk(ys) -> GraphLoops | None:
    nodes, _, complete = walk([y.grad_fn for y in ys if y is not None])
    if not complete:
        return None
    kinds: dict[str, int] = {}
    for node in nodes:
        name = type(node).__name__
        kinds[name] = kinds.get(name, 0) + 1
    loops = {k: c * FALLBACKS[k] for k, c in kinds.items() if FALLBACKS.get(k)}
    unknown = sorted(k for k in kinds if k not in FALLBACKS and k != "AccumulateGrad")
    return GraphLoops(sum(loops.values()), len(nodes), sorted(loops, key=lambda k: -loops[k]), unknown)
