"""autojac: full Jacobians of PyTorch functions, by the fastest method that fits in memory."""

from ._api import derived as _derived
from ._api import jacobian as _entry
from ._api.jacobian import clear_cache as clear_cache
from ._api.jacobian import last_report as last_report
from ._api.jacobian import load_plans as load_plans
from ._api.jacobian import save_plans as save_plans
from ._core.opaque import opaque as _opaque
from ._core.errors import AutojacError as AutojacError
from ._core.errors import InputError as InputError
from ._core.errors import InputTypeError as InputTypeError
from ._core.errors import MemoryBudgetError as MemoryBudgetError
from ._core.errors import NotBatchAwareError as NotBatchAwareError
from ._core.errors import PlanMismatchError as PlanMismatchError
from ._core.errors import StrictError as StrictError
from ._core.errors import UnsupportedFunctionError as UnsupportedFunctionError
from ._measure.meter import process_peak_rss as process_peak_rss
from ._planning.plan import Candidate as Candidate
from ._planning.plan import Plan as Plan
from ._planning.plan import RunReport as RunReport

from ._api.jacobian import _forget_report
from ._core.warmup import first_call_code as _first_call_code
from ._core.warmup import warm_up as _warm_up

_warm_up()
_first_call_code(_entry.jacobian, _forget_report)
del _forget_report

# Opaque to torch.compile (NOTE: [Opaque to torch.compile]).
jacobian = _opaque(_entry.jacobian)
hessian = _opaque(_derived.hessian)
batch_jacobian = _opaque(_derived.batch_jacobian)
sparsity = _opaque(_derived.sparsity)
plan = _opaque(_entry.plan)
tune = _opaque(_entry.tune)

__version__ = "0.2.0.dev0"

__all__ = [
    "AutojacError",
    "Candidate",
    "InputError",
    "InputTypeError",
    "MemoryBudgetError",
    "NotBatchAwareError",
    "Plan",
    "PlanMismatchError",
    "RunReport",
    "StrictError",
    "UnsupportedFunctionError",
    "batch_jacobian",
    "clear_cache",
    "hessian",
    "jacobian",
    "last_report",
    "load_plans",
    "plan",
    "process_peak_rss",
    "save_plans",
    "sparsity",
    "tune",
]
