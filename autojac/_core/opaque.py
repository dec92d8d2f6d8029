"""The public functions, opaque to `torch.compile`.

NOTE: [Opaque to torch.compile]
A compiled training step that calls `autojac.jacobian` had Dynamo trace into
autojac's planner: it failed with an internal Dynamo error at the first graph
break inside a `with` block (torch 2.13: "'LazyVariableTracker' object is not
iterable"), and had it got through, it would have compiled plans, locks and
caches that are Python state by design. So the public entry points are wrapped
with `torch.compiler.disable`: Dynamo breaks the graph at the call and runs it
eagerly, and the compiled code before and after it stays compiled (the Jacobian
is an ordinary tensor to it, and differentiable with `create_graph=True`). The
wrapper costs about 0.6 us a call. It needs torch._dynamo, which the import-time
warm-up loads anyway (NOTE: [Why autojac warms torch.func up at import]); with
AUTOJAC_LAZY_IMPORTS=1 nothing is wrapped, so that importing autojac still loads
none of it: wrap the call in `torch.compiler.disable` yourself there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .warmup import lazy


def opaque(fn: Callable) -> Callable:
    """`fn` as `torch.compile` should see it: a call it runs eagerly (NOTE: [Opaque to torch.compile])."""
    if lazy():
        return fn
    return torch.compiler.disable(fn, recursive=True)
