"""The public entry points: `jacobian`, `plan`, `tune`, and the plan cache's controls."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._core.errors import InputError, InputTypeError, PlanMismatchError
from .._core.evaluation import Evaluator, inside_evaluation, module_modes
from .._core import pytree
from .._core.options import EFFORTS, Options, check_callable, check_flag, make_options, refuse_unknown
from .._core.pytree import Arguments
from .._core.problem import Signature, check_inputs
from .._methods.base import evaluate_plain
from .._planning import first_call as first, later_calls as later, session, store
from .._planning.cache import PlanCache
from .._planning.entry import PlanEntry
from .._planning.keys import argument_signature, describe_function, stable
from .._planning.plan import Plan, RunReport
from .._execute.sparse import as_output
from .aux import AuxRecorder
from .compose import composed_jacobian, outer_transform

logger = logging.getLogger("autojac")

_cache = PlanCache()
_reports = threading.local()


def clear_cache() -> None:
    """Forget every plan made or loaded in this process (for example after freeing a lot of memory)."""
    _cache.clear()
    store.forget()


def last_report() -> RunReport | None:
    """What this thread's latest `jacobian` call did: method, chunks, evaluations of `f`, checks, fallbacks."""
    return _last_report()


@contextlib.contextmanager
def _user_call_state(xs: Sequence[torch.Tensor]):
    """Leave inference mode for the call (autograd needs it off), with normal copies of inference tensors."""
    if not torch.is_inference_mode_enabled():
        yield xs
        return
    with torch.inference_mode(False):
        yield tuple(x.clone() if x.is_inference() else x for x in xs)


def _describe(f: Callable, arguments: Arguments, has_aux: bool) -> tuple[tuple, tuple]:
    """(the key part for `f` and the arguments it is not differentiated in, the modules `f` uses)."""
    function_key, modules = describe_function(f)
    if arguments.argnums is None:
        return (function_key, has_aux), modules
    found = {id(m): m for m in modules}
    fixed = tuple(None if i in arguments.argnums else argument_signature(a, found)
                  for i, a in enumerate(arguments.fixed))
    return (function_key, has_aux, arguments.argnums, arguments.argnums_int, fixed), tuple(found.values())


def _key(function_key, signature: Signature, options: Options, modules) -> tuple:
    """What a plan depends on: the function's code and captures, the inputs, the options, grad mode, module modes."""
    return (function_key, signature, options.key(), torch.is_grad_enabled(), module_modes(modules))


def _stable_key(key: tuple) -> str | None:
    """The key as text that means the same in another process, or None (see `keys.stable`)."""
    function_key, signature, option_key, grad, modes = key
    spec = pytree.dumps(signature.spec)
    if spec is None:
        return None
    form = stable((function_key, signature.shapes, signature.dtypes, signature.device.type, spec,
                   option_key, grad, modes))
    return None if form is None else json.dumps(form, default=str)


def _finish(call: session.Call, seconds: float | None, planned: bool) -> None:
    _reports.last = (call, seconds, planned)  # the report is built only if asked for


def _forget_report() -> None:
    _reports.last = None


def _last_report() -> RunReport | None:
    last = getattr(_reports, "last", None)
    if last is None or isinstance(last, RunReport):
        return last
    call, seconds, planned = last
    _reports.last = report = call.report(seconds, planned)
    return report


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
    argnums: int | tuple[int, ...] | None = None,
    has_aux: bool = False,
    sparsity: object = "auto",
    output: str = "dense",
    **unknown: object,
):
    """The full Jacobian of `f` at `inputs`, by the fastest method that fits in memory.

    The result nests output-major, as `torch.func.jacrev` does: `f`'s output
    structure, each output tensor replaced by the input structure of blocks of
    shape `output.shape + input.shape`. For a tensor or a tuple of tensors on
    either side that is exactly `torch.autograd.functional.jacobian`'s result:
    one tensor for one input and one output; tuples per output of tuples per
    input otherwise. Blocks have the dtype and device of their input.

    Args:
        f: a function or `nn.Module`. It returns a tensor or a structure of
            tensors (tuple, list, dict, namedtuple; namedtuples come back as
            namedtuples). Module parameters are not differentiated.
        inputs: a tensor, a tuple of positional arguments for `f`, or one other
            structure (a dict, a list, a namedtuple) passed as one argument. Each
            argument may itself be a structure of floating-point tensors, all on
            one device. They are never modified.
        argnums: as in `torch.func`: an int or a tuple of ints, the positional
            arguments to differentiate (the others may be anything and are passed
            through); the result's input side is that argument's structure, or a
            tuple of them. None: every argument.
        has_aux: `f` returns `(output, aux)`; the call returns `(jacobian, aux)`,
            aux from one plain evaluation of `f` (detached unless `create_graph`).
        sparsity: "auto" (the planner looks for structure when it can pay, see
            below), None (dense only), or a bool tensor marking where the
            Jacobian may be nonzero, `(n_out, n_in)` or `out_shape + in_shape`
            (then one seed per colour of it is pushed; the result is checked).
        output: "dense" (torch's structure, default), "sparse" (torch sparse COO
            blocks in the same shapes, the zeros never stored when the plan is
            sparse), or "csr" (each block a 2-D `(out.numel(), in.numel())` CSR
            matrix, for solvers).
        mode: "reverse" (one VJP per output element), "forward" (one native JVP
            per input element), "forward-trick" (JVPs from the double-VJP trick:
            needs only backward formulas and double backward), or "auto".
        vectorize: "vmap" (`torch.func.vmap` / `is_grads_batched` over a chunk of
            basis vectors), "repeat" (the repeat trick: `f` runs once on k copies
            of the input; needs a batch-aware `f`), "loop" (one basis vector at a
            time through `torch.autograd`), or "auto".
        chunk_size: basis vectors per batched pass, honoured exactly (balanced:
            `ceil(n / ceil(n / chunk_size))` each); None lets autojac choose.
            A chunk of 1 never uses vmap.
        memory_budget: bytes this call may allocate, the result included: None
            (half the free memory of the inputs' device), an int, a string such as
            "512MiB" or "2GB", or a float in (0, 1] (that share of free memory).
        create_graph: return a differentiable Jacobian (for higher derivatives).
        strict: raise `StrictError` if an output does not depend on an input;
            otherwise that block is zeros.
        plan: a `Plan` from `autojac.plan(...)` or `autojac.tune(...)`: run exactly
            its method and chunk size, with no exploration.
        cache: reuse the plan made for the same function (same code and captured
            shapes), inputs and options (default); False plans afresh, keeps nothing.
        progress: a tqdm bar on stderr; None shows it when the call is expected
            to take over 10 s and stderr is a terminal (a first call projects
            from its latest chunk's pace, from its second chunk on).

    How autojac chooses (mode and vectorize "auto"):

    - Inside a torch.func transform or forward-mode AD it does not plan: it
      computes with `torch.func.vjp`/`jvp` on the inputs as given, so the outer
      transform differentiates the result.
    - A plan is looked up by the function's code and the shapes of what it
      captures (a lambda or partial rebuilt each step reuses it), the inputs'
      shapes and dtypes, the options (the budget in bytes), the grad mode and the
      training flags of the modules `f` uses.
    - A new plan is made by the first call, which computes the Jacobian as it goes:
      - `f` is evaluated once with a plain autograd graph, to learn the output
        shapes. If the result (plus that forward pass) does not fit the budget,
        `MemoryBudgetError` comes now, before any basis vector is pushed; with
        `output="sparse"` or `"csr"` the sparsity pattern is found first and the
        sparse result must fit (finding it is charged 192 bytes a nonzero).
      - Reverse mode, unless the outputs outnumber the inputs over 4x: then the
        double-VJP trick (which needs no forward formulas and starts from the same
        evaluation). If `f` drew random numbers, only methods that evaluate it
        once are allowed, so the result is the Jacobian of one realization.
      - A basis of at most 2 vectors is looped on that evaluation (for reverse
        mode: torch's own loop); otherwise vmap with the autograd engine, unless
        it would loop over ops it has no batching rule for: the evaluation's graph
        is walked and a table of torch's vmap fallbacks per backward node gives
        the looped op calls of a batched backward; at a cost (looped calls x rows
        x 3.3 us) above what the torch.func engine adds (an evaluation of `f`,
        0.175 ms and 7.5 us a graph node), the torch.func engine goes first.
        Otherwise over 100 rows a probe (8 vectors pushed batched through that
        evaluation's backward, timed, and kept as the first rows; also run where
        structure might pay) counts the loops of nodes the table does not know,
        and finds batching no faster than half a plain VJP per vector, at a like
        cost: then the torch.func engine goes first. Below 100 rows, with nodes
        the table does not know, the autograd engine's own run counts its loops,
        for later calls' order. If a method fails, the next: the other engine,
        the loop, the other modes. A first call of 3 or 4 reverse rows runs
        torch's own loop instead (it needs no check) and leaves that method to
        the second call, which runs, measures and checks it.
        If that evaluation wrote in place into a tensor `f` captures (a counter,
        a running average that is not a module buffer), the plan settles on the
        method that worked: each call evaluates `f` once and nothing is explored.
      - Chunks: the whole basis if a prior (twice the forward pass plus one input
        and one output per vector) says it fits the budget with room to spare.
        On the CPU without a budget the forward pass is not measured: it is
        bounded by its time at twice the fastest rate pages were touched, and a
        run on torch.autograd's vmap by the probe's pace a vector; when that
        bound would call for measuring a reverse vmap run (and the evaluation
        took 4x what touching the result's pages could), the reference VJP is
        measured instead, and the run bounded by twice its peak a vector plus
        the largest tensor `f` holds (the smallest bound decides); chunks are
        measured only when that bound over the basis passes a quarter of the
        room. Otherwise
        a first chunk that fits by that prior, measured (CUDA allocator
        peak, or the process's peak RSS on Linux), then chunks that grow at most
        4x at a time while the measured line says they fit (on the CPU, a
        chunk larger than any measured with 8 MiB, or the largest operand `f`
        holds if smaller, kept back for the kernels' new workspaces) and a
        larger chunk still saves time per vector, and take all that is left at
        once when the line puts it under 1/16 of the budget's room (at most 16x the largest
        chunk measured). Once the largest chunk of 64 vectors or more is not 5%
        faster per vector than a smaller one, the run and the plan's later calls
        keep to the size that was fastest.
      - Structure (sparsity="auto"): when the dense Jacobian has at least 64
        passes and could be long (a trace estimated under a quarter of it; at
        the engine probe's pace only where the autograd engine it timed runs
        first), its first slice is timed; if a trace (about 40
        evaluations of `f`) is under 10% of the projected dense Jacobian (50%
        when at most 1/16 of the slice's entries are nonzero), the pattern is
        detected (a sparse first row, at most 1/16 nonzero, with the dense run
        at a fifth of a VJP a row putting the trace under half of it, decides at
        once, before the engine probe; then sparse probe rows whose pace does
        the same, with no slice; stopped past 3x that projection, or as soon as it is
        too full to halve the passes) and coloured, and compression is used when
        it needs at most half the dense passes. An `f` evaluated in under 2 ms is
        traced on its real values, its calls checked until the second call's
        fake-tensor trace confirms the pattern. A pattern is found for the values
        `f` holds: a call on other captured tensors (or the same ones written
        since) is checked, and a pattern that fails there is found again for
        them (the call plans as a first call does); once the pattern has changed
        with the values, a call on new values plans again before computing.
      - The result is verified (see "Never silently wrong" in the README) before
        it is returned; a method that fails the check hands over to the next.
        If `f`'s backward fails under the check's VJP (a custom Function with a
        forward-mode formula only) and forward mode is allowed, the call plans
        again in forward mode, checked by Jacobian-vector products instead.
    - Later calls run the plan's method (its chunk size from its measured memory
      line under a budget). While a plan is not settled, every call adds 10% of the
      plan's fastest call to an exploration credit (a new plan starts with half its
      first call's time) and every trial is charged all it cost beyond a plan's
      call. Trials wait for the plan's method's first warm call (the second),
      except behind torch.autograd's vmap when the first call counted it looping
      over ops. When the credit covers what the next alternative costs before its
      first vector (0.5 ms of the trial's own, its evaluation of `f`, its first
      run's check, a repeat method's checks) and a pessimistically priced first
      slice (a batched method of at most 64 vectors: its whole run, less what it is
      predicted to save), that call runs the alternative on that slice, projects
      its whole time, and either finishes the call with it or gives the rest to the
      plan's method. Alternatives are tried in order of predicted time (loops from
      the measured evaluation and VJP; vmap and repeat from the plan's own time,
      the repeat trick before the other vmap engine; a repeat method's time
      counts the check it would pay on each call that brings new captured
      values, at the share of recent calls that did, as when a closure is
      rebuilt around new tensors):
      a mode needing over 4x the passes, or a method predicted over 4x slower, is
      not tried, nor vmap and repeat for a mode of one pass (a scalar loss: the
      loop's own product); a trial whose first slice projects over 1.5x the plan's time (its
      one evaluation of `f` counted once, the slice's chunk scaled up; the plan's
      time with the checks a repeat plan pays on new captured values) stops
      there, and if that projection is under 4x, the alternative gets one whole
      run before the plan settles. Under a budget, forward modes are not tried when a zero tangent the size
      of the largest tensor `f` holds would not fit. A measured alternative whose
      fastest whole call beats the plan's method by over 3% replaces it (by
      over 20% while that method has run only once, cold, or on the torch.func
      engine fewer than 3 times); one within
      2x runs two more whole calls first (a first run is a cold one, or sliced, and
      torch.func warms up over two or more calls), and more, up to 6 in all, while
      its latest run is its fastest by over 10%; each waits for credit only if it
      is expected slower than the plan's call. Structure
      is one more alternative: a dense plan (64 passes or more, no budget given)
      whose first call did not look for it looks once the credit covers a trace,
      and the next call plans again with a pattern that halves the passes. If
      the plan's Jacobian, read by its second call (every row and column up to
      2^14 entries, else 16 sampled rows and columns; no look or trial before
      that), allows a
      colouring of at most 1/8 of the passes, the look comes before any trial
      and may also draw on what that bound saves over 5 calls (trials wait for
      it only while 10 more calls' share would let it be taken). The dense plan is
      kept beside the structured one: after 6 calls of it (or once it settles),
      a dense plan faster by 3% takes the key back, and does not look again.
      When nothing is left to try, the plan is settled and calls measure nothing.
    - At run time an out-of-memory chunk is retried at half the size (down to 1);
      a method that fails otherwise hands over to the next feasible one, and last
      to reverse/loop.

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
    return _jacobian("jacobian", f, inputs, mode=mode, vectorize=vectorize, chunk_size=chunk_size,
                     memory_budget=memory_budget, create_graph=create_graph, strict=strict, plan=plan, cache=cache,
                     progress=progress, argnums=argnums, has_aux=has_aux, sparsity=sparsity, output=output, **unknown)


def _jacobian(
    who: str,
    f: Callable,
    inputs: Any,
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
    argnums: int | tuple[int, ...] | None = None,
    has_aux: bool = False,
    sparsity: object = "auto",
    output: str = "dense",
    **unknown: object,
):
    """`jacobian`, its errors named for `who`: "jacobian", or "hessian" / "batch_jacobian" for the Jacobians those
    compute through it (the user called them, so their messages name them)."""
    refuse_unknown(unknown, who)
    options = make_options(who, mode=mode, vectorize=vectorize, chunk_size=chunk_size,
                           memory_budget=memory_budget, create_graph=create_graph, strict=strict,
                           cache=cache, progress=progress, sparsity=sparsity, output=output)
    check_callable(f, who)
    check_flag(who, "has_aux", has_aux)
    xs, signature, arguments = check_inputs(inputs, who, argnums)
    function_key, modules = _describe(f, arguments, has_aux)
    transform = outer_transform(xs)
    if transform is None and not options.create_graph and _differentiated_from_outside(xs):
        options = dataclasses.replace(options, create_graph=True)  # NOTE: [A Jacobian inside f]
    if plan is not None:  # after the line above: a plan must have been made for the create_graph this call runs
        _check_plan(plan, signature, options, who)
    key = entry = None
    if plan is not None:
        entry = plan.entry
    elif transform is None and options.cache:
        key = _key(function_key, signature, options, modules)
        entry = _cache.get(key)
    recorder = AuxRecorder(f, who) if has_aux else None
    inference = torch.is_inference_mode_enabled()
    with (_user_call_state(xs) if inference else contextlib.nullcontext(xs)) as xs:
        evaluator = Evaluator(recorder or f, signature.device, modules, once=_evaluates_once(entry, plan) and not has_aux,
                              arguments=arguments, watch_captured=entry is None)
        if recorder is not None:
            recorder.evaluator = evaluator
        call = session.Call(evaluator, xs, signature, options, who)
        call.captures = (f, function_key, modules)
        if plan is not None and entry.function_key is not None and entry.function_key != function_key:
            # A plan made for another function: what was checked on that one says nothing about this one.
            call.must_verify, call.values_now = True, entry.values_seen
        try:
            if transform is not None:  # NOTE: [Why composed calls take their own path]
                if options.strict:
                    session.check_strict(evaluate_plain(evaluator, xs, False), who)
                result = composed_jacobian(evaluator, xs, signature, plan.mode if plan is not None else options.mode,
                                           chunk_size, who)
            else:
                result = _run(call, entry, key, plan)
            result = as_output(result, signature.sizes, options.output)
            return result if recorder is None else (result, recorder.aux(xs, options.create_graph))
        finally:
            evaluator.finish()


def _differentiated_from_outside(xs) -> bool:
    """NOTE: [A Jacobian inside f]: `jacobian(g, x)` where g calls `jacobian(f, y)` is meant to be the Hessian,
    but a Jacobian computed without `create_graph=True` is a constant to autograd, so a reverse-mode outer call
    would differentiate it to zero (torch's `jacobian` nested in itself does), while a forward-mode outer call
    runs the inner one composed and gets the Hessian (and its check against a reverse product then failed).
    So a Jacobian taken inside an autojac evaluation of `f`, with grad recording and inputs that require grad,
    always builds its graph: every outer method differentiates through it. Detach the inputs (or run under
    `torch.no_grad()`) for a Jacobian that should stay constant."""
    return bool(inside_evaluation()) and torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _evaluates_once(entry: PlanEntry | None, plan: Plan | None) -> bool:
    """Whether the call will surely evaluate `f` once: then the evaluator need not save any state upfront."""
    if entry is None or entry.incumbent is None or entry.follows_values:
        # A plan that follows the values `f` holds may plan again before any evaluation (NOTE: [A pattern found
        # again]): that first call must learn from a snapshot whether `f` draws random numbers.
        return False
    name = plan.name if plan is not None else entry.incumbent
    stats = entry.stats[name]
    if not ((entry.settled or plan is not None) and stats.verified and stats.runs and not entry.reverify):
        return False
    if stats.method.evaluates_once:
        return True
    n = stats.method.passes(entry.problem.col_passes, entry.problem.row_passes)  # repeat: once per chunk
    return stats.method.vectorize == "repeat" and entry.chunk_size(name) >= n


def _run(call: session.Call, entry: PlanEntry | None, key, plan: Plan | None):
    options = call.options
    planned = False
    began = time.perf_counter()
    try:
        if plan is not None:
            result = later.fixed_call(call, entry, plan.name, plan.chunk_size)
        else:
            if entry is None and key is not None:
                entry = _loaded_entry(key, options)
                if entry is not None:
                    _cache.put(key, entry)
            if entry is None:
                result, entry = first.first_call(call)
                planned = True
                if key is not None:
                    _cache.put(key, entry)
            elif entry.layout_found is not None and key is not None:
                # A later call of this plan found structure that pays: the plan is made again with it, and the
                # dense plan is kept until the two are weighed (NOTE: [A found pattern measured against the
                # dense plan]).
                dense = entry
                result, entry = first.first_call(call, layout_found=dense.layout_found)
                dense.layout_found = None
                if entry.problem.layout is not None:
                    entry.dense_plan = dense
                planned = True
                _cache.put(key, entry)
            else:
                if options.strict:
                    session.check_strict(evaluate_plain(call.f, call.xs, False), call.who)
                result = later.later_call(call, entry)
                if entry.dense_plan is not None and key is not None:
                    back = later.judge_structure(entry)
                    if back is not None:
                        _cache.put(key, back)
    except session.PatternFailed as exc:  # NOTE: [Patterns and values]
        logger.debug("the sparsity pattern failed the check, or the values it follows changed: planning again")
        result, entry = first.after_pattern_failed(call, exc.failure, later=True, layout=exc.layout)
        planned = True
        if key is not None:
            _cache.put(key, entry)
    except session.OutputsChanged as exc:
        if plan is not None:
            raise PlanMismatchError(f"{call.who}: {exc}. Make a new plan with {_plan_call(call.who)}.") from None
        logger.debug("%s: making a new plan", exc)
        result, entry, planned = _plan_again(call, key)
    except session.NeedsTangents as exc:
        # A plan made before its check's VJP failed (an estimate, a loaded plan, a torch loop first): made again,
        # in forward mode checked by tangents (NOTE: [Checks by tangents]).
        if plan is not None:
            raise PlanMismatchError(
                f"{call.who}: `f`'s backward fails ({session._first_line(exc.__cause__)}), and this plan was made "
                f"before autojac knew it: its method is checked by a VJP. Make a new plan with "
                f"{_plan_call(call.who)}, which computes and checks it in forward mode.") from None
        logger.debug("the check's VJP failed: making a new plan")
        result, entry, planned = _plan_again(call, key)
    if entry is not None and entry.function_key is None:
        entry.function_key = call.captures[1]
    _finish(call, time.perf_counter() - began, planned)
    return result


def _plan_again(call: session.Call, key) -> tuple[object, PlanEntry, bool]:
    """Drop the cached plan and make a new one, as a first call: (result, entry, planned)."""
    if key is not None:
        _cache.pop(key)
    result, entry = first.first_call(call)
    if key is not None:
        _cache.put(key, entry)
    return result, entry, True


def _loaded_entry(key, options: Options) -> PlanEntry | None:
    if not store.has_plans():
        return None
    stable_key = _stable_key(key)
    if stable_key is None:
        return None
    data = store.lookup(stable_key)
    if data is None:
        return None
    try:
        return store.entry_from(data, options)
    except Exception as exc:  # noqa: BLE001 - a damaged record is ignored, never trusted
        logger.debug("ignoring a saved plan: %s", exc)
        return None


def _plan_call(who: str, *options: str) -> str:
    """How to make the plan that `who` takes back with `plan=` (with `options`, such as "create_graph=True")."""
    arguments = ["f", "inputs", *options] + ([] if who == "jacobian" else [f'kind="{who}"'])
    return f"`autojac.plan({', '.join(arguments)})`"


def _check_plan(plan: object, signature: Signature, options: Options, who: str = "jacobian") -> None:
    if not isinstance(plan, Plan):
        raise InputTypeError(f"{who}: `plan` must be an autojac.Plan from {_plan_call(who)}, but got {type(plan).__name__}.")
    if (options.mode, options.vectorize, options.chunk_size, options.budget) != ("auto", "auto", None, None):
        raise InputError(f"{who}: `plan` already fixes the method, chunk size and budget, but `mode`, `vectorize`, `chunk_size` or `memory_budget` was also given. Pass those to `autojac.plan(...)` instead.")
    if plan.entry is None:
        raise InputError(f"{who}: this `plan` holds no measurements (it was not made by `autojac.plan` or `autojac.tune`). Make one with {_plan_call(who)}.")
    if options.create_graph and not plan.entry.options.create_graph:
        # Its first call did not look for what a Jacobian to differentiate needs (NOTE: [Second derivatives
        # through @once_differentiable]).
        raise PlanMismatchError(f"{who}: `plan` was made without create_graph=True, which this call asks for. Make one with {_plan_call(who, 'create_graph=True')}.")
    rows = plan.signature.mismatches(signature)
    if rows:
        raise PlanMismatchError(f"{who}: `plan` was made for other inputs; it cannot be reused here:\n  " + "\n  ".join(rows) + f"\nMake a new plan with {_plan_call(who)}.")


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
    effort: str = "measure",
    time_limit: float | None = None,
    argnums: int | tuple[int, ...] | None = None,
    has_aux: bool = False,
    sparsity: object = "auto",
    output: str = "dense",
    kind: str = "jacobian",
    **unknown: object,
) -> Plan:
    """Decide how `jacobian(f, inputs, ...)` runs, and show why, as a `Plan`.

    `effort` is how much work the decision may take, in the spirit of FFTW:
    "estimate" evaluates `f` once and applies the rules (nothing is measured);
    "measure" (default) computes the Jacobian once as a first call would, so the
    plan holds that method's measured time and memory (or returns the cached
    plan, as it stands now); "exhaustive" then tries every alternative on whole
    Jacobians until the plan settles or `time_limit` seconds pass (`autojac.tune`).
    The plan is cached as `jacobian` would cache it, so later calls use it. Takes
    the same options as `jacobian`; the rules are in its docstring.

    `kind="hessian"` or `"batch_jacobian"` plans what `autojac.hessian` or
    `autojac.batch_jacobian` would run with the same arguments (both take the
    plan back with `plan=`).
    """
    refuse_unknown(unknown, "plan")
    f, inputs, argnums = _of_kind(kind, f, inputs, argnums, has_aux, mode, "plan")
    return _plan("plan", f, inputs, effort, time_limit, argnums, has_aux, dict(
        mode=mode, vectorize=vectorize, chunk_size=chunk_size, memory_budget=memory_budget, create_graph=create_graph,
        strict=strict, cache=cache, sparsity=sparsity, output=output))


def tune(
    f: Callable,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    time_limit: float | None = 30.0,
    mode: str = "auto",
    vectorize: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | float | str | None = None,
    create_graph: bool = False,
    cache: bool = True,
    argnums: int | tuple[int, ...] | None = None,
    has_aux: bool = False,
    sparsity: object = "auto",
    output: str = "dense",
    kind: str = "jacobian",
    **unknown: object,
) -> Plan:
    """Exhaustive search: time every alternative on whole Jacobians until the plan settles (or `time_limit` s).

    The same as `plan(..., effort="exhaustive")`. Later `jacobian` calls with the
    same function, inputs and options use the settled plan and measure nothing.
    """
    refuse_unknown(unknown, "tune")
    f, inputs, argnums = _of_kind(kind, f, inputs, argnums, has_aux, mode, "tune")
    return _plan("tune", f, inputs, "exhaustive", time_limit, argnums, has_aux, dict(
        mode=mode, vectorize=vectorize, chunk_size=chunk_size, memory_budget=memory_budget, create_graph=create_graph,
        cache=cache, sparsity=sparsity, output=output))


def _of_kind(kind: str, f, inputs, argnums, has_aux: bool, mode: str, who: str):
    """(function, inputs, argnums) that `hessian` / `batch_jacobian` hand to `jacobian`, for a plan of those."""
    if kind == "jacobian":
        return f, inputs, argnums
    from .derived import batch_target, gradient_target

    if kind == "hessian":
        target, argnums = gradient_target(f, inputs, argnums, has_aux)
        return target, inputs, argnums
    if kind == "batch_jacobian":
        target, target_inputs = batch_target(f, inputs, mode, who)
        return target, target_inputs, None
    raise InputError(f"{who}: `kind` must be 'jacobian', 'hessian' or 'batch_jacobian', but got {kind!r}.")


def _plan(who: str, f, inputs, effort: str, time_limit, argnums, has_aux, raw: dict[str, Any]) -> Plan:
    options = make_options(who, **raw)
    check_flag(who, "has_aux", has_aux)
    if effort not in EFFORTS:
        raise InputError(f"{who}: `effort` must be one of {', '.join(map(repr, EFFORTS))}, but got {effort!r}.")
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or time_limit <= 0):
        raise InputError(f"{who}: `time_limit` must be None or a positive number of seconds, but got {time_limit!r}.")
    check_callable(f, who)
    xs, signature, arguments = check_inputs(inputs, who, argnums)
    if outer_transform(xs) is not None:
        raise InputError(f"{who}: cannot plan inside a torch.func transform or forward-mode AD, where timings and memory are the outer transform's. Make the plan outside, or call `autojac.jacobian` there (it then runs torch.func products without planning).")
    function_key, modules = _describe(f, arguments, has_aux)
    key = _key(function_key, signature, options, modules)
    entry = _cache.get(key) if options.cache else None
    if entry is None and options.cache:
        entry = _loaded_entry(key, options)
    with _user_call_state(xs) as xs:
        recorder = AuxRecorder(f, who) if has_aux else None
        evaluator = Evaluator(recorder or f, signature.device, modules, arguments=arguments,
                              watch_captured=entry is None)
        if recorder is not None:
            recorder.evaluator = evaluator
        call = session.Call(evaluator, xs, signature, options, who)
        call.captures = (f, function_key, modules)
        try:
            try:
                if entry is None:
                    _, entry = first.first_call(call, compute=effort != "estimate")
                elif entry.effort == "estimate" and effort != "estimate":
                    later.later_call(call, entry, explore=False)
                if effort == "exhaustive":
                    later.tune(call, entry, time_limit)
            except session.PatternFailed as exc:  # NOTE: [Patterns and values]
                _, entry = first.after_pattern_failed(call, exc.failure, later=True, layout=exc.layout)
                if effort == "exhaustive":
                    later.tune(call, entry, time_limit)
            except session.NeedsTangents:  # NOTE: [Checks by tangents]: a plan made before its VJP failed
                _, entry = first.first_call(call)
                if effort == "exhaustive":
                    later.tune(call, entry, time_limit)
        finally:
            evaluator.finish()
    if entry.function_key is None:
        entry.function_key = function_key
    if options.cache:
        _cache.put(key, entry)
    return entry.snapshot()


def save_plans(path=None) -> int:
    """Save what every cached plan learnt to a JSON file (default: `$AUTOJAC_CACHE_DIR/plans.json` or
    `~/.cache/autojac/plans.json`); returns how many were saved.

    Plans of functions known only by identity (a captured object that is not a
    tensor, module, number, string or container of those) cannot be matched in
    another process and are left out.
    """
    records = []
    for key, entry in _cache.items():
        stable_key = _stable_key(key)
        if stable_key is not None and entry.incumbent is not None:
            with entry.lock:
                rec = store.record(stable_key, entry)
            if rec is not None:
                records.append(rec)
    store.save(path, records)
    return len(records)


def load_plans(path=None) -> int:
    """Load plans saved by `save_plans`; returns how many were kept.

    Plans saved with another torch version, device or CPU thread count are
    ignored. A loaded plan only says which method to start with: that method is
    verified on its first use, as any other.
    """
    kept, ignored = store.load(path)
    if ignored:
        logger.debug("load_plans: ignored %d plan(s) made with another torch, device or thread count", ignored)
    return kept
