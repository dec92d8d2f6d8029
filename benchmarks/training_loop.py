"""Per-sample Jacobians inside a training loop: the weights change between calls.

A model trained with an optimizer has its parameters written in place every step; a Jacobian taken each step
(per-sample sensitivities for monitoring, a penalty, an active-learning score) sees the same function with new
weights. autojac keeps its plan (keyed by code and shapes) and its verdict that the samples are independent,
which it confirms on each result when the weights changed (NOTE: [Independence confirmed on the result] in
autojac/_api/derived.py); the torch ways check nothing. Each loop runs STEPS steps from the same initial weights:
one per-sample Jacobian (timed) and one SGD step on the plain loss (untimed). The loops are repeated ROUNDS times
in a shuffled order (seeded); the median Jacobian time of each contestant's steps after the first two is
reported, with its whole loop's Jacobian time. autojac starts each loop from an empty cache. Every autojac result
is compared with `vmap(jacrev)`'s.

    python benchmarks/training_loop.py [--quick] [--out DIR] [--device cuda]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import func, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import autojac  # noqa: E402


def mlp_net() -> nn.Module:  # the habits benchmark's per-sample MLP
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))


def cnn_net() -> nn.Module:  # the habits benchmark's per-sample CNN
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 8, 3), nn.Tanh(), nn.Flatten(1),
                         nn.Linear(8 * 8 * 8, 10))


def decoder_net() -> nn.Module:  # more output than input features: autojac differentiates f(X + z)
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 256))


PROBLEMS = {  # name: (network, one sample's shape, batches, quick batches)
    "mlp": (mlp_net, (16,), (64, 512, 4096), (64,)),
    "cnn": (cnn_net, (1, 12, 12), (64, 512), (16,)),
    "decoder": (decoder_net, (8,), (64, 512), (16,)),
}


def _single(net: nn.Module):
    return lambda x: net(x.unsqueeze(0)).squeeze(0)


CONTESTANTS = {
    "autojac": lambda net, X: autojac.batch_jacobian(net, X),
    "vmap(jacrev)": lambda net, X: func.vmap(func.jacrev(_single(net)))(X),
    "vmap(jacfwd)": lambda net, X: func.vmap(func.jacfwd(_single(net)))(X),
    "sum trick": lambda net, X: func.jacrev(lambda Z: net(Z).sum(0))(X).movedim(1, 0),
}


PEERS = [c for c in CONTESTANTS if c != "autojac"]


def run_loop(name: str, batch: int, contestant: str, steps: int, device: torch.device) -> tuple[list[float], int]:
    build, sample, _, _ = PROBLEMS[name]
    torch.manual_seed(0)
    net = build().to(device)
    X = torch.randn(batch, *sample).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    fn = CONTESTANTS[contestant]
    autojac.clear_cache()
    times, wrong = [], 0
    for _ in range(steps):
        seconds, J = C.timed(lambda: fn(net, X), device)
        times.append(seconds)
        if contestant == "autojac":
            wrong += not torch.allclose(J, CONTESTANTS["vmap(jacrev)"](net, X), rtol=1e-4, atol=1e-6)
        del J
        loss = net(X).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return times, wrong


def main() -> None:
    args, steps, rounds = C.loop_args(__doc__, device=True)
    device = torch.device(args.device)
    rng = random.Random(0)
    rows = []
    for name, (_, _, batches, quick_batches) in PROBLEMS.items():
        for batch in quick_batches if args.quick else batches:
            times, totals, wrong = C.loop_rounds(lambda c: run_loop(name, batch, c, steps, device), list(CONTESTANTS),
                                                 rounds, rng)
            med = {c: statistics.median(v) for c, v in times.items()}
            peer = min(PEERS, key=med.get)
            rows.append(dict(problem=f"{name} B={batch}", steps=steps, rounds=rounds, step_seconds=med,
                             loop_seconds={c: statistics.median(v) for c, v in totals.items()}, fastest_peer=peer,
                             ratio=med["autojac"] / med[peer], wrong=wrong, plan=str(autojac.last_report())))
            print(f"{name} B={batch}: " + ", ".join(f"{c} {C.ms(v)}" for c, v in med.items())
                  + f"; ratio {rows[-1]['ratio']:.2f}x; wrong {wrong}", flush=True)
    meta = dict(machine=C.machine_text(device), date=time.strftime("%Y-%m-%d"), quick=args.quick,
                commit=C.commit(), torch=torch.__version__, threads=torch.get_num_threads())
    stem = C.stem_for(device, "training-loop", args.quick)
    C.write(args.out, stem, dict(meta=meta, rows=rows), report(rows, meta), None)


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"# Per-sample Jacobians inside a training loop{' (quick)' if meta['quick'] else ''}", "",
             f"Machine: {meta['machine']}. {meta['threads']} torch threads. Commit {meta['commit']}. "
             f"Date: {meta['date']}.", "",
             "Median time of one `batch_jacobian`-like call (steps 3 onwards of each loop, all rounds), an SGD step "
             "writing the weights in place between calls; each contestant's loops interleaved with the others' in "
             "a shuffled order; autojac starts each loop from an empty cache. Ratio = autojac / the fastest of "
             "`vmap(jacrev)`, `vmap(jacfwd)` and the sum trick (below 1: autojac is faster). autojac confirms on each result that "
             "the samples are independent; the torch ways do not check.", "",
             f"| problem | autojac | vmap(jacrev) | vmap(jacfwd) | sum trick | ratio | wrong | loop of {rows[0]['steps'] if rows else 0}: autojac / fastest peer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, loop = r["step_seconds"], r["loop_seconds"]
        lines.append(f"| {r['problem']} | {C.ms(s['autojac'])} | {C.ms(s['vmap(jacrev)'])} | {C.ms(s['vmap(jacfwd)'])} | {C.ms(s['sum trick'])} | "
                     f"{r['ratio']:.2f}x | {r['wrong']} | {C.ms(loop['autojac'])} / {C.ms(loop[r['fastest_peer']])} |")
    lines += ["", "autojac's last call in each loop:", ""] + [f"- {r['problem']}: {r['plan']}" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
