"""The public entry points `jacobian` and `plan`: check arguments, plan (or reuse a plan), run."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

import torch

from ._cache import PlanCache
from ._compose import composed_jacobian, outer_transform
from ._core.errors import InputError, InputTypeError, MemoryBudgetError, PlanMismatchError, StrictError, UnsupportedFunctionError
from ._core.evaluation import Evaluator, module_modes, modules_of
from ._execute.run import is_out_of_memory, run_method
from ._methods import engines, method
from ._core.units import format_bytes, normalize_budget, parse_budget
from ._measure.device import free_memory, total_bytes, untracked_reserve
from ._methods.base import MODES, VECTORIZATIONS, Method, call, grad_inputs
from ._plan import Cost, Plan
from ._planner import NoMethodError, choose
from ._probe import probe, refine
from ._core.problem import Signature, check_inputs, describe
from ._execute.verify import VerificationError, check_result

logger = logging.getLogger("autojac")

PRUNE_RATIO = 8
"""In auto mode, a mode that needs this many times more passes than the other is measured only if nothing else fits."""
PROGRESS_AFTER_SECONDS = 10.0
REFINE_WITHIN = 2.0
"""Candidates estimated within this factor of the best are re-timed at their real chunk size."""
REFINE_MAX_SECONDS = 1.0
"""...if their whole Jacobian is estimated to take less than this."""
REFINE_PASSES = 3
"""Timing passes at most: a pass whose runs bring untimed candidates within reach calls for another."""

_cache = PlanCache()


def clear_cache() -> None:
    """Forget every cached plan (for example after freeing a lot of memory)."""
    _cache.clear()


_TORCH_KEYWORDS = {
    "strategy": "`strategy='reverse-mode'` / `'forward-mode'` of torch.autograd.functional is `mode='reverse'` / `mode='forward'` here",
    "vectorize": "`vectorize=True` of torch.autograd.functional is `vectorize='vmap'` here (False is `vectorize='loop'`); autojac chooses by itself with 'auto'",
    "chunk_size": "torch.func's `chunk_size` is `chunk_size` here too",
    "argnums": "`argnums` is not supported yet: pass only the inputs to differentiate, and close over the others (`lambda x: f(x, y)`)",
    "has_aux": "`has_aux` is not supported yet: return only the outputs to differentiate",
    "budget": "the memory budget is `memory_budget`",
    "memory": "the memory budget is `memory_budget`",
    "method": "the method is chosen with `mode` ('reverse', 'forward', 'forward-trick') and `vectorize` ('vmap', 'repeat', 'loop')",
}


def _refuse_unknown(unknown: dict, who: str) -> None:
    if not unknown:
        return
    name = next(iter(unknown))
    hint = _TORCH_KEYWORDS.get(name, "see `help(autojac.jacobian)` for the options")
    raise InputTypeError(f"{who}: got an unexpected keyword argument `{name}`. {hint[0].upper() + hint[1:]}.")


def _check_flags(who: str, **flags: object) -> None:
    for name, value in flags.items():
        if name == "progress":
            if value is not None and not isinstance(value, bool):
                raise InputTypeError(f"{who}: `progress` must be True, False or None (show a bar for runs estimated over 10 s on a terminal), but got {value!r}.")
        elif not isinstance(value, bool):
            raise InputTypeError(f"{who}: `{name}` must be True or False, but got {value!r}.")


def _check_options(mode: object, vectorize: object, chunk_size: object, who: str) -> None:
    if isinstance(vectorize, bool):
        raise InputError(f"{who}: `vectorize` takes 'auto', 'vmap', 'repeat' or 'loop', but got {vectorize!r}. {_TORCH_KEYWORDS['vectorize'][0].upper() + _TORCH_KEYWORDS['vectorize'][1:]}.")
    if mode not in ("auto", *MODES):
        raise InputError(f"{who}: `mode` must be one of 'auto', 'reverse', 'forward', 'forward-trick', but got {mode!r}.")
    if vectorize not in ("auto", *VECTORIZATIONS):
        raise InputError(f"{who}: `vectorize` must be one of 'auto', 'vmap', 'repeat', 'loop', but got {vectorize!r}.")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise InputTypeError(f"{who}: `chunk_size` must be None or a positive int, but got {type(chunk_size).__name__} {chunk_size!r}.")
        if chunk_size <= 0:
            raise InputError(f"{who}: `chunk_size` must be a positive int (basis vectors per pass), but got {chunk_size}. Use 1 for the least memory, or None to let autojac choose.")


def _check_callable(f: object, who: str) -> None:
    if not callable(f):
        raise InputTypeError(f"{who}: `f` must be callable (a function or an nn.Module), but got {type(f).__name__}.")


def _candidates(mode: str, vectorize: str, n_in: int, n_out: int) -> list[Method]:
    """Allowed methods in order of preference: fewer passes first, forward before the trick, vmap > repeat > loop."""
    forward_first = n_in < n_out
    modes = ["forward", "forward-trick", "reverse"] if forward_first else ["reverse", "forward", "forward-trick"]
    if mode != "auto":
        modes = [mode]
    vectorizations = list(VECTORIZATIONS) if vectorize == "auto" else [vectorize]
    return [e for m in modes for v in vectorizations for e in engines(m, v)]


def plan(
    f: Callable,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    mode: str = "auto",
    vectorize: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | float | str | None = None,
    create_graph: bool = False,
    strict: bool = False,
    cache: bool = True,
    **unknown: object,
) -> Plan:
    """Decide how `jacobian(f, inputs, ...)` would run, without computing the Jacobian.

    Takes the same options as `jacobian`; the rules are in its docstring
    (`strict` is accepted so the same options can be passed, and is checked when
    the plan runs). The returned `Plan` prints as one readable paragraph and can
    be passed back as `jacobian(f, inputs, plan=plan)`.
    """
    _refuse_unknown(unknown, "plan")
    _check_options(mode, vectorize, chunk_size, "plan")
    _check_flags("plan", create_graph=create_graph, strict=strict, cache=cache)
    _check_callable(f, "plan")
    xs, signature = check_inputs(inputs, "plan")
    memory_budget = normalize_budget(memory_budget, "plan")
    if outer_transform(xs) is not None:
        raise InputError("plan: cannot plan inside a torch.func transform or forward-mode AD, where timings and memory are the outer transform's. Make the plan outside, or call `autojac.jacobian` there (it then runs torch.func products without planning).")
    modules = modules_of(f)
    with _user_call_state(xs) as xs:
        evaluator = Evaluator(f, signature.device, modules)
        try:
            return _plan(f, evaluator, xs, signature, modules, mode, vectorize, chunk_size, memory_budget, create_graph, cache, "plan")
        finally:
            evaluator.finish()


@contextlib.contextmanager
def _user_call_state(xs: Sequence[torch.Tensor]):
    """Leave inference mode for the call (autograd needs it off), with normal copies of inference tensors."""
    if not torch.is_inference_mode_enabled():
        yield xs
        return
    with torch.inference_mode(False):
        yield tuple(x.clone() if x.is_inference() else x for x in xs)


def _plan_key(signature, mode, vectorize, chunk_size, memory_budget, create_graph, modules) -> tuple:
    """What a plan depends on besides the function: inputs, options, grad mode and the modules' training flags."""
    return (signature, mode, vectorize, chunk_size, memory_budget, create_graph, torch.is_grad_enabled(), module_modes(modules))


def _evaluates_once(plan: Plan, f: Callable) -> bool:
    """Whether running `plan` on `f` evaluates `f` once: then the evaluator need not save any state upfront."""
    chosen = method(plan.mode, plan.vectorize, plan.engine)
    n = chosen.basis_size(plan.problem)
    return chosen.evaluations(n, plan.n_chunks) <= 1 and (chosen.evaluates_once or plan.checks.verified(f, chosen.name))


def _plan(f, evaluator, xs, signature, modules, mode, vectorize, chunk_size, memory_budget, create_graph, cache, who) -> Plan:
    key = _plan_key(signature, mode, vectorize, chunk_size, memory_budget, create_graph, modules)
    if cache:
        cached = _cache.get(f, key)
        if cached is not None:
            return cached
    free = free_memory(signature.device)
    budget_bytes = parse_budget(memory_budget, free.free_bytes, who, total=total_bytes(signature.device))
    problem = dataclasses.replace(describe(evaluator, xs, signature, who), draws_random=evaluator.draws_random)
    _refuse_what_cannot_fit(problem, budget_bytes, who)
    methods = _candidates(mode, vectorize, problem.n_in, problem.n_out)
    random_only_once = problem.draws_random and any(m.evaluates_once for m in methods) and not all(m.evaluates_once for m in methods)
    if random_only_once:  # NOTE: [Why evaluations are pinned]
        drawn = [m for m in methods if not m.evaluates_once]
        methods = [m for m in methods if m.evaluates_once]
    fixed = len({(m.mode, m.vectorize) for m in methods}) == 1 and chunk_size is not None and memory_budget is None
    if fixed:
        methods = methods[:1]  # nothing is measured, so there is nothing to choose an engine by: the default
    fewest = min(m.basis_size(problem) for m in methods)
    first = [m for m in methods if m.basis_size(problem) <= PRUNE_RATIO * max(fewest, 1)]
    later = [m for m in methods if m not in first]
    room = None if fixed else max(budget_bytes - untracked_reserve(signature.device), 0)
    costs = []
    for m in first:  # in order of preference, so the usual winner sets the time to beat early
        beat = None if fixed else _time_to_beat(problem, costs, budget_bytes, chunk_size)
        costs.append(probe(m, evaluator, xs, problem, create_graph, measure=not fixed, chunk_size=chunk_size,
                           room_bytes=room, beat_seconds=beat))
    skipped = [
        Cost(m.mode, m.vectorize, m.basis_size(problem), engine=m.engine,
             dropped=f"not measured: {m.basis_size(problem)} passes against {fewest}")
        for m in later
    ]
    if random_only_once:
        skipped += [
            Cost(m.mode, m.vectorize, m.basis_size(problem), engine=m.engine,
                 dropped="`f` draws random numbers, and this method evaluates it more than once")
            for m in drawn
        ]
    budget = None if fixed else budget_bytes
    try:
        result = _choose(problem, costs + skipped, budget, chunk_size, mode, vectorize)
    except (UnsupportedFunctionError, MemoryBudgetError):
        if not later:
            raise
        costs += [probe(m, evaluator, xs, problem, create_graph, chunk_size=chunk_size, room_bytes=room) for m in later]
        result = _choose(problem, costs, budget, chunk_size, mode, vectorize)
    if not fixed:
        result = _refined(result, evaluator, xs, create_graph, budget, chunk_size, mode, vectorize)
    logger.debug("%s", result)
    if cache:
        _cache.put(f, key, result)
    return result


def _refuse_what_cannot_fit(problem, budget_bytes: int, who: str) -> None:
    """MemoryBudgetError right after the one evaluation that gave the output shapes, before any probe."""
    reserve = untracked_reserve(problem.inputs.device)
    if problem.result_bytes + reserve > budget_bytes:
        raise MemoryBudgetError(
            f"{who}: the memory budget is {format_bytes(budget_bytes)}, but the Jacobian alone "
            f"({problem.n_out} x {problem.n_in}) takes {format_bytes(problem.result_bytes)}"
            + (f", plus the {format_bytes(reserve)} workspace reserve" if reserve else "")
            + ". Raise `memory_budget`, or compute the Jacobian of fewer outputs or inputs at a time."
        )


def _time_to_beat(problem, costs, budget, chunk_size) -> float | None:
    """REFINE_WITHIN times the best estimate among the candidates probed so far; None if none is feasible."""
    try:
        best = _choose(problem, costs, budget, chunk_size, "auto", "auto").estimated_seconds
    except (UnsupportedFunctionError, MemoryBudgetError):
        return None
    return None if best is None else REFINE_WITHIN * best


def _refined(plan: Plan, f, xs, create_graph, budget, chunk_size, mode, vectorize) -> Plan:
    """Time whole runs of the close contenders at their planned chunk sizes, then choose again.

    Contenders are feasible candidates estimated within REFINE_WITHIN of the best
    whose whole Jacobian is estimated under REFINE_MAX_SECONDS, so refining costs
    at most a few Jacobians and only where extrapolation could flip the choice.
    The best alone is timed too. If the timed runs bring candidates that were not
    timed within reach, another pass times them together with those timed before
    (up to REFINE_PASSES passes), so the final choice is between timed runs.
    """
    timed_ones: set[tuple[str, str, str]] = set()
    for _ in range(REFINE_PASSES):
        best = plan.estimated_seconds
        if best is None:
            return plan
        contenders, where, new = [], [], False
        for i, c in enumerate(plan.candidates):
            name = (c.cost.mode, c.cost.vectorize, c.cost.engine)
            close = c.feasible and c.estimated_seconds is not None and c.estimated_seconds <= REFINE_WITHIN * best
            close = close and c.estimated_seconds <= REFINE_MAX_SECONDS and c.cost.measured
            if close or (name in timed_ones and c.feasible):
                contenders.append((c.cost, method(*name), c.chunk_size))
                where.append(i)
                new = new or name not in timed_ones
        if not new:
            return plan  # every contender has been timed: the choice stands
        timed_ones |= {(c.mode, c.vectorize, c.engine) for c, _, _ in contenders}
        costs = [c.cost for c in plan.candidates]
        for i, cost in zip(where, refine(contenders, f, xs, plan.problem, create_graph)):
            costs[i] = cost
        plan = _choose(plan.problem, costs, budget, chunk_size, mode, vectorize)
    return plan


def _choose(problem, costs, budget, chunk_size, mode, vectorize) -> Plan:
    reserve = untracked_reserve(problem.inputs.device) if budget is not None else 0
    try:
        return choose(problem, costs, budget, chunk_size, reserve)
    except NoMethodError as exc:
        errors = [c.cost.error for c in exc.candidates if c.cost.error is not None]
        cause = errors[0] if errors else None
        if errors and all(is_out_of_memory(e) for e in errors):
            names = ", ".join(c.name for c in exc.candidates if c.cost.error is not None)
            raise MemoryBudgetError(
                f"jacobian: every allowed method ({names}) ran out of memory on a probe of a few basis vectors "
                f"({str(cause).splitlines()[0] if str(cause) else type(cause).__name__}). Free memory, or allow other "
                "methods (mode='auto', vectorize='auto'), or pass chunk_size=1."
            ) from cause
        raise _unsupported(mode, vectorize, exc.candidates) from cause


def _advice(mode: str, vectorize: str) -> str:
    """What to try instead when the allowed methods failed."""
    if mode == "auto" and vectorize == "auto":
        return "Check that `f` is differentiable with torch.autograd (no .detach(), .numpy() or .item() on the path from inputs to outputs)."
    advice = "Leave `mode` and `vectorize` at 'auto' to let autojac try every method"
    if mode == "forward":
        advice += ", or use mode='forward-trick' (needs only backward formulas) or mode='reverse'"
    if vectorize in ("vmap", "repeat"):
        advice += ", or use vectorize='loop' (works wherever torch.autograd does)"
    return advice + "."


def _unsupported(mode: str, vectorize: str, candidates) -> UnsupportedFunctionError:
    reasons = "; ".join(f"{c.name}: {(c.cost.dropped or '').rstrip('.')}" for c in candidates)
    return UnsupportedFunctionError(f"jacobian: no method could differentiate `f` with mode={mode!r}, vectorize={vectorize!r}. {reasons}. {_advice(mode, vectorize)}")


def jacobian(
    f: Callable,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    mode: str = "auto",
    vectorize: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | float | str | None = None,
    create_graph: bool = False,
    strict: bool = False,
    plan: Plan | None = None,
    cache: bool = True,
    progress: bool | None = None,
    **unknown: object,
):
    """The full Jacobian of `f` at `inputs`, by the fastest method that fits in memory.

    The result has the structure of `torch.autograd.functional.jacobian(f, inputs)`:
    for one input and one output a tensor of shape `f(x).shape + x.shape`; for
    tuples, a tuple per output of (a tuple per input of) blocks. Blocks have the
    dtype and device of their input.

    Args:
        f: a function or `nn.Module` taking the input tensors and returning a
            tensor or a tuple of tensors. Module parameters are not differentiated.
        inputs: a floating-point tensor or a tuple of them, all on one device.
            They are never modified.
        mode: "reverse" (one VJP per output element), "forward" (one native JVP
            per input element), "forward-trick" (JVPs from the double-VJP trick:
            needs only backward formulas and double backward), or "auto".
        vectorize: "vmap" (`torch.func.vmap` / `is_grads_batched` over a chunk of
            basis vectors), "repeat" (the repeat trick: `f` runs once on k copies
            of the input; needs a batch-aware `f`), "loop" (one basis vector at a
            time through `torch.autograd`), or "auto".
        chunk_size: basis vectors per batched pass, honoured exactly (balanced:
            `ceil(n / ceil(n / chunk_size))` each); None lets the planner choose.
            A chunk of 1 never uses vmap. With "loop" it only sets how many basis
            vectors are built at a time.
        memory_budget: bytes this call may allocate, the result included: None
            (half the free memory of the inputs' device), an int, a string such as
            "512MiB" or "2GB", or a float in (0, 1] (that share of free memory).
        create_graph: return a differentiable Jacobian (for higher derivatives).
        strict: raise `StrictError` if an output does not depend on an input;
            otherwise that block is zeros.
        plan: a `Plan` from `autojac.plan(...)` to run instead of planning.
        cache: reuse the plan made for the same function, input signature and
            options (default); False plans afresh and stores nothing.
        progress: a tqdm bar on stderr; None shows it when the plan's estimate
            exceeds 10 s and stderr is a terminal.

    How autojac chooses (mode and vectorize "auto"):

    - Inside a torch.func transform or forward-mode AD, it does not plan: it
      computes with `torch.func.vjp`/`jvp` on the inputs as given, so the outer
      transform differentiates the result (reverse mode there unless forward
      mode has fewer passes and no forward-AD level is active).
    - Otherwise it evaluates `f` once to learn the output shapes; `f`'s own
      errors propagate. If the result alone does not fit the budget,
      `MemoryBudgetError` comes now, before any probe.
    - Candidates are every allowed (mode, vectorize) pair, reverse/vmap twice
      (torch.func and autograd engines). A mode needing over 8x
      more passes than the best (e.g. forward with 1000 inputs, 1 output) is not
      measured unless nothing else fits. If `f` drew from the global RNG, only
      methods that evaluate it once compete (reverse; forward-trick with vmap or
      loop), so the result is the Jacobian of one realization.
    - Each candidate is probed on chunks of 2 and 16 basis vectors (4 for loop):
      a failure drops it, with the reason kept in `plan.candidates`; repeat is
      dropped unless `f` passes a batch-independence check; a vmap that falls
      back to per-sample loops is kept, its measured slowdown counted.
      Under a budget the larger probe is cut to what surely fits; a candidate
      whose 2-vector chunk takes longer than 2x the best whole Jacobian so far
      is not timed at the larger chunk (it cannot win), only measured for memory.
    - The probes give time and peak memory as lines in the chunk size: a fixed
      part (forward pass, retained graph) and a part per basis vector. Memory is
      measured, not guessed: CUDA allocator peaks, or on the CPU live storages
      plus the copies matrix kernels make of expanded operands.
    - Per candidate, the chunk size is the largest whose estimated peak (measured
      x1.15, plus the result, plus 8 MiB on the CPU for BLAS workspaces the probes
      cannot see) fits the budget, balanced across chunks.
    - Candidates estimated within 2x of the best (and under 1 s in all), the
      best included, compute the whole Jacobian at their chunk size, timed in
      interleaved rounds, since small probes extrapolate poorly; the fastest
      round replaces the estimate. If that brings untimed candidates within 2x of the
      new best, they are timed with the others (3 passes at most).
    - The candidate with the lowest estimated total time wins; ties go to fewer
      passes, then vmap over repeat over loop.
    - If nothing fits, `MemoryBudgetError` says what the smallest plan needs,
      before any Jacobian work is done.
    - A method's first Jacobian of a function is verified: w^T J for a random w
      must match one plain autograd VJP (on the method's own graph, or on a fresh
      evaluation for methods that evaluate `f` more than once). A method that
      fails it is not used again for that function.
    - At run time, an out-of-memory chunk is retried at half the size (down to 1);
      a method that still fails, or fails otherwise, hands over to the next
      feasible candidate by estimated time, and last to reverse/loop.
      `plan.history` records this.
    - Plans are cached per function, input signature, options (the budget in
      bytes), grad mode and the training flags of the modules `f` uses.

    Every evaluation of `f` gets private copies of the inputs and starts from the
    same global RNG state and module buffers; afterwards they are as one
    evaluation of `f` leaves them. The README tells how many evaluations each
    method makes.

    Raises:
        InputError / InputTypeError: bad arguments (also ValueError / TypeError).
        UnsupportedFunctionError: no allowed method can differentiate `f`.
        MemoryBudgetError: nothing fits in `memory_budget` (also MemoryError).
        PlanMismatchError: `plan` was made for other input shapes or dtypes.
        StrictError: with `strict=True`, an output is independent of an input.
        Unknown keywords raise InputTypeError saying what the torch-style
        keyword (`strategy`, `vectorize=True`, ...) is called here.

    Example:
        >>> import torch, autojac
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> autojac.jacobian(lambda x: x ** 2, x)
        tensor([[2., 0.],
                [0., 4.]], dtype=torch.float64)
    """
    _refuse_unknown(unknown, "jacobian")
    _check_options(mode, vectorize, chunk_size, "jacobian")
    _check_flags("jacobian", create_graph=create_graph, strict=strict, cache=cache, progress=progress)
    _check_callable(f, "jacobian")
    xs, signature = check_inputs(inputs, "jacobian")
    memory_budget = normalize_budget(memory_budget, "jacobian")
    if plan is not None:
        _check_plan(plan, signature, mode, vectorize, chunk_size, memory_budget)
    modules = modules_of(f)
    transform = outer_transform(xs)
    if plan is None and cache and transform is None:
        plan = _cache.get(f, _plan_key(signature, mode, vectorize, chunk_size, memory_budget, create_graph, modules))
    with _user_call_state(xs) as xs:
        evaluator = Evaluator(f, signature.device, modules, once=plan is not None and _evaluates_once(plan, f))
        try:
            if transform is not None:  # NOTE: [Why composed calls take their own path]
                if strict:
                    _check_strict(evaluator, xs)
                return composed_jacobian(evaluator, xs, signature, plan.mode if plan is not None else mode, chunk_size)
            if plan is None:
                plan = _plan(f, evaluator, xs, signature, modules, mode, vectorize, chunk_size, memory_budget, create_graph, cache, "jacobian")
            if strict:
                _check_strict(evaluator, xs)
            return _execute(plan, f, evaluator, xs, create_graph, progress)
        finally:
            evaluator.finish()


def _check_plan(plan: object, signature: Signature, mode, vectorize, chunk_size, memory_budget) -> None:
    if not isinstance(plan, Plan):
        raise InputTypeError(f"jacobian: `plan` must be an autojac.Plan from `autojac.plan(...)`, but got {type(plan).__name__}.")
    if (mode, vectorize, chunk_size, memory_budget) != ("auto", "auto", None, None):
        raise InputError("jacobian: `plan` already fixes the method, chunk size and budget, but `mode`, `vectorize`, `chunk_size` or `memory_budget` was also given. Pass those to `autojac.plan(...)` instead.")
    rows = plan.signature.mismatches(signature)
    if rows:
        raise PlanMismatchError("jacobian: `plan` was made for other inputs; it cannot be reused here:\n  " + "\n  ".join(rows) + "\nMake a new plan with `autojac.plan(f, inputs)`.")


def _check_strict(f: Callable, xs: Sequence[torch.Tensor]) -> None:
    """Raise StrictError if some output's graph does not reach some input."""
    leaves = grad_inputs(xs, create_graph=False)
    with torch.enable_grad():
        ys = call(f, leaves)
    for i, y in enumerate(ys):
        reached = (
            torch.autograd.grad(y, leaves, torch.ones_like(y), retain_graph=True, allow_unused=True)
            if y.requires_grad else (None,) * len(leaves)
        )
        for j, g in enumerate(reached):
            if g is None:
                raise StrictError(f"jacobian: with strict=True every output must depend on every input, but output {i} is independent of input {j}. Pass strict=False to get zeros for that block.")


def _execute(plan: Plan, f: Callable, evaluator: Evaluator, xs: Sequence[torch.Tensor], create_graph: bool, progress: bool | None):
    """Run the plan's method, verified on its first use for `f`; on failure, the fallbacks in turn.

    A method whose Jacobian fails verification is not trusted again for `f`: if
    it evaluates `f` more than once, `f`'s evaluations disagree (a generator of its
    own, state it keeps), and only methods that evaluate it once are tried after.
    """
    failures: list[tuple[str, BaseException]] = []
    checks = plan.checks
    for chosen, chunk_size in _attempts(plan):
        if not chosen.evaluates_once and checks.evaluations_disagree(f):
            continue
        verify = not checks.verified(f, chosen.name)
        bar = _progress_bar(plan, chosen, progress)
        try:
            result = run_method(chosen, evaluator, xs, plan.problem, chunk_size, create_graph, plan.history,
                                None if bar is None else bar.update,
                                check=(lambda m, state, res: check_result(m, state, res, evaluator, xs, plan.problem)) if verify else None)
            if verify:
                checks.mark_verified(f, chosen.name)
            return result
        except Exception as exc:
            failure = exc
        finally:
            if bar is not None:
                bar.close()
        # Outside the except block, so that an error of `f` itself propagates unchanged.
        if isinstance(failure, VerificationError):
            if not chosen.evaluates_once:
                checks.mark_evaluations_disagree(f)
        else:
            problem = describe(evaluator, xs, plan.signature)
            if (problem.out_shapes, problem.out_dtypes) != (plan.problem.out_shapes, plan.problem.out_dtypes):
                raise PlanMismatchError(f"jacobian: `f` now returns outputs of shapes {list(problem.out_shapes)}, but the plan was made when it returned {list(plan.problem.out_shapes)}. Pass cache=False, or make a new plan.") from failure
        failures.append((chosen.name, failure))
        plan.history.append(f"{chosen.name} failed ({type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''})")
        logger.debug(plan.history[-1])
    if not failures:
        raise UnsupportedFunctionError(f"jacobian: `f` gives different results on identical evaluations (a random generator of its own, or state it changes), and none of the allowed methods evaluates it only once. Use mode='reverse' or mode='forward-trick' with vectorize='vmap' or 'loop'.")
    name, last = failures[-1]
    tried = "; ".join(f"{n}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for n, e in failures)
    if isinstance(last, UnsupportedFunctionError) and len(failures) == 1:
        raise last
    if is_out_of_memory(last):
        raise MemoryBudgetError(f"jacobian: {name} ran out of memory even one basis vector at a time ({tried}). Free memory, pass a `memory_budget` so the planner can choose a method that fits, or use mode='reverse' when `f` has fewer outputs than inputs.") from last
    if isinstance(last, VerificationError):
        advice = ("`f` gives different results on identical evaluations (a random generator of its own, or state it changes); "
                  "use mode='reverse', or mode='forward-trick' with vectorize='vmap' or 'loop', which evaluate it once.")
    else:
        advice = _advice(plan.mode, plan.vectorize) if len(failures) == 1 else "Every feasible method was tried."
    raise UnsupportedFunctionError(f"jacobian: {name} could not differentiate `f`: {tried}. {advice}") from last


LAST_RESORT_CHUNK = 32
"""Basis vectors built at a time by the last resort, reverse/loop (its memory hardly grows with it)."""


def _attempts(plan: Plan):
    """The chosen method, then (only if it fails) the fallbacks: lazily, to keep cached calls cheap.

    Last comes reverse/loop, if the plan allowed it and it was not among them (a
    mode pruned for its many passes is never measured): one evaluation of `f`
    and plain autograd, torch's own loop, for an `f` that nothing else can do.
    """
    yield method(plan.mode, plan.vectorize, plan.engine), plan.chunk_size
    tried = {plan.name}
    for c in plan.fallbacks:
        tried.add(c.name)
        yield method(c.cost.mode, c.cost.vectorize, c.cost.engine), c.chunk_size or 1
    if "reverse/loop" not in tried and any(c.name == "reverse/loop" and c.cost.error is None for c in plan.candidates):
        yield method("reverse", "loop"), min(LAST_RESORT_CHUNK, max(plan.problem.n_out, 1))


def _progress_bar(plan: Plan, method: Method, progress: bool | None):
    show = progress if progress is not None else (
        (plan.estimated_seconds or 0.0) > PROGRESS_AFTER_SECONDS and sys.stderr.isatty()
    )
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=method.basis_size(plan.problem), desc=f"autojac {method.name}", unit="vec", file=sys.stderr)
