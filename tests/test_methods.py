"""Every mode x vectorization x chunk size against torch's float64 loop Jacobian, on every case."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from cases import CASES
from reference import assert_same_structure_and_close, reference

import autojac
from autojac._execute.basis import balanced_chunks, basis_chunk

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
@pytest.mark.parametrize("engine", ["func", "autograd"])
@pytest.mark.parametrize("mode", ["reverse", "forward-trick"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_both_vmap_engines_match_torch(case, mode, engine, chunk):
    """The vmap methods' two engines (torch.func, and autograd with is_grads_batched) are two candidates; both must be right."""
    from autojac._execute.run import run_method
    from autojac._methods import method
    from autojac._core.problem import check_inputs, describe

    f, x = case.build(torch.float64)
    want = reference(f, x)
    xs, signature, _ = check_inputs(x, "test")
    problem = describe(f, xs, signature, "test")
    n = problem.n_out if mode == "reverse" else problem.n_in
    chunk_size = {"n": max(n, 1), "n+5": n + 5}.get(chunk) or int(chunk)
    run = lambda: run_method(method(mode, "vmap", engine), f, xs, problem, chunk_size, False, [])  # noqa: E731
    why = case.refused(mode, "vmap", chunk_size, engine)
    if why and "caught by" in why:
        pytest.skip(f"wrong without an error at the method level ({why}); the safety net's tests cover it")
    if why:
        with pytest.raises(Exception):  # noqa: B017 (the engines fail in their own words; the planner names them)
            run()
        return
    assert_same_structure_and_close(run(), want)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    data=st.data(),
)
def test_basis_chunks_are_rows_of_the_identity_cut_into_parts(sizes, data):
    n = sum(sizes)
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    shapes = [(s,) if s % 2 else (s // 2, 2) if s > 1 else () for s in sizes]
    shapes = [sh if math.prod(sh) == s else (s,) for sh, s in zip(shapes, sizes)]
    parts = basis_chunk(start, stop, shapes, sizes, [torch.float64] * len(sizes), torch.device("cpu"))
    got = torch.cat([p.reshape(stop - start, -1) for p in parts], dim=1)
    assert torch.equal(got, torch.eye(n, dtype=torch.float64)[start:stop])
    assert [tuple(p.shape[1:]) for p in parts] == [tuple(sh) for sh in shapes]


@pytest.mark.parametrize(("n", "chunk", "sizes"), [(10, 8, [5, 5]), (10, 10, [10]), (7, 3, [3, 3, 1]), (9, 4, [3, 3, 3]), (1, 5, [1]), (0, 3, [])])
def test_balanced_chunks_cover_the_basis_in_near_equal_sizes(n, chunk, sizes):
    chunks = balanced_chunks(n, chunk)
    assert [b - a for a, b in chunks] == sizes
    assert all(a == b for (_, a), (b, _) in zip(chunks, chunks[1:]))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 20), m=st.integers(1, 1200), left=st.integers(0, 3), right=st.integers(0, 3),
       expanded=st.booleans(), single=st.booleans())
def test_columns_are_written_transposed_in_tiles_or_whole(k, m, left, right, expanded, single):
    """Forward chunks (k, m) land as columns of an (m, n) block, tiled for few long columns (NOTE: [Writing few
    long columns]): every entry where it belongs, none elsewhere, from expanded chunks too, across dtypes."""
    from autojac._execute.assemble import _write_columns

    g = torch.Generator().manual_seed(k * 10007 + m)
    flat = (torch.randn(m, generator=g, dtype=torch.float64).expand(k, m) if expanded
            else torch.randn(k, m, generator=g, dtype=torch.float64))
    block = torch.zeros(m, left + k + right, dtype=torch.float32 if single else torch.float64)
    _write_columns(block[:, left:left + k], flat)
    want = torch.zeros_like(block)
    want[:, left:left + k] = flat.T.to(block.dtype)
    assert torch.equal(block, want)
