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
sets it around one chunk, records those warnings (re-emitting any others, so a
user's warnings still reach them), and puts flag and warning filters back. Warning
filters are process-wide, so one probe runs at a time; a thread that finds another
probe running skips probing (it only costs speed).
"""

from __future__ import annotations

import re
import threading
import warnings

import torch

_LOCK = threading.Lock()
_FLAG = getattr(torch._C, "_debug_only_display_vmap_fallback_warnings", None)
_FLAG_NOW = getattr(torch._C, "_debug_only_are_vmap_fallback_warnings_enabled", None)
_OP = re.compile(r"batching rule for (\S+?)\.")
_MARK = "There is a performance drop because we have not yet implemented the batching rule"


class LoopProbe:
    """`with LoopProbe() as probe: <one batched backward>`; then `probe.loops` (looped op calls) and `probe.ops`.

    `probe.active` is False where nothing could be watched (another thread probing,
    or a torch without the flag); `loops` is then 0 and means nothing.
    """

    def __init__(self) -> None:
        self.active = False
        self._open = False
        self.loops = 0
        self.ops: list[str] = []
        self._before = False
        self._catcher = None
        self._records = None

    def __enter__(self) -> LoopProbe:
        if _FLAG is None or _FLAG_NOW is None or not _LOCK.acquire(blocking=False):
            return self
        self.active = self._open = True
        try:
            self._before = bool(_FLAG_NOW())
            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
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
        records = list(self._records or ())
        try:
            if _FLAG is not None:
                _FLAG(self._before)
        finally:
            try:
                if self._catcher is not None:
                    self._catcher.__exit__(None, None, None)
            finally:
                self._catcher = None
                _LOCK.release()
        ops: dict[str, None] = {}
        for r in records:
            text = str(r.message)
            if text.startswith(_MARK) and not self._before:  # the user's own flag: theirs to see
                self.loops += 1
                match = _OP.search(text)
                if match:
                    ops.setdefault(match.group(1))
            else:  # not ours to keep: the caller's filters decide, as if no probe had been there
                warnings.warn_explicit(r.message, r.category, r.filename, r.lineno, source=r.source)
        self.ops = list(ops)
