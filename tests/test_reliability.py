"""No silent wrong answers: impure and composed functions through every method, against torch in float64.

Each function here made autojac return a wrong Jacobian without an error before;
every (mode, vectorize) and auto must now give torch's answer or a clean
`AutojacError`, and leave the caller's tensors and the process's state alone.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import DEVICE
from torch import nn

import autojac

COMBOS = [(m, v) for m in ("reverse", "forward", "forward-trick") for v in ("vmap", "repeat", "loop")] + [("auto", "auto")]
IDS = [f"{m}-{v}" for m, v in COMBOS]


def x64(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)


def right_or_clean_error(run, want):
    """The call gives `want`, or refuses with an AutojacError; returns the result or None."""
    try:
        got = run()
    except autojac.AutojacError:
        return None
    torch.testing.assert_close(got, want)
    return got


# --- 1. Jacobians of Jacobians, and torch.func transforms over autojac -------------------------

def energy(x):
    return (x ** 3).sum() + (x[..., :-1] * x[..., 1:]).sin().sum()


def hessian_of_energy(x):
    return torch.autograd.functional.hessian(energy, x)


@pytest.mark.parametrize("mode, vectorize", COMBOS, ids=IDS)
def test_hessian_as_jacobian_of_jacobian_whatever_the_outer_method(mode, vectorize):
    x = x64(12)
    inner = lambda t: autojac.jacobian(energy, t, create_graph=True)  # noqa: E731
    got = right_or_clean_error(lambda: autojac.jacobian(inner, x, mode=mode, vectorize=vectorize), hessian_of_energy(x))
    if (mode, vectorize) == ("auto", "auto") or vectorize in ("vmap", "loop"):
        assert got is not None  # these can always run; before, every forward outer gave zeros


@pytest.mark.parametrize("inner_mode", ["reverse", "forward", "forward-trick", "auto"])
@pytest.mark.parametrize("transform", ["jacfwd", "jacrev", "jvp", "vmap", "grad", "hessian"])
def test_torch_func_transforms_over_autojac(transform, inner_mode):
    x = x64(6)
    grad_e = lambda t: autojac.jacobian(energy, t, mode=inner_mode, create_graph=True)  # noqa: E731
    H = hessian_of_energy(x)
    try:
        if transform == "jacfwd":
            got, want = torch.func.jacfwd(grad_e)(x), H
        elif transform == "jacrev":
            got, want = torch.func.jacrev(grad_e)(x), H
        elif transform == "jvp":
            v = x64(6, seed=1)
            got, want = torch.func.jvp(grad_e, (x,), (v,))[1], H @ v
        elif transform == "vmap":
            X = x64(3, 6, seed=2)
            got = torch.func.vmap(grad_e)(X)
            want = torch.stack([torch.autograd.functional.jacobian(energy, r) for r in X])
        elif transform == "grad":
            got, want = torch.func.grad(lambda t: grad_e(t).pow(2).sum())(x), 2 * H @ torch.autograd.functional.jacobian(energy, x)
        else:
            got, want = torch.func.jacfwd(torch.func.jacrev(lambda t: energy(t) * 0 + grad_e(t).sum()))(x), torch.func.hessian(
                lambda t: torch.autograd.functional.jacobian(energy, t, create_graph=True).sum())(x)
    except autojac.AutojacError as exc:
        # Only forward mode inside forward-mode AD may refuse (PyTorch allows one forward level).
        assert inner_mode == "forward" and transform in ("jacfwd", "jvp", "hessian"), exc
        assert "one forward-AD level" in str(exc)
        return
    torch.testing.assert_close(got, want)


def test_nested_autojac_with_tuple_inputs():
    def E(x, y):
        return (x.sin() * y[:3]).sum() + (y ** 2).sum() * x.sum()

    x, y = x64(3), x64(4, seed=1)
    inner = lambda a, b: autojac.jacobian(E, (a, b), create_graph=True)  # noqa: E731
    want = torch.autograd.functional.hessian(E, (x, y))
    for mode in ("reverse", "forward", "forward-trick", "auto"):
        got = autojac.jacobian(inner, (x, y), mode=mode)
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(got[i][j], want[i][j])


@pytest.mark.parametrize("outer_mode", ["reverse", "forward", "forward-trick", "auto"])
def test_a_jacobian_inside_f_is_differentiated_without_create_graph(outer_mode):
    # NOTE: [A Jacobian inside f]: torch's jacobian nested in itself gives zeros here; every outer mode must give
    # the Hessian (reverse once gave zeros and forward the Hessian, so forward failed its own check).
    x = x64(6)
    inner = lambda t: autojac.jacobian(energy, t)  # noqa: E731
    torch.testing.assert_close(autojac.jacobian(inner, x, mode=outer_mode), hessian_of_energy(x))
    nested_torch = torch.autograd.functional.jacobian(lambda t: torch.autograd.functional.jacobian(energy, t), x)
    assert nested_torch.abs().max() == 0  # the behaviour this departs from


def test_a_jacobian_inside_f_stays_constant_for_detached_inputs_and_outside_autojac():
    x = x64(6)
    assert autojac.jacobian(lambda t: autojac.jacobian(energy, t.detach()), x).abs().max() == 0
    plain = autojac.jacobian(energy, x.clone().requires_grad_())  # not inside an autojac evaluation
    assert not plain.requires_grad


def test_forward_ad_duals_keep_their_tangents():
    x, v = x64(5), x64(5, seed=1)
    g = lambda t: autojac.jacobian(energy, t, create_graph=True)  # noqa: E731
    with fwAD.dual_level():
        out = g(fwAD.make_dual(x, v))
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, hessian_of_energy(x) @ v)


# --- 2. create_graph gives the same metadata whatever the method -------------------------------

@pytest.mark.parametrize("mode, vectorize", COMBOS, ids=IDS)
def test_create_graph_result_is_differentiable_in_every_mode(mode, vectorize):
    f = lambda t: torch.sin(t) * t  # noqa: E731
    x = x64(3)  # does not require grad
    want = torch.autograd.functional.jacobian(f, x, create_graph=True)
    got = autojac.jacobian(f, x, mode=mode, vectorize=vectorize, create_graph=True)
    assert got.requires_grad == want.requires_grad is True
    torch.testing.assert_close(got, want)


# --- 3. randomness inside f: the Jacobian of one realization ------------------------------------

def dropout_f(x):
    return F.dropout(x.sum() * torch.ones(256, dtype=x.dtype, device=x.device), 0.5, training=True)


def noisy_f(x):
    return torch.tanh(x * torch.randn(x.shape[-1], dtype=x.dtype, device=x.device)).repeat(3)


@pytest.mark.parametrize("f", [dropout_f, noisy_f], ids=["dropout", "randn"])
@pytest.mark.parametrize("mode, vectorize", COMBOS, ids=IDS)
def test_random_f_gives_the_jacobian_of_the_realization_torch_gives(f, mode, vectorize):
    x = x64(4)
    torch.manual_seed(123)
    want = torch.autograd.functional.jacobian(f, x)
    rng_after_torch = torch.get_rng_state()
    torch.manual_seed(123)
    got = right_or_clean_error(lambda: autojac.jacobian(f, x, mode=mode, vectorize=vectorize), want)
    if got is not None:
        assert torch.equal(got, want)  # the same realization, bit for bit
        assert torch.equal(torch.get_rng_state(), rng_after_torch)  # as after one evaluation of f
    if mode == "auto":
        assert got is not None


def test_auto_uses_only_one_evaluation_methods_for_a_random_f():
    p = autojac.plan(dropout_f, x64(4))
    assert p.problem.draws_random
    chosen = autojac._methods.method(p.mode, p.vectorize, p.engine)
    assert chosen.evaluates_once
    assert any("draws random numbers" in c.reason and c.status == "not tried" for c in p.candidates)


class _OwnGenerator:
    """A function with a random generator of its own, which autojac cannot put back."""

    def __init__(self):
        self.g = torch.Generator(device=DEVICE).manual_seed(0)

    def __call__(self, x):
        return x.sum() * torch.rand(64, generator=self.g, dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("mode, vectorize", COMBOS, ids=IDS)
def test_a_generator_of_f_s_own_never_gives_a_mix_of_realizations(mode, vectorize):
    f = _OwnGenerator()
    x = x64(4)
    try:
        got = autojac.jacobian(f, x, mode=mode, vectorize=vectorize)
    except autojac.AutojacError:
        assert mode != "auto"
        return
    # One realization: every column is the same random vector (d/dx_j of sum(x) * r = r).
    assert torch.equal(got, got[:, :1].expand_as(got))
    assert bool((got > 0).all())


# --- 4. plans follow module modes and grad mode ------------------------------------------------

def test_a_plan_made_in_eval_is_not_reused_in_train():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 8)).double().to(DEVICE)
    x = x64(4)
    net.eval()
    autojac.jacobian(net, x)
    closure = lambda t: net(t)  # noqa: E731
    autojac.jacobian(closure, x)
    net.train()
    for f in (net, closure):
        torch.manual_seed(5)
        want = torch.autograd.functional.jacobian(f, x)
        torch.manual_seed(5)
        assert torch.equal(autojac.jacobian(f, x), want)
    assert autojac.plan(net, x) is not None and autojac.plan(net, x).problem.draws_random


def test_grad_mode_is_part_of_the_plan_key():
    f = lambda t: t.exp()  # noqa: E731
    x = x64(3)
    p = autojac.plan(f, x)
    with torch.no_grad():
        q = autojac.plan(f, x)
        torch.testing.assert_close(autojac.jacobian(f, x), torch.diag(x.exp()))
    assert p is not q


# --- 5. in-place writes ------------------------------------------------------------------------

def mul_in_place(t):
    t.mul_(2)
    return t * 1.0


def center_in_place(t):
    t -= t.mean()
    return t ** 2


@pytest.mark.parametrize("f", [mul_in_place, center_in_place], ids=["mul_", "-=mean"])
@pytest.mark.parametrize("mode, vectorize", COMBOS, ids=IDS)
def test_f_writing_into_its_input_never_changes_the_callers_tensor(f, mode, vectorize):
    x = x64(5)
    keep = x.clone()
    want = torch.autograd.functional.jacobian(lambda t: f(t.clone()), x.clone())
    got = right_or_clean_error(lambda: autojac.jacobian(f, x, mode=mode, vectorize=vectorize), want)
    assert torch.equal(x, keep)
    if mode == "auto":
        assert got is not None


def test_f_writing_into_a_captured_buffer_gets_one_realization():
    buf = torch.zeros(4, dtype=torch.float64, device=DEVICE)

    def f(x):  # state of its own: every evaluation adds x to the buffer
        buf.add_(x.detach())
        return x * buf

    x = x64(4)
    got = autojac.jacobian(f, x)
    # d/dx (x * b) with b treated as data = diag(b) for the b of one evaluation: b is n * x after n of them.
    ratio = got.diagonal() / x
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and float(ratio[0]) >= 1
    assert torch.count_nonzero(got - torch.diag(got.diagonal())) == 0


# --- 6. inference mode, no_grad, enable_grad ---------------------------------------------------

@pytest.mark.parametrize("context", ["inference_mode", "no_grad", "enable_grad"])
@pytest.mark.parametrize("mode, vectorize", COMBOS, ids=IDS)
def test_grad_contexts(context, mode, vectorize):
    W = x64(6, 4, seed=3)
    f = lambda t: torch.tanh(t @ W.T)  # noqa: E731
    x = x64(4)
    want = torch.autograd.functional.jacobian(f, x)
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "enable_grad": torch.enable_grad}[context]
    with ctx():
        xi = x.clone()
        got = autojac.jacobian(f, xi, mode=mode, vectorize=vectorize)
        assert torch.is_grad_enabled() == (context == "enable_grad")
    torch.testing.assert_close(got, want)


# --- 7. f that calls torch.autograd.grad itself ------------------------------------------------

@pytest.mark.parametrize("mode, vectorize", COMBOS, ids=IDS)
def test_f_computing_forces_with_autograd_grad(mode, vectorize):
    def forces(t):
        t = t if t.requires_grad else t.requires_grad_()
        return -torch.autograd.grad(energy(t), t, create_graph=True)[0]

    x = x64(5)
    want = -hessian_of_energy(x)
    got = right_or_clean_error(lambda: autojac.jacobian(forces, x, mode=mode, vectorize=vectorize), want)
    if mode in ("auto", "reverse") and vectorize != "repeat":
        assert got is not None


# --- 8. threads, and global state after every call ---------------------------------------------

def _state():
    return (torch.is_grad_enabled(), fwAD._current_level, list(warnings.filters), torch.get_rng_state())


def test_eight_threads_mixing_functions_and_modes():
    W = x64(5, 4, seed=4)
    jobs = [
        (lambda t: torch.sin(t) * t.sum(), "forward", "loop"),
        (lambda t: torch.tanh(t @ W.T), "forward", "vmap"),
        (lambda t: t.exp() * t[0], "auto", "auto"),
        (lambda t: (t ** 2).sum(-1, keepdim=True) * t, "forward-trick", "vmap"),
    ]
    before = _state()
    results, errors = [], []

    def work(i):
        f, mode, vectorize = jobs[i % len(jobs)]
        for r in range(4):
            x = x64(4, seed=10 * i + r)
            try:
                got = autojac.jacobian(f, x, mode=mode, vectorize=vectorize)
                results.append(torch.allclose(got, torch.autograd.functional.jacobian(f, x)))
            except Exception as exc:  # noqa: BLE001 (collected and reported below)
                errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 32 and all(results)
    after = _state()
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])


@pytest.mark.parametrize("mode, vectorize", COMBOS, ids=IDS)
def test_keyboard_interrupt_mid_call_leaves_global_state_as_one_evaluation_leaves_it(mode, vectorize):
    calls = []

    def f(t):
        calls.append(1)
        torch.rand(3)  # draws from the global RNG
        if len(calls) == 3:
            raise KeyboardInterrupt
        return t.sin() * 2

    x = x64(4)
    torch.manual_seed(0)
    torch.rand(3)
    rng_after_one = torch.get_rng_state()
    torch.manual_seed(0)
    filters, level, grad = list(warnings.filters), fwAD._current_level, torch.is_grad_enabled()
    try:
        autojac.jacobian(f, x, mode=mode, vectorize=vectorize, cache=False)
    except KeyboardInterrupt:
        pass
    except autojac.AutojacError:
        pass
    assert (list(warnings.filters), fwAD._current_level, torch.is_grad_enabled()) == (filters, level, grad)
    if len(calls) >= 1:
        assert torch.equal(torch.get_rng_state(), rng_after_one)
    # forward AD is free again: a forward-mode call right after works
    torch.testing.assert_close(autojac.jacobian(torch.sin, x, mode="forward", vectorize="loop"), torch.diag(x.cos()))


def test_user_warnings_still_show_after_calls():
    f = lambda t: t * 2  # noqa: E731
    autojac.jacobian(f, x64(3))
    with pytest.warns(UserWarning, match="still here"):
        warnings.warn("still here")


# --- 9. module buffers -------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["module", "closure", "bound method"])
def test_batch_norm_buffers_end_as_one_forward_pass_leaves_them(wrap):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh()).double().to(DEVICE).train()
    twin = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh()).double().to(DEVICE).train()
    twin.load_state_dict(net.state_dict())
    X = x64(5, 4)
    want = torch.autograd.functional.jacobian(twin, X)
    f = {"module": net, "closure": lambda t: net(t), "bound method": net.forward}[wrap]
    got = autojac.jacobian(f, X)
    torch.testing.assert_close(got, want)
    for name, buffer in twin.named_buffers():
        assert torch.equal(dict(net.named_buffers())[name], buffer), name
    assert int(net[1].num_batches_tracked) == 1


def test_batch_norm_buffers_stay_right_over_many_calls_with_failing_trials():
    # BatchNorm1d on 2 samples: the repeat trick's batch of copies raises inside `f` after
    # `num_batches_tracked` was bumped but before the running statistics were written; an
    # evaluation that raised must not decide which buffers later evaluations put back.
    torch.manual_seed(0)
    net = nn.BatchNorm1d(3).double().to(DEVICE).train()
    twin = nn.BatchNorm1d(3).double().to(DEVICE).train()
    X = x64(2, 3)
    for call in range(1, 16):
        want = torch.autograd.functional.jacobian(twin, X)
        torch.testing.assert_close(autojac.jacobian(net, X), want)
        for name, buffer in twin.named_buffers():
            assert torch.equal(dict(net.named_buffers())[name], buffer), (call, name, autojac.last_report())
    assert int(net.num_batches_tracked) == 15


@pytest.mark.parametrize("vectorize", ["loop", "vmap"])
def test_batch_norm_in_training_gets_reverse_mode_on_its_one_evaluation(vectorize):
    # Putting running statistics back between evaluations must not invalidate the graph
    # that saved them (torch's own loop used to fail with "modified by an inplace operation").
    torch.manual_seed(0)
    net = nn.BatchNorm1d(3).double().to(DEVICE).train()
    twin = nn.BatchNorm1d(3).double().to(DEVICE).train()
    X = x64(2, 3)
    want = torch.autograd.functional.jacobian(twin, X)
    torch.testing.assert_close(autojac.jacobian(net, X, mode="reverse", vectorize=vectorize), want)
    assert autojac.last_report().method.startswith(f"reverse/{vectorize}")
    for name, buffer in twin.named_buffers():
        assert torch.equal(dict(net.named_buffers())[name], buffer), name


class _Accumulating(nn.Module):
    """Keeps a running level as a plain tensor attribute (not a buffer), written in place by forward."""

    def __init__(self):
        super().__init__()
        self.level = torch.ones((), dtype=torch.float64, device=DEVICE)

    def forward(self, t):
        self.level.mul_(1.5)
        return t.sin() * self.level


@pytest.mark.parametrize("kind", ["closure", "module attribute"])
def test_an_f_that_writes_what_it_captures_is_evaluated_once_per_call(kind):
    # Such state cannot be put back: every further evaluation would be a step the caller sees, and a
    # Jacobian assembled from several evaluations would mix states. torch evaluates once; so must we.
    if kind == "closure":
        level = torch.ones((), dtype=torch.float64, device=DEVICE)

        def f(t):
            level.add_(1)
            return t.sin() * level

        read = lambda: level  # noqa: E731
    else:
        f = _Accumulating()
        read = lambda: f.level  # noqa: E731
    x = x64(40)
    for call in range(12):
        before = read().clone()
        got = autojac.jacobian(f, x)
        after_one = read().clone()
        assert autojac.last_report().evaluations == 1, (call, autojac.last_report())
        want = torch.diag(x.cos()) * after_one
        torch.testing.assert_close(got, want)
        assert not torch.equal(before, after_one)
    text = str(autojac.plan(f, x))
    assert "writes in place into a tensor it captures" in text and "To try" not in text, text


def test_an_evaluation_that_raised_leaves_no_state_behind():
    from autojac._core.evaluation import Evaluator

    counter = torch.zeros((), dtype=torch.int64, device=DEVICE)
    stat = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    holder = nn.Module()
    holder.register_buffer("counter", counter)
    holder.register_buffer("stat", stat)
    fail = [True]

    def f(t):
        holder.counter.add_(1)
        if fail[0]:
            raise RuntimeError("not this shape")
        with torch.no_grad():
            holder.stat.data += t.detach().sum()  # no version bump, as batch norm's kernel does
        return t * 2

    evaluator = Evaluator(f, torch.device(DEVICE), (holder,))
    t = x64(3)
    with pytest.raises(RuntimeError):
        evaluator(t)
    fail[0] = False
    evaluator(t)
    evaluator(t)
    evaluator(t)
    evaluator.finish()
    assert int(holder.counter) == 1
    torch.testing.assert_close(holder.stat, torch.full((3,), float(t.sum()), dtype=torch.float64, device=DEVICE))


def test_the_evaluation_count_is_what_the_readme_says_for_a_warm_call():
    calls = []

    def f(t):
        calls.append(1)
        return t.sin() * t.sum()

    x = x64(6)
    for mode, vectorize, once in [("reverse", "vmap", 1), ("forward", "loop", 6), ("forward", "vmap", 1)]:
        p = autojac.plan(f, x, mode=mode, vectorize=vectorize, chunk_size=6)
        autojac.jacobian(f, x, plan=p)  # first use: verified (one more evaluation for methods that evaluate f many times)
        calls.clear()
        autojac.jacobian(f, x, plan=p)
        assert len(calls) == once, (mode, vectorize, len(calls))


# --- 10. too large to fit, and out of memory at one vector -------------------------------------

def test_a_result_larger_than_the_budget_is_refused_after_one_evaluation():
    calls = []

    def f(t):
        calls.append(1)
        return t * 2

    with pytest.raises(autojac.MemoryBudgetError, match=r"the Jacobian alone \(200000 x 200000\) takes 149.0 GiB"):
        autojac.jacobian(f, torch.zeros(200_000, device=DEVICE), memory_budget="1GiB")
    assert len(calls) == 1


def test_an_explicit_method_out_of_memory_at_one_vector_says_so(monkeypatch):
    from autojac import _methods as _execute

    method = _execute.method("forward", "vmap")

    def out_of_memory(self, state, basis):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(type(method), "chunk", out_of_memory)
    with pytest.raises(autojac.MemoryBudgetError, match="ran out of memory") as info:
        autojac.jacobian(torch.sin, x64(8), mode="forward", vectorize="vmap", chunk_size=4)
    assert "could differentiate" not in str(info.value)
    # and at run time, after a plan that probed fine: halved down to one vector, then said plainly
    monkeypatch.undo()
    p = autojac.plan(torch.sin, x64(8), mode="forward", vectorize="vmap", chunk_size=4)
    monkeypatch.setattr(type(method), "chunk", out_of_memory)
    with pytest.raises(autojac.MemoryBudgetError, match="ran out of memory even one basis vector at a time"):
        autojac.jacobian(torch.sin, x64(8), plan=p)


# --- the safety net ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["reverse/vmap", "forward/vmap", "forward/loop", "forward-trick/vmap", "reverse/repeat"])
def test_a_method_that_silently_returns_wrong_products_is_caught(monkeypatch, name):
    from autojac import _methods as _execute

    mode, vectorize = name.split("/")
    method = _execute.method(mode, vectorize)
    real = type(method).chunk

    def off_by_a_bit(self, state, basis):
        parts = real(self, state, basis)
        return tuple(None if p is None else p * 1.001 for p in parts)

    f = lambda t: torch.tanh(t) * t.sum(-1, keepdim=True)  # noqa: E731
    x = x64(5)
    want = torch.autograd.functional.jacobian(f, x)
    monkeypatch.setattr(type(method), "chunk", off_by_a_bit)
    with pytest.raises(autojac.UnsupportedFunctionError, match="disagrees with an independent vector-Jacobian product"):
        autojac.jacobian(f, x, mode=mode, vectorize=vectorize, chunk_size=5, cache=False)
    # auto never returns the broken method's answer: not on the first call, nor while it explores
    for _ in range(25):
        torch.testing.assert_close(autojac.jacobian(f, x, mode="auto"), want)


def test_a_verified_method_is_not_checked_again():
    from autojac._execute import verify as _verify

    f = lambda t: t.exp() * 3  # noqa: E731
    x = x64(4)
    seen = []
    real = _verify.check_against
    _verify.check_against = lambda *a: seen.append(1) or real(*a)
    try:
        p = autojac.plan(f, x, mode="forward", vectorize="loop")
        autojac.jacobian(f, x, plan=p)
        autojac.jacobian(f, x, plan=p)
    finally:
        _verify.check_against = real
    assert seen == [1]
    assert autojac.last_report().evaluations == 4  # one per input element, no evaluation for a check


# --- bad keywords ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "forward-mode"}, "mode='forward'"),
    ({"vectorize": True}, "vectorize='vmap'"),
    ({"argnum": 0}, "help"),
    ({"argnums": "0"}, "an int or a non-empty tuple of ints"),
    ({"has_aux": 1}, "`has_aux` must be True or False"),
    ({"budget": "1GiB"}, "memory_budget"),
    ({"progress": "yes"}, "True, False or None"),
    ({"cache": None}, "`cache` must be True or False"),
    ({"create_graph": 1}, "`create_graph` must be True or False"),
])
def test_unknown_or_misspelled_options_say_what_to_pass(kwargs, match):
    with pytest.raises(autojac.AutojacError, match=match):
        autojac.jacobian(torch.sin, x64(3), **kwargs)


def test_a_method_that_returns_nan_where_the_reference_is_finite_is_caught(monkeypatch):
    """A NaN compares false with everything: the check must count it as a difference, not let it through."""
    from autojac import _methods

    method = _methods.method("reverse", "vmap", "func")
    real = type(method).chunk

    def with_a_nan(self, state, basis):
        parts = real(self, state, basis)
        first = parts[0].clone()
        first.view(-1)[0] = float("nan")
        return (first, *parts[1:])

    monkeypatch.setattr(type(method), "chunk", with_a_nan)
    f = lambda t: torch.tanh(t) * t.sum(-1, keepdim=True)  # noqa: E731
    x = x64(6)
    with pytest.raises(autojac.UnsupportedFunctionError, match="disagrees"):
        autojac.jacobian(f, x, mode="reverse", vectorize="vmap", chunk_size=6, cache=False)
    got = autojac.jacobian(f, x, cache=False)
    assert not got.isnan().any()
    torch.testing.assert_close(got, torch.autograd.functional.jacobian(f, x))


def test_create_graph_under_no_grad_gives_the_jacobian_not_zeros():
    """create_graph=True on an input that requires grad, called under torch.no_grad(): the inputs are views
    that keep the caller's graph, and a view made under no_grad would not require grad (a Jacobian of zeros
    that its own reference, also zero, passed). torch's own jacobian works under enable_grad."""
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for f in (lambda t: t**3, lambda t: torch.sin(t) * t.sum()):
        want = torch.autograd.functional.jacobian(f, x, create_graph=True)
        for mode in ("auto", "forward", "forward-trick"):
            with torch.no_grad():
                got = autojac.jacobian(f, x, create_graph=True, mode=mode)
            torch.testing.assert_close(got, want)
            assert got.abs().sum() > 0


def test_no_grad_inside_f_is_reverse_modes_jacobian_and_forward_mode_says_why_it_cannot():
    # Forward-mode AD ignores torch.no_grad, so a value made under it carries derivatives reverse mode drops:
    # autojac's answer is reverse mode's (torch.autograd.functional.jacobian's), in every mode that can give it.
    def f(t):
        with torch.no_grad():
            scale = t * 3
        return torch.outer(torch.linspace(0.5, 1.5, 40, dtype=t.dtype, device=t.device), t.sin() * scale).reshape(-1)

    x = x64(3)
    want = torch.autograd.functional.jacobian(f, x)
    for _ in range(12):  # tall: the planner's first choice is a forward method, whose check fails
        torch.testing.assert_close(autojac.jacobian(f, x), want)
    torch.testing.assert_close(autojac.jacobian(f, x, mode="forward-trick"), want)
    with pytest.raises(autojac.UnsupportedFunctionError, match="does not stop forward-mode AD"):
        autojac.jacobian(f, x, mode="forward")
