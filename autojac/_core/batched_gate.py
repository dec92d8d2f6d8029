"""A gate between autojac's batched backward passes and a loop probe's process-wide debug flag.

NOTE: [Batched backwards wait for an open loop probe]
A loop probe (`_measure/engine_loops.py`) turns on torch's global flag that makes its
legacy vmap warn about every op it loops over. A batched backward that another thread
of autojac's ran meanwhile warned too, and torch hands a C++ call's warnings to Python
when that call returns, after the probe had taken its filter and hook out again: four
threads computing first Jacobians of a `roll` stencil printed the legacy-vmap
"performance drop" warning to stderr. So autojac's own batched backward passes go
through this gate: one waits while another thread's probe is open (a probe covers 8
vectors, or a first call's first chunk), and a probe opens only while no other one is
running (else it skips: a probe is only advice). The probing thread's own backward passes
never wait for it. A pass waits at most WAIT_AT_MOST_SECONDS, then runs anyway (a probe
that waits on such a thread, through a function of the user's that starts one, must not
deadlock), at worst letting such a warning through. That wait is also what a nested autojac
call pays, per batched pass, when it runs in a thread of torch's own while a probe is open:
the autograd engine runs CUDA backward nodes (a custom Function's backward calling autojac)
on its device threads, which are not the probing thread. A probe on a first call also spans
its method's preparation (an evaluation of `f`, when the first one is not adopted). The
user's own batched backward passes in other threads are not gated: while a probe is open
they may warn as under the flag.
"""

from __future__ import annotations

import threading

WAIT_AT_MOST_SECONDS = 1.0

_GATE = threading.Condition()
_owner: int | None = None
"""The thread whose probe is open."""
_running: dict[int, int] = {}
"""Batched backward passes under way, per thread."""


class _BatchedBackward:
    """Around one of autojac's batched backward passes (`torch.autograd.grad(..., is_grads_batched=True)`):
    `with batched_backward(): ...`. A class, not a generator: it runs on every call of the autograd engine
    (2 us against 6 us)."""

    __slots__ = ()

    def __enter__(self) -> None:
        me = threading.get_ident()
        with _GATE:
            if _owner is not None and _owner != me:
                _GATE.wait_for(lambda: _owner is None or _owner == me, timeout=WAIT_AT_MOST_SECONDS)
            _running[me] = _running.get(me, 0) + 1

    def __exit__(self, *exc: object) -> None:
        me = threading.get_ident()
        with _GATE:
            left = _running[me] - 1
            if left:
                _running[me] = left
            else:
                del _running[me]  # (nothing waits for this: a probe that finds a pass running skips)


_ONE = _BatchedBackward()


def batched_backward() -> _BatchedBackward:
    return _ONE


def open_probe() -> bool:
    """Open a probe for this thread: False (nothing opened) while another thread's batched backward runs."""
    global _owner
    me = threading.get_ident()
    with _GATE:
        if _owner is not None or any(thread != me for thread in _running):
            return False
        _owner = me
        return True


def close_probe() -> None:
    global _owner
    with _GATE:
        _owner = None
        _GATE.notify_all()
