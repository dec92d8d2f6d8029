"""The `autojac` command: info, plan, bench, demo."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

import autojac

from ._memory import DEFAULT_BUDGET_SHARE, format_bytes, free_memory, parse_budget


class CommandError(Exception):
    """A mistake in what the user typed: one line on stderr, exit status 2."""


def _info(args) -> None:
    print(f"autojac {autojac.__version__}, torch {torch.__version__}")
    devices = [torch.device("cpu")] + [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    for device in devices:
        facts = free_memory(device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "host memory"
        print(f"{device}: {name}; free {format_bytes(facts.free_bytes)} ({facts.source}); "
              f"default budget {format_bytes(parse_budget(None, facts.free_bytes))} ({DEFAULT_BUDGET_SHARE:.0%} of free)")
    if not torch.cuda.is_available():
        print("CUDA: not available")


def _load(target: str):
    if ":" not in target:
        raise CommandError(f"expected MODULE:CALLABLE (e.g. mypkg.models:make), but got {target!r}")
    module_name, attr = target.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(f"cannot import module {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CommandError(f"module {module_name!r} has no attribute {attr!r}") from None


def _plan(args) -> None:
    obj = _load(args.target)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CommandError(f"unknown dtype {args.dtype!r}; use e.g. float32 or float64")
    f, inputs = obj, None
    if args.shape is None:  # a factory returning (f, example_input)
        made = obj()
        if not (isinstance(made, tuple) and len(made) == 2):
            raise CommandError(f"{args.target} was called as a factory (no --shape) but did not return (f, example_input)")
        f, inputs = made
    else:
        try:
            shapes = [tuple(int(d) for d in s.split(",") if d) for s in args.shape]
        except ValueError:
            raise CommandError(f"--shape takes comma-separated ints like 3,28,28, but got {args.shape}") from None
        tensors = tuple(torch.randn(s, dtype=dtype, device=device) for s in shapes)
        inputs = tensors[0] if len(tensors) == 1 else tensors
    print(autojac.plan(f, inputs, memory_budget=args.budget, mode=args.mode, vectorize=args.vectorize))


def _bench(args) -> None:
    from ._bench.suite import run_suite

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for, but torch sees no CUDA device")
    run_suite(args.quick, device, Path(args.out), memory=args.memory, say=lambda s: print(s, flush=True))


def _demo(args) -> None:
    from ._demo import demo

    demo()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autojac", description="Full Jacobians of PyTorch functions, planned for speed and memory.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and DEBUG logs")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="torch version, devices, free memory and default budgets").set_defaults(run=_info)
    pl = sub.add_parser("plan", help="print the plan autojac makes for your function")
    pl.add_argument("target", help="MODULE:CALLABLE, a function (with --shape) or a factory returning (f, example_input)")
    pl.add_argument("--shape", action="append", help="input shape like 3,28,28; repeat for tuple inputs")
    pl.add_argument("--dtype", default="float32")
    pl.add_argument("--device", default="cpu")
    pl.add_argument("--budget", default=None, help="memory budget: bytes, '512MiB', '2GB' or a share like 0.25")
    pl.add_argument("--mode", default="auto")
    pl.add_argument("--vectorize", default="auto")
    pl.set_defaults(run=_plan)
    b = sub.add_parser("bench", help="run the benchmark suite against torch.func, torch.autograd and the seed methods")
    b.add_argument("--quick", action="store_true", help="a subset that runs in under 2 minutes on 2 CPU cores")
    b.add_argument("--device", default="cpu")
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--memory", choices=["auto", "rss", "tracker"], default="auto",
                   help="peak memory by fresh-subprocess RSS (default for the full CPU run) or in-process tracking")
    b.set_defaults(run=_bench)
    sub.add_parser("demo", help="what autojac chooses for a few built-in functions, against torch.func").set_defaults(run=_demo)
    return p


def _budget(value):
    if value is None:
        return None
    try:
        return float(value) if "." in value and value.replace(".", "", 1).isdigit() else int(value)
    except ValueError:
        return value


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if hasattr(args, "budget"):
        args.budget = _budget(args.budget)
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG)
    try:
        args.run(args)
    except (CommandError, autojac.AutojacError, OSError) as exc:
        if args.debug:
            raise
        print(f"autojac: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
