"""Smoke tests of the `autojac` command (the full benchmark does not belong in the suite)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from autojac._cli import main, parser


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " + torch.__version__ in out and "cpu: host memory; free" in out and "default budget" in out


def test_plan_of_an_importable_function(capsys, tmp_path, monkeypatch):
    (tmp_path / "userfuncs.py").write_text(
        "import torch\n"
        "def f(x):\n    return torch.tanh(x).sum(-1, keepdim=True) * x\n"
        "def make():\n    return f, torch.randn(5)\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "userfuncs:f", "--shape", "2,5", "--budget", "64MiB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Plan: ") and "10 x 10 Jacobian" in out and "budget 64.0 MiB" in out
    assert main(["plan", "userfuncs:make"]) == 0
    assert "5 x 5 Jacobian" in capsys.readouterr().out


def test_errors_are_one_line_and_a_nonzero_exit(capsys):
    assert main(["plan", "no_such_module_here:f", "--shape", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autojac: error: cannot import module") and err.count("\n") == 1


def test_bad_budget_from_the_command_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "uf2.py").write_text("import torch\ndef f(x):\n    return x * 2\n")
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "uf2:f", "--shape", "3", "--budget", "lots"]) == 2
    assert "memory_budget" in capsys.readouterr().err


def test_python_dash_m_and_bench_on_one_tiny_problem(tmp_path, monkeypatch):
    from autojac._bench import suite

    monkeypatch.setattr(suite, "QUICK_PROBLEMS", ["tiny"])
    monkeypatch.setattr(suite, "QUICK_CONTESTANTS", ["autojac", "func.jacrev", "seed simple loop"])
    assert main(["bench", "--quick", "--out", str(tmp_path), "--memory", "tracker"]) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    names = {r["contestant"] for r in data["rows"] if "seconds" in r}
    assert names == {"autojac", "func.jacrev", "seed simple loop"}
    auto = next(r for r in data["rows"] if r["contestant"] == "autojac")
    # the first calls, the calls until the plan settled, evaluations of f: autojac's own and a counted peer's
    assert len(auto["first_call_samples"]) == 3 and auto["first_call_seconds"] > 0 and auto["settle_calls"] >= 10
    assert len(auto["call_seconds"]) == auto["settle_calls"] and auto["settled_seconds"] > 0
    assert auto["evaluations"] >= 1 and min(auto["first_evaluations"]) >= 1
    assert next(r for r in data["rows"] if r["contestant"] == "func.jacrev")["evaluations"] == 1
    assert {(c["problem"], c["style"]) for c in data["closures"]} == {("tiny", "lambda"), ("tiny", "partial")}
    assert all(c["planned_steps"] == 1 and c["ratio"] > 0 for c in data["closures"])
    text = next(tmp_path.glob("*.md")).read_text()
    assert text.count("| tiny |") == 6  # summary, first calls, settling, evaluations, two closure loops
    assert "## Acceptance" in text and "| 5 | Budget" in text and "not measured: run `python benchmarks/budget_sweep.py`" in text
    out = subprocess.run([sys.executable, "-m", "autojac", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout


# ---- every failure: one `autojac: error:` line on stderr and exit status 2 ----

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("autojac: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """write(name, source): a module in a fresh current directory, importable by `plan`, forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # `plan` puts the current directory on it
    names = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


FUNCS = (
    "import torch\n"
    "def f(x):\n    return torch.sin(x) * x\n"
    "def raises(x):\n    raise ValueError('x is not what I wanted\\nsecond line')\n"
    "def make():\n    return f, torch.randn(3)\n"
    "def make_raises():\n    raise KeyError('no such model')\n"
    "def make_not_a_pair():\n    return f\n"
    "N = 3\n"
)


def test_a_function_without_shape_is_not_called_as_a_factory(capsys, user_module):
    user_module("cli_funcs_a", FUNCS)
    assert main(["plan", "cli_funcs_a:f"]) == 2
    err = _one_error_line(capsys)
    assert "`--shape`" in err and "takes arguments (`x`)" in err and "factory" in err
    assert main(["plan", "cli_funcs_a:make_not_a_pair"]) == 2
    assert "must return `(f, example_input)`, but it returned a `function`" in _one_error_line(capsys)
    assert main(["plan", "cli_funcs_a:N", "--shape", "3"]) == 2
    assert "but it is an `int`" in _one_error_line(capsys)
    assert main(["plan", "cli_funcs_a:make"]) == 0
    assert "3 x 3 Jacobian" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["plan", "cli_never_imported:f", "--shape", "3"], ["bench", "--quick"]])
def test_cuda_without_cuda_and_invalid_devices(capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*command, "--device", "cuda"]) == 2
    assert "`--device cuda` needs a CUDA device, but torch" in _one_error_line(capsys)
    assert main([*command, "--device", "gpu"]) == 2
    assert "`--device` takes a torch device like `cpu`, `cuda` or `cuda:1`, but got `gpu`" in _one_error_line(capsys)
    assert main([*command, "--device", "meta"]) == 2  # a torch device, but not one to run on
    assert "but got `meta`" in _one_error_line(capsys)


def test_cuda_device_index_beyond_the_devices(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["plan", "cli_never_imported:f", "--shape", "3", "--device", "cuda:3"]) == 2
    assert "needs CUDA device 3, but torch sees 1 CUDA device(s)" in _one_error_line(capsys)


@pytest.mark.parametrize("option", [["--dtype", "int32"], ["--dtype", "float128"], ["--mode", "sideways"],
                                    ["--vectorize", "vectorized"], ["--memory", "lots"]])
def test_choices_are_checked_by_argparse(capsys, option):
    command = ["bench"] if option[0] == "--memory" else ["plan", "cli_never_imported:f", "--shape", "3"]
    with pytest.raises(SystemExit) as raised:
        main([*command, *option])
    assert raised.value.code == 2
    assert f"argument {option[0]}: invalid choice: '{option[1]}'" in capsys.readouterr().err


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["plan", "--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    for listed in ["{float16,bfloat16,float32,float64}", "{auto,reverse,forward,forward-trick}", "{auto,vmap,repeat,loop}", "--debug"]:
        assert listed in out


@pytest.mark.parametrize("shape", ["-1", "3,-2", "3,x", "2.5", "3,,4", "x"])
def test_bad_shapes(capsys, shape):
    assert main(["plan", "cli_never_imported:f", f"--shape={shape}"]) == 2
    assert f"`--shape` takes whole numbers of 0 or more separated by commas, like `3,28,28` (an empty string for a scalar), " \
           f"but got `{shape}`" in _one_error_line(capsys)


def test_good_shapes(capsys, user_module):
    user_module("cli_funcs_b", FUNCS)
    for shape, size in [("2,3", 6), ("(2, 3)", 6), ("4,", 4), ("", 1), ("0", 0)]:
        assert main(["plan", "cli_funcs_b:f", f"--shape={shape}"]) == 0
        assert f"{size} x {size} Jacobian" in capsys.readouterr().out


def test_user_code_that_raises_is_one_line(capsys, user_module):
    user_module("cli_funcs_c", FUNCS)
    user_module("cli_raises_at_import", "raise ZeroDivisionError('broken at import')\n")
    user_module("cli_missing_dependency", "import cli_no_such_dependency_xyz\n")
    user_module("cli_bad_syntax", "def f(x)\n    return x\n")
    expected = {
        ("cli_funcs_c:raises", "3"): "`cli_funcs_c:raises` raised ValueError: x is not what I wanted. Rerun with `--debug`",
        ("cli_funcs_c:make_raises", None): "the factory `cli_funcs_c:make_raises` raised KeyError: 'no such model'.",
        ("cli_raises_at_import:f", "3"): "importing `cli_raises_at_import` raised ZeroDivisionError: broken at import.",
        ("cli_missing_dependency:f", "3"): "importing `cli_missing_dependency` raised ModuleNotFoundError: "
                                           "No module named 'cli_no_such_dependency_xyz'.",
        ("cli_bad_syntax:f", "3"): "importing `cli_bad_syntax` raised SyntaxError:",
        ("torch:matmul", "3"): "planning `torch:matmul` failed with TypeError:",  # no frame of the user's: not blamed on f
    }
    for (target, shape), message in expected.items():
        assert main(["plan", target, *(["--shape", shape] if shape else [])]) == 2
        assert _one_error_line(capsys).startswith("autojac: error: " + message)


def test_an_unexpected_failure_is_one_line(capsys, monkeypatch):
    from autojac._bench import suite

    def broken(*args, **kwargs):
        raise KeyError("contestant")

    monkeypatch.setattr(suite, "run_suite", broken)
    assert main(["bench", "--quick", "--out", "unused"]) == 2
    assert _one_error_line(capsys) == "autojac: error: `autojac bench` failed with KeyError: 'contestant'. " \
                                      "Rerun with `--debug` to see the traceback.\n"


def test_debug_before_or_after_the_subcommand_shows_the_users_exception(capsys, user_module):
    user_module("cli_funcs_d", FUNCS)
    for argv in (["--debug", "plan", "cli_funcs_d:raises", "--shape", "3"],
                 ["plan", "--debug", "cli_funcs_d:raises", "--shape", "3"],
                 ["plan", "cli_funcs_d:raises", "--shape", "3", "--debug"]):
        with pytest.raises(ValueError, match="x is not what I wanted"):
            main(argv)
    with pytest.raises(ZeroDivisionError):
        user_module("cli_raises_at_import_d", "1 / 0\n")
        main(["plan", "cli_raises_at_import_d:f", "--shape", "3", "--debug"])
    assert parser().parse_args(["info"]).debug is False
    assert parser().parse_args(["--debug", "info"]).debug is True
    assert parser().parse_args(["info", "--debug"]).debug is True
    assert parser().parse_args(["bench", "--debug"]).debug is True and parser().parse_args(["demo", "--debug"]).debug is True


def test_bench_says_where_it_writes_and_claims_no_plots_without_matplotlib(capsys, tmp_path, monkeypatch):
    from autojac._bench import suite

    monkeypatch.setattr(suite, "QUICK_PROBLEMS", ["tiny"])
    monkeypatch.setattr(suite, "QUICK_CONTESTANTS", ["autojac"])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` raises ImportError
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick", "--out", "results", "--memory", "tracker"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"writing results to {(tmp_path / 'results').resolve()} (change with --out)"
    assert "matplotlib is not installed: no plots" in out
    assert "and plots" not in out and lines[-1].endswith(".md and .json (no plots: matplotlib is not installed)")
    assert not list((tmp_path / "results").glob("*.png")) and len(list((tmp_path / "results").glob("*.json"))) == 1
