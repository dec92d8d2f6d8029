"""The only impure part of planning: a plan's first call, its later calls (with exploration), and `tune`.

NOTE: [Planning that pays for itself]
A first call does real work from the start. It evaluates `f` once with a plain
autograd graph (to learn the output shapes; timed, and measured when the budget
could bind), takes one reference VJP on that graph for the safety net, picks the
first method by rules (`choose.first_chain`), and computes the Jacobian with it
in chunks that grow only while the measurements say the next one fits the budget
and pays. Those chunks are the answer. A method that fails on them hands over to
the next in the chain.

Later calls run the incumbent. While the plan is not settled, each call adds a
share of the incumbent's fastest call to an exploration credit, and each trial is
charged what it cost beyond an incumbent call; when the credit covers a first
slice of the next alternative (priced pessimistically), that call runs the
alternative on that slice first, projects its whole time, and either finishes the
call with it (a real, whole measurement) or hands the rest to the incumbent. The
fastest whole call wins; once every alternative has been tried (close ones twice)
the plan is settled and calls cost nothing extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence

import torch

from .._core.errors import MemoryBudgetError, NotBatchAwareError, PlanMismatchError, UnsupportedFunctionError
from .._core.options import Options
from .._core.problem import Problem, Signature
from .._core.units import format_bytes, parse_budget
from .._execute.assemble import Assembler
from .._execute.layout import collector, seeds
from .._execute.sparse import AT_ONE_POINT
from .._execute.run import FixedChunks, RunLog, is_out_of_memory, push
from .._execute.verify import VerificationError, blocks_of, check_against, check_columns, random_cotangents, reference_product
from .._measure.device import (allocated_bytes, free_memory, kept_by_libraries, total_bytes, untracked_margin,
                               untracked_reserve)
from .._measure.meter import PeakMeter
from .._methods import METHODS
from .._measure.engine_loops import LoopProbe
from .._methods.base import PlainGraph, check_batch_aware, evaluate_plain, grad_mode, vjp
from . import choose
from .choose import Facts, MethodId
from .entry import PlanEntry
from .plan import RunReport, seconds_text
from .cost_model import GROWTH, fitting_size, n_chunks, paying_cap, projected_seconds
from .keys import largest_captured_bytes
from .sizing import Sizer
from .structure import (DETECT_LIMIT, DETECT_SHARE, LOOK_PAYBACK_CALLS, LOOKS_SPARSE, MIN_PASSES, REAL_TRACE_BELOW,
                        STRUCTURE_BYTES_PER_NONZERO, confirm_real_trace, layout_for, might_pay, promising_share,
                        sampled_bounds, too_dense_to_pay, trace_estimate, worth_detecting)

logger = logging.getLogger("autojac")

PROGRESS_AFTER_SECONDS = 10.0
CPU_TOUCH_BYTES_PER_THREAD_PER_SECOND = 12e9
"""An upper bound of how fast one CPU thread grows resident memory (touching new pages; 2x the fastest
measured, 5.9 GiB/s with transparent huge pages, benchmarks/results/cpu-2core-meter.md): what an
evaluation that took t seconds can have allocated, when it was not measured."""
FIRST_CHUNK_SECONDS = 1.0
STRUCTURE_SLICES = 8
STRUCTURE_SLICE_MAX = 64
"""When structure might pay, the dense run's first chunk is 1/STRUCTURE_SLICES of the basis, at most
STRUCTURE_SLICE_MAX vectors: its time decides (and is wasted if structure is found)."""
MEASURE_WHEN_PRIOR_ABOVE = 0.25
"""Chunks are measured when the prior peak of the whole basis exceeds this share of the room the budget leaves."""
PRIOR_FACTOR = 2.0
"""Bytes per basis vector before anything is measured: this times (forward pass + one input + one output)."""
LOOP_SLICE_SECONDS = 1e-6
"""What the torch.func engine saves per looped op call and vector, at least: its batched backward against
torch.autograd's loop (RK4 rollout, 160 looped tanh_backward calls per vector on 64-element states: about
0.9 us each; a grid residual's `roll` on 40 x 40: about 8 us). See NOTE: [The autograd engine's vmap loops]."""
PROBE_MIN_PASSES = 100
"""A first call probes the autograd engine for loops only over this many rows: the probe costs about one
VJP, under 5% of a vmapped run's bound (LOOP_TO_VMAP of a VJP per row) from here on."""
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
FUNC_EVALUATION_FACTOR = 2.0
FUNC_FIXED_SECONDS = 5e-4
"""What putting the torch.func engine first costs a first call: an evaluation of `f` under its transform,
counted at FUNC_EVALUATION_FACTOR plain evaluations, and this much of the transforms' own set-up (a per-sample
MLP over 256 rows: its first call 3.0 ms on the torch.func engine against 2.5 ms on the autograd one,
which loops twice per vector there, though warm the torch.func engine is 1.7x faster)."""


def _method(m: MethodId):
    return METHODS[(m.mode, m.vectorize, m.engine)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROGRESS_EVIDENCE_SECONDS = 1.0
"""A run's first chunk alone opens the bar only once this much has passed (see `Progress.projected`)."""


class Progress:
    """A tqdm bar on stderr, opened only once a run is expected to take over 10 s (or when asked).

    NOTE: [A first call's progress estimate]
    The run's time is projected from the pace of its latest chunk: the time so far, plus the vectors left at
    the seconds per vector the latest chunk took. Not from the first chunk: it carries the run's one-time
    costs (a first batch of 2 vectors of a wide MLP under a 4-6 MiB budget projected 16-19 s for runs of
    9.5-9.9 s), and chunks grow after it while a vector can cost more in a larger chunk (a 60-step RK4
    rollout of 3000 unknowns: 31 vectors in 0.3 s projected 33.6 s, and the run took 80 s). A first chunk that
    is itself slow (PROGRESS_EVIDENCE_SECONDS) still opens the bar at once.
    """

    def __init__(self, wanted: bool | None, total: int, label: str) -> None:
        self.wanted, self.total, self.label = wanted, total, label
        self.bar = None
        self.done = 0
        self.began = time.perf_counter()
        self.updates = 0
        self.last = self.began  # when the latest chunk ended
        if wanted:
            self.expect(None)

    def projected(self, k: int, now: float) -> float | None:
        """The whole run's expected time after a chunk of `k` vectors ended at `now` (None: not known yet)."""
        elapsed = now - self.began
        if self.updates <= 1:  # the first chunk: all of the run's one-time costs
            return projected_seconds(0.0, elapsed, self.done, self.total) if elapsed >= PROGRESS_EVIDENCE_SECONDS else None
        return projected_seconds(elapsed, now - self.last, k, self.total - self.done)

    def expect(self, seconds: float | None) -> None:
        """Open the bar if the whole run is expected to take over PROGRESS_AFTER_SECONDS."""
        if self.bar is not None or self.wanted is False:
            return
        if self.wanted or (seconds is not None and seconds > PROGRESS_AFTER_SECONDS and sys.stderr.isatty()):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=f"autojac {self.label}", unit="vec", file=sys.stderr)

    def already(self, k: int) -> None:
        """`k` vectors computed before the run began (the engine probe's rows): counted, but no chunk's pace."""
        self.done += k
        self.last = time.perf_counter()
        if self.bar is not None:
            self.bar.update(k)

    def update(self, k: int) -> None:
        self.done += k
        self.updates += 1
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(k)
        elif self.wanted is None and self.done < self.total:
            self.expect(self.projected(k, now))
        self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Call:
    """One call of `jacobian`: the evaluator standing in for `f`, the inputs, the options, and what happened."""

    def __init__(self, evaluator, xs: Sequence[torch.Tensor], signature: Signature, options: Options, who: str) -> None:
        self.f = evaluator
        self.xs = xs
        self.signature = signature
        self.options = options
        self.who = who
        self.device = signature.device
        self._meter: PeakMeter | None = None
        self.events: list[str] = []
        self.chunks: list[int] = []
        self.trial: str | None = None
        self.verified = False
        self.method_name = ""
        self.captures: tuple = (None, (), ())
        """(`f`, its key, the modules it uses): what it holds, for a forward method's fixed memory."""
        self.work_seconds: float | None = None
        """The chosen method's time in this call: prepare, push, assemble (not checks, not autojac's own work)."""
        self.must_verify = False
        """Check this call's Jacobian whatever the method: the values a sparsity pattern was found for changed."""
        self.values_now = None
        self.recheck_seconds: float | None = None
        """What the check that `must_verify` asked for took (a repeat method's, on new captured values)."""

    @property
    def meter(self) -> PeakMeter:
        """Made when first needed: a cached call of a settled plan measures nothing."""
        if self._meter is None:
            self._meter = PeakMeter(self.device)
        return self._meter

    def collect(self, assembler) -> tuple[object, float]:
        """The assembled result and the seconds assembling it took (part of a method's time: a dense
        result is allocated there, a sparse one decompressed)."""
        _sync(self.device)
        began = time.perf_counter()
        result = assembler.result()
        _sync(self.device)
        return result, time.perf_counter() - began

    def report(self, seconds: float | None, planned: bool) -> RunReport:
        return RunReport(self.method_name, tuple(self.chunks), seconds, self.f.count, planned, self.verified,
                         self.trial, tuple(self.events))

    # --- pieces ----------------------------------------------------------------------------------

    def reference(self, problem: Problem, w, graph: PlainGraph | None = None):
        """w^T J by one plain VJP: on `graph` if given, else on a fresh plain evaluation of `f`."""
        if graph is None:
            graph = evaluate_plain(self.f, self.xs, False)
            self._check_shapes(graph.ys, problem)
        return reference_product(graph.ys, graph.xs, w)

    def _check_shapes(self, ys, problem: Problem) -> None:
        if tuple(tuple(y.shape) for y in ys) != problem.out_shapes or tuple(y.dtype for y in ys) != problem.out_dtypes:
            raise OutputsChanged(tuple(tuple(y.shape) for y in ys), problem.out_shapes)

    def run(self, m: MethodId, problem: Problem, sizer: Sizer, *, state=None, start: int = 0, stop: int | None = None,
            assembler: Assembler | None = None, progress: Progress | None = None, after_chunk=None):
        """Prepare `m` (unless `state` is given) and push basis vectors start..stop; (assembler, log, position, seconds)."""
        method = _method(m)
        n = m.passes(problem.col_passes, problem.row_passes)
        stop = n if stop is None else stop
        log = RunLog()
        began = time.perf_counter()
        if state is None:
            state = method.prepare(self.f, self.xs, problem, self.options.create_graph)
        assembler = assembler or collector(problem, m.by_rows)
        position = push(method, state, assembler, problem, start, stop, sizer, log,
                        self.meter if sizer.measured else None, None if progress is None else progress.update,
                        after_chunk)
        if sizer.timed:
            _sync(self.device)
        seconds = time.perf_counter() - began
        self.chunks += [c.size for c in log.chunks]
        self.events += log.events
        return assembler, log, position, seconds, state


class PatternFailed(Exception):
    """Internal: a plan's sparsity pattern failed the check on a later call (see NOTE: [Patterns and values]), or
    (`failure` None) the tensors `f` holds changed and the plan's pattern follows them (NOTE: [A pattern found
    again]): it is found again before anything is computed. `layout`: the plan's."""

    def __init__(self, failure: BaseException | None, layout) -> None:
        super().__init__(str(failure) if failure is not None else "the tensors `f` holds changed")
        self.failure = failure
        self.layout = layout


class OutputsChanged(Exception):
    """Internal: `f` now returns outputs of other shapes than the plan was made for."""

    def __init__(self, now, planned):
        super().__init__(f"`f` now returns outputs of shapes {list(now)}, but the plan was made when it returned {list(planned)}")
        self.now, self.planned = now, planned


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# --- the first call --------------------------------------------------------------------------------

def first_call(call: Call, compute: bool = True, layout_found=None) -> tuple[object, PlanEntry]:
    """Make a plan by computing the Jacobian (see NOTE: [Planning that pays for itself]); (result, entry).

    With `compute=False` (`plan(..., effort="estimate")`), stop after the first
    evaluation: the entry holds the rules' choice and nothing measured.
    """
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
    problem = Problem(
        inputs=call.signature,
        out_shapes=tuple(tuple(y.shape) for y in ys),
        out_dtypes=tuple(y.dtype for y in ys),
        out_spec=graph.out_spec,
        draws_random=call.f.draws_random,
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
    if options.vectorize == "auto" and getattr(call.f.f, "__autojac_repeat_on_request__", False):
        # NOTE: [The sum trick's copies fold into the batch]: `batch_jacobian`'s functions, repeat trick asked for.
        candidates = [m for m in candidates if m.vectorize != "repeat"]
        chain = [m for m in chain if m.vectorize != "repeat"]
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

    def reference_for_check():
        if "reference" not in checks:
            checks["w"] = random_cotangents(problem)
            checks["reference"] = call.reference(problem, checks["w"], graph)
        return checks["w"], checks["reference"]

    retained = 0  # what the reference VJP left allocated beyond its own tensors (CUDA)
    if chain and chain[0].is_reference and not options.strict:
        vjp_seconds = region.seconds  # a VJP costs about an evaluation: only a bound for long runs, refined below
    else:
        with torch.enable_grad():
            _sync(device)
            allocated = allocated_bytes(device)
            t = time.perf_counter()
            reference_for_check()
            _sync(device)
            vjp_seconds = time.perf_counter() - t
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
        made.reverify = problem.layout is not None and not problem.layout.pattern.valid_everywhere
        # A real trace the first call chose (not one a failed fake trace fell back to): confirmed later.
        made.confirm_trace = (made.reverify and problem.layout.pattern.source == "real trace"
                              and not problem.layout.pattern.notes)
        return made

    entry = new_entry(problem)
    entry.structure = note
    if not compute:
        entry.incumbent = chain[0].name
        entry.chosen().status = "chosen"
        entry.effort = "estimate"
        return None, entry
    probed: dict = {}
    chain = _engine_by_probe(chain, problem, graph, entry, region.seconds, keep=probed)
    if (not structure_pending and note and isinstance(options.sparsity, str) and layout_found is None
            and entry.facts.probe_seconds_per_vector is not None
            and might_pay(problem, min(region.seconds, vjp_seconds), vjp_seconds,
                          per_pass=entry.facts.probe_seconds_per_vector, share=DETECT_SHARE)):
        # The probe timed batched vectors: a dense run it puts over the bar is timed on a first slice after all
        # (a per-sample MLP on 256 samples: 0.14 ms a row batched, 1.4 plain VJPs, not the 0.2 assumed). Held to
        # the strict share: a few vectors' time each carries the batch's fixed cost over a few, so it overstates a
        # long run (at SLICE_SHARE the suite's per_sample_mlp large split its 256 rows for a slice: 2.0 -> 2.9 ms).
        structure_pending, note = True, ""
        entry.structure = note
    if structure_pending and "rows" in probed:  # NOTE: [Sparse probe rows decide without a slice]
        k, rows, batched = probed["rows"]
        share = _nonzero_share(rows, k, problem)
        projected = problem.row_passes * max(batched - vjp_seconds, 0.0) / max(k - 1, 1)
        if (share is not None and share <= LOOKS_SPARSE
                and worth_detecting(projected, min(region.seconds, vjp_seconds), share)):
            structure_pending, looked = False, True
            layout, note = _find_layout(call, problem, DETECT_LIMIT * projected, _first_trace(problem, region.seconds))
            entry.structure = note
            if layout is not None:  # one seed per colour; the probe's dense rows are not colour products
                probed.clear()
                facts = entry.facts
                problem = dataclasses.replace(problem, layout=layout)
                entry = new_entry(problem)
                entry.facts = dataclasses.replace(entry.facts, autograd_loops=facts.autograd_loops,
                                                  probe_seconds_per_vector=facts.probe_seconds_per_vector)
                entry.structure = note
                chain = choose.first_chain(options, problem.col_passes, problem.row_passes, once_only)
    failures: list[tuple[str, BaseException]] = []
    result = None
    prior = PRIOR_FACTOR * (graph_bytes + max(problem.in_bytes, problem.out_bytes))
    bound_prior = PRIOR_FACTOR * (graph_bound + max(problem.in_bytes, problem.out_bytes))
    methods = _Restartable()(chain)
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
                check_against(m.name, assembler.checkable(result), w, reference, problem)
                call.verified = True
                stats.checked_sizes.update(c.size for c in log.chunks)
            elif log.chunks and log.chunks[0].seconds:  # torch's loop: one row of it is one VJP
                vjp_seconds = log.chunks[0].seconds / max(log.chunks[0].size, 1)
                entry.facts = dataclasses.replace(entry.facts, vjp_seconds=vjp_seconds)
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
    graph = None
    entry.needs_reorder = True  # the priors of the alternatives are worked out when a later call needs them
    # Not under a budget the caller gave: detection's index sets are neither measured nor held to it (a later
    # call's look at wide_mlp's 32768-wide layers took 2.2 GB under a 32.6 MiB budget).
    entry.structure_open = (isinstance(options.sparsity, str) and not looked and problem.layout is None
                            and min(problem.n_in, problem.n_out) >= MIN_PASSES and not options.measures_nothing
                            and options.budget is None)
    if entry.structure_open and result is not None:
        bounds = sampled_bounds(blocks_of(result, problem), problem)
        dense = too_dense_to_pay(bounds, problem)  # a look could not pay: never taken
        if dense:
            entry.structure_open, entry.structure = False, dense
        entry.structure_share = promising_share(bounds, problem)  # NOTE: [Structure before trials]
        if entry.structure_share is not None:
            entry.values_first = call.f.value_sources()
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


def _check_result_fits(call: Call, problem: Problem, budget: int, forward_bytes: int, hint: bool = False) -> None:
    """MemoryBudgetError before any basis vector is pushed if the result and the forward pass (its measured bytes,
    0 when not measured) cannot fit; `hint`: say that a sparse output may fit where the dense one does not."""
    if problem.result_bytes + forward_bytes > budget:
        sparse = problem.layout is not None and problem.layout.output != "dense"
        raise MemoryBudgetError(
            f"{call.who}: the memory budget is {format_bytes(budget)}, but the Jacobian alone "
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


def _confirm_pattern(call: Call, entry: PlanEntry) -> None:
    """Trace `f` on fake tensors to confirm a first call's real-trace pattern (NOTE: [A real trace first])."""
    began = time.perf_counter()
    pattern = entry.problem.layout.pattern
    xs = tuple(x.detach() for x in call.xs)
    allowed = max(entry.credit, DETECT_LIMIT * (entry.chosen().best or 0.0))
    why = call.f.isolated(lambda raw: confirm_real_trace(raw, xs, pattern, allowed))
    with entry.lock:
        entry.credit -= time.perf_counter() - began
        if not why:
            entry.reverify = False
            entry.structure = entry.structure.replace(
                AT_ONE_POINT, f"; found on a real trace, confirmed on fake tensors on call {entry.calls + 1}")
            entry.events.append(f"pattern confirmed on fake tensors on call {entry.calls + 1}: valid for every input "
                                "of these shapes, calls are no longer checked")
        else:
            entry.events.append(f"pattern not confirmed on call {entry.calls + 1} ({why}): every call is checked")


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


def _trimming(call: Call, entry: PlanEntry) -> bool:
    """Return free heap memory between chunks: on the CPU under a budget the caller gave (see
    `meter.release_free_heap`; about a millisecond a chunk). The plan's budget: a `plan=` call gives none."""
    return call.device.type == "cpu" and entry.options.budget is not None


def _engine_by_probe(chain: list[MethodId], problem: Problem, graph: PlainGraph | None, entry: PlanEntry,
                     eval_seconds: float, keep: dict | None = None) -> list[MethodId]:
    """The chain, with the torch.func engine first if torch.autograd's vmap would loop (NOTE: [The autograd
    engine's vmap loops]) or runs a few vectors no faster than a loop of VJPs.

    The probe's vectors are the Jacobian's first rows: with `keep` given, they are left there (`keep["rows"]`:
    (k, parts, seconds)) for the run that follows to start after them.

    Probed with PROBE_VECTORS vectors pushed batched through the plain evaluation's backward (their time is
    also compared with the plain VJP's) when the first method is reverse vmap on the autograd engine over at
    least PROBE_MIN_PASSES rows, and the torch.func engine may evaluate `f` again: not for a random `f` or one
    that writes what it captures, and not under a budget of the caller's (its evaluation's memory is not known
    before it runs). The autograd engine stays a candidate: later calls measure it like any alternative.
    """
    if not chain or graph is None or entry.once_only or entry.options.budget is not None:
        return chain
    m = chain[0]
    other = dataclasses.replace(m, engine="func")
    n = m.passes(problem.col_passes, problem.row_passes)
    if (m.mode, m.vectorize, m.engine) != ("reverse", "vmap", "autograd") or other not in chain or n < PROBE_MIN_PASSES:
        return chain
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
    worth = FUNC_EVALUATION_FACTOR * eval_seconds + FUNC_FIXED_SECONDS
    slow = n * (marginal - VMAP_PER_VJP * vjp_seconds) if loop_like or probe.loops else 0.0
    # Counted loops cost at least LOOP_SLICE_SECONDS a call and vector, and what the probe's vectors beyond the
    # first measured where that is more: a looped op's fallback is not always cheap (tanh(W x) on 512 rows,
    # one looped tanh_backward a vector: 37 ms on the autograd engine against 6 ms on torch.func's, which 1 us a
    # call put at 0.5 ms lost).
    lost = max(probe.loops * n * LOOP_SLICE_SECONDS, slow if probe.loops else 0.0)
    if lost > worth:  # some loops
        ops = ", ".join(probe.ops[:4]) + (" and more" if len(probe.ops) > 4 else "")
        why = (f"torch.autograd's vmap loops over the chunk for {ops} ({probe.loops} looped op calls per vector, "
               f"about {seconds_text(lost)} over the basis)")
    elif slow > worth:
        why = (f"torch.autograd's vmap took {seconds_text(marginal)} a vector beyond the first of {k}, "
               f"{marginal / vjp_seconds:.1f}x a plain VJP (a batching rule no faster than a loop)")
    else:
        return chain
    entry.events.append(f"{other.name} went first: {why}")
    logger.debug(entry.events[-1])
    return [other, *(c for c in chain if c != other)]


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


def _long_run_first_chunk(n: int, vjp_seconds: float) -> int | None:
    """A first chunk of about FIRST_CHUNK_SECONDS when a run could take over PROGRESS_AFTER_SECONDS.

    The bound is one unbatched product per vector (a loop): vmap is faster, so
    this only starts small what might be long, to learn its real pace (the
    progress bar's estimate, and whether larger chunks pay) before committing.
    """
    if n * vjp_seconds <= PROGRESS_AFTER_SECONDS:
        return None
    return max(2, int(FIRST_CHUNK_SECONDS / max(vjp_seconds, 1e-9)))


def _planned_chunk(entry: PlanEntry, stats) -> int | None:
    """The chunk size later calls run `stats.method` at: None (the whole basis) unless its measured memory
    line says the budget does not fit the whole basis (then the largest chunk that fits), or a run measured
    larger chunks that stopped paying (then no larger than `stats.pays_up_to`)."""
    n = stats.method.passes(entry.problem.col_passes, entry.problem.row_passes)
    if entry.options.chunk_size is not None:
        return None
    fitting = n
    line = stats.memory_line()
    room = entry.room_bytes()
    if line is not None and room is not None:
        # Later calls are not measured: beyond the largest chunk measured the CPU reserve is kept back (NOTE: [A
        # larger chunk meets new workspaces]), and no further than GROWTH times it.
        measured = max((k for k, _ in stats.memory), default=n)
        fitting = min(fitting_size(line, room, n, measured, entry.new_size_reserve),
                      GROWTH * measured)
    if stats.pays_up_to is not None:
        fitting = min(fitting, stats.pays_up_to)
    return None if fitting >= n else max(fitting, 1)


def _relearn_memory(call: Call, entry: PlanEntry, stats, timed: bool, chunk_size: int | None) -> bool:
    """Whether this call measures the plan's chunks again (see NOTE: [Memory learned again in a warm process]):
    a plan still learning (`timed`), whose chunks the budget holds below the whole basis, with no chunk size
    given by the user or the call."""
    return (timed and stats.chunk_size is not None and chunk_size is None and entry.options.chunk_size is None
            and entry.room_bytes() is not None and call.meter.kind != "none")


def _learn(stats, log: RunLog, sizer: Sizer) -> None:
    """Keep what the run measured: chunk peaks and time per vector."""
    for c in log.chunks:
        if c.peak_bytes is not None:
            stats.memory.append((c.size, float(c.peak_bytes)))
        if c.seconds is not None and c.size:
            stats.rates.append((c.size, c.seconds / c.size))
    del stats.memory[:-8], stats.rates[:-8]
    cap = paying_cap(stats.rates)
    if cap is not None:
        stats.pays_up_to = cap


def _record_failure(entry: PlanEntry, stats, failure: BaseException, call: Call, failures: list) -> None:
    if isinstance(failure, NotBatchAwareError):
        _not_batch_aware(entry, failure)
    elif isinstance(failure, VerificationError) and not stats.method.evaluates_once:
        if stats.method.vectorize == "repeat":
            _not_batch_aware(entry, failure)
        else:
            _evaluations_disagree(entry, forward=stats.method.mode == "forward")
    stats.status, stats.reason = "failed", _first_line(failure)
    failures.append((stats.method.name, failure))
    call.events.append(f"{stats.method.name} failed ({_first_line(failure)})")
    logger.debug(call.events[-1])


def _batch_aware_once(call: Call, entry: PlanEntry, m: MethodId) -> None:
    """Before a plan's first repeat method runs: `f` on two different rows (NOTE: [Batch-aware, checked on
    different rows]); raises NotBatchAwareError, which drops every repeat method of the plan."""
    if m.vectorize == "repeat" and not entry.batch_aware_checked:
        check_batch_aware(call.f, call.xs, entry.problem)
        entry.batch_aware_checked = True
        if entry.problem.layout is None:  # what the verdict holds for (a pattern's values are its own)
            entry.values_seen = call.f.value_sources()


def _not_batch_aware(entry: PlanEntry, failure: BaseException) -> None:
    """The repeat trick gave a wrong Jacobian: `f` mixes the rows of a batch (or its evaluations disagree)."""
    for s in entry.stats.values():
        if s.method.vectorize == "repeat" and s.status != "failed":
            s.status, s.reason = "failed", ("the repeat trick's Jacobian failed the check: `f` mixes the rows of a "
                                            "batch, or its evaluations disagree")


_FORWARD_DIFFERS = ("or its forward-mode derivatives differ from its reverse-mode ones (`torch.no_grad` inside `f` "
                    "does not stop forward-mode AD; a custom autograd.Function whose jvp disagrees with its backward)")


def _evaluations_disagree(entry: PlanEntry, forward: bool = False) -> None:
    """`f` gives different results on identical evaluations: only methods that evaluate it once may run.

    A forward-mode method's failed check has a second possible cause, which the reason names: forward-mode AD
    ignores `torch.no_grad` (so a value `f` computes under it carries derivatives that reverse mode drops).
    The same methods are dropped either way (the forward-trick computes reverse mode's derivatives)."""
    entry.once_only = True
    why = "`f`'s evaluations disagree (a generator of its own, or state it changes)"
    if forward:
        why += ", " + _FORWARD_DIFFERS
    for s in entry.stats.values():
        if not s.method.evaluates_once and s.status not in ("failed",):
            s.excluded = why
            s.status, s.reason = "not tried", s.excluded


def _no_method(call: Call, failures: list[tuple[str, BaseException]]) -> Exception:
    options = call.options
    if not failures:
        return UnsupportedFunctionError(
            f"{call.who}: `f` gives different results on identical evaluations (a random generator of its own, "
            "or state it changes), and none of the allowed methods evaluates it only once. Use mode='reverse' "
            "or mode='forward-trick' with vectorize='vmap' or 'loop'.")
    name, last = failures[-1]
    tried = "; ".join(f"{n}: {_first_line(e)}" for n, e in failures)
    if all(is_out_of_memory(e) for _, e in failures):
        error = MemoryBudgetError(
            f"{call.who}: {name} ran out of memory even one basis vector at a time ({tried}). Free memory, "
            "pass a `memory_budget` so autojac sizes chunks to fit, or use mode='reverse' when `f` has fewer "
            "outputs than inputs.")
    elif isinstance(last, UnsupportedFunctionError) and len(failures) == 1:
        return last
    else:
        advice = _advice(options) if len(failures) == 1 else "Every allowed method was tried."
        if isinstance(last, VerificationError):
            forward = name.startswith("forward/")
            advice = ("`f` gives different results on identical evaluations (a random generator of its own, or "
                      "state it changes)" + (", " + _FORWARD_DIFFERS if forward else "") + "; use mode='reverse', "
                      "or mode='forward-trick' with vectorize='vmap' or 'loop', which evaluate it once"
                      + (" and compute reverse mode's derivatives" if forward else "") + ".")
        error = UnsupportedFunctionError(f"{call.who}: {name} could not differentiate `f`: {tried}. {advice}")
    error.__cause__ = last
    return error


def _advice(options: Options) -> str:
    if options.fixed_method or options.mode != "auto" or options.vectorize != "auto":
        if options.vectorize == "repeat":
            return "vectorize='repeat' needs `f` to accept a leading batch dimension with independent rows; try vectorize='vmap' or 'loop', or 'auto'."
        if options.mode == "forward":
            return "mode='forward' needs forward-mode formulas for every op of `f`; try mode='forward-trick' or 'reverse', or 'auto'."
        if options.mode == "forward-trick":
            return "mode='forward-trick' needs backward formulas that are themselves differentiable; try mode='reverse' or 'forward', or 'auto'."
        return "Try mode='auto' and vectorize='auto', which fall back on their own."
    return "Check that `f` is differentiable."


def check_strict(graph: PlainGraph, who: str) -> None:
    """Raise StrictError if some output's graph does not reach some input."""
    from .._core.errors import StrictError

    for i, y in enumerate(graph.ys):
        reached = (
            torch.autograd.grad(y, graph.xs, torch.ones_like(y), retain_graph=True, allow_unused=True)
            if y.requires_grad else (None,) * len(graph.xs)
        )
        for j, g in enumerate(reached):
            if g is None:
                raise StrictError(f"{who}: with strict=True every output must depend on every input, but output {i} is independent of input {j}. Pass strict=False to get zeros for that block.")


# --- later calls ----------------------------------------------------------------------------------

# NOTE: [Patterns and values]
# A sparsity pattern is found for the values `f` holds: a captured index tensor decides where a
# gather reads, a weight's zeros which products vanish. Plans are keyed by shapes, so a closure
# rebuilt with a new permutation every step hits the same plan, and its pattern would put every
# product in the wrong place. So a structured plan remembers the tensors it was checked with (by
# identity and version counter: `Evaluator.value_sources`); a call on other tensors, or on the same
# ones written since, is checked whatever its method, and a pattern that fails there is found again for
# the new values (NOTE: [A pattern found again]; a pattern the caller gave makes the plan dense).


def _values_changed(call: Call, entry: PlanEntry, name: str | None = None) -> None:
    """A call on values other than those the plan was checked on is checked, if the plan's answer depends on
    them beyond what autograd sees: a sparsity pattern (NOTE: [Patterns and values]), or a repeat method
    (whether `f` is batch-aware can depend on a captured weight: `m * y.roll(1, 0)` is, at m = 0): the
    incumbent, or `name`, the method this call runs instead (a `plan=` made when another was the incumbent,
    a trial)."""
    repeat = ((entry.incumbent is not None and entry.chosen().method.vectorize == "repeat")
              or (name is not None and entry.stats[name].method.vectorize == "repeat"))
    if entry.problem.layout is None and not repeat:
        return
    now = call.f.value_sources()
    if now != entry.values_seen:
        if entry.follows_values and entry.problem.layout is not None:
            raise PatternFailed(None, entry.problem.layout)  # NOTE: [A pattern found again]
        # The call's Jacobian is checked (one plain evaluation and one VJP); the rows check is not made again:
        # it guards against a point where the Jacobian vanishes, and a closure rebuilt every step with a new
        # target would pay its three evaluations every step.
        call.must_verify, call.values_now = True, now


# NOTE: [A repeat plan on changing values]
# A repeat plan checks every call made on new captured values (above). A closure rebuilt every step around a
# new target changes them on every call, so such a plan pays a plain evaluation and a VJP per call beside
# its run: the grid residual's closure loop took 52.8 ms for 20 steps on the repeat trick, 34.0 ms on vmap,
# which needs no such check. So a repeat method's time is its fastest run plus its checks' time times the
# share of its recent calls that needed one, and the plan's method is the fastest by that measure.

# NOTE: [New values before a repeat method runs]
# Whether calls bring new captured values was learnt only from a repeat incumbent's own checks, so a repeat
# method waiting untried behind a vmap incumbent was priced as if it would pay none, and went first: a robot
# arm's closure loop (a new lambda around a new target each step; torch.autograd's vmap loops there, and both
# the repeat trick and the torch.func engine avoid the loops) tried the repeat trick first (its batch-aware
# check and run, then a check every call) before the torch.func engine that became the plan's method. So while
# a dense plan explores (calls without `plan=`) behind an incumbent that is not a repeat method, each call
# notes whether the tensors `f` holds changed since the call before (the first call's are kept for the second;
# an optimizer's in-place step is a change, as it is for a repeat incumbent), and a check not yet timed is
# priced at the first call's plain evaluation plus VJP, lowered to the incumbent's fastest call (which holds
# an evaluation and at least one product) so that a cold first call cannot price a repeat method out for good:
# the repeat method's place in the trial order, its trial's projection and the switch then count the checks it
# would pay. A loop over one function on unchanged values prices none, as before. Watching stops for good once
# a repeat method is the plan's method (its own checks are noted from then on) or the plan settles.


def _watch_values(call: Call, entry: PlanEntry) -> None:
    """NOTE: [New values before a repeat method runs]: whether this call brings new captured values."""
    if entry.values_last is None:
        return
    with entry.lock:
        waiting = entry.repeat_waiting()
        if waiting is None:
            entry.values_last = None
            return
    now = call.f.value_sources()
    with entry.lock:
        if entry.values_last is None:  # another thread's call stopped watching meanwhile
            return
        changed = now != entry.values_last
        entry.values_last = now
        waiting.note_values(changed, None)
        best = entry.chosen().best
        if waiting.checks.estimate is not None and best is not None:
            waiting.checks.estimate = min(waiting.checks.estimate, best)  # warm: the first call's was cold


def _values_checked(call: Call, entry: PlanEntry) -> None:
    if call.must_verify and call.verified:
        with entry.lock:
            entry.values_seen = call.values_now


def later_call(call: Call, entry: PlanEntry, explore: bool = True, credit: float | None = None) -> object:
    """Run a plan: its incumbent, or (while exploring, credit permitting) a trial of the next alternative."""
    began = time.perf_counter()
    _values_changed(call, entry)
    if explore:
        _watch_values(call, entry)
    timed = not entry.settled or entry.chosen().best is None
    with entry.lock:
        if credit is not None:
            entry.credit = max(entry.credit, credit)
        estimate = _trace_estimate(entry)
        look = explore and entry.structure_open and _look_allowance(entry) >= estimate
        if look and entry.credit < estimate and call.f.value_sources() != entry.values_first:
            # NOTE: [Structure before trials]: a pattern would be checked on every call of a closure rebuilt
            # around new tensors, so what the bound says a look saves is not there to borrow against.
            look, entry.structure_share, entry.values_first = False, None, None
            entry.events.append(f"call {entry.calls + 1}: the tensors `f` holds changed since the first call; "
                                "the look for structure waits for the credit like any trial")
        if look:
            entry.structure_open = False  # one look per plan
            entry.values_first = None  # needed no more (it may hold copies of small index tensors)
        # On the plan's second call, credit or not: until then every call pays a check (NOTE: [A real trace first]).
        confirm = explore and not look and entry.confirm_trace
        if confirm:
            entry.confirm_trace = False  # one confirmation per plan
        # NOTE: [Structure before trials]: a promising look waits for the credit before any trial spends it.
        wait = entry.structure_open and entry.structure_share is not None
        trial = entry.next_trial() if explore and not look and not confirm and not wait else None
    if look:
        _look_for_structure(call, entry)
    if confirm:
        _confirm_pattern(call, entry)
    if trial is not None:
        result = _trial(call, entry, trial)
    else:
        result = _incumbent(call, entry, timed)
    _values_checked(call, entry)
    if timed:
        _sync(call.device)
        seconds = time.perf_counter() - began
        with entry.lock:
            entry.record_call(seconds)
            if trial is None and call.method_name == entry.incumbent and call.work_seconds is not None:
                if entry.chosen().add_run(call.work_seconds):
                    entry.needs_reorder = True  # the alternatives' priors were scaled from a slower time
                entry.warm = True
    else:
        with entry.lock:
            entry.calls += 1
    if trial is None and call.method_name == entry.incumbent and entry.chosen().method.vectorize == "repeat":
        with entry.lock:
            entry.chosen().note_values(call.must_verify, call.recheck_seconds)
            if call.must_verify:  # only a check raises the incumbent's cost: NOTE: [A repeat plan on changing values]
                entry.consider_switch()
    return result


def _trace_estimate(entry: PlanEntry) -> float:
    return trace_estimate(entry.facts.eval_seconds or 0.0)


def _look_allowance(entry: PlanEntry) -> float:
    """What a look for structure may take now: the credit, and for a promising look (NOTE: [Structure before
    trials]) what the first call's Jacobian says it would save over LOOK_PAYBACK_CALLS calls."""
    best = entry.chosen().best if entry.incumbent is not None else None
    if entry.structure_share is None or not best:
        return entry.credit
    return entry.credit + LOOK_PAYBACK_CALLS * best * (1.0 - entry.structure_share)


def _look_for_structure(call: Call, entry: PlanEntry) -> None:
    """Structure as one more alternative (see NOTE: [When structure is worth finding]): a plan whose first
    call did not look for it looks once the exploration credit covers a trace, charged what it took. A
    pattern that pays is kept for the next call, which makes the plan again with it (`first_call`); this
    call runs the plan as it is. Propagation may take what the credit holds (with, for a promising look, what
    it is expected to save: `_look_allowance`), and at least DETECT_LIMIT calls of the plan (the first call's
    limit)."""
    began = time.perf_counter()
    with entry.lock:
        allowed = max(_look_allowance(entry), DETECT_LIMIT * (entry.chosen().best or 0.0))
    layout, note = _find_layout(call, entry.problem, allowed)
    with entry.lock:
        entry.credit -= time.perf_counter() - began
        if layout is not None:
            entry.layout_found = (layout, note)
            entry.events.append(f"structure found on call {entry.calls + 1}: {note}; the next call plans with it")
        else:
            entry.structure = f"looked for on call {entry.calls + 1}: {note}"


# NOTE: [A found pattern measured against the dense plan]
# A pattern a later call finds is adopted because its colours promise fewer passes, priced as the CPU pays
# them: a pass each. A GPU pays a batch of vectorized passes nearly the price of one at small sizes (kernel
# launches, not arithmetic), and a structured run adds seeds and a gather: on an H200 the quick Brusselator (128
# unknowns, 8 colours) ran 5.15 ms structured after its plan's look, against 1.96 ms for the dense plan it
# replaced. So the dense plan is kept beside the structured one, and once the structured plan has settled or run
# STRUCTURE_JUDGED_AFTER calls, the two fastest measured times are weighed: a dense plan faster by the margin
# any switch of method needs (under DENSE_BACK_BELOW of the structured time) is taken back, with the pattern
# and both times in its note; it does not look again. Not for a pattern the first call found: no dense
# Jacobian was measured whole then (a first slice of it was, and judged the look).

STRUCTURE_JUDGED_AFTER = 6
DENSE_BACK_BELOW = choose.SWITCH_BELOW


def judge_structure(entry: PlanEntry) -> PlanEntry | None:
    """The dense plan to go back to, when a structured plan made from a later call's pattern has shown itself
    slower (NOTE: [A found pattern measured against the dense plan]); None to keep the structured plan."""
    dense = entry.dense_plan
    if dense is None:
        return None
    with entry.lock:
        if entry.dense_plan is None or entry.incumbent is None:
            return None
        best = entry.chosen().best
        if best is None or not (entry.settled or entry.calls >= STRUCTURE_JUDGED_AFTER):
            return None
        entry.dense_plan = None  # judged once
        dense_best = dense.chosen().best if dense.incumbent is not None else None
        if dense_best is None or dense_best >= DENSE_BACK_BELOW * best:
            entry.events.append(f"call {entry.calls}: structured {seconds_text(best)} against the dense plan's "
                                f"{seconds_text(dense_best) if dense_best is not None else 'unmeasured time'}: kept")
            return None
        found = entry.structure
    with dense.lock:
        dense.layout_found, dense.structure_open = None, False
        dense.structure = (f"found by a later call ({found}), but the plan made with it ran {seconds_text(best)} "
                           f"against this dense plan's {seconds_text(dense_best)}: dense")
        dense.events.append(f"the structured plan ran {seconds_text(best)} in {entry.calls} calls against "
                            f"{seconds_text(dense_best)}: back to this dense plan")
    logger.debug(dense.events[-1])
    return dense


def fixed_call(call: Call, entry: PlanEntry, name: str, chunk_size: int) -> object:
    """`jacobian(plan=...)`: exactly that method and chunk size, no exploration (fallbacks only on failure)."""
    _values_changed(call, entry, name)
    result = _incumbent(call, entry, timed=False, first=name, chunk_size=chunk_size)
    _values_checked(call, entry)
    return result


# NOTE: [A ready plan's call]
# A call of a plan's method that was checked at the chunk sizes it will run, with nothing asked of this call but
# its time (no memory to learn again, no new values to check, no bar, no structure), only prepares the method,
# pushes its chunks, assembles, and (while the plan is not settled) times that. The general attempt below does
# the same among the bookkeeping other calls need (sizers, memory learning, checks, switching incumbents);
# skipping it took 23-77 us off a call of 0.5-1.3 ms (interleaved means, `plan=` calls of the benchmark's
# loss_wrt_weights and per_sample_mlp, 2-core CPU). A ready run that fails is handled as a failed attempt, and
# the other candidates follow as they would.

def _ready_chunk(call: Call, entry: PlanEntry, timed: bool, first: str | None, chunk_size: int | None):
    """(name, chunk size) when this call is a ready plan's call (NOTE: [A ready plan's call]), else None."""
    problem = entry.problem
    if problem.layout is not None or call.must_verify or entry.reverify:
        return None
    name = first or entry.incumbent
    stats = entry.stats[name]
    if ((first is None and stats.status == "failed") or not stats.verified or not stats.runs
            or _relearn_memory(call, entry, stats, timed, chunk_size)
            or call.options.progress or (call.options.progress is None and (stats.best or 0.0) > PROGRESS_AFTER_SECONDS)
            or (stats.method.vectorize == "repeat" and not entry.batch_aware_checked)):
        return None
    k = chunk_size if (first is not None and chunk_size) else entry.chunk_size(name)
    if stats.method.vectorize == "repeat" and stats.unchecked_sizes(
            FixedChunks(k).sizes(stats.method.passes(problem.col_passes, problem.row_passes))):
        return None  # a repeat method's chunk size not checked yet (each is checked once)
    return name, k


def _run_whole(call: Call, m: MethodId, problem: Problem, sizer, timed: bool, progress: Progress | None = None):
    """Run `m` on the whole basis: (assembler, result, log, state). Timed, the run and its assembly are the
    call's `work_seconds` (the method's own time, as its stats keep it)."""
    assembler, log, _, seconds, state = call.run(m, problem, sizer, progress=progress)
    if not timed:
        return assembler, assembler.result(), log, state
    result, collecting = call.collect(assembler)
    call.work_seconds = seconds + collecting
    return assembler, result, log, state


def _check_run(call: Call, problem: Problem, name: str, stats, state, assembler, result, sizes) -> None:
    """The safety net on a run's result (a VerificationError if it fails); its chunk sizes are checked then."""
    w = random_cotangents(problem)
    reference = _same_graph_reference(stats.method, state, w) or call.reference(problem, w)
    check_against(name, assembler.checkable(result), w, reference, problem)
    call.verified = True
    stats.checked_sizes.update(sizes)


def _after_failure(call: Call, entry: PlanEntry, stats, failure: BaseException, failures: list) -> None:
    """An attempt failed: a pattern's failure is the pattern's; `f`'s own errors propagate if its outputs changed;
    otherwise the method is marked failed and the next attempt follows."""
    if isinstance(failure, VerificationError) and entry.problem.layout is not None:
        raise PatternFailed(failure, entry.problem.layout)  # the pattern, not the method: NOTE: [Patterns and values]
    # f's own errors propagate unchanged if the outputs changed (a new plan is due) ...
    _check_outputs_unchanged(call, entry.problem, failure)
    with entry.lock:
        _record_failure(entry, stats, failure, call, failures)


def _incumbent(call: Call, entry: PlanEntry, timed: bool, first: str | None = None,
               chunk_size: int | None = None) -> object:
    """The incumbent on the whole basis; on failure the other candidates in turn, reverse/loop last."""
    problem = entry.problem
    failures: list[tuple[str, BaseException]] = []
    ready, done = _ready_chunk(call, entry, timed, first, chunk_size), None
    if ready is not None:
        done, k = ready
        stats = entry.stats[done]
        try:
            with grad_mode(call.options.create_graph):
                assembler, result, log, state = _run_whole(call, stats.method, problem,
                                                           FixedChunks(k, trim_between=_trimming(call, entry)), timed)
                sizes = [c.size for c in log.chunks]
                if stats.unchecked_sizes(sizes):  # a repeat method's chunks, halved after running out of memory
                    _check_run(call, problem, done, stats, state, assembler, result, sizes)
        except OutputsChanged:
            raise
        except Exception as exc:  # noqa: BLE001
            failure = exc
        else:
            call.method_name = done
            return result
        _after_failure(call, entry, stats, failure, failures)  # outside the handler: f's own error unchained
    for name in _attempts(entry, first):
        if name == done:
            continue  # the ready run's method, which failed
        stats = entry.stats[name]
        m = stats.method
        n = m.passes(problem.col_passes, problem.row_passes)
        unmeasured = not stats.runs
        relearn = False
        room = entry.room_bytes()
        if unmeasured:  # a plan made by the rules alone, or a fallback never run: measure as a first call would
            prior = PRIOR_FACTOR * (max(problem.in_bytes, problem.out_bytes) + entry.fixed_bytes - problem.result_bytes)
            sizer = Sizer(None if entry.options.chunk_size is None else min(entry.options.chunk_size, max(n, 1)),
                          room_bytes=room, prior_bytes_per_vector=prior, timed=True,
                          reserve_bytes=untracked_reserve(call.device) + entry.fixed_prior(m),
                          measured=(call.meter.kind != "none") and room is not None and n * prior > MEASURE_WHEN_PRIOR_ABOVE * room,
                          minimum=2 if m.vectorize == "vmap" and n >= 2 else 1, trim_between=_trimming(call, entry),
                          new_size_reserve=entry.new_size_reserve)
        elif relearn := _relearn_memory(call, entry, stats, timed, chunk_size):
            # NOTE: [Memory learned again in a warm process]: a first call's chunk peaks include the process's
            # one-time costs (kernels' first-use pages and workspaces), charged to the chunks that met them, so a
            # tight budget's plan is held to chunks smaller than need be. While the plan is still learning, its
            # chunks are measured again from its chunk size up, and what this call measured replaces them.
            # The plan's chunk size was measured within the budget: never below it (a line drawn through the
            # few sizes this call measures can be steeper than the truth).
            sizer = Sizer(None, room_bytes=room, timed=True, measured=True, first=stats.chunk_size,
                          minimum=stats.chunk_size, trim_between=_trimming(call, entry),
                          new_size_reserve=entry.new_size_reserve)
        else:
            sizer = FixedChunks(chunk_size if (name == first and chunk_size) else entry.chunk_size(name),
                                trim_between=_trimming(call, entry))
        progress = None
        if call.options.progress or (call.options.progress is None and (stats.best or 0.0) > PROGRESS_AFTER_SECONDS):
            progress = Progress(call.options.progress, n, name)
            progress.expect(stats.best)
        try:
            _batch_aware_once(call, entry, m)  # once per plan; a no-op for other methods
            with grad_mode(call.options.create_graph):
                assembler, result, log, state = _run_whole(call, m, problem, sizer, timed or unmeasured, progress)
                sizes = [c.size for c in log.chunks]
                if ((not stats.verified or entry.reverify or call.must_verify or stats.unchecked_sizes(sizes))
                        and not (m.is_reference and problem.layout is None)):
                    # Made for new captured values alone (not a first check, a new chunk size or a pattern's)?
                    for_values = (call.must_verify and stats.verified and not entry.reverify
                                  and not stats.unchecked_sizes(sizes))
                    checking = time.perf_counter()
                    _check_run(call, problem, name, stats, state, assembler, result, sizes)
                    if for_values:
                        call.recheck_seconds = time.perf_counter() - checking
        except OutputsChanged:
            raise
        except Exception as exc:  # noqa: BLE001
            failure = exc
        else:
            with entry.lock:
                stats.verified = True
                if unmeasured or relearn:
                    before = stats.chunk_size
                    if relearn and any(c.peak_bytes is not None for c in log.chunks):
                        stats.memory.clear()
                    _learn(stats, log, sizer)
                    stats.chunk_size = _planned_chunk(entry, stats)
                    if relearn and before is not None and stats.chunk_size is not None:
                        stats.chunk_size = max(stats.chunk_size, before)
                if unmeasured:
                    stats.add_run(call.work_seconds)
                if name != entry.incumbent and first is None:
                    entry.events.append(f"{entry.incumbent} failed at run time; {name} took over")
                    entry.stats[entry.incumbent].status = "failed"
                    stats.status = "chosen"
                    entry.incumbent = name
                    entry.reorder()
            call.method_name = name
            return result
        finally:
            if progress is not None:
                progress.close()
        _after_failure(call, entry, stats, failure, failures)
    raise _no_method(call, failures)


def _same_graph_reference(m: MethodId, state, w):
    """A reference product on the method's own plain graph (one backward pass), if it has one."""
    if m.on_plain_graph and isinstance(state, PlainGraph):
        return reference_product(state.ys, state.xs, w)
    return None


def _check_outputs_unchanged(call: Call, problem: Problem, failure: BaseException) -> None:
    if is_out_of_memory(failure) or isinstance(failure, VerificationError):
        return
    graph = evaluate_plain(call.f, call.xs, False)
    call._check_shapes(graph.ys, problem)


def _attempts(entry: PlanEntry, first: str | None):
    """`first` (default: the incumbent), then (only if it fails: a cached call stays cheap) the other
    candidates that can run, fastest first, then reverse/loop."""
    head = first or entry.incumbent
    if first is not None or entry.stats[head].status != "failed":  # an incumbent that failed a check since: skip
        yield head
    names = [head]
    plan = entry.snapshot()
    names += [c.name for c in plan.fallbacks if c.name not in names
              and (entry.stats[c.name].method.evaluates_once or not entry.once_only)]
    if "reverse/loop" in entry.stats and "reverse/loop" not in names and entry.stats["reverse/loop"].status != "failed":
        names.append("reverse/loop")
    yield from names[1:]


def _trial_failed(call: Call, entry: PlanEntry, stats, failure: BaseException, began: float) -> object:
    """A trial's method failed (an error of `f` itself propagates): recorded, charged what it took since
    `began`, and the plan's method answers the call."""
    _check_outputs_unchanged(call, entry.problem, failure)
    with entry.lock:
        _record_failure(entry, stats, failure, call, [])
        entry.credit -= time.perf_counter() - began
    call.trial = f"{stats.method.name}: failed"
    return _incumbent(call, entry, timed=True)


def _trial(call: Call, entry: PlanEntry, trial: choose.Trial) -> object:
    """Try `trial.method` on this call (see NOTE: [Planning that pays for itself])."""
    problem = entry.problem
    inc = entry.chosen()
    m = trial.method
    stats = entry.stats[m.name]
    n = m.passes(problem.col_passes, problem.row_passes)
    same_side = m.by_rows == inc.method.by_rows
    if m.vectorize == "repeat" and not entry.batch_aware_checked:
        # Before the trial's clock starts (its slice's projection must not carry it), charged to the credit.
        checking = time.perf_counter()
        try:
            _batch_aware_once(call, entry, m)
        except Exception as exc:  # noqa: BLE001 - not batch-aware (or f fails on two rows): no repeat method
            return _trial_failed(call, entry, stats, exc, checking)
        with entry.lock:
            entry.credit -= time.perf_counter() - checking
    if m.vectorize == "repeat" and not call.must_verify:
        _values_changed(call, entry, m.name)  # checked on values other than its batch-aware check's
    began = time.perf_counter()
    room = entry.room_bytes()
    line = inc.memory_line()
    # A repeat trick holds a whole forward pass per vector, a vmap only its backward state: priced higher.
    weight = 2 * PRIOR_FACTOR if m.vectorize == "repeat" and inc.method.vectorize != "repeat" else PRIOR_FACTOR
    prior = (weight * line.per_vector) if line is not None else weight * max(problem.in_bytes, problem.out_bytes)
    measured = (call.meter.kind != "none") and room is not None and n * prior > MEASURE_WHEN_PRIOR_ABOVE * room
    fixed = entry.options.chunk_size  # the caller's chunk size holds for trials too: they run as the plan would
    sizer = Sizer(trial.slice_vectors if fixed is None else min(trial.slice_vectors, fixed, max(n, 1)), timed=True,
                  measured=measured, room_bytes=room, prior_bytes_per_vector=prior,
                  reserve_bytes=untracked_reserve(call.device) + entry.fixed_prior(m), trim_between=_trimming(call, entry),
                  cap_fixed=True, new_size_reserve=entry.new_size_reserve)
    call.trial = m.name
    verdict = {"stopped": False}

    def after_first(log: RunLog) -> bool:
        sizer.fixed = fixed if fixed is None else min(fixed, max(n, 1))  # else as large as the memory line allows
        sizer.cap_fixed = False  # the caller's chunk size from here on, as the plan's calls run it (first_call too)
        elapsed = time.perf_counter() - began
        # What the trial paid once (its own evaluation of `f`: the torch.func engine's under its transform, a
        # repeat method's first copies) is not paid again per slice; the slice's chunk is. A loop's time is per
        # vector (chunk * n / k); a small chunk of a batched method is mostly fixed cost, so its projection sits
        # between "all fixed" and "all per vector" (chunk * sqrt(n / k)). Charged as a whole run, a 3-row slice of
        # the torch.func engine on a 48-row robot arm projected 2.2 ms against the repeat trick's 0.45 ms (0.22 ms
        # and a check on new captured values); jacrev takes 0.25 ms.
        power = 1.0 if m.vectorize == "loop" else 0.5
        done = log.vectors
        work = log.seconds if log.seconds is not None else elapsed
        projected = (elapsed - work) + work * (n / max(done, 1)) ** power
        # Both sides with the checks their calls pay on new captured values (a repeat method's).
        if projected + stats.extra > choose.ABORT_PROJECTED * inc.cost:
            verdict["stopped"] = True
            verdict["projected"] = projected
            verdict["vectors"] = done
            return False
        return True

    result = None
    try:
        with grad_mode(call.options.create_graph):
            assembler, log, position, seconds, state = call.run(m, problem, sizer, after_chunk=after_first)
            if position == n:
                result, collecting = call.collect(assembler)
                seconds += collecting
                _check_run(call, problem, m.name, stats, state, assembler, result, [c.size for c in log.chunks])
    except OutputsChanged:
        raise
    except Exception as exc:  # noqa: BLE001
        failure = exc
    else:
        failure = None
    if failure is not None:
        if isinstance(failure, VerificationError) and problem.layout is not None:
            raise PatternFailed(failure, problem.layout)  # the pattern, not the method: NOTE: [Patterns and values]
        return _trial_failed(call, entry, stats, failure, began)
    if result is not None:  # the alternative computed the whole Jacobian, verified
        with entry.lock:
            stats.verified = True
            stats.status = "measured" if stats.status != "chosen" else "chosen"
            stats.add_run(seconds)
            _learn(stats, log, sizer)
            stats.chunk_size = _planned_chunk(entry, stats)
            planned = n_chunks(n, stats.chunk_size or n)
            stats.sliced_share = min(planned / len(log.chunks), 1.0) if len(stats.runs) == 1 else 1.0
            # Charged all it cost beyond an incumbent call: the method's time, and the check and collection
            # around it (an alternative's first run also pays its one-time costs on this function).
            entry.credit -= max(time.perf_counter() - began - inc.best, 0.0)
            entry.consider_switch()
        call.trial = f"{m.name}: {seconds_text(seconds)} against {seconds_text(inc.best)}"
        call.method_name = m.name
        return result
    # Stopped after its first slice: projected too slow. The incumbent finishes (or redoes) the work.
    spent = time.perf_counter() - began
    projected = verdict.get("projected", math.inf)
    with entry.lock:
        stats.status = "slower"
        stats.reason = f"projected {seconds_text(projected)} from {verdict.get('vectors', log.chunks[0].size)} vectors"
        stats.prior = projected
        stats.stopped_on_slice = True
        _learn(stats, log, sizer)
        entry.credit -= spent
    call.trial = f"{m.name}: stopped, {stats.reason}"
    if same_side:
        with grad_mode(call.options.create_graph):
            assembler, inc_log, _, _, inc_state = call.run(inc.method, problem,
                                                           FixedChunks(entry.chunk_size(inc.method.name),
                                                                       _trimming(call, entry)),
                                                           start=position, assembler=assembler)
            result = assembler.result()
            # Both parts are checked unless each ran as it was checked before: a repeat method at a chunk size
            # of its own (the rest of the basis can make the incumbent's last chunk one it never ran).
            rest = [c.size for c in inc_log.chunks]
            slice_unchecked = not stats.verified or stats.unchecked_sizes([log.chunks[0].size])
            if slice_unchecked or inc.unchecked_sizes(rest) or call.must_verify:
                checking = time.perf_counter()
                w = random_cotangents(problem)
                reference = _same_graph_reference(inc.method, inc_state, w) or call.reference(problem, w)
                try:
                    check_against(m.name, assembler.checkable(result), w, reference, problem)
                    call.verified = True
                    stats.verified = True
                    stats.checked_sizes.add(log.chunks[0].size)
                    inc.checked_sizes.update(rest)
                except VerificationError as exc:  # the unchecked part was wrong: the incumbent redoes the call
                    with entry.lock:
                        # The part that ran unchecked, or on new values the repeat trick's (NOTE: [A repeat plan
                        # on changing values]).
                        culprit = stats if slice_unchecked or m.vectorize == "repeat" else inc
                        _record_failure(entry, culprit, exc, call, [])
                    return _incumbent(call, entry, timed=True)
                finally:
                    with entry.lock:
                        entry.credit -= time.perf_counter() - checking  # the trial's check, too
        call.method_name = f"{m.name} + {inc.method.name}"
        return result
    partial = assembler
    result = _incumbent(call, entry, timed=True)
    if problem.layout is None:  # colour groups are not columns: only a dense slice compares column by column
        try:
            check_columns(m.name, partial.result(), 0, position, result, problem)
        except VerificationError as exc:
            with entry.lock:
                _record_failure(entry, stats, exc, call, [])
    return result


def tune(call: Call, entry: PlanEntry, time_limit: float | None) -> PlanEntry:
    """Exhaustive search: whole trial calls, one after another, until settled or out of time."""
    began = time.perf_counter()
    while not entry.settled and (time_limit is None or time.perf_counter() - began < time_limit):
        later_call(call, entry, explore=True, credit=math.inf)
    entry.effort = "exhaustive"
    return entry
