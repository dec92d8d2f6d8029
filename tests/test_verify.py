"""The safety net's comparison itself: w^T J against an independent VJP, with cancellation and sparse results."""

from __future__ import annotations

import pytest
import torch

from autojac._core.problem import Problem, Signature
from autojac._execute.verify import VerificationError, check_against


def _problem(m: int, n: int, dtype=torch.float32) -> Problem:
    return Problem(inputs=Signature(((n,),), (dtype,), torch.device("cpu")), out_shapes=((m,),), out_dtypes=(dtype,))


def _cancelling(m: int = 64, n: int = 48, dtype=torch.float32):
    """A Jacobian whose columns sum to nearly nothing under w: w^T J is tiny next to |w|^T |J|."""
    g = torch.Generator().manual_seed(3)
    # Columns of sizes from 1 to 1e9, so that each column must be judged against its own terms.
    jac = torch.randn(m, n, generator=g, dtype=torch.float64) * 10.0 ** (3 * (torch.arange(n) % 4))
    w = torch.randn(m, generator=g, dtype=torch.float64)
    # Make the last row cancel the others' contribution to w^T J for every column.
    jac[-1] = -(w[:-1] @ jac[:-1]) / w[-1] + 1e-3
    exact = w @ jac  # ~1e-3 per column: 1e-7 of the terms' size
    return jac.to(dtype), w.to(dtype), exact.to(dtype)


@pytest.fixture(params=["whole", "blocks of 5 columns"])
def block_bytes(request, monkeypatch):
    """The suspect columns judged all at once, or a few at a time (as under a tight budget's CHECK_BLOCK_BYTES)."""
    if request.param != "whole":
        monkeypatch.setattr("autojac._execute.verify.CHECK_BLOCK_BYTES", 5 * 64 * 4)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_cancellation_is_not_taken_for_an_error(layout, block_bytes):
    jac, w, exact = _cancelling()
    result = jac if layout == "dense" else jac.to_sparse_coo()
    # float32 rounding of the terms is far above the exact product: the cheap path finds every column suspect.
    check_against("m", result, (w,), (exact,), _problem(*jac.shape))


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_a_wrong_element_is_found_under_cancellation(layout, block_bytes):
    jac, w, exact = _cancelling()
    row = int((w[:-1].abs() * jac[:-1, 7].abs()).argmax())
    jac[row, 7] *= 3  # the largest of ~64 terms tripled: over 10x the tolerance (2 sqrt(eps) of the terms' sum)
    result = jac if layout == "dense" else jac.to_sparse_coo()
    with pytest.raises(VerificationError, match="input 0, element 7"):
        check_against("m", result, (w,), (exact,), _problem(*jac.shape))


def test_nan_where_the_reference_is_finite_fails():
    jac = torch.randn(8, 5, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    reference = w @ jac
    jac[2, 3] = float("nan")
    with pytest.raises(VerificationError, match="element 3"):
        check_against("m", jac, (w,), (reference,), _problem(8, 5, torch.float64))


def test_a_right_jacobian_passes_in_float64():
    jac = torch.randn(30, 20, dtype=torch.float64)
    w = torch.randn(30, dtype=torch.float64)
    check_against("m", jac, (w,), (w @ jac,), _problem(30, 20, torch.float64))
