"""A plan's first call: it computes the Jacobian with a first method chosen by rules, measuring as it goes
(NOTE: [Planning that pays for itself]), looks for structure where it can pay, and makes the plan; a pattern that
fails its check on new values is found again here (NOTE: [A pattern found again])."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import torch

from .._core.errors import AutojacError, MemoryBudgetError, UnsupportedFunctionError
from .._core.once import WALK_LIMIT, create_graph_once_error, custom_functions, unsafe_under_create_graph
from .._core.options import Options
from .._core.problem import Problem
from .._core.units import format_bytes, parse_budget
from .._execute.layout import collector, seeds
from .._execute.run import RunLog, is_out_of_memory
from .._execute import verify
from .._execute.verify import VerificationError, blocks_of, check_vectors
from .._measure.device import (allocated_bytes, free_memory, kept_by_libraries, total_bytes, untracked_margin,
                               untracked_reserve)
from .._measure.engine_loops import LoopProbe, backward_fallbacks
from .._methods.base import PlainGraph, evaluate_plain, grad_mode, vjp
from . import choose
from .choose import Facts, MethodId
from .entry import PlanEntry
from .keys import largest_captured_bytes
from .plan import seconds_text
from .session import (MEASURE_WHEN_PRIOR_ABOVE, NeedsTangents, PRIOR_FACTOR, PROGRESS_AFTER_SECONDS, Call, Progress, _batch_aware_once,
                      _check_outputs_unchanged, check_strict, _first_line, _learn, logger, _method, _no_method,
                      _planned_chunk, _record_failure, _sync, _trimming)
from .sizing import Sizer
from .structure import (DETECT_LIMIT, DETECT_SHARE, LOOKS_SPARSE, LOOP_TO_VMAP, MIN_PASSES, REAL_TRACE_BELOW,
                        STRUCTURE_BYTES_PER_NONZERO, layout_for, might_pay, worth_detecting)

CPU_TOUCH_BYTES_PER_THREAD_PER_SECOND = 12e9
"""An upper bound of how fast one CPU thread grows resident memory (touching new pages; 2x the fastest
measured, 5.9 GiB/s with transparent huge pages, benchmarks/results/cpu-2core-meter.md): what an
evaluation that took t seconds can have allocated, when it was not measured."""
FIRST_CHUNK_SECONDS = 1.0
STRUCTURE_SLICES = 8
STRUCTURE_SLICE_MAX = 64
"""When structure might pay, the dense run's first chunk is 1/STRUCTURE_SLICES of the basis, at most
STRUCTURE_SLICE_MAX vectors: its time decides (and is wasted if structure is found)."""
LOOP_SECONDS_PER_VECTOR = 3.3e-6
"""What one looped op call costs torch.autograd's vmap per vector of the chunk, beyond a batched op (fitted
on the 2-core CPU, first calls on the autograd engine against the torch.func one: a robot arm's 9 looped
cumsum/flip calls over 12 and 48 rows, 0.20 and 1.27 ms lost; a gated layer's one tanh_backward over 64 and
256 rows; 80 over 16 rows in an RK4 rollout). See NOTE: [The autograd engine's vmap loops]."""
PROBE_MIN_PASSES = 100
"""A first call probes the autograd engine for loops the table of backward nodes cannot tell (NOTE: [Loops read
off the graph]) only over this many rows: the probe costs about one VJP, under 5% of a vmapped run's bound
(LOOP_TO_VMAP of a VJP per row) from here on."""
PROBE_VECTORS = 8
LOOP_LIKE = 0.5
VMAP_PER_VJP = 0.2
"""The probe pushes PROBE_VECTORS vectors; over LOOP_LIKE of a plain VJP's time per vector beyond the first (the
first pays about a VJP's fixed work), the autograd engine's batching is loop-like, and the torch.func engine is
expected at VMAP_PER_VJP of a VJP per vector.
`tanh(W @ x)` with a 512 x 512 W (float64): torch.autograd's vmap runs `mv`'s backward as one `bmm` over
copies of W, 265 ms for the 512 rows against 12.5 ms for torch.func.jacrev and 81 ms for a loop of VJPs;
no op falls back to a loop, so counting loops alone missed it (`W @ x` only: `x @ W.T` and `nn.Linear` batch
as one matmul)."""
FUNC_FIXED_SECONDS = 1.75e-4
FUNC_SECONDS_PER_NODE = 7.5e-6
"""What putting the torch.func engine first costs a first call beyond its evaluation of `f` (which the autograd
engine does not need: it runs on the first evaluation's graph): this much of the transforms' own set-up, and
this much per node of `f`'s graph (the evaluation under `torch.func.vjp` and the vmapped backward, op by op).
Fitted with LOOP_SECONDS_PER_VECTOR on the 2-core CPU: a 3 -> 3 map of 6 nodes, +0.29 ms on the torch.func
engine; a CNN classifier of 20, +0.37 ms; an RK4 rollout of 985 nodes that loops 80 times over 16 rows, +9 ms;
the same rollout on 64-element states (1965 nodes, 160 loops, 64 rows), 3.6 ms faster."""


# --- the first call --------------------------------------------------------------------------------

def first_call(call: Call, compute: bool = True, layout_found=None) -> tuple[object, PlanEntry]:
    """Make a plan by computing the Jacobian (see NOTE: [Planning that pays for itself]); (result, entry).

    With `compute=False` (`plan(..., effort="estimate")`), stop after the first
    evaluation: the entry holds the rules' choice and nothing measured. If `f`'s
    backward fails under the check's VJP and forward mode is allowed, the plan is
    made again in forward mode, checked by tangents (NOTE: [Checks by tangents]).
    """
    try:
        return _first_call(call, compute, layout_found)
    except NeedsTangents as need:
        call.options = dataclasses.replace(call.options, mode="forward", sparsity=None)
        call.tangent_checks, call.vjp_failure = True, need.__cause__
        why = (f"`f`'s backward failed under the check's VJP ({_first_line(need.__cause__)}): planned again in "
               "forward mode, checked by Jacobian-vector products")
        call.events.append(why)
        logger.debug(why)
        result, entry = _first_call(call, compute, None)
        entry.events.append(why)
        return result, entry


def _first_call(call: Call, compute: bool, layout_found) -> tuple[object, PlanEntry]:
    options, device = call.options, call.device
    began = time.perf_counter()
    budget = parse_budget(options.budget, free_memory(device).free_bytes, call.who, total=total_bytes(device))
    # NOTE: [The CPU reserve]: BLAS and OpenMP workspaces appear in the peak RSS the meter reads, so measured
    # chunks include them; a first chunk sized by the prior alone keeps this much back for them.
    reserve = untracked_reserve(device)
    region = call.meter.region() if _measure_first_evaluation(options, device) else Timed(device)
    with region:
        graph = evaluate_plain(call.f, call.xs, options.create_graph)
    ys = graph.ys
    custom: list[str] = []
    if options.create_graph:  # NOTE: [Second derivatives through @once_differentiable], once per plan
        once, custom = custom_functions(ys, graph.xs)
        if once:
            raise create_graph_once_error(call.who, once)
    problem = Problem(
        inputs=call.signature,
        out_shapes=tuple(tuple(y.shape) for y in ys),
        out_dtypes=tuple(y.dtype for y in ys),
        out_spec=graph.out_spec,
        draws_random=call.f.draws_random,
        tangent_checks=call.tangent_checks,
        symmetric=bool(getattr(call.captures[0], "jacobian_is_symmetric", False)),
    )
    graph_bytes = region.peak_bytes
    measured_forward = graph_bytes is not None
    # Not measured: the forward pass is bounded by how fast pages can be touched. The bound decides whether
    # chunks must be measured, not their size (it is far above most real forward passes).
    graph_bound = graph_bytes if measured_forward else (
        int(_touchable_bytes(region.seconds)) if device.type == "cpu" else 0)
    graph_bytes = graph_bytes or 0
    forward_bytes = graph_bytes if measured_forward else 0
    # Bytes a basis vector may take before anything is measured (PRIOR_FACTOR), from the forward pass's bound.
    bound_prior = PRIOR_FACTOR * (graph_bound + max(problem.in_bytes, problem.out_bytes))
    # NOTE: [Structure first when only a sparse result fits]
    # A sparse output is asked for so that a Jacobian whose dense form cannot fit never exists densely (a
    # 450 x 450 heat equation: 305 GiB dense, 1.0 million nonzeros). When its dense blocks alone are over the
    # budget, the pattern is found before anything else (no dense probe or slice: their collector is the
    # dense result), used however many colours it takes, and the budget is held against the sparse result.
    # Only if no pattern fits is the call refused.
    structure_first = (problem.result_bytes + forward_bytes > budget and options.output != "dense"
                       and options.sparsity is not None)
    if not structure_first:
        _check_result_fits(call, problem, budget, forward_bytes,
                           hint=options.output == "dense" and options.sparsity is not None)
    if options.strict:
        check_strict(graph, call.who)
    # NOTE: [An f that writes what it captures]: every evaluation is a step the caller sees and no later
    # evaluation computes the same function, so one evaluation per call and nothing explored.
    writes_captured = call.f.writes_captured
    once_only = problem.draws_random or writes_captured
    candidates = choose.allowed(options, False)
    chain = choose.first_chain(options, problem.col_passes, problem.row_passes, once_only)
    if custom:  # NOTE: [Second derivatives through @once_differentiable]: graphs these methods build can be wrong
        candidates = [m for m in candidates if not unsafe_under_create_graph(m)]
        safe = [m for m in chain if not unsafe_under_create_graph(m)]
        if chain and not safe:
            raise UnsupportedFunctionError(
                f"{call.who}: create_graph=True and `f` uses custom autograd.Functions ({', '.join(custom)}): "
                "through them torch.autograd's batched backward and the double-VJP trick can build a Jacobian "
                "whose own derivatives are wrong, which no check sees, so those methods are not used, and "
                f"mode={options.mode!r}, vectorize={options.vectorize!r} leaves no other. Use mode='reverse' "
                "(vectorize 'vmap', 'loop' or 'repeat'), mode='forward', or 'auto'.")
        chain = safe
    if options.vectorize == "auto" and getattr(call.f.f, "__autojac_repeat_on_request__", False):
        # NOTE: [The sum trick's copies fold into the batch]: `batch_jacobian`'s functions, repeat trick asked for.
        candidates = [m for m in candidates if m.vectorize != "repeat"]
        chain = [m for m in chain if m.vectorize != "repeat"]
    if not chain and call.tangent_checks:
        raise UnsupportedFunctionError(
            f"{call.who}: `f` has no backward ({_first_line(call.vjp_failure)}), so only forward mode can "
            f"compute its Jacobian, and forward mode evaluates `f` more than once; but `f` "
            + ("writes in place into a tensor it captures" if writes_captured else "draws random numbers (dropout "
               "in training mode, torch.randn)")
            + ", so those evaluations would not be of one function. Put such modules in eval() mode, keep that "
            "state outside `f`, or give its custom autograd.Functions a backward.")
    if not chain:
        raise UnsupportedFunctionError(
            f"{call.who}: `f` draws random numbers (dropout in training mode, torch.randn), and "
            f"mode={options.mode!r}, vectorize={options.vectorize!r} evaluates it more than once, so its "
            "Jacobian would mix several realizations. Use mode='reverse', or mode='forward-trick' with "
            "vectorize='vmap' or 'loop', which evaluate it once; or put the modules in eval()."
        )
    # The safety net's reference, taken now on the plain evaluation (it also times one VJP, the unit of the
    # predictions), unless the first method is torch's own loop on that evaluation: it needs no check, and
    # its first row times a VJP as well. A fallback then takes the reference when it needs it.
    checks: dict[str, object] = {}
    loop_first = _loop_first(options, problem, chain, candidates, writes_captured)

    def reference_for_check():
        if "reference" not in checks:
            checks["w"] = check_vectors(problem)
            try:
                checks["reference"] = call.reference(problem, checks["w"], graph)
            except NeedsTangents:
                raise
            except Exception as exc:
                raise _no_reference(call, problem, exc) from exc
        return checks["w"], checks["reference"]

    retained = 0  # what the reference VJP left allocated beyond its own tensors (CUDA)
    vjp_peak = None  # NOTE: [A reverse run's memory bounded by one VJP's]
    if chain and (chain[0].is_reference or loop_first is not None) and not options.strict:
        vjp_seconds = region.seconds  # a VJP costs about an evaluation: only a bound for long runs, refined below
    else:
        # NOTE: [A reverse run's memory bounded by one VJP's]: not where a look for structure may make the run
        # one of a few colours, unless the evaluation is slow next to touching the dense result. A pattern given
        # or already found is certain; otherwise `might_pay` is read with the VJP, not timed yet, at
        # MAY_LOOK_VJP evaluations, so that most looks it later allows find the heap untrimmed.
        may_look = options.sparsity is not None and (
            not isinstance(options.sparsity, str) or layout_found is not None or structure_first
            or might_pay(problem, region.seconds, MAY_LOOK_VJP * region.seconds))
        measure_vjp = (not measured_forward and device.type == "cpu" and call.meter.kind != "none"
                       and _reverse_vmap(chain[0])
                       and (not may_look
                            or region.seconds >= TRIM_TOUCH_FACTOR * problem.result_bytes / _touchable_bytes(1.0))
                       and chain[0].passes(problem.col_passes, problem.row_passes) * bound_prior
                       > MEASURE_WHEN_PRIOR_ABOVE * max(budget - problem.result_bytes, 0))
        with torch.enable_grad():
            _sync(device)
            allocated = allocated_bytes(device)
            t = time.perf_counter()
            if measure_vjp:
                with call.meter.region() as vjp_region:
                    reference_for_check()
                vjp_peak = vjp_region.peak_bytes
            else:
                reference_for_check()
            _sync(device)
            vjp_seconds = vjp_region.seconds if vjp_peak is not None else time.perf_counter() - t
            retained = kept_by_libraries(device, allocated, (*checks["w"], *checks["reference"]))
    note = ""
    structure_pending = False  # NOTE: [When structure is worth finding]
    looked = False  # whether this call looked for structure (else later calls may: see `_look_for_structure`)
    if layout_found is not None and compute:  # a pattern a later call of the last plan found: use it
        layout, note = layout_found
        looked = True
        problem = dataclasses.replace(problem, layout=layout)
        chain = choose.first_chain(options, problem.col_passes, problem.row_passes, once_only)
    elif structure_first:
        layout, note = _find_layout(call, problem, None, _first_trace(problem, region.seconds),
                                    max_nnz=max(int(budget - forward_bytes - untracked_margin(device, budget))
                                                // STRUCTURE_BYTES_PER_NONZERO, 1))
        looked = True
        if layout is None:
            raise MemoryBudgetError(
                f"{call.who}: the memory budget is {format_bytes(budget)}, but the dense Jacobian "
                f"({problem.n_out} x {problem.n_in}) takes {format_bytes(problem.result_bytes)}, and for "
                f"output={options.output!r} no sparsity pattern that fits was found: {note}. Raise "
                "`memory_budget`, or compute the Jacobian of fewer outputs or inputs at a time.")
        problem = dataclasses.replace(problem, layout=layout)
        _check_result_fits(call, problem, budget, forward_bytes)
        chain = choose.first_chain(options, problem.col_passes, problem.row_passes, once_only)
    elif options.sparsity is not None and compute:
        if isinstance(options.sparsity, str) and writes_captured:
            # The trace runs `f` once more, and even on fake tensors its in-place write bumps the captured tensor's
            # version, which breaks the backward of the evaluation this call started from (later calls never look
            # for such an `f` either: below).
            note = "not looked for: `f` writes in place into a tensor it captures (a trace would run it again)"
        elif isinstance(options.sparsity, str):
            structure_pending = might_pay(problem, min(region.seconds, vjp_seconds), vjp_seconds)
            note = "" if structure_pending else "not looked for: the dense Jacobian is too short to pay for a trace"
        else:
            layout, note = _find_layout(call, problem)
            problem = dataclasses.replace(problem, layout=layout)
            chain = choose.first_chain(options, problem.col_passes, problem.row_passes, once_only)

    # NOTE: [Copies inside matrix kernels]: a forward method's fixed memory, known before it runs.
    copies = largest_captured_bytes(*call.captures)
    # NOTE: [A larger chunk meets new workspaces]: at most what the kernels could pack, its largest operand.
    new_size = min(reserve, max(copies, forward_bytes, problem.in_bytes + problem.out_bytes))

    def new_entry(problem: Problem) -> PlanEntry:
        facts = Facts(problem.col_passes, problem.row_passes, region.seconds, vjp_seconds)
        # NOTE: [Memory between the regions]; NOTE: [Workspaces a first backward keeps]
        fixed = problem.result_bytes + graph_bytes + untracked_margin(device, budget) + retained
        made = PlanEntry(problem, options, budget, fixed, facts, candidates, once_only, tangent_copy_bytes=copies,
                         once_why=("`f` writes in place into a tensor it captures" if writes_captured else
                                   "`f` draws random numbers"))
        made.new_size_reserve = new_size
        # A pattern valid at this point only, or one you gave (NOTE: [A pattern you gave is confirmed]), is
        # checked on every call until a trace on fake tensors confirms it.
        made.reverify = problem.layout is not None and (not problem.layout.pattern.valid_everywhere
                                                         or problem.layout.pattern.source == "user")
        made.pattern_reads_captured = (problem.layout is None or made.reverify
                                       or problem.layout.pattern.reads_captured)
        # A real trace the first call chose (not one a failed fake trace fell back to): confirmed later.
        made.confirm_trace = made.reverify and (
            (problem.layout.pattern.source == "real trace" and not problem.layout.pattern.notes)
            or problem.layout.pattern.source == "user")
        return made

    entry = new_entry(problem)
    entry.structure = note
    if not compute:
        entry.incumbent = chain[0].name
        entry.chosen().status = "chosen"
        entry.effort = "estimate"
        return None, entry
    probed: dict = {}

    def look_now(rows, k: int, projected: float) -> None:
        """Look for the pattern at once if `rows` (k of the Jacobian's first rows) are sparse and the dense run,
        `projected`, would pay for the trace; with a pattern, the plan starts again with one seed per colour."""
        nonlocal structure_pending, looked, layout, note, problem, entry, chain
        share = _nonzero_share(rows, k, problem)
        if not (share and share <= LOOKS_SPARSE  # rows of zeros say nothing: a saturated unit, an unused input
                and worth_detecting(projected, min(region.seconds, vjp_seconds), share)):
            return
        structure_pending, looked = False, True
        layout, note = _find_layout(call, problem, DETECT_LIMIT * projected, _first_trace(problem, region.seconds))
        entry.structure = note
        if layout is not None:  # the probe's dense rows, if any, are not colour products
            probed.clear()
            facts = entry.facts
            problem = dataclasses.replace(problem, layout=layout)
            entry = new_entry(problem)
            entry.facts = dataclasses.replace(entry.facts, autograd_loops=facts.autograd_loops,
                                              probe_seconds_per_vector=facts.probe_seconds_per_vector)
            entry.structure = note
            chain = choose.first_chain(options, problem.col_passes, problem.row_passes, once_only)

    if structure_pending and not options.create_graph:  # NOTE: [A sparse first row decides before the probe]
        look_now(_first_row(graph, problem), 1, problem.row_passes * LOOP_TO_VMAP * vjp_seconds)
    chain = _engine_by_probe(chain, problem, graph, entry, region.seconds, keep=probed, rows_wanted=structure_pending)
    if (not structure_pending and note and isinstance(options.sparsity, str) and layout_found is None
            and entry.facts.probe_seconds_per_vector is not None
            and chain[0].engine == "autograd"  # the probe's pace is that engine's: not the run's if it went second
            and might_pay(problem, min(region.seconds, vjp_seconds), vjp_seconds,
                          per_pass=entry.facts.probe_seconds_per_vector, share=DETECT_SHARE)):
        # The probe timed batched vectors: a dense run it puts over the bar is timed on a first slice after all
        # (a per-sample MLP on 256 samples: 0.14 ms a row batched, 1.4 plain VJPs, not the 0.2 assumed). Held to
        # the strict share: a few vectors' time each carries the batch's fixed cost over a few, so it overstates a
        # long run (at SLICE_SHARE the suite's per_sample_mlp large split its 256 rows for a slice: 2.0 -> 2.9 ms).
        # Only where the autograd engine stays first: a pace that put torch.func first is that of a run which will
        # not happen (tanh(W x), 512 x 512: the autograd engine's batched `mv` backward is 20x slower than the
        # torch.func run, whose slice then decided on its own timing, and in the VM's slow phases looked for
        # structure on a dense Jacobian: first calls 29-31 ms against 22-25 ms with `sparsity=None`).
        structure_pending, note = True, ""
        entry.structure = note
    if structure_pending and "rows" in probed:  # NOTE: [Sparse probe rows decide without a slice]
        k, rows, batched = probed["rows"]
        look_now(rows, k, problem.row_passes * max(batched - vjp_seconds, 0.0) / max(k - 1, 1))
    failures: list[tuple[str, BaseException]] = []
    result = None
    prior = PRIOR_FACTOR * (graph_bytes + max(problem.in_bytes, problem.out_bytes))
    run_chain = chain
    if loop_first is not None and not structure_pending and problem.layout is None:
        run_chain = [loop_first, *(c for c in chain if c != loop_first)]
    methods = _Restartable()(run_chain)
    for m in methods:
        if (not m.evaluates_once and entry.once_only) or entry.stats[m.name].excluded:
            continue
        method = _method(m)
        n = m.passes(problem.col_passes, problem.row_passes)
        stats = entry.stats[m.name]
        room = entry.room_bytes()
        run_bound = n * bound_prior
        if not measured_forward and device.type == "cpu":  # NOTE: [A run's memory bounded by its pace]
            run_bound = min(run_bound, _paced_bound(m, n, graph_bound, entry.facts.probe_seconds_per_vector, problem))
            if vjp_peak is not None and _reverse_vmap(m):  # NOTE: [A reverse run's memory bounded by one VJP's]
                run_bound = min(run_bound, graph_bound + n * (PRIOR_FACTOR * (vjp_peak + problem.in_bytes
                                                                              + problem.out_bytes) + copies))
        measured = (call.meter.kind != "none") and room is not None and run_bound > MEASURE_WHEN_PRIOR_ABOVE * room
        first = _long_run_first_chunk(n, vjp_seconds)
        if measured and not measured_forward:  # learn the memory line on an eighth of the basis first
            first = min(first or n, max(2, -(-n // STRUCTURE_SLICES)))
        if structure_pending:  # a first slice of the dense run tells whether looking for structure pays
            first = min(first or n, -(-n // STRUCTURE_SLICES), STRUCTURE_SLICE_MAX)
        sizer = Sizer(None if options.chunk_size is None else min(options.chunk_size, max(n, 1)),
                      room_bytes=room, prior_bytes_per_vector=prior if measured or not (call.meter.kind != "none") else None,
                      timed=True, measured=measured, minimum=2 if m.vectorize == "vmap" and n >= 2 else 1, first=first,
                      reserve_bytes=reserve + entry.fixed_prior(m), trim_between=_trimming(call, entry),
                      new_size_reserve=entry.new_size_reserve)
        progress = Progress(options.progress, n, m.name)
        adopted = False
        verdict: dict[str, object] = {}

        def after_first_slice(log: RunLog, n=n, sizer=sizer) -> bool:
            nonlocal structure_pending
            if not structure_pending:
                return True
            structure_pending = False
            done = log.vectors
            projected = (log.seconds or 0.0) * n / max(done, 1)
            share = slice_assembler.nonzero_share(0, start + done) if slice_assembler is not None else None
            verdict["look"] = worth_detecting(projected, min(region.seconds, vjp_seconds), share)  # one noisy timing less
            verdict["projected"] = projected
            if verdict["look"]:
                return False
            sizer.first = None
            sizer.sizes.clear()  # the slice was only to decide: the run goes on in chunks as large as fit
            return True
        try:
            state = None
            t = time.perf_counter()
            if graph is not None:
                with grad_mode(options.create_graph):
                    state = method.adopt(graph)
                adopted = state is not None
                if not adopted and options.budget is not None:
                    # Under a budget, free the plain graph: this method evaluates `f` its own way. Without one,
                    # keep it for a fallback that can start from it (no extra evaluation if this one fails).
                    graph = None
            adopt_seconds = time.perf_counter() - t
            _batch_aware_once(call, entry, m)
            # The run's collector, made here so that the slice's callback can count the zeros of its rows (a hint
            # of structure).
            slice_assembler = collector(problem, m.by_rows) if structure_pending and problem.layout is None else None
            # The engine probe's vectors are this run's first rows (NOTE: [The probe's rows are kept]).
            start, probe_seconds = 0, 0.0
            rows = probed.pop("rows", None)
            if rows is not None and m.by_rows and problem.layout is None:
                start, parts, probe_seconds = rows
                slice_assembler = slice_assembler or collector(problem, m.by_rows)
                slice_assembler.add(0, start, parts)
                progress.already(start)
            # Unprobed, the autograd engine's first chunk counts its own loops (a few microseconds, no extra work):
            # the exploration order of later calls follows (NOTE: [The autograd engine's vmap loops]). The counter
            # is process-wide, so it is held for that chunk only.
            counting = (m.mode, m.vectorize, m.engine) == ("reverse", "vmap", "autograd") and \
                entry.facts.autograd_loops is None and not entry.once_only
            loops = LoopProbe() if counting else None

            def after_chunk(log: RunLog, loops=loops) -> bool:
                if loops is not None:
                    loops.__exit__(None, None, None)  # closing twice is harmless
                return after_first_slice(log)
            with grad_mode(options.create_graph), (loops if loops is not None else contextlib.nullcontext()):
                assembler, log, position, seconds, state = call.run(m, problem, sizer, state=state,
                                                                    progress=progress, after_chunk=after_chunk,
                                                                    assembler=slice_assembler, start=start)
            seconds += probe_seconds
            if loops is not None and loops.active:
                entry.facts = dataclasses.replace(entry.facts, autograd_loops=loops.loops)
            if verdict.get("look"):
                looked = True
                # Detection is stopped past DETECT_LIMIT times the projected dense Jacobian (see there why).
                layout, note = _find_layout(call, problem, DETECT_LIMIT * verdict["projected"],
                                            _first_trace(problem, region.seconds))
                entry.structure = note
                if layout is not None:  # start again with one seed per colour (the dense slice is not reused)
                    problem = dataclasses.replace(problem, layout=layout)
                    entry = new_entry(problem)
                    entry.structure = note
                    chain = choose.first_chain(options, problem.col_passes, problem.row_passes, once_only)
                    # The plain evaluation stays: a method that starts from it pushes the colours' seeds through
                    # its backward, with no evaluation of `f` beyond the call's first (and the trace).
                    methods.restart(chain)
                    progress.close()
                    continue
                # No structure worth it: the dense run goes on, its chunks no longer held to the slice's size.
                sizer = Sizer(sizer.fixed, room_bytes=sizer.room, prior_bytes_per_vector=sizer.prior, memory=sizer.points,
                              timed=True, measured=sizer.measured, minimum=sizer.minimum, reserve_bytes=sizer.reserve,
                              trim_between=sizer.trim_between, new_size_reserve=sizer.new_size_reserve)
                with grad_mode(options.create_graph):
                    assembler, more, _, rest, state = call.run(m, problem, sizer, state=state, progress=progress,
                                                               start=position, assembler=assembler)
                log.chunks += more.chunks
                seconds += rest
            result, collecting = call.collect(assembler)
            seconds += collecting
            if not (m.is_reference and adopted and problem.layout is None):  # compressed seeds: not torch's loop
                w, reference = reference_for_check()
                checkable = assembler.checkable(result)
                verify.check(m.name, checkable, problem, call.references(problem, graph), w, reference,
                             blocks_of(checkable, problem))
                call.verified = True
                stats.checked_sizes.update(c.size for c in log.chunks)
            elif log.chunks and log.chunks[0].seconds:  # torch's loop: one row of it is one VJP
                vjp_seconds = log.chunks[0].seconds / max(log.chunks[0].size, 1)
                entry.facts = dataclasses.replace(entry.facts, vjp_seconds=vjp_seconds)
        except NeedsTangents:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of a method is a reason to try the next
            failure = exc
        else:
            graph = None
            evaluation = region.seconds if adopted else 0.0  # the evaluation it started from is part of its cost
            stats.add_run(evaluation + adopt_seconds + seconds)
            stats.verified, stats.status = True, "chosen"
            _learn(stats, log, sizer)
            stats.chunk_size = _planned_chunk(entry, stats)
            entry.incumbent = m.name
            call.method_name = m.name
            break
        finally:
            progress.close()
        # Outside the except block, so that an error of `f` itself propagates unchanged: a method that
        # failed in its own machinery hands over; if `f` itself now raises, that error is the answer.
        result = None
        _check_outputs_unchanged(call, problem, failure)
        if isinstance(failure, VerificationError) and problem.layout is not None:
            return after_pattern_failed(call, failure)
        _record_failure(entry, stats, failure, call, failures)
    if entry.incumbent is None:
        raise _no_method(call, failures)
    if loop_first is not None and entry.incumbent == loop_first.name:
        head = entry.stats[chain[0].name]  # NOTE: [Torch's loop for a first call of a few rows]
        if not head.excluded and head.status == "untried":
            entry.stats[loop_first.name].status, head.status = "measured", "chosen"
            entry.incumbent = head.method.name
            entry.events.append(f"first call: torch's own loop ({problem.row_passes} rows, nothing to check); "
                                f"the plan's method, {head.method.name}, runs and is checked on the next call")
    graph = None
    entry.needs_reorder = True  # the priors of the alternatives are worked out when a later call needs them
    # Not under a budget the caller gave: detection's index sets are neither measured nor held to it (a later
    # call's look at wide_mlp's 32768-wide layers took 2.2 GB under a 32.6 MiB budget).
    entry.structure_open = (isinstance(options.sparsity, str) and not looked and problem.layout is None
                            and min(problem.n_in, problem.n_out) >= MIN_PASSES and not options.measures_nothing
                            and options.budget is None)
    # NOTE: [Structure bounds on the second call]
    entry.bounds_pending = entry.structure_open and result is not None
    if options.measures_nothing:  # mode, vectorize and chunk size given: nothing to choose, nothing to measure
        entry.settled = True
    if writes_captured:
        entry.settled, entry.structure_open = True, False
        for s in entry.stats.values():
            if s.method.name != entry.incumbent and not s.excluded and s.status != "failed":
                s.excluded = "`f` writes in place into a tensor it captures: each call evaluates it once, nothing is tried"
                s.status, s.reason = "not tried", s.excluded
        entry.events.append("settled at once: `f` writes in place into a tensor it captures (state autojac cannot "
                            "put back), so each call evaluates it once and tries nothing else")
    elapsed = time.perf_counter() - began
    entry.credit = choose.INITIAL_CREDIT * elapsed
    entry.calls = 1
    entry.warm = False
    if problem.layout is not None:  # checked on these values: see NOTE: [Patterns and values]
        entry.values_seen = call.f.value_sources()
    waiting = entry.repeat_waiting()
    if waiting is not None and entry.facts.eval_seconds is not None and entry.facts.vjp_seconds is not None:
        # NOTE: [New values before a repeat method runs]
        entry.values_last = call.f.value_sources()
        waiting.checks.estimate = entry.facts.eval_seconds + entry.facts.vjp_seconds
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("new plan: %s", entry.snapshot())
    return result, entry


class _Restartable:
    """Iterate a chain of methods; `restart(chain)` starts over with another one (structure was found)."""

    def __call__(self, chain):
        self.chain, self.i = list(chain), 0
        return self

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= len(self.chain):
            raise StopIteration
        self.i += 1
        return self.chain[self.i - 1]

    def restart(self, chain) -> None:
        self.chain, self.i = list(chain), 0


def _no_reference(call: Call, problem: Problem, failure: BaseException) -> BaseException:
    """The safety net's reference failed on the first evaluation: no method could be checked by it. Running out
    of memory and autojac's own errors stay as they are (a VJP that failed where forward mode is allowed raised
    `NeedsTangents` instead: NOTE: [Checks by tangents]); otherwise (a mode that needs the backward, or
    forward-mode formulas that fail too: a reentrant `torch.utils.checkpoint`) it is said plainly."""
    if is_out_of_memory(failure) or isinstance(failure, AutojacError):
        return failure
    if problem.tangent_checks and call.who == "hessian":  # the function differentiated is `f`'s gradient
        return UnsupportedFunctionError(
            f"hessian: torch cannot differentiate `f`'s gradient: its backward has no derivative "
            f"({_first_line(call.vjp_failure)}) and its forward-mode formulas fail ({_first_line(failure)}). Fused "
            "kernels do this (scaled_dot_product_attention's flash and memory-efficient backends: select the math "
            "backend with torch.nn.attention.sdpa_kernel), as do custom autograd.Functions with a backward that "
            "is not itself differentiable.")
    if problem.tangent_checks:
        return UnsupportedFunctionError(
            f"{call.who}: `f` has neither a backward that works ({_first_line(call.vjp_failure)}) nor forward-mode "
            f"formulas that do ({_first_line(failure)}), so no product of its derivatives can check a Jacobian. "
            "Give its custom autograd.Functions a backward or a jvp (torch.utils.checkpoint: use_reentrant=False).")
    return UnsupportedFunctionError(
        f"{call.who}: autojac checks every result against a vector-Jacobian product of `f`, and `f`'s backward "
        f"failed there ({_first_line(failure)}). With mode={call.options.mode!r} every method needs it; "
        "mode='forward' or 'auto' computes and checks the Jacobian with forward-mode formulas instead "
        "(torch.utils.checkpoint: use_reentrant=False).")


def _check_result_fits(call: Call, problem: Problem, budget: int, forward_bytes: int, hint: bool = False) -> None:
    """MemoryBudgetError before any basis vector is pushed if the result and the forward pass (its measured bytes,
    0 when not measured) cannot fit; `hint`: say that a sparse output may fit where the dense one does not."""
    if problem.result_bytes + forward_bytes > budget:
        sparse = problem.layout is not None and problem.layout.output != "dense"
        result = {"hessian": "the Hessian", "batch_jacobian": "the per-sample Jacobians"}.get(call.who, "the Jacobian")
        raise MemoryBudgetError(
            f"{call.who}: the memory budget is {format_bytes(budget)}, but {result} alone "
            f"({problem.n_out} x {problem.n_in}"
            + (f", {problem.layout.pattern.nnz} nonzeros as {problem.layout.output} blocks" if sparse else "")
            + f") takes {format_bytes(problem.result_bytes)}"
            + (f" and the forward pass {format_bytes(forward_bytes)}" if forward_bytes else "")
            # On a GPU the first evaluation's peak also holds what libraries allocate once per process inside it
            # (cuBLAS's workspace at a fresh process's first matmul: 32 MiB on Hopper), which this call must count.
            + (" (its measured peak, with any workspace a library allocated there for the first time in this "
               "process, such as cuBLAS's)" if forward_bytes and problem.inputs.device.type == "cuda" else "")
            + ". Raise `memory_budget`, or compute the Jacobian of fewer outputs or inputs at a time"
            + (". If it is mostly zeros, output='sparse' or 'csr' returns it without them." if hint else ".")
        )


def _find_layout(call: Call, problem: Problem, max_seconds: float | None = None, trace: str = "auto",
                 max_nnz: int | None = None):
    """Detect (or take the user's) pattern and colour it, outside the evaluations anyone sees."""
    xs = tuple(x.detach() for x in call.xs)
    return call.f.isolated(lambda raw: layout_for(raw, xs, problem, call.options.sparsity, call.options.output,
                                                  call.who, max_seconds, trace, max_nnz))


def _first_trace(problem: Problem, eval_seconds: float) -> str:
    """How a first call traces `f` (NOTE: [A real trace first])."""
    return "real" if eval_seconds < REAL_TRACE_BELOW and not problem.draws_random else "auto"


class Timed:
    """A stand-in for a meter region when memory is not measured: wall seconds only (CUDA-synchronized)."""

    peak_bytes = None

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timed:
        _sync(self.device)
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self._began


def _measure_first_evaluation(options: Options, device: torch.device) -> bool:
    """Measure the first evaluation's memory when a budget was given, or on CUDA (the allocator's counters
    cost nothing); with the default budget on the CPU (half the free memory) the bound is enough."""
    return options.budget is not None or device.type == "cuda"


def after_pattern_failed(call: Call, failure: BaseException | None, later: bool = False,
                    layout=None) -> tuple[object, PlanEntry]:
    """A compressed Jacobian failed the check (a pattern that missed a nonzero): the plan is made again, dense,
    or with a pattern found again.

    `later`: the check failed on a later call. After the tensors `f` holds changed (NOTE: [Patterns and values]),
    a pattern autojac found is found again for the new values (see NOTE: [A pattern found again]); a pattern the
    caller gave, or one that failed at a new point with the same values (a real trace's pattern, valid at its
    point only: NOTE: [A real trace first]), makes the plan dense."""
    if later and isinstance(call.options.sparsity, str) and (failure is None or call.values_now is not None):
        return _found_again(call, failure, layout)  # the values `f` holds changed (not the point, see below)
    call.events.append(f"the sparsity pattern failed the check ({_first_line(failure)}); computed densely")
    dense = _call_again(call, dataclasses.replace(call.options, sparsity=None))
    try:
        result, entry = first_call(dense)
    except MemoryBudgetError as exc:
        raise MemoryBudgetError(f"{call.who}: the sparsity pattern failed the check ({_first_line(failure)}), and "
                                f"the dense Jacobian cannot be made instead: {exc}") from None
    if not later:
        entry.structure = "a sparsity pattern was found but failed the check; dense"
    elif call.values_now is not None:
        entry.structure = ("the sparsity pattern given held on the values it was checked with, then failed the check "
                           "after the tensors `f` captures changed; dense from then on")
    else:
        entry.structure = "a sparsity pattern held at the point it was found, then failed the check at another; dense"
    _took_over(call, dense)
    return result, entry


# NOTE: [A pattern found again]
# A pattern depends on the values `f` holds (NOTE: [Patterns and values]): a closure rebuilt every step around a
# new permutation or mask has a new pattern every step. When the plan's pattern fails its check on new values,
# the call plans again with structure as a first call does (whose rules bound detection by what the dense
# Jacobian would cost), and so finds the pattern of the values it now holds, or plans dense if none pays. If
# that pattern differs from the one before, the new plan follows the values: a later call on new values plans
# again before it computes anything (no compressed run that is bound to fail, no check of it); one whose
# pattern comes out the same as before stops following them (values that change without changing the
# pattern, such as weights an optimizer updates, then only pay the check again).


def _found_again(call: Call, failure: BaseException | None, layout) -> tuple[object, PlanEntry]:
    if failure is not None:
        call.events.append(f"the sparsity pattern failed the check on new values ({_first_line(failure)}); planned "
                           "again for them")
    else:
        call.events.append("the tensors `f` holds changed and the plan's pattern follows them; planned again")
    made = _call_again(call, call.options)
    result, entry = first_call(made)
    new = entry.problem.layout
    entry.follows_values = new is not None and not (layout is not None and layout.pattern == new.pattern)
    entry.events.append("planned again after the tensors `f` holds changed" + (
        "; its pattern changed with them, so a call on new values plans again" if entry.follows_values else
        "; a call on new values checks the pattern"))
    _took_over(call, made)
    return result, entry


def _call_again(call: Call, options) -> Call:
    """A fresh call on the same evaluator and inputs (the plan is made again by it, with `options`)."""
    again = Call(call.f, call.xs, call.signature, options, call.who)
    again.captures = call.captures
    return again


def _took_over(call: Call, made: Call) -> None:
    call.events += made.events
    call.chunks, call.verified, call.method_name = made.chunks, made.verified, made.method_name


# NOTE: [Torch's loop for a first call of a few rows]
# Over LOOP_MAX rows a plan pushes them batched (vmap), which must be checked on its first run: a reference
# product and a comparison, about a VJP and 0.1 ms. Up to FIRST_LOOP_MAX rows that costs a first call more than
# torch's own loop on the same evaluation, which needs no check: so a first call of so few rows runs that loop
# (one evaluation, a VJP a row), and leaves the rules' method as the plan's incumbent, not run yet: the next
# call runs it, measures it and checks it, as a later call runs any method the first call did not (the loop
# stays a measured alternative). On the suite's 3 -> 3 map (2-core CPU) the first call took 0.79 ms against
# 0.89-0.90 ms batched and checked (torch's vectorized call takes 0.33 ms, its loop 0.55-0.60 ms); on a two-layer
# tanh map 0.81 against 0.99 ms at 3 rows, 0.91 against 0.99 ms at 4, and 0.99 against 0.99 ms at 5.

FIRST_LOOP_MAX = 4
"""A first call of at most this many reverse passes runs torch's loop (NOTE: [Torch's loop for a first call of a
few rows])."""


def _loop_first(options: Options, problem: Problem, chain: list[MethodId], candidates: list[MethodId],
                writes_captured: bool) -> MethodId | None:
    """torch's own loop, where a first call runs it before the rules' reverse vmap method (NOTE: [Torch's loop
    for a first call of a few rows]); else None."""
    if (not chain or (chain[0].mode, chain[0].vectorize) != ("reverse", "vmap") or problem.row_passes > FIRST_LOOP_MAX
            or options.strict or options.create_graph or options.chunk_size is not None or writes_captured
            or problem.layout is not None):
        return None
    return next((m for m in candidates if m.is_reference), None)


def _engine_by_probe(chain: list[MethodId], problem: Problem, graph: PlainGraph | None, entry: PlanEntry,
                     eval_seconds: float, keep: dict | None = None, rows_wanted: bool = False) -> list[MethodId]:
    """The chain, with the torch.func engine first if torch.autograd's vmap would loop (NOTE: [The autograd
    engine's vmap loops]) or runs a few vectors no faster than a loop of VJPs.

    The loops are read off the first evaluation's graph (NOTE: [Loops read off the graph]). Unless they already
    put torch.func first (and `rows_wanted` is False: structure might pay, and the probe's rows would tell, NOTE:
    [Sparse probe rows decide without a slice]), over at least PROBE_MIN_PASSES rows PROBE_VECTORS vectors are
    pushed batched through that graph's backward (loops counted, their time compared with the plain VJP's); with
    `keep` given, they are left there (`keep["rows"]`: (k, parts, seconds)) as the Jacobian's first rows for the
    run that follows to start after them.

    Only when the first method is reverse vmap on the autograd engine and the torch.func engine may evaluate
    `f` again: not for a random `f` or one that writes what it captures, and not under a budget of the caller's
    (its evaluation's memory is not known before it runs). Loops cost LOOP_SECONDS_PER_VECTOR a looped call and
    row; the torch.func engine an evaluation of `f`, FUNC_FIXED_SECONDS and FUNC_SECONDS_PER_NODE a node of the
    graph. The autograd engine stays a candidate: later calls measure it like any alternative.
    """
    if not chain or graph is None or entry.once_only or entry.options.budget is not None:
        return chain
    m = chain[0]
    other = dataclasses.replace(m, engine="func")
    if (m.mode, m.vectorize, m.engine) != ("reverse", "vmap", "autograd") or other not in chain:
        return chain
    n = m.passes(problem.col_passes, problem.row_passes)
    walked = backward_fallbacks(graph.ys)
    nodes = walked.nodes if walked is not None else WALK_LIMIT
    worth = eval_seconds + FUNC_FIXED_SECONDS + FUNC_SECONDS_PER_NODE * nodes
    if walked is not None and walked.fallbacks:
        # The table knows loops: where they cost more than the torch.func engine, it goes first with no probe
        # (whose 8 vectors and warnings took 0.7 ms of a grid residual's 2.9 ms first call).
        entry.facts = dataclasses.replace(entry.facts, autograd_loops=walked.fallbacks)
        lost = walked.fallbacks * n * LOOP_SECONDS_PER_VECTOR
        if lost > worth and not (rows_wanted and n >= PROBE_MIN_PASSES):
            kinds = ", ".join(walked.looping[:4]) + (" and more" if len(walked.looping) > 4 else "")
            why = (f"torch.autograd's vmap would loop over the chunk for {kinds} ({walked.fallbacks} looped op "
                   f"calls a pass, by the table of backward nodes: about {seconds_text(lost)} over the basis, "
                   f"against {seconds_text(worth)} for the torch.func engine's evaluation and {nodes} nodes)")
            return _func_first(chain, other, entry, why)
    if n < PROBE_MIN_PASSES:
        if walked is not None and not walked.unknown:  # every node known: no loop left to count on the run
            entry.facts = dataclasses.replace(entry.facts, autograd_loops=walked.fallbacks)
        return chain
    # Over PROBE_MIN_PASSES rows a probe runs unless the table already put torch.func first: for loops of nodes
    # the table does not know, a batching rule slower than a loop, and its pace, which bounds the run's memory
    # (NOTE: [A run's memory bounded by its pace]).
    k = min(PROBE_VECTORS, n)
    try:
        with LoopProbe() as probe, grad_mode(entry.options.create_graph):
            _sync(problem.inputs.device)
            began = time.perf_counter()
            rows = vjp(graph.ys, graph.xs, seeds(problem, True, 0, k), create_graph=False, batched=True)
            _sync(problem.inputs.device)
            batched = time.perf_counter() - began
            per_vector = batched / k
    except Exception:  # noqa: BLE001 - only advice: the methods find out for themselves what fails
        return chain
    if keep is not None and problem.layout is None and not entry.options.create_graph:
        keep["rows"] = (k, rows, batched)
    vjp_seconds = entry.facts.vjp_seconds or 0.0
    # A batched backward costs about a plain VJP's fixed work, then its vectors: the marginal cost per vector is
    # what a loop would pay in full (W @ x on 128 rows: 16 us a vector over 8, but 13 us beyond the first, against
    # a 38 us VJP; on 512 rows 82 us beyond the first, against 53 us).
    marginal = max(batched - vjp_seconds, 0.0) / max(k - 1, 1)
    loop_like = vjp_seconds > 0 and marginal > LOOP_LIKE * vjp_seconds
    # Loops counted only where the probe could watch (another thread probing at the same time: unknown, unless
    # the timing alone says loop-like).
    loops = max(probe.loops, int(loop_like)) if probe.active or loop_like else None
    entry.facts = dataclasses.replace(entry.facts, autograd_loops=loops, probe_seconds_per_vector=per_vector)  # priors
    slow = n * (marginal - VMAP_PER_VJP * vjp_seconds) if loop_like or probe.loops else 0.0
    # Counted loops cost at least LOOP_SECONDS_PER_VECTOR a call and vector, and what the probe's vectors beyond
    # the first measured where that is more: a looped op's fallback is not always cheap (tanh(W x) on 512 rows,
    # one looped tanh_backward a vector: 37 ms on the autograd engine against 6 ms on torch.func's).
    lost = max(probe.loops * n * LOOP_SECONDS_PER_VECTOR, slow if probe.loops else 0.0)
    if lost > worth:  # some loops
        ops = ", ".join(probe.ops[:4]) + (" and more" if len(probe.ops) > 4 else "")
        why = (f"torch.autograd's vmap loops over the chunk for {ops} ({probe.loops} looped op calls per vector, "
               f"about {seconds_text(lost)} over the basis)")
    elif slow > worth:
        why = (f"torch.autograd's vmap took {seconds_text(marginal)} a vector beyond the first of {k}, "
               f"{marginal / vjp_seconds:.1f}x a plain VJP (a batching rule no faster than a loop)")
    else:
        return chain
    return _func_first(chain, other, entry, why)


def _func_first(chain: list[MethodId], other: MethodId, entry: PlanEntry, why: str) -> list[MethodId]:
    entry.events.append(f"{other.name} went first: {why}")
    logger.debug(entry.events[-1])
    return [other, *(c for c in chain if c != other)]


def _first_row(graph: PlainGraph, problem: Problem):
    """The Jacobian's first row (its parts, one per input), by one plain VJP on the first evaluation's graph."""
    with torch.enable_grad():
        return vjp(graph.ys, graph.xs, [s[0] for s in seeds(problem, True, 0, 1)], create_graph=False)


# NOTE: [A sparse first row decides before the probe]
# Where structure might pay (NOTE: [When structure is worth finding]), one plain VJP on the first evaluation's
# graph gives the Jacobian's first row. If at most LOOKS_SPARSE of its entries are nonzero and the dense run,
# paced at LOOP_TO_VMAP of a VJP a row (the prior `might_pay` uses), would pay for the trace, the pattern is
# looked for at once: the engine probe, whose 8 dense rows a pattern's compressed run cannot use, is not run
# (on a 2-D Brusselator 1.0-1.4 ms of a 13-20 ms first call, against 0.3 ms for the row). One row is only a
# hint: the pattern comes from the trace, and a row that is not sparse, or all zeros (a saturated unit: a dense
# layer's first row can be), leaves the decision to the probe's rows as before (NOTE: [Sparse probe rows decide
# without a slice]) and then to a first slice.


def _nonzero_share(parts, k: int, problem: Problem) -> float | None:
    """The share of nonzero entries in k rows given as per-input parts (None parts: zeros)."""
    total = k * sum(problem.in_sizes)
    if total <= 0:
        return None
    nonzero = sum(int(torch.count_nonzero(p)) for p in parts if p is not None)
    return nonzero / total


# NOTE: [Sparse probe rows decide without a slice]
# Where structure might pay, a first slice of the dense run (up to 64 vectors, timed) decides whether to look
# for it (NOTE: [When structure is worth finding]). The engine probe's rows hold the same evidence when they are
# sparse: their nonzero share, and a pace (the batched time of its vectors beyond the first, which leaves out
# the fixed work a slice's projection also carries). If at most LOOKS_SPARSE of their entries are nonzero and
# that pace already puts the trace under the sparse share of the dense run, the pattern is looked for at once:
# the slice (5-7 ms of a per-sample MLP's 23 ms first call, then thrown away) is not run. Otherwise the slice
# decides, as before.


# NOTE: [The probe's rows are kept]
# The engine probe pushes the first PROBE_VECTORS rows of the basis through the plain evaluation's backward:
# those are the Jacobian's first rows, whichever engine then goes first (the engines compute the same rows).
# The run starts after them, so the probe costs a first call one chunk boundary instead of PROBE_VECTORS
# vectors; the safety net checks the assembled whole as before. Not kept under `create_graph` (the probe
# builds no graph) or with a pattern's seeds (the probe pushes dense rows).


# NOTE: [A run's memory bounded by its pace]
# Unmeasured, the first evaluation's memory is bounded by its time (CPU_TOUCH_BYTES_PER_THREAD_PER_SECOND per
# thread), and a first call measures its chunks when n vectors at PRIOR_FACTOR times that bound each could
# take over MEASURE_WHEN_PRIOR_ABOVE of the room. That bound follows the evaluation's time, and so its noise: a
# gated layer evaluated in 0.1-0.25 ms crossed the line on most first calls (256 rows at 11.5 GiB of room),
# and a measured run is split to learn its memory line on an eighth of the basis and trims the heap before
# each chunk (malloc_trim, then the pages touched afresh): first calls of 9-12 ms against 4-7 ms unmeasured
# (the suite's tuple_inputs and per_sample_mlp, large; 2-core CPU). Where the engine probe
# timed vectors pushed batched through torch.autograd's backward (`probe_seconds_per_vector`, their whole time
# over their count, so it carries the batch's fixed work too), a run on that engine is bounded the same way by
# that pace: k vectors batched touch what their time allows, and their tensors grow linearly in k. So the run
# is bounded by n times the pace's bytes (with the seed and the row it writes) plus the plain graph it runs on
# (the first evaluation's bound, once); the smaller bound decides. Both bounds are upper bounds already (twice
# the fastest touch rate measured), so the pace's is not doubled again as the prior is; the threshold keeps a
# factor 4 of the room for what it misses. Not for the torch.func engine: its batching rules differ from
# torch.autograd's (for `W @ x` the autograd engine runs one bmm over copies of W, 20x slower than torch.func:
# see VMAP_PER_VJP), so the autograd engine's pace bounds nothing of it.


def _touchable_bytes(seconds: float) -> float:
    """The most memory the CPU's threads can touch in `seconds` (CPU_TOUCH_BYTES_PER_THREAD_PER_SECOND each)."""
    return CPU_TOUCH_BYTES_PER_THREAD_PER_SECOND * torch.get_num_threads() * seconds


def _paced_bound(m: MethodId, n: int, graph_bound: int, pace: float | None, problem: Problem) -> float:
    """A run on torch.autograd's vmap bounded by the engine probe's pace on it (NOTE: [A run's memory bounded by
    its pace]); infinite for other methods, or without a probe."""
    if pace is None or (m.mode, m.vectorize, m.engine) != ("reverse", "vmap", "autograd"):
        return math.inf
    per_vector = _touchable_bytes(pace)
    return graph_bound + n * (per_vector + problem.in_bytes + problem.out_bytes)


def _reverse_vmap(m: MethodId) -> bool:
    return m.mode == "reverse" and m.vectorize == "vmap"


# NOTE: [A reverse run's memory bounded by one VJP's]
# A reverse run pushes its vectors through one backward pass, batched: each vector's cotangents and gradients
# are one VJP's, and torch.autograd's batching rules may add a copy of an operand per vector (`W @ x`: one bmm
# over copies of W). So on the CPU, where the first evaluation is not measured and its time-bound would split
# the run to learn its memory line (an RK4 rollout, 16 rows: a first chunk of 2, then 14, 10.1 + 13.1 ms against
# 13.4 ms for all 16 at once; 64 rows: 24.6 + 52 ms against 57.6 ms), the safety net's reference VJP, which
# runs anyway, is measured instead (one meter region, ~20 us with the heap trimmed first, so that reused
# blocks show as growth and the reading errs high). A vmapped reverse run is then bounded by the plain graph
# it may build again (the evaluation's time-bound, once) plus n times PRIOR_FACTOR times that VJP's peak with
# the seed and the row it writes, plus the largest tensor `f` holds per vector (the copy a batching rule may
# make); the smaller bound decides, with MEASURE_WHEN_PRIOR_ABOVE's factor 4 of the room for what it misses.
# Forward and repeat runs evaluate `f` in their own way: a VJP says nothing of them. The trim has a cost beyond
# its own: what the call allocates next, the result first, is touched afresh instead of reusing resident pages
# (the suite's pde_residual large, a 20 MB dense result of 5 colours: first calls 4.9 -> 6.2 ms). Where a look
# for structure may follow (its run then has a few colours, which need no measuring), the VJP is measured only
# where the evaluation takes TRIM_TOUCH_FACTOR times what touching the result's pages could (at the fastest
# touch rate: the real one is 2-4x slower). Elsewhere it is measured wherever the run would otherwise be: the
# split it replaces trims the heap too, once a chunk, and adds a chunk. A parameter-dict MLP (256 rows,
# 0.3-0.7 ms evaluations, whose time-bound is over the line from 0.25 ms) was split on 1-8 of 9 first calls after
# other work had left free heap to trim: 12-17 ms against 3.5-5 ms in one chunk (jacrev: 1.7-2.6 ms).
TRIM_TOUCH_FACTOR = 4.0
MAY_LOOK_VJP = 2.0
"""A VJP is taken at this many evaluations where a first call guesses, before timing it, whether a look for
structure may follow (a VJP is usually 1.5-3 evaluations). Higher, the guess says yes for runs that will not
look: at 4, a parameter-dict MLP's 256 rows (0.5 ms evaluations) were split again to learn their memory (1 of 9
first calls in one process, 0 of 9 at 2). A look the guess missed costs the trim before the dense result, once."""


def _long_run_first_chunk(n: int, vjp_seconds: float) -> int | None:
    """A first chunk of about FIRST_CHUNK_SECONDS when a run could take over PROGRESS_AFTER_SECONDS.

    The bound is one unbatched product per vector (a loop): vmap is faster, so
    this only starts small what might be long, to learn its real pace (the
    progress bar's estimate, and whether larger chunks pay) before committing.
    """
    if n * vjp_seconds <= PROGRESS_AFTER_SECONDS:
        return None
    return max(2, int(FIRST_CHUNK_SECONDS / max(vjp_seconds, 1e-9)))