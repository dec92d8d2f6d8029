"""One-time imports paid at `import autojac`, not inside the first call (and not against its budget).

NOTE: [Why autojac warms torch.func up at import]
The first `torch.func.vmap` of a process imports some 800 modules (torch._dynamo
and friends): 0.8 s and about 80 MiB of resident memory on the 2-core CPU machine;
the first `torch.func.jvp` another 0.1 s and 10 MiB. Inside a call that would be
charged to the call's time and, worse, to its memory budget, where no plan can
avoid it. A vmap and a jvp over a 2-element tensor at import pay it once, up front.
Set AUTOJAC_LAZY_IMPORTS=1 to skip this (the first call then pays it).
"""

from __future__ import annotations

import os

import torch


def warm_up() -> None:
    if os.environ.get("AUTOJAC_LAZY_IMPORTS", "") not in ("", "0"):
        return
    x = torch.zeros(2)
    with torch.no_grad():
        _, vjp_fn = torch.func.vjp(torch.sin, x)
        torch.func.vmap(vjp_fn)(torch.eye(2))
        torch.func.vmap(lambda t: torch.func.jvp(torch.sin, (x,), (t,))[1])(torch.eye(2))
