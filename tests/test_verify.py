"""The safety net's comparison itself: w^T J against an independent VJP, with cancellation and sparse results."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE
from reference import reference

import autojac
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


# --- NOTE: [Rows of very different sizes] -----------------------------------------------------------------

def _loud_and_quiet(x):
    """One output 1e9 times the others', which average over x's first dimension (not batch-aware)."""
    return torch.cat([1e9 * x.sum(-1, keepdim=True), torch.sin(x) + 0.1 * x.mean(0)], -1)


def test_a_method_wrong_only_in_small_rows_beside_huge_ones_is_caught():
    x = torch.randn(3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(autojac.UnsupportedFunctionError):
        autojac.jacobian(_loud_and_quiet, x, mode="reverse", vectorize="repeat")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for _ in range(40):  # the plan's trials included: never a wrong answer
        x = torch.randn(3, dtype=torch.float64, device=DEVICE, generator=gen)
        torch.testing.assert_close(autojac.jacobian(_loud_and_quiet, x), reference(_loud_and_quiet, x),
                                   rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("mode", ["reverse", "forward", "forward-trick"])
@pytest.mark.parametrize("vectorize", ["vmap", "loop", "repeat"])
def test_rounding_in_a_row_that_should_be_zero_beside_huge_rows_fails_no_method(mode, vectorize):
    g = lambda x: torch.cat([1e9 * x, (1e9 * x + x) - 1e9 * x - x, torch.sin(x)], -1)  # noqa: E731
    x = torch.randn(4, dtype=torch.float64, device=DEVICE)
    got = autojac.jacobian(g, x, mode=mode, vectorize=vectorize)
    torch.testing.assert_close(got, reference(g, x), rtol=1e-7, atol=1e-6)


def test_balanced_cotangents_only_where_rows_differ_widely():
    from autojac._core.problem import check_inputs, describe
    from autojac._execute.verify import balanced_cotangents

    x = torch.randn(3, dtype=torch.float64, device=DEVICE)
    for f, wanted in ((torch.sin, False), (_loud_and_quiet, True)):
        xs, signature, _ = check_inputs(x)
        problem = describe(f, xs, signature)
        w = balanced_cotangents(reference(f, x), problem)
        assert (w is not None) == wanted
    if w is not None:  # the loud row no longer weighs 1e9 times the quiet ones: at most 1 / eps^(1/3) (1.7e5)
        J = reference(_loud_and_quiet, x)
        weights = (w[0].abs().unsqueeze(1) * J.abs()).amax(1)
        assert float(weights.max()) < 1e7 * float(weights.min())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_row_scales_are_the_largest_magnitude_in_each_row_on_every_path(dtype, layout):
    """The rows' scales (NumPy views for CPU floats, torch's reductions for the rest, a scatter for sparse blocks)
    are max |J| per row, NaN or infinite rows read as 0, so that they never set the balance."""
    from autojac._execute.verify import _row_scale

    g = torch.Generator().manual_seed(7)
    block = torch.randn(6, 5, generator=g, dtype=torch.float64) * 10.0 ** torch.arange(6.0).unsqueeze(1)
    block[2] = -block[2].abs()  # a row whose largest magnitude is negative
    block[3, 1] = float("nan")
    block[4, 0] = float("-inf")
    block[5] = 0.0
    want = block.abs().amax(1).to(dtype).double().numpy()
    typed = block.to(dtype).to(DEVICE)
    if layout == "sparse":
        typed = typed.to_sparse_coo().coalesce()
    got = _row_scale(typed, 6)
    import numpy as np
    finite = np.isfinite(want)
    assert np.array_equal(got[finite], want[finite]) and got.dtype == np.float64
    assert not np.isfinite(got[~finite]).any()  # NaN or inf here; balanced_cotangents reads them as 0
