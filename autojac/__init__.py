"""autojac: full Jacobians of PyTorch functions, by the fastest method that fits in memory."""

from ._core.errors import AutojacError as AutojacError
from ._core.errors import InputError as InputError
from ._core.errors import InputTypeError as InputTypeError
from ._core.errors import MemoryBudgetError as MemoryBudgetError
from ._core.errors import NotBatchAwareError as NotBatchAwareError
from ._core.errors import PlanMismatchError as PlanMismatchError
from ._core.errors import StrictError as StrictError
from ._core.errors import UnsupportedFunctionError as UnsupportedFunctionError
from ._jacobian import clear_cache as clear_cache
from ._jacobian import jacobian as jacobian
from ._jacobian import plan as plan
from ._plan import Candidate as Candidate
from ._plan import Cost as Cost
from ._plan import Plan as Plan

__version__ = "0.1.0"

__all__ = [
    "AutojacError",
    "Candidate",
    "Cost",
    "InputError",
    "InputTypeError",
    "MemoryBudgetError",
    "NotBatchAwareError",
    "Plan",
    "PlanMismatchError",
    "StrictError",
    "UnsupportedFunctionError",
    "clear_cache",
    "jacobian",
    "plan",
]
