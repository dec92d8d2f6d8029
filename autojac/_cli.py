"""The `autojac` command: info, plan, bench, demo."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import sysconfig
import traceback
from pathlib import Path

import torch

import autojac

from ._core.units import DEFAULT_BUDGET_SHARE, format_bytes, parse_budget
from ._measure.device import free_memory

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
MODES = ["auto", "reverse", "forward", "forward-trick"]
VECTORIZATIONS = ["auto", "vmap", "repeat", "loop"]
_RERUN = "Rerun with `--debug` to see the traceback."


class CommandError(Exception):
    """A mistake in what the user typed, or in the user's code: one line on stderr, exit status 2."""


class UserCodeError(CommandError):
    """The user's module, factory or function raised `original`; `--debug` re-raises that exception itself."""

    def __init__(self, message: str, original: BaseException):
        super().__init__(message)
        self.original = original


def _a(obj) -> str:
    """'an `int`', 'a `Module`': the type of obj with its article."""
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} `{name}`"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else ""


def _raised(who: str, exc: BaseException, verb: str = "raised") -> UserCodeError:
    """`who raised ValueError: first line of its message. Rerun with --debug ...`, wrapping exc."""
    message = _first_line(exc)
    if message and message[-1] not in ".!?":
        message += "."
    what = f"{who} {verb} {type(exc).__name__}" + (f": {message}" if message else ".")
    return UserCodeError(f"{what} {_RERUN}", exc)


def _library_dirs() -> tuple[str, ...]:
    dirs = {str(Path(autojac.__file__).resolve().parent), str(Path(torch.__file__).resolve().parent)}
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(str(Path(path).resolve()))
    return tuple(os.path.join(d, "") for d in dirs)


def _passed_through_user_code(exc: BaseException) -> bool:
    """Whether the traceback has a frame outside autojac, torch and the standard library (the user's `f`)."""
    libraries = _library_dirs()
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if filename.startswith("<frozen"):
            continue
        if filename.startswith("<"):  # code from exec() or `python -c`: the user's
            return True
        if not str(Path(filename).resolve()).startswith(libraries):
            return True
    return False


def _device(text: str) -> torch.device:
    """The `--device` value as a torch.device the machine has, checked before anything else runs."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise CommandError(f"`--device` takes a torch device like `cpu`, `cuda` or `cuda:1`, but got `{text}`. "
                           "Pass one of those; `autojac info` lists the devices torch sees.") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build"
            raise CommandError(f"`--device {text}` needs a CUDA device, but torch {torch.__version__} ({build}) sees none. "
                               "Use `--device cpu`, or run on a machine with a GPU and a CUDA build of torch.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CommandError(f"`--device {text}` needs CUDA device {device.index}, but torch sees {count} CUDA device(s). "
                               f"Pass `--device cuda:0` to `--device cuda:{count - 1}`.")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CommandError(f"`--device {text}` needs Apple's MPS backend, but this torch cannot use it here. Use `--device cpu`.")
        return device
    raise CommandError(f"`--device` takes `cpu`, `cuda`, `cuda:N` or `mps`, but got `{text}`. Pass one of those.")


def _shape(text: str) -> tuple[int, ...]:
    """`3,28,28` as (3, 28, 28); an empty string (or `()`) is a scalar; a trailing comma is allowed."""
    bad = CommandError(f"`--shape` takes whole numbers of 0 or more separated by commas, like `3,28,28` (an empty string for a scalar), "
                       f"but got `{text}`. Pass one input's shape that way, and repeat `--shape` for tuple inputs.")
    body = text.strip()
    if body.startswith("(") and body.endswith(")"):
        body = body[1:-1].strip()
    if not body:
        return ()
    parts = [part.strip() for part in body.split(",")]
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    dims = []
    for part in parts:
        if not (part.isascii() and part.isdigit()):  # refuses '', '-1', '2.5', 'x'
            raise bad
        dims.append(int(part))
    return tuple(dims)


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
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise CommandError(f"`plan` takes MODULE:CALLABLE (e.g. `mypkg.models:make`), but got `{target}`. "
                           "Name the module and the function or factory in it, separated by a colon.")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CommandError(f"cannot import module `{module_name}`: MODULE:CALLABLE needs an importable module, but there is "
                               f"no module `{exc.name}` on the path (which starts with the current directory, {cwd}). "
                               "Run from the directory that holds it, or install it.") from exc
        raise _raised(f"importing `{module_name}`", exc) from exc
    except Exception as exc:  # the module's own code raised at import time
        raise _raised(f"importing `{module_name}`", exc) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CommandError(f"`{target}` needs `{module_name}` to define `{attr}`, but it has no attribute `{part}` there. "
                               "Check the name after the colon.") from None
        except Exception as exc:  # a property or module __getattr__ of the user's
            raise _raised(f"looking up `{target}`", exc) from exc
    return obj


def _required_parameters(obj) -> list[str] | None:
    """The parameters `obj` cannot be called without, or None where its signature cannot be read."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in signature.parameters.values() if p.kind in positional and p.default is p.empty]


def _plan(args) -> None:
    dtype = DTYPES.get(args.dtype)
    if dtype is None:  # argparse's choices refuse these first; kept for in-process callers
        raise CommandError(f"`--dtype` takes one of {', '.join(DTYPES)}, but got `{args.dtype}`. Pass a floating dtype.")
    shapes = None if args.shape is None else [_shape(s) for s in args.shape]
    obj = _load(args.target)
    if not callable(obj):
        raise CommandError(f"`{args.target}` must be a function (with `--shape`) or a factory returning `(f, example_input)`, "
                           f"but it is {_a(obj)}. Name a callable.")
    who = f"`{args.target}`"
    if shapes is None:  # a factory returning (f, example_input)
        required = _required_parameters(obj)
        if required:
            names = ", ".join(f"`{n}`" for n in required)
            raise CommandError(f"without `--shape`, `{args.target}` must be a factory returning `(f, example_input)`, but it takes "
                               f"arguments ({names}), so it looks like the function itself. Pass its input shape with "
                               "`--shape` (e.g. `--shape 3,28,28`, repeated for tuple inputs), or name a factory.")
        try:
            made = obj()
        except Exception as exc:
            raise _raised(f"the factory `{args.target}`", exc) from exc
        if not (isinstance(made, tuple) and len(made) == 2 and callable(made[0])):
            raise CommandError(f"without `--shape`, `{args.target}` is called as a factory and must return `(f, example_input)`, "
                               f"but it returned {_a(made)}. Return that pair, or pass `--shape` to plan it as a function.")
        f, inputs = made
        who = f"`{getattr(f, '__qualname__', type(f).__name__)}` from `{args.target}`"
    else:
        f = obj
        tensors = []
        for shape in shapes:
            try:
                tensors.append(torch.randn(shape, dtype=dtype, device=args.device))
            except RuntimeError as exc:
                raise CommandError(f"`--shape` needs an input autojac can allocate, but a random {args.dtype} tensor of shape "
                                   f"{list(shape)} on {args.device} failed: {_first_line(exc)} Pass a smaller shape.") from exc
        inputs = tensors[0] if len(tensors) == 1 else tuple(tensors)
    try:
        result = autojac.plan(f, inputs, memory_budget=args.budget, mode=args.mode, vectorize=args.vectorize,
                              effort=args.effort, time_limit=args.time_limit)
    except autojac.AutojacError:
        raise
    except Exception as exc:
        if _passed_through_user_code(exc):
            raise _raised(who, exc) from exc
        raise _raised(f"planning {who}", exc, verb="failed with") from exc
    print(result)


def _bench(args) -> None:
    from ._bench.suite import run_suite

    out = Path(args.out).expanduser().resolve()
    print(f"writing results to {out} (change with --out)", flush=True)
    run_suite(args.quick, args.device, out, memory=args.memory, say=lambda s: print(s, flush=True))


def _demo(args) -> None:
    from ._demo import demo

    demo()


def parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the subcommand; the subcommands' copy leaves the value alone when absent
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and DEBUG logs")
    p = argparse.ArgumentParser(prog="autojac", description="Full Jacobians of PyTorch functions, planned for speed and memory.")
    p.add_argument("--debug", action="store_true", default=False, help="show tracebacks and DEBUG logs")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", parents=[common], help="torch version, devices, free memory and default budgets").set_defaults(run=_info)
    pl = sub.add_parser("plan", parents=[common], help="print the plan autojac makes for your function")
    pl.add_argument("target", help="MODULE:CALLABLE, a function (with --shape) or a factory returning (f, example_input)")
    pl.add_argument("--shape", action="append", help="input shape like 3,28,28; repeat for tuple inputs")
    pl.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the random inputs (default: float32)")
    pl.add_argument("--device", default="cpu", help="device of the random inputs: cpu, cuda, cuda:N (default: cpu)")
    pl.add_argument("--budget", default=None, help="memory budget: bytes, '512MiB', '2GB' or a share like 0.25")
    pl.add_argument("--mode", default="auto", choices=MODES, help="differentiation mode (default: auto)")
    pl.add_argument("--vectorize", default="auto", choices=VECTORIZATIONS, help="how products are batched (default: auto)")
    pl.add_argument("--effort", default="measure", choices=["estimate", "measure", "exhaustive"],
                    help="estimate: the rules alone; measure: one Jacobian (default); exhaustive: try every alternative")
    pl.add_argument("--time-limit", type=float, default=None, help="seconds the exhaustive search may take")
    pl.set_defaults(run=_plan)
    b = sub.add_parser("bench", parents=[common],
                       help="run the benchmark suite against torch.func, torch.autograd and the seed methods")
    b.add_argument("--quick", action="store_true", help="a subset that runs in under 2 minutes on 2 CPU cores")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    b.add_argument("--out", default="benchmarks/results", help="results folder, relative to the current directory "
                                                             "(default: benchmarks/results)")
    b.add_argument("--memory", choices=["auto", "rss", "tracker"], default="auto",
                   help="peak memory by fresh-subprocess RSS (default for the full CPU run) or in-process tracking")
    b.set_defaults(run=_bench)
    sub.add_parser("demo", parents=[common],
                   help="what autojac chooses for a few built-in functions, against torch.func").set_defaults(run=_demo)
    return p


def _budget(value):
    if value is None:
        return None
    try:
        return float(value) if "." in value and value.replace(".", "", 1).isdigit() else int(value)
    except ValueError:
        return value


def _error_line(exc: Exception, command: str) -> str:
    if isinstance(exc, (CommandError, autojac.AutojacError, OSError)):
        text = _first_line(exc) or type(exc).__name__
    else:
        text = _raised(f"`autojac {command}`", exc, verb="failed with").args[0]
    return f"autojac: error: {text}"


def main(argv: list[str] | None = None) -> int:
    """Run the command; every failure is one `autojac: error: ...` line on stderr and a non-zero exit (2)."""
    args = parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if debug:
        import logging

        logging.basicConfig(level=logging.DEBUG)
    try:
        if hasattr(args, "device"):
            args.device = _device(args.device)
        if hasattr(args, "budget"):
            args.budget = _budget(args.budget)
        args.run(args)
    except Exception as exc:
        if debug:
            if isinstance(exc, UserCodeError):
                raise exc.original from None  # the traceback of the user's own exception
            raise
        print(_error_line(exc, args.command), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
