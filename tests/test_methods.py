"""Every mode x vectorization x chunk size against torch's float64 loop Jacobian, on every case."""

from __future__ import annotations

import pytest
import torch
from cases import CASES
from reference import assert_same_structure_and_close, reference

import autojac

MODES = ["reverse", "forward", "forward-trick"]
VECTORIZATIONS = ["vmap", "repeat", "loop"]
CHUNKS = ["1", "2", "3", "7", "n", "n+5"]


def n_vectors(problem_inputs, outputs, mode):
    xs = problem_inputs if isinstance(problem_inputs, tuple) else (problem_inputs,)
    ys = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(t.numel() for t in (ys if mode == "reverse" else xs))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("vectorize", VECTORIZATIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_method_matches_torch(case, dtype, mode, vectorize, chunk):
    f, x = case.build(dtype)
    f64, x64 = case.build(torch.float64)
    want = reference(f64, x64)
    n = n_vectors(x, f(*(x if isinstance(x, tuple) else (x,))), mode)
    chunk_size = {"n": max(n, 1), "n+5": n + 5}.get(chunk) or int(chunk)
    if case.refused(mode, vectorize, chunk_size):
        with pytest.raises(autojac.UnsupportedFunctionError) as info:
            autojac.jacobian(f, x, mode=mode, vectorize=vectorize, chunk_size=chunk_size)
        assert f"{mode}/{vectorize}" in str(info.value)
        assert info.value.__cause__ is not None  # the original exception is chained
        return
    got = autojac.jacobian(f, x, mode=mode, vectorize=vectorize, chunk_size=chunk_size)
    if dtype == torch.float64:
        assert_same_structure_and_close(got, want)
    else:
        _close_in_float32(got, want)


def _close_in_float32(got, want):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            _close_in_float32(g, w)
        return
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("engine", ["", "autograd"], ids=["func", "autograd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_both_reverse_vmap_engines_match_torch(case, engine, chunk):
    """reverse/vmap's two engines (torch.func and is_grads_batched) are two candidates; both must be right."""
    from autojac._execute import method, run_method
    from autojac._problem import check_inputs, describe

    f, x = case.build(torch.float64)
    want = reference(f, x)
    xs, signature = check_inputs(x, "test")
    problem = describe(f, xs, signature, "test")
    chunk_size = {"n": max(problem.n_out, 1), "n+5": problem.n_out + 5}.get(chunk) or int(chunk)
    run = lambda: run_method(method("reverse", "vmap", engine), f, xs, problem, chunk_size, False, [])  # noqa: E731
    if case.refused("reverse", "vmap", chunk_size):
        with pytest.raises(Exception):  # noqa: B017 (the engines fail in their own words; the planner names them)
            run()
        return
    assert_same_structure_and_close(run(), want)
