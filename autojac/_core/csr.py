"""torch sparse CSR tensors without torch's one-time "in beta" notice, and without touching warning filters per call.

NOTE: [The CSR beta notice, silenced once]
torch warns "Sparse CSR tensor support is in beta" the first time a process builds a
CSR tensor, and never again (a warn-once). A caller who asked for `output="csr"` gets
no news from it, so autojac silenced it with `warnings.catch_warnings()` around each
construction. That swaps the process's whole filter list and puts the saved one
back: two threads doing it at once can restore each other's lists, leaving autojac's
"ignore" filter in place for good or dropping a filter another thread added
meanwhile. Since torch says it only once, only the process's first CSR needs the
filter: under a lock, that one construction gets one filter of its own, in front,
removed by identity afterwards (other filters, added or removed meanwhile, stay as
they are); every later construction touches nothing.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable

import torch

_LOCK = threading.Lock()
_NOTICE = "Sparse CSR tensor support is in beta"
_said = False


def csr_tensor(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A torch sparse CSR tensor of `size` with `values` at (`rows`, `cols`), given in row-major order (int64,
    unchecked), torch's beta notice silenced (NOTE: [The CSR beta notice, silenced once])."""
    crow = torch.zeros(size[0] + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(torch.bincount(rows, minlength=size[0]), 0, out=crow[1:])
    return quietly(lambda: torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False))


def to_csr(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix.to_sparse_csr()` (a 2-D strided tensor), torch's beta notice silenced."""
    return quietly(matrix.to_sparse_csr)


def quietly(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()`, which builds a CSR tensor: the process's first under a filter of its own for torch's notice."""
    global _said
    if _said:
        return make()
    with _LOCK:
        ours = ("ignore", re.compile(re.escape(_NOTICE), re.I), Warning, None, 0)
        added = ours not in warnings.filters  # the caller's own identical filter stays theirs
        if added:
            warnings.filters.insert(0, ours)
            warnings._filters_mutated()  # noqa: SLF001 - what filterwarnings and catch_warnings call after a change
        try:
            out = make()
            _said = True
        finally:
            if added:
                # By identity: an equal filter of the caller's, earlier in the list, stays. Gone already when
                # another thread's catch_warnings put back a list without it.
                at = next((k for k, item in enumerate(warnings.filters) if item is ours), None)
                if at is not None:
                    del warnings.filters[at]
                warnings._filters_mutated()  # noqa: SLF001
    return out
