"""Smoke tests of the `autojac` command (the full benchmark does not belong in the suite)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from autojac._cli import main


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
    assert next(tmp_path.glob("*.md")).read_text().count("| tiny |") == 1
    out = subprocess.run([sys.executable, "-m", "autojac", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout
