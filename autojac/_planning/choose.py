"""Pure decisions: the first method of a new plan, the order alternatives are tried in, and when.

This module is the decision list that the docstring of `autojac.jacobian` repeats.
It imports nothing that runs `f`: the facts come in as numbers, so it is tested
with made-up ones.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from .._core.options import Options

LOOP_MAX = 2
"""A basis of at most this many vectors is pushed one vector at a time (a loop has no vmap overhead).

Measured with torch's own loop against its batched VJP (2-core CPU, warm, medians of interleaved rounds), for a
3 -> 3 map and a 64-wide MLP: n = 2 ties (1.05x, 0.92x), n = 3 the loop takes 1.45x and 1.27x, n = 4 1.86x and
1.54x, n = 6 2.55x and 2.11x. At 4 the suite's 3 -> 3 problem kept a loop 1.5x slower than torch's vectorized call."""
PRUNE_PASSES = 4
"""A mode needing more than this many times the passes of the other is not tried (unless asked for)."""
PRUNE_PREDICTED = 4.0
"""An alternative predicted to take more than this many times the incumbent's time is not tried."""
ABORT_PROJECTED = 1.5
"""A trial whose first slice projects to more than this many times the incumbent's cost (its fastest call, plus
a repeat plan's checks on new captured values) stops there."""
RETRY_PROJECTED = 4.0
"""A trial stopped on its first slice's projection, if that projection is under this many times the incumbent's
cost, is run once more on a whole call before the plan settles: a 3-row slice of the torch.func engine on a
48-row robot arm projected 1.5 ms; its whole run takes 0.25 ms, against the repeat trick's 0.45 ms (0.22 ms
and a check on new captured values) in a loop of closures."""
CONFIRM_WITHIN = 2.0
"""A measured alternative this close to the best is measured on a second whole call before the plan settles.

An alternative's first whole call is its first on this function (a new vmap engine's first batched pass):
the `reverse/vmap [autograd]` engine took 1.41-1.46 ms on its first classifier call and 0.96 ms warm, while
the incumbent's best is the fastest of many runs. Within 1.10 only, that engine lost to a 1.42 ms incumbent
in a benchmark run and the plan settled 2x slower than `torch.autograd.functional.jacobian`. Within 1.5 only,
the repeat trick's first run (21.8 ms on the RK4 rollout, its first batch of copies paying the pages of a 16x larger
forward pass; 11.8 ms warm) lost to the autograd engine's 15.2 ms without a second run."""
CONFIRM_RUNS = 3
"""Whole runs a close contender (CONFIRM_WITHIN) gets before the plan settles: its first and two more.

torch.func warms up over its first few calls on a function, not one: the sum trick's `vmap` over `torch.func.vjp`
on a per-sample CNN (B=64) took 16.8-33.1 ms, then 13.5-20.0 ms, then 8.5-12.2 ms in fresh processes (2-core CPU).
Confirmed on its second run alone, that engine measured 18.3 and 17.2 ms against the autograd engine's 12.2 ms,
and the plan settled on the engine 11-16% slower (frozen, interleaved: 10.9 against 12.6 ms)."""
CONFIRM_MAX_RUNS = 6
"""A close contender whose latest run was still its fastest by over 10% (still warming up) gets more whole runs, up
to this many: on the per-sample CNN (B=64) the torch.func engine's three runs took 16.1, 15.6 and 11.5 ms against
the autograd engine's 9.5 ms, and the plan settled there; frozen and interleaved afterwards, the torch.func engine
took 6.1-8.6 ms from its fifth call on, and the benchmark's sum trick (the same engine) beat the plan 1.28x."""
SWITCH_BELOW = 0.97
"""An alternative replaces the incumbent when its fastest whole call is below this share of the incumbent's."""
SWITCH_BELOW_COLD = 0.8
"""The same while the incumbent's only run is its first call's, a cold one (NOTE: [No warm wait behind a looping
engine])."""
EXPLORE_SHARE = 0.10
"""Each call of an unsettled plan adds this share of the incumbent's fastest call to the exploration credit."""
INITIAL_CREDIT = 0.5
"""A new plan starts with this share of its first call's time as exploration credit."""
PESSIMISM = 1.0
"""A trial's slice is charged as if the alternative took (1 + this) times the incumbent's time per vector."""
WHOLE_UP_TO = 64
"""A batched method with at most this many vectors to push is tried whole or not yet, never on a slice: one chunk
holds them all, so a slice costs about as much as the whole run (its fixed costs) and projects poorly (a 2-row
slice of the torch.func engine on an 8-row arm projected 1.31 ms, and cost 1.3 ms beyond the incumbent's 0.67 ms
call; its whole runs took 0.74-0.81 ms)."""
SLICE_SHARE_MIN = 4
"""A batched method's first slice holds at least 1/this of its vectors, or it waits: its projection scales the
slice's chunk by the square root of the basis over the slice, and a small chunk is mostly fixed cost (2 of a
transformer layer's 256 rows on the repeat trick projected 13.75 ms; its whole run took 5.6-7.1 ms)."""
TRIAL_FIXED_SECONDS = 5e-4
"""What a trial costs beyond its own work (NOTE: [What a trial costs before its first vector]): the trial's own
machinery, taken from the suite's small problems (2-core CPU)."""

FORWARD_PASS_COST = 2.0
"""Prior cost of a forward-mode pass against a reverse-mode one."""
REPEAT_PRIOR = 0.85
"""Prior time of the repeat trick against the incumbent vmap of the same mode: unknown, tried first.

Measured warm on the suite's 18 problem sizes (2-core CPU, reverse mode): the repeat trick was the fastest reverse
method on 11 (robot arm 0.42 against 0.75 ms for the autograd engine, RK4 rollout 11.8 against 18.9 ms, the
transformer layer 5.1 against 10.2 ms); the other vmap engine won on 4, by 1.05x to 1.4x but for a probe-detected
loop (grid residual)."""
ENGINE_PRIOR = 0.9
"""Prior time of the other vmap engine: unknown until tried (1.1x to 8x either way, see NOTE: [Two engines for vmap]).

Where the first call probed torch.autograd's vmap for loops, or counted them in its own first chunk on that engine
(`Facts.autograd_loops`), the prior follows the count:
no loops, the engines run the same kernels and the torch.func engine is tried after the repeat trick
(ENGINE_PRIOR_NO_LOOPS); loops, the func engine went first and the autograd engine is predicted slower
(ENGINE_PRIOR_LOOPS)."""
ENGINE_PRIOR_NO_LOOPS = 1.0
ENGINE_PRIOR_LOOPS = 2.0


@dataclass(frozen=True)
class MethodId:
    mode: str
    vectorize: str
    engine: str = ""

    @functools.cached_property
    def name(self) -> str:  # read some 20 times a first call (stats are keyed by it): made once
        return f"{self.mode}/{self.vectorize}" + (f" [{self.engine}]" if self.engine else "")

    @property
    def by_rows(self) -> bool:
        return self.mode == "reverse"

    @property
    def evaluates_once(self) -> bool:
        """Whether the whole Jacobian comes from one evaluation of `f` (see the README's table)."""
        return self.mode == "reverse" and self.vectorize != "repeat" or (
            self.mode == "forward-trick" and self.vectorize != "repeat")

    @property
    def on_plain_graph(self) -> bool:
        """Whether it can start from the plain autograd evaluation that a new plan begins with."""
        return self.evaluates_once and self.engine in ("", "autograd")

    @property
    def is_reference(self) -> bool:
        """reverse/loop is torch's own loop: the reference the safety net checks the others against."""
        return (self.mode, self.vectorize) == ("reverse", "loop")

    def passes(self, n_in: int, n_out: int) -> int:
        return n_out if self.by_rows else n_in


ALL = (
    MethodId("reverse", "vmap", "func"), MethodId("reverse", "vmap", "autograd"),
    MethodId("reverse", "repeat"), MethodId("reverse", "loop"),
    MethodId("forward", "vmap"), MethodId("forward", "repeat"), MethodId("forward", "loop"),
    MethodId("forward-trick", "vmap", "func"), MethodId("forward-trick", "vmap", "autograd"),
    MethodId("forward-trick", "repeat"), MethodId("forward-trick", "loop"),
)
BY_NAME = {m.name: m for m in ALL}


def allowed(options: Options, once_only: bool) -> list[MethodId]:
    """Every method the options allow; only one-evaluation methods for a random or inconsistent `f`."""
    return [
        m for m in ALL
        if options.mode in ("auto", m.mode) and options.vectorize in ("auto", m.vectorize)
        and (m.evaluates_once or not once_only)
    ]


FORWARD_RATIO = 4
"""Forward modes go first only when they need this many times fewer passes: a forward pass costs more than a
reverse one on small functions (robot_arm, 6 -> 12: jacrev 0.26 ms, jacfwd 0.70 ms)."""


def preferred_mode(n_in: int, n_out: int) -> str:
    """Reverse, unless the outputs are over FORWARD_RATIO times the inputs: then the double-VJP trick.

    The trick starts from the same evaluation as reverse mode (see `first_chain`)
    and needs no forward-mode formulas; native forward mode is tried as an alternative.
    """
    return "forward-trick" if n_out > FORWARD_RATIO * n_in else "reverse"


def first_chain(options: Options, n_in: int, n_out: int, once_only: bool) -> list[MethodId]:
    """The first method of a new plan, then its fallbacks, in order.

    - The mode with fewer passes (or the one asked for); the other modes after it.
    - A basis of at most LOOP_MAX vectors: the loop on the plain evaluation
      (for reverse mode, torch's own loop: nothing to check).
    - Otherwise vmap with the autograd engine, then the torch.func engine, then
      the loop. Repeat only when asked for (it needs a batch-aware `f`; auto
      tries it on later calls).

    NOTE: [The first call's engine] The autograd engine pushes the chunks through the
    plain evaluation the call starts from, so a first call evaluates `f` once, as torch's
    own `jacobian` does; the torch.func engine evaluates it again under its transform.
    Measured on the 22 benchmark problems (2-core CPU, first calls, median of 7): the
    autograd engine first gave 0.92x the first-call time (geomean; classifier 0.63-0.70x,
    decoder 0.69-0.81x, RK4 rollout 0.40x), losing where its vmap has no batching rule for
    an op and loops over the chunk (grid residual's roll: 2.4x; robot arm 1.6x). Later
    calls try the repeat trick, then the torch.func engine (REPEAT_PRIOR, ENGINE_PRIOR), so a plan
    that started on the slower engine leaves it within a few calls. And an `f` that writes a
    captured tensor it also differentiates through (a step counter, a running average)
    keeps a valid graph: a second evaluation bumps that tensor's version and makes the
    first graph unusable, which left such functions with no method at all.
    """
    # Only these comparisons matter, so the chain is worked out once per combination of them.
    order = (n_out > n_in) - (n_out < n_in)
    forward_first = preferred_mode(n_in, n_out) != "reverse"
    return list(_chain(options.mode, options.vectorize, n_in <= LOOP_MAX, n_out <= LOOP_MAX, order, forward_first,
                       once_only))


@functools.lru_cache(maxsize=256)
def _chain(mode_asked: str, vectorize: str, small_in: bool, small_out: bool, order: int, forward_first: bool,
           once_only: bool) -> tuple[MethodId, ...]:
    candidates = [m for m in ALL if mode_asked in ("auto", m.mode) and vectorize in ("auto", m.vectorize)
                  and (m.evaluates_once or not once_only)]
    if not candidates:
        return ()
    # Representative pass counts with the same comparisons as the real ones.
    if small_in and small_out:
        n_in, n_out = 3, 3 + order
    else:
        n_in, n_out = (4 if small_in else 1000), (4 if small_out else 1000 + order)
    mode = mode_asked if mode_asked != "auto" else ("forward-trick" if forward_first else "reverse")
    # Then fewer passes first; native forward before the trick (it needs no backward formulas,
    # the likely reason the first mode failed).
    others = sorted((m for m in ("forward", "forward-trick", "reverse") if m != mode),
                    key=lambda m: n_out if m == "reverse" else n_in)
    modes = [mode, *others]

    def rank(m: MethodId) -> tuple:
        small = small_out if m.by_rows else small_in
        if vectorize != "auto":
            place = 0
        elif small:
            place = {"loop": 0, "vmap": 1, "repeat": 2}[m.vectorize]
        else:
            place = {"vmap": 0, "loop": 1, "repeat": 2}[m.vectorize]
        engine = 0 if m.engine in ("", "autograd") else 1  # the plain evaluation's engine first
        return (modes.index(m.mode), place, engine)

    chain = sorted(candidates, key=rank)
    if vectorize == "auto":
        chain = [m for m in chain if m.vectorize != "repeat"] + [m for m in chain if m.vectorize == "repeat"]
    return tuple(chain)


@dataclass(frozen=True)
class Facts:
    """What a plan has learnt about `f` that predictions are made from (seconds; None: unknown)."""

    n_in: int
    n_out: int
    eval_seconds: float | None
    vjp_seconds: float | None
    autograd_loops: int | None = None
    """Op calls torch.autograd's vmap looped over per vector in the first call's probe, at least 1 where its
    batching was timed no faster than a loop (None: not probed). Only whether it is 0 orders the engines."""
    probe_seconds_per_vector: float | None = None
    """The probe's time per vector, its few vectors batched on the autograd engine (None: not probed)."""


def prior_seconds(m: MethodId, incumbent: MethodId, incumbent_seconds: float, facts: Facts) -> float | None:
    """A rough prediction of a whole Jacobian by `m`, from the incumbent's measured time and the facts.

    Loops are predicted from one evaluation and one unbatched product; a vmap or
    repeat method from the incumbent's time, scaled by the ratio of passes.
    """
    n = m.passes(facts.n_in, facts.n_out)
    ratio = n / max(incumbent.passes(facts.n_in, facts.n_out), 1)
    if m.vectorize == "loop":
        if facts.eval_seconds is None or facts.vjp_seconds is None:
            return None
        per_pass = {"reverse": facts.vjp_seconds, "forward-trick": 2 * facts.vjp_seconds,
                    "forward": 2 * facts.eval_seconds}[m.mode]
        return facts.eval_seconds + n * per_pass
    if m.vectorize == "repeat":
        factor = REPEAT_PRIOR
        if facts.autograd_loops and (incumbent.vectorize, incumbent.engine) == ("vmap", "autograd"):
            # Its backward is one plain pass, untouched by the loops that slow the incumbent: still first.
            factor /= ENGINE_PRIOR_LOOPS
    elif facts.autograd_loops is None or m.mode != "reverse":
        factor = ENGINE_PRIOR
    elif m.engine == "autograd":
        factor = ENGINE_PRIOR_LOOPS if facts.autograd_loops else ENGINE_PRIOR_NO_LOOPS
    else:
        factor = 1 / ENGINE_PRIOR_LOOPS if facts.autograd_loops else ENGINE_PRIOR_NO_LOOPS
    if m.by_rows != incumbent.by_rows:  # a forward pass costs more than a reverse one (see FORWARD_RATIO)
        factor *= FORWARD_PASS_COST if incumbent.by_rows else 1 / FORWARD_PASS_COST
    return incumbent_seconds * ratio * factor


def exploration_order(
    candidates: Sequence[MethodId], incumbent: MethodId, incumbent_seconds: float, facts: Facts,
) -> list[tuple[MethodId, float | None, str]]:
    """Every candidate but the incumbent, with its prior time and, if it is not worth trying, why.

    Not tried: a mode needing over PRUNE_PASSES times the incumbent's passes, any
    method predicted over PRUNE_PREDICTED times the incumbent's time, and a vmap or
    repeat method of a mode with one pass where that mode's loop is a candidate: one
    vector is the loop's product (torch.autograd's vmap runs it as the loop does,
    torch.func's adds its transform around the same backward, a repeat method a batch
    of one copy): a scalar loss's plan has nothing to try and settles. The rest are
    tried fastest prediction first (ties: the order of `candidates`).
    """
    rows = []
    passes = incumbent.passes(facts.n_in, facts.n_out)
    looped = {c.mode for c in candidates if c.vectorize == "loop"}
    for i, m in enumerate(candidates):
        if m == incumbent:
            continue
        prior = prior_seconds(m, incumbent, incumbent_seconds, facts)
        n = m.passes(facts.n_in, facts.n_out)
        if n == 1 and m.vectorize != "loop" and m.mode in looped:
            rows.append((m, prior, f"one vector: {m.mode}/loop's product", i))
        elif n > PRUNE_PASSES * max(passes, 1):
            rows.append((m, prior, f"{n} passes against {passes}", i))
        elif prior is not None and prior > PRUNE_PREDICTED * incumbent_seconds:
            rows.append((m, prior, f"predicted {_seconds(prior)} against {_seconds(incumbent_seconds)}", i))
        else:
            rows.append((m, prior, "", i))
    rows.sort(key=lambda r: (r[2] != "", r[1] if r[1] is not None else float("inf"), r[3]))
    return [(m, prior, why) for m, prior, why, _ in rows]


@dataclass(frozen=True)
class Trial:
    """Try `method` on this call: its first `slice_vectors` basis vectors first, projected, then the rest or not."""

    method: MethodId
    slice_vectors: int


def slice_for(m: MethodId, incumbent: MethodId, incumbent_seconds: float, facts: Facts, credit: float,
              fixed_seconds: float, saving: float = 0.0) -> int:
    """The largest first slice (basis vectors) whose pessimistic charge the credit covers; 0 if none.

    The charge of s vectors: the alternative's fixed costs (NOTE: [What a trial
    costs before its first vector]) plus, per vector, PESSIMISM times the
    incumbent's time per vector if the slice is part of the answer (same mode),
    or 1 + PESSIMISM times it if it is not (another mode: the incumbent still
    does all the work). A whole run's charge is lowered by `saving`, what it is
    predicted to save against the incumbent's call.
    """
    n = m.passes(facts.n_in, facts.n_out)
    if n == 0:
        return 0
    per_vector = incumbent_seconds / max(incumbent.passes(facts.n_in, facts.n_out), 1)
    weight = PESSIMISM if m.by_rows == incumbent.by_rows else 1 + PESSIMISM
    room = credit - fixed_seconds
    if room + saving >= n * weight * per_vector:
        return n
    if room <= 0 or (m.vectorize != "loop" and n <= WHOLE_UP_TO):
        return 0
    s = int(room / max(weight * per_vector, 1e-12))
    smallest = 1 if m.vectorize == "loop" else -(-n // SLICE_SHARE_MIN)
    return min(n, s) if s >= smallest else 0


def _seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"
