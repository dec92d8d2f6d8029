"""The planner is pure: made-up problem facts, costs and budgets in, an exact choice out."""

from __future__ import annotations

import pytest
import torch

import autojac
from autojac._plan import Cost
from autojac._planner import SAFETY, choose
from autojac._core.problem import Problem, Signature

MiB = 2**20


def problem(n_in: int, n_out: int) -> Problem:
    sig = Signature(shapes=((n_in,),), dtypes=(torch.float32,), device=torch.device("cpu"), is_tuple=False)
    return Problem(inputs=sig, out_shapes=((n_out,),), out_dtypes=(torch.float32,), outputs_tuple=False)


def cost(name, n, *, fixed=0.0, per_chunk=0.0, per_vector=1e-3, bytes_fixed=0, bytes_per_vector=1000, dropped=None):
    mode, vectorize = name.split("/")
    if dropped:
        return Cost(mode, vectorize, n, dropped=dropped)
    return Cost(mode, vectorize, n, seconds_fixed=fixed, seconds_per_chunk=per_chunk, seconds_per_vector=per_vector,
                bytes_fixed=bytes_fixed, bytes_per_vector=bytes_per_vector)


# facts -> expected (method, chunk size); each row a situation a user meets.
TABLE = [
    pytest.param(
        problem(1000, 10), 10**9,
        [cost("reverse/vmap", 10, per_vector=1e-4, per_chunk=1e-3), cost("forward/vmap", 1000, per_vector=1e-4, per_chunk=1e-3)],
        ("reverse/vmap", 10), id="few outputs: reverse wins",
    ),
    pytest.param(
        problem(10, 1000), 10**9,
        [cost("reverse/vmap", 1000, per_vector=1e-4), cost("forward/vmap", 10, per_vector=2e-4)],
        ("forward/vmap", 10), id="few inputs: forward wins despite dearer passes",
    ),
    pytest.param(
        problem(100, 100), 10**9,
        [cost("reverse/vmap", 100, dropped="RuntimeError: vmap: no batching rule"),
         cost("reverse/loop", 100, per_vector=1e-3)],
        ("reverse/loop", 100), id="vmap cannot run: loop",
    ),
    pytest.param(
        problem(100, 100), 100 * 4 * 100 + int(SAFETY * (1 * MiB + 25 * 10_000)) + 1,
        [cost("reverse/vmap", 100, per_vector=1e-5, bytes_fixed=MiB, bytes_per_vector=10_000)],
        ("reverse/vmap", 25), id="budget caps the chunk at 25 of 100 (4 balanced chunks)",
    ),
    pytest.param(
        problem(100, 100), 100 * 4 * 100 + int(SAFETY * (1 * MiB + 30 * 10_000)) + 1,
        [cost("reverse/vmap", 100, per_vector=1e-5, bytes_fixed=MiB, bytes_per_vector=10_000)],
        ("reverse/vmap", 25), id="room for 30 balances to 4 chunks of 25",
    ),
    pytest.param(
        problem(100, 100), 3 * MiB,
        [cost("reverse/vmap", 100, per_vector=1e-5, bytes_fixed=750 * MiB, bytes_per_vector=1000),
         cost("reverse/loop", 100, per_vector=1e-3, bytes_fixed=MiB, bytes_per_vector=100)],
        ("reverse/loop", 100), id="vmap's intercept does not fit: the slower loop does",
    ),
    pytest.param(
        problem(100, 100), 10**9,
        [cost("reverse/vmap", 100, per_vector=1e-5, per_chunk=0.5, bytes_per_vector=10**8),
         cost("reverse/repeat", 100, per_vector=2e-5, per_chunk=1e-3, bytes_per_vector=100)],
        ("reverse/repeat", 100), id="per-chunk cost makes a small-chunk vmap lose to repeat",
    ),
]


@pytest.mark.parametrize("facts, budget, costs, expected", TABLE)
def test_planner_table(facts, budget, costs, expected):
    plan = choose(facts, costs, budget)
    assert (f"{plan.mode}/{plan.vectorize}", plan.chunk_size) == expected
    assert plan.estimated_peak_bytes <= budget
    assert plan.budget_bytes == budget
    assert plan.n_chunks == -(-plan.problem.n_out // plan.chunk_size) or plan.mode != "reverse"


def test_nothing_fits_raises_memory_budget_error_with_the_need():
    facts = problem(100, 100)
    costs = [cost("reverse/vmap", 100, bytes_fixed=10 * MiB, bytes_per_vector=1000)]
    with pytest.raises(autojac.MemoryBudgetError, match=r"needs ~11\.5 MiB") as info:
        choose(facts, costs, budget_bytes=MiB)
    assert isinstance(info.value, MemoryError)


def test_result_alone_too_big_is_reported():
    facts = problem(10_000, 10_000)  # the result is 400 MB
    with pytest.raises(autojac.MemoryBudgetError, match="the result itself is 381.5 MiB"):
        choose(facts, [cost("reverse/loop", 10_000, bytes_per_vector=10)], budget_bytes=100 * MiB)


def test_fixed_chunk_size_is_honoured_and_balanced():
    plan = choose(problem(10, 10), [cost("reverse/vmap", 10)], budget_bytes=10**9, chunk_size=8)
    assert (plan.chunk_size, plan.n_chunks) == (5, 2)


def test_fixed_chunk_size_that_does_not_fit():
    with pytest.raises(autojac.MemoryBudgetError):
        choose(problem(100, 100), [cost("reverse/vmap", 100, bytes_per_vector=MiB)], budget_bytes=10 * MiB, chunk_size=50)


def test_plan_lists_every_candidate_and_reads_as_a_paragraph():
    costs = [cost("reverse/vmap", 10, per_vector=1e-4), cost("forward/vmap", 1000, dropped="no jvp")]
    plan = choose(problem(1000, 10), costs, 10**9)
    text = str(plan)
    assert text.startswith("Plan: reverse/vmap in 1 chunk(s) of 10 for a 10 x 1000 Jacobian")
    assert "forward/vmap: dropped (no jvp)" in text and "\n" not in text
    assert [c.name for c in plan.candidates] == ["reverse/vmap", "forward/vmap"]
    with pytest.raises(AttributeError):
        plan.mode = "forward"  # frozen


def test_fallbacks_are_the_other_feasible_candidates_fastest_first():
    costs = [cost("reverse/vmap", 10, per_vector=1e-5), cost("reverse/loop", 10, per_vector=1e-3),
             cost("reverse/repeat", 10, per_vector=1e-4), cost("forward/vmap", 10, dropped="x")]
    plan = choose(problem(10, 10), costs, 10**9)
    assert [c.name for c in plan.fallbacks] == ["reverse/repeat", "reverse/loop"]
