"""autojac: full Jacobians of PyTorch functions, by the fastest method that fits in memory."""

from ._errors import AutojacError as AutojacError
from ._errors import InputError as InputError
from ._errors import InputTypeError as InputTypeError
from ._errors import MemoryBudgetError as MemoryBudgetError
from ._errors import NotBatchAwareError as NotBatchAwareError
from ._errors import PlanMismatchError as PlanMismatchError
from ._errors import StrictError as StrictError
from ._errors import UnsupportedFunctionError as UnsupportedFunctionError
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
