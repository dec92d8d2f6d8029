"""Plans that outlive the process: what each plan learnt, saved as JSON and loaded as hints.

A saved plan is keyed by a stable form of its key (code hashed from its bytecode,
modules by class and parameter shapes; see `keys.stable`) and stamped with the
torch version, the device's name and the number of CPU threads. On load, entries
stamped otherwise are ignored. A loaded plan is never trusted: it only says which
method to start with, and that method is verified on its first use as any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import threading
from pathlib import Path

import torch

from .._core.errors import InputError
from .._core.options import Options
from .._core import pytree
from .._core.problem import Problem, Signature
from .choose import BY_NAME, Facts
from .entry import MethodStats, PlanEntry

FORMAT = 1
_loaded: dict[str, dict] = {}
_lock = threading.Lock()


def default_path() -> Path:
    """`$AUTOJAC_CACHE_DIR/plans.json`, else `~/.cache/autojac/plans.json`."""
    root = os.environ.get("AUTOJAC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autojac")
    return Path(root) / "plans.json"


def environment(device: torch.device) -> dict:
    """What makes a measured plan valid: torch, the device, the CPU threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"torch": torch.__version__, "device": f"{device.type}:{name}", "threads": torch.get_num_threads()}


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name}")
    return value


def record(stable_key: str, entry: PlanEntry) -> dict | None:
    """The saved form of a plan, or None if its structures cannot be written (a namedtuple of a local class)."""
    p = entry.problem
    if pytree.dumps(p.inputs.spec) is None or pytree.dumps(p.out_spec) is None:
        return None
    return {
        "key": stable_key,
        "environment": environment(p.inputs.device),
        "problem": {
            "in_shapes": [list(s) for s in p.inputs.shapes], "in_dtypes": [str(d) for d in p.inputs.dtypes],
            "device": str(p.inputs.device), "in_spec": pytree.dumps(p.inputs.spec),
            "out_shapes": [list(s) for s in p.out_shapes], "out_dtypes": [str(d) for d in p.out_dtypes],
            "out_spec": pytree.dumps(p.out_spec), "draws_random": p.draws_random,
            "tangent_checks": p.tangent_checks,
        },
        "budget_bytes": entry.budget_bytes, "fixed_bytes": entry.fixed_bytes,
        "facts": {"eval_seconds": entry.facts.eval_seconds, "vjp_seconds": entry.facts.vjp_seconds,
                  "autograd_loops": entry.facts.autograd_loops},
        "incumbent": entry.incumbent, "settled": entry.settled, "calls": entry.calls, "once_only": entry.once_only,
        "methods": {
            name: {"status": s.status, "reason": s.reason, "prior": s.prior, "runs": s.runs,
                   "chunk_size": s.chunk_size, "memory": s.memory, "rates": s.rates}
            for name, s in entry.stats.items()
        },
    }


def entry_from(data: dict, options: Options) -> PlanEntry:
    """A plan entry from a saved record; nothing in it counts as verified."""
    p = data["problem"]
    signature = Signature(tuple(tuple(s) for s in p["in_shapes"]), tuple(_dtype(d) for d in p["in_dtypes"]),
                          torch.device(p["device"]), pytree.loads(p["in_spec"]))
    problem = Problem(signature, tuple(tuple(s) for s in p["out_shapes"]), tuple(_dtype(d) for d in p["out_dtypes"]),
                      pytree.loads(p["out_spec"]), p["draws_random"], tangent_checks=bool(p.get("tangent_checks")))
    if problem.tangent_checks:  # forward mode only, no structure, as the plan was made (NOTE: [Checks by tangents])
        options = dataclasses.replace(options, mode="forward", sparsity=None)
    facts = Facts(problem.col_passes, problem.row_passes, data["facts"]["eval_seconds"], data["facts"]["vjp_seconds"],
                  data["facts"].get("autograd_loops"))
    methods = [BY_NAME[name] for name in data["methods"]]
    entry = PlanEntry(problem, options, data["budget_bytes"], data["fixed_bytes"], facts, methods, data["once_only"])
    for name, m in data["methods"].items():
        s: MethodStats = entry.stats[name]
        s.status, s.reason, s.prior, s.runs = m["status"], m["reason"], m["prior"], list(m["runs"])
        s.chunk_size, s.memory, s.rates = m["chunk_size"], [tuple(x) for x in m["memory"]], [tuple(x) for x in m["rates"]]
    entry.incumbent, entry.settled, entry.calls = data["incumbent"], data["settled"], data["calls"]
    entry.events.append("loaded from a saved plan")
    return entry


def save(path: str | os.PathLike | None, records: list[dict]) -> Path:
    path = Path(path) if path is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "plans": records}, indent=1))
    os.replace(tmp, path)  # never a half-written file
    return path


def load(path: str | os.PathLike | None) -> tuple[int, int]:
    """Read saved plans; keep those made on this torch, device kind and thread count. (kept, ignored)."""
    path = Path(path) if path is not None else default_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"load_plans: there is no plan file at {str(path)!r}. Save one with `autojac.save_plans()` first.") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"load_plans: {str(path)!r} is not a plan file autojac wrote ({exc}).") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"load_plans: {str(path)!r} is not a plan file of this autojac version (format {FORMAT}).")
    kept = ignored = 0
    with _lock:
        for rec in data.get("plans", []):
            try:
                device = torch.device(rec["problem"]["device"])
                if rec["environment"] != environment(device) or any(n not in BY_NAME for n in rec["methods"]):
                    ignored += 1
                    continue
            except Exception:  # noqa: BLE001 - a foreign or damaged record is ignored, never trusted
                ignored += 1
                continue
            _loaded[rec["key"]] = rec
            kept += 1
    return kept, ignored


def has_plans() -> bool:
    return bool(_loaded)


def lookup(stable_key: str) -> dict | None:
    with _lock:
        return _loaded.get(stable_key)


def forget() -> None:
    with _lock:
        _loaded.clear()
