"""How well and how cheaply `autojac._measure.meter.PeakMeter` measures CPU work, against the live-storage tracker.

    python benchmarks/meter_study.py [--out benchmarks/results] [--quick]

Each workload is a chunk of k basis vectors pushed through `torch.func.vmap(vjp_fn)` (the
region the planner measures), k = 2, 16, 64. Everything runs in child processes of this one:
  inprocess   one long-lived process that runs all workloads in shuffled rounds, as a user's
              process would: region cost, overhead against bare work and the tracker, readings;
              run with MALLOC_MMAP_THRESHOLD_=131072, with glibc's default, and with the default
              changed by mallopt at run time; regions with and without trim=True (malloc_trim)
  reference   a fresh process per workload and k: a warm-up call, then the benchmark's own
              measurement (VmHWM after clear_refs minus VmRSS), with and without the variable
  growth      the fastest rate at which this machine can add RSS (touching new pages)
  alternatives  the profiler's memory events, saved_tensors_hooks, mallinfo2, getrusage
Writes <machine>-meter.md and .json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from autojac._bench.problems import rk4_step
from autojac._measure.meter import PeakMeter, process_peak_rss
from autojac._measure.tracker import LiveStorageTracker

KS = (2, 16, 64)
MiB = 2**20
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
# One intra-op thread for everything but the growth rates: on a shared 2-core machine, another process
# stalls OpenMP's barriers and made 2-thread timings 20x slower at random; the memory readings barely change.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap of attention's backward


# ----------------------------------------------------------------------------- workloads

def _mlp(widths, batch=None, depth_act=torch.tanh):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=g) / i**0.5 for i, o in zip(widths[:-1], widths[1:])]

    def f(x):
        for i, w in enumerate(ws):
            x = x @ w.T
            if i < len(ws) - 1:
                x = depth_act(x)
        return x

    shape = (widths[0],) if batch is None else (batch, widths[0])
    return f, torch.randn(*shape, generator=g)


def _convnet():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Tanh(),
                        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(0), nn.Linear(32 * 8 * 8, 256))
    for p in net.parameters():
        p.requires_grad_(False)
    return lambda x: net(x), torch.randn(3, 32, 32)


def _rk4_lorenz(steps=200, dt=0.01):
    sigma, rho, beta = torch.tensor(10.0), torch.tensor(28.0), torch.tensor(8 / 3)

    def rhs(s):
        x, y, z = s[..., 0], s[..., 1], s[..., 2]
        return torch.stack([sigma * (y - x), x * (rho - z) - y, x * y - beta * z], -1)

    def f(s):
        out = []
        for _ in range(steps):
            s = rk4_step(rhs, s, dt)
            out.append(s)
        return torch.cat(out)  # the trajectory, 3 * steps outputs

    return f, torch.tensor([1.0, 1.0, 1.0])


def _transformer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=256, dropout=0.0, batch_first=True).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    return lambda x: layer(x.unsqueeze(0)).squeeze(0), torch.randn(32, 64)


WORKLOADS = {
    "mlp_small": lambda: _mlp([64, 256, 256, 64]),
    "mlp_mid": lambda: _mlp([512, 2048, 2048, 512]),
    "mlp_batch": lambda: _mlp([128, 512, 512, 128], batch=64),
    "mlp_wide_64MiB": lambda: _mlp([1024, 4096, 4096, 1024], batch=64),  # the middle weight is 64 MiB
    "mlp_deep_narrow": lambda: _mlp([32] * 33),  # 32 layers of 32: many small ops
    "convnet": _convnet,
    "rk4_lorenz_200": _rk4_lorenz,
    "transformer": _transformer,
}
DESCRIPTIONS = {
    "mlp_small": "64-256-256-64 tanh MLP, one input",
    "mlp_mid": "512-2048-2048-512 tanh MLP, one input",
    "mlp_batch": "128-512-512-128 tanh MLP, batch of 64",
    "mlp_wide_64MiB": "1024-4096-4096-1024 MLP (a 64 MiB weight), batch of 64",
    "mlp_deep_narrow": "32 layers of width 32",
    "convnet": "3 convs (3x32x32 -> 32x8x8) + linear to 256",
    "rk4_lorenz_200": "200 RK4 steps of the 3-d Lorenz system, trajectory out (600)",
    "transformer": "TransformerEncoderLayer d=64, 4 heads, 32 tokens",
}


def build(name: str):
    """`work(k)`: a chunk of k output basis vectors through vmap(vjp_fn) (the forward ran once, outside)."""
    f, x = WORKLOADS[name]()
    out, vjp_fn = torch.func.vjp(f, x)
    m = out.numel()
    batched = torch.func.vmap(vjp_fn)

    def work(k: int):
        basis = torch.zeros(k, m)
        basis[torch.arange(k), torch.arange(k) * (m // k)] = 1.0  # spread over the outputs
        return batched(basis.view(k, *out.shape))[0]

    return work


# ----------------------------------------------------------------------------- helpers

def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _median_time(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _region_cost(meter: PeakMeter, n: int = 20000) -> float:
    t = time.perf_counter()
    for _ in range(n):
        with meter.region():
            pass
    return (time.perf_counter() - t) / n


# ----------------------------------------------------------------------------- children

def child_inprocess(rounds: int, variant: str) -> dict:
    """All workloads in one long-lived process, in shuffled rounds. Bare, measured and tracked calls
    alternate one by one, so that load from elsewhere on the machine falls on all three alike.
    `variant` "mallopt": after the warm-up, set glibc's mmap and trim thresholds to 128 KiB at run time."""
    meter = PeakMeter("cpu")
    works = {name: build(name) for name in WORKLOADS}
    configs = [(name, k) for name in WORKLOADS for k in KS]
    rows = {c: {"bare": [], "region": [], "bare_t": [], "tracked": [], "peaks": [], "tracker_peak": None,
                "trim_s": [], "trim_peaks": []} for c in configs}
    for c in configs:  # warm-up; the tracker's peak is the same every time
        works[c[0]](c[1])
        tracker = LiveStorageTracker()
        with tracker:
            works[c[0]](c[1])
        rows[c]["tracker_peak"] = tracker.peak
    if variant == "mallopt":
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        assert _libc.mallopt(M_MMAP_THRESHOLD, 131072) == 1 and _libc.mallopt(M_TRIM_THRESHOLD, 131072) == 1
    empty = _region_cost(meter)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(configs)
        for c in configs:
            work, k, row = works[c[0]], c[1], rows[c]
            t1 = _median_time(lambda: work(k), 1)
            n = max(3, min(40, int(0.05 / max(t1, 1e-6))))  # about 50 ms of each variant per round
            bare, region = [], []
            for _ in range(n):
                bare.append(_median_time(lambda: work(k), 1))
                t = time.perf_counter()
                with meter.region() as r:
                    work(k)
                region.append(time.perf_counter() - t)
                row["peaks"].append(r.peak_bytes)
            row["bare"].append(statistics.median(bare))
            row["region"].append(statistics.median(region))

            def tracked():
                with LiveStorageTracker():
                    work(k)

            bare, tracked_ts = [], []
            for _ in range(max(1, n // 8)):
                bare.append(_median_time(lambda: work(k), 1))
                tracked_ts.append(_median_time(tracked, 1))
            row["bare_t"].append(statistics.median(bare))
            row["tracked"].append(statistics.median(tracked_ts))
            t = time.perf_counter()
            with meter.region(trim=True) as r:
                work(k)
            row["trim_s"].append(time.perf_counter() - t - r.seconds)  # the trim and the region's own cost
            row["trim_peaks"].append(r.peak_bytes)
    return {"region_cost_s": empty, "rows": [{"workload": c[0], "k": c[1], **rows[c]} for c in sorted(rows)]}


def child_reference(name: str, k: int) -> dict:
    """The benchmark's measurement of one warm call, in this fresh process."""
    work = build(name)
    work(k)
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    work(k)
    return {"extra_bytes": _status("VmHWM") - before}


def child_growth(threads: int, nbytes: int, how: str) -> dict:
    """RSS added per second by the fastest page-touching work: the best of 5. "file mmap": reading
    through a mapping of a file already in the page cache (no zeroing, the kernel maps 16 pages a fault)."""
    import mmap
    import tempfile

    torch.set_num_threads(threads)
    meter = PeakMeter("cpu")
    makers = {"empty+fill_": lambda: torch.empty(nbytes // 4).fill_(1.0), "ones": lambda: torch.ones(nbytes // 4),
              "zeros": lambda: torch.zeros(nbytes // 4)}
    best = 0.0
    with tempfile.TemporaryFile() as fh:
        if how == "file mmap":
            fh.write(b"\1" * nbytes)
            fh.flush()
        for _ in range(5):
            gc.collect()
            if how == "file mmap":
                pages = mmap.mmap(fh.fileno(), nbytes, access=mmap.ACCESS_READ)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a read-only buffer; only read here
                    view = torch.frombuffer(pages, dtype=torch.int64)
                with meter.region() as r:
                    view.sum()
                del view
                pages.close()
            else:
                with meter.region() as r:
                    x = makers[how]()
                del x
            best = max(best, r.peak_bytes / r.seconds)
    return {"bytes_per_s": best}


def child_alternatives() -> dict:
    """Costs and readings of other ways to see memory, on two workloads, k = 16."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    meter = PeakMeter("cpu")
    for name in ("mlp_mid", "rk4_lorenz_200"):
        work, k = build(name), 16
        work(k)
        bare = statistics.median(_median_time(lambda: work(k), 5) for _ in range(3))
        tracker = LiveStorageTracker()
        with tracker:
            work(k)
        with meter.region() as r:
            work(k)
        row = {"bare_s": bare, "tracker_peak": tracker.peak, "region_peak": r.peak_bytes}

        def profiled():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                work(k)
            return prof

        profiled()
        t = time.perf_counter()
        prof = profiled()
        row["profiler_s"] = time.perf_counter() - t
        t = time.perf_counter()
        row["profiler_peak"] = _profiler_peak(prof)
        row["profiler_analysis_s"] = time.perf_counter() - t

        # saved_tensors_hooks see what a forward pass saves for backward (torch.func.vjp refuses them,
        # so through torch.autograd); a backward chunk saves nothing.
        f, x = WORKLOADS[name]()
        x.requires_grad_(True)
        saved = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            work(k)
        row["saved_hooks_bytes_in_chunk"] = sum(saved)
        saved.clear()
        f(x)
        t = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = f(x)
        row["saved_hooks_forward_s"] = time.perf_counter() - t
        row["saved_hooks_forward_bytes"] = sum(saved)
        del y
        t = time.perf_counter()
        y = f(x)
        row["forward_s"] = time.perf_counter() - t
        del y
        tracker = LiveStorageTracker()
        with tracker:
            y = f(x)
        row["forward_tracker_live"] = tracker.live  # what the graph and the output hold after the forward
        del y
        out[name] = row

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    _libc.mallinfo2.restype = Mallinfo2
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        info = _libc.mallinfo2()
    out["mallinfo2_s"] = (time.perf_counter() - t) / n
    out["mallinfo2_free_in_arenas"] = info.fordblks
    import resource

    x = torch.empty(256 * MiB // 4).fill_(1.0)  # a peak, then gone
    del x
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 (Linux: KiB)
    out["rusage"] = {"maxrss_before": maxrss(), "vmhwm_before": _status("VmHWM")}
    with meter.region():
        pass
    out["rusage"].update(maxrss_after=maxrss(), vmhwm_after=_status("VmHWM"), process_peak_rss=process_peak_rss())
    t = time.perf_counter()
    for _ in range(n):
        resource.getrusage(resource.RUSAGE_SELF)
    out["getrusage_s"] = (time.perf_counter() - t) / n
    return out


def _profiler_peak(prof) -> int:
    """The high-water mark of CPU bytes from the profiler: each op's own net allocation and each
    allocation or free outside ops ("[memory]" events), in time order (transients inside an op are lost)."""
    events = sorted((e.time_range.start, e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage)
                    for e in prof.events())
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def child_trim_cost() -> dict:
    """malloc_trim(0) against heaps of different sizes of free memory below the top."""
    out = []
    gc.collect()
    _libc.malloc_trim(0)  # start from a trimmed heap
    for held_mib in (0, 64, 512):
        # Many blocks under the mmap threshold (glibc default 128 KiB) land in the heap; free every other.
        blocks = [torch.empty(16 * 1024).fill_(1.0) for _ in range(held_mib * 16)]  # 64 KiB each
        del blocks[::2]
        gc.collect()
        before = _status("VmRSS")
        t = time.perf_counter()
        _libc.malloc_trim(0)
        first = time.perf_counter() - t
        t = time.perf_counter()
        _libc.malloc_trim(0)
        again = time.perf_counter() - t
        out.append({"free_mib_in_heap": held_mib / 2, "first_s": first, "again_s": again,
                    "released_bytes": before - _status("VmRSS")})
        del blocks
    return {"trim": out}


# ----------------------------------------------------------------------------- parent

def _run_child(args: list[str], env_extra: dict | None = None, timeout=3600) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_main(argv: list[str]) -> None:
    what, rest = argv[0], argv[1:]
    if what == "inprocess":
        result = child_inprocess(int(rest[0]), rest[1])
    elif what == "reference":
        result = child_reference(rest[0], int(rest[1]))
    elif what == "growth":
        result = child_growth(int(rest[0]), int(rest[1]), rest[2])
    elif what == "alternatives":
        result = {**child_alternatives(), **child_trim_cost()}
    else:
        raise SystemExit(f"unknown child {what!r}")
    print(json.dumps(result))


def _fit_error(peaks: dict[int, float], truth: float) -> tuple[float, float, float, float]:
    """a + b*k through k = 2 and 16; the prediction at 64 and its error against `truth`."""
    b = (peaks[16] - peaks[2]) / 14
    a = peaks[2] - 2 * b
    predicted = a + 64 * b
    return a, b, predicted, (predicted - truth) / truth if truth else float("nan")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return _child_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5, growth at 256 MiB only")
    parser.add_argument("--render", metavar="JSON", help="only write the markdown again from a results file")
    args = parser.parse_args()
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
    if PeakMeter("cpu").kind != "peak RSS":
        raise SystemExit("meter_study needs Linux with a writable /proc/self/clear_refs (the CPU peak RSS meter)")
    rounds = 2 if args.quick else 5
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    result: dict = {"rounds": rounds, "ks": list(KS)}

    say("in-process runs (MALLOC_MMAP_THRESHOLD_=131072, then glibc's default) ...")
    result["load_before"] = os.getloadavg()
    result["inprocess"] = {"mmap_131072": _run_child(["inprocess", str(rounds), "plain"], {**MMAP_ENV, **ONE_THREAD}),
                           "glibc_default": _run_child(["inprocess", str(rounds), "plain"], ONE_THREAD),
                           "glibc_mallopt": _run_child(["inprocess", str(rounds), "mallopt"], ONE_THREAD)}
    say("fresh-process references ...")
    result["reference"] = {"mmap_131072": {}, "glibc_default": {}}
    for name in WORKLOADS:
        for k in KS:
            result["reference"]["mmap_131072"][f"{name}/{k}"] = \
                _run_child(["reference", name, str(k)], {**MMAP_ENV, **ONE_THREAD})["extra_bytes"]
            result["reference"]["glibc_default"][f"{name}/{k}"] = \
                _run_child(["reference", name, str(k)], ONE_THREAD)["extra_bytes"]
    say("RSS growth rates ...")
    growth = []
    sizes = (256 * MiB,) if args.quick else (64 * MiB, 256 * MiB, 1024 * MiB)
    for thp in ("0", "1"):
        for threads in (1, 2):
            for nbytes in sizes:
                for how in ("empty+fill_", "ones", "zeros") + (("file mmap",) if thp == "0" else ()):
                    rate = _run_child(["growth", str(threads), str(nbytes), how], {"THP_MEM_ALLOC_ENABLE": thp})
                    growth.append({"thp": thp == "1", "threads": threads, "bytes": nbytes, "how": how, **rate})
    result["growth"] = growth
    say("alternatives ...")
    result["alternatives"] = _run_child(["alternatives"], ONE_THREAD)
    result["load_after"] = os.getloadavg()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from autojac._bench.suite import machine_name, machine_text

    device = torch.device("cpu")
    result["machine"] = machine_text(device)
    result["thp_setting"] = _thp_setting()
    stem = out_dir / f"{machine_name(device)}-meter"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    say(f"wrote {stem}.md and .json")


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:.2f}"


def _ratio(x, ref) -> str:
    if x is None or ref is None or ref < MiB:
        return "-"
    return f"{x / ref:.2f}"


def _pct(x) -> str:
    return f"{100 * x:+.1f}%"


def _ms(s) -> str:
    return f"{s * 1e3:.2f}" if s < 10 else f"{s:.1f} s"


def render(r: dict) -> str:
    ref, ref_default = r["reference"]["mmap_131072"], r["reference"]["glibc_default"]
    runs = r["inprocess"]
    rows = {env: {(row["workload"], row["k"]): row for row in run["rows"]} for env, run in runs.items()}
    lines = [f"# What measuring peak memory costs and how right it is ({r['machine']})", "",
             "Produced by `python benchmarks/meter_study.py`. A *region* is `PeakMeter('cpu').region()` "
             "(peak RSS: clear_refs + VmHWM); the *tracker* is `LiveStorageTracker` (a dispatch mode counting "
             "storages). Each workload's measured work is one chunk of k output basis vectors through "
             "`torch.func.vmap(vjp_fn)`; the forward pass ran once, outside.", "",
             "| workload | what |", "|---|---|"]
    lines += [f"| {n} | {DESCRIPTIONS[n]} |" for n in WORKLOADS]
    lines += _summary(r, rows, ref)

    # 1. overhead
    runs_m = runs["mmap_131072"]
    lines += ["", "## 1. Overhead", "",
              f"An empty region in a tight loop costs **{runs_m['region_cost_s'] * 1e6:.1f} us** "
              f"({runs['glibc_default']['region_cost_s'] * 1e6:.1f} and "
              f"{runs['glibc_mallopt']['region_cost_s'] * 1e6:.1f} "
              "us in the other two runs): two preads of /proc/self/status and one write to clear_refs. Around real "
              "work it costs more (caches are cold): *in situ* is the median measured call minus the median bare "
              "call, with measured and bare calls alternating. Per-call medians, then the median over "
              f"{r['rounds']} shuffled rounds, in one long-lived process (MALLOC_MMAP_THRESHOLD_=131072). All runs "
              "but the growth rates use one intra-op thread (OMP_NUM_THREADS=1): on this shared machine other "
              "processes stalled OpenMP's barriers and made 2-thread timings up to 20x slower at random. "
              f"Load average {r['load_before'][0]:.1f} before the study, {r['load_after'][0]:.1f} after (2 cores: "
              "above ~1, other processes were running and timings are noisier).", "",
              "| workload | k | bare work ms | region in situ us | region overhead | tracker ms | tracker overhead |",
              "|---|---|---|---|---|---|---|"]
    for name in WORKLOADS:
        for k in KS:
            row = rows["mmap_131072"][(name, k)]
            bare = statistics.median(row["bare"])
            in_situ = statistics.median(a - b for a, b in zip(row["region"], row["bare"]))
            region = statistics.median(a / b - 1 for a, b in zip(row["region"], row["bare"]))
            tracker = statistics.median(a / b - 1 for a, b in zip(row["tracked"], row["bare_t"]))
            lines.append(f"| {name} | {k} | {_ms(bare)} | {in_situ * 1e6:.0f} | {_pct(region)} | "
                         f"{_ms(statistics.median(row['tracked']))} | {_pct(tracker)} |")

    # 2. accuracy
    lines += ["", "## 2. Accuracy", "",
              "Peak extra MiB. *reference*: the benchmark's measurement, one warm call in a fresh process with "
              "MALLOC_MMAP_THRESHOLD_=131072 (*fresh, default*: the same without the variable). *region* columns: "
              "in-process readings over all rounds, median [min-max], and the ratio of the median to the "
              "reference (only where the reference is at least 1 MiB). *mmap 128K*: the process was started with "
              "MALLOC_MMAP_THRESHOLD_=131072; *default*: without it; *mallopt*: without it, but "
              "`mallopt(M_MMAP_THRESHOLD and M_TRIM_THRESHOLD, 131072)` after the warm-up. *+trim*: "
              "`meter.region(trim=True)`: `malloc_trim(0)` just before the region.", "",
              "| workload | k | reference | fresh, default | tracker | region, mmap 128K | ratio | region, default | "
              "ratio | default +trim | ratio | mallopt | ratio | mallopt +trim | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in WORKLOADS:
        for k in KS:
            key = f"{name}/{k}"
            m, d, o = (rows[env][(name, k)] for env in ("mmap_131072", "glibc_default", "glibc_mallopt"))
            cells = []
            for peaks, spread in ((m["peaks"], True), (d["peaks"], True), (d["trim_peaks"], False),
                                  (o["peaks"], False), (o["trim_peaks"], False)):
                med = statistics.median(peaks)
                text = f"{_mib(med)} [{_mib(min(peaks))}-{_mib(max(peaks))}]" if spread else _mib(med)
                cells += [text, _ratio(med, ref[key])]
            lines.append(f"| {name} | {k} | {_mib(ref[key])} | {_mib(ref_default[key])} | "
                         f"{_mib(m['tracker_peak'])} | " + " | ".join(cells) + " |")
    trims = [t for row in runs["glibc_default"]["rows"] for t in row["trim_s"]]
    lines += ["", f"`region(trim=True)` costs (trim and region, without the work; glibc default): median "
              f"{statistics.median(trims) * 1e6:.0f} us, max {max(trims) * 1e3:.2f} ms over {len(trims)} calls."]
    for t in r["alternatives"]["trim"]:
        lines.append(f"- with {t['free_mib_in_heap']:.0f} MiB freed in 64 KiB blocks in the heap: first trim "
                     f"{t['first_s'] * 1e3:.2f} ms (released {_mib(t['released_bytes'])} MiB), again "
                     f"{t['again_s'] * 1e3:.3f} ms")
    def bare(env, name, k):
        return statistics.median(rows[env][(name, k)]["bare"])

    speed = "; ".join(name + " " + " / ".join(f"{bare('mmap_131072', name, k) / bare('glibc_default', name, k):.2f}"
                                              for k in KS) for name in WORKLOADS)
    lines += ["", "What MALLOC_MMAP_THRESHOLD_=131072 costs in speed (every block over 128 KiB is a fresh mmap, "
              "its pages faulted in again): median bare time with it over without it, by workload (k = 2 / 16 / 64): "
              f"{speed}."]

    # 3. linearity
    lines += ["", "## 3. Linearity", "",
              "a + b*k through the readings at k = 2 and 16, predicting k = 64; the error is against the same "
              "source's reading at 64 (*self*) and against the reference at 64. Only workloads whose reference "
              "at k = 64 is at least 1 MiB.", "",
              "| workload | source | a MiB | b MiB/vector | predicted 64 | measured 64 | error (self) | "
              "error (reference) |",
              "|---|---|---|---|---|---|---|---|"]
    for name in WORKLOADS:
        if ref[f"{name}/64"] < MiB:
            continue
        sources = {"reference": {k: ref[f"{name}/{k}"] for k in KS},
                   "tracker": {k: rows["mmap_131072"][(name, k)]["tracker_peak"] for k in KS},
                   "region (mmap 128K)": {k: statistics.median(rows["mmap_131072"][(name, k)]["peaks"]) for k in KS},
                   "region (default)": {k: statistics.median(rows["glibc_default"][(name, k)]["peaks"]) for k in KS},
                   "region (default, +trim)": {k: statistics.median(rows["glibc_default"][(name, k)]["trim_peaks"])
                                               for k in KS}}
        for source, peaks in sources.items():
            a, b, predicted, err = _fit_error(peaks, peaks[64])
            err_ref = (predicted - ref[f"{name}/64"]) / ref[f"{name}/64"]
            lines.append(f"| {name} | {source} | {_mib(a)} | {b / MiB:.3f} | {_mib(predicted)} | {_mib(peaks[64])} | "
                         f"{_pct(err)} | {_pct(err_ref)} |")

    # 4. growth
    lines += ["", "## 4. How fast RSS can grow", "",
              "Peak RSS added over the region's seconds (GiB/s), best of 5, each in a fresh process. *THP*: "
              "`THP_MEM_ALLOC_ENABLE=1` (torch asks for transparent huge pages; this machine's THP setting is "
              f"'{r.get('thp_setting', 'unknown')}'). *file mmap*: reading a mapping of a file in the page cache.", ""]
    sizes = sorted({g["bytes"] for g in r["growth"]})
    header = [f"{t} thread{'s' if t > 1 else ''}, {n // MiB} MiB" for t in (1, 2) for n in sizes]
    lines += ["| how | THP | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    by = {(g["how"], g["thp"], g["threads"], g["bytes"]): g["bytes_per_s"] for g in r["growth"]}
    for how, thp in sorted({(g["how"], g["thp"]) for g in r["growth"]}):
        lines.append(f"| {how} | {'yes' if thp else 'no'} | " + " | ".join(
            f"{by[(how, thp, t, n)] / 2**30:.2f}" for t in (1, 2) for n in sizes) + " |")

    # 5. alternatives
    alt = r["alternatives"]
    lines += ["", "## 5. Alternatives", "", "k = 16.", "",
              "| workload | bare ms | tracker peak | region peak (glibc default) | profiler (profile_memory) ms | "
              "its peak | "
              "its analysis ms | saved_tensors_hooks bytes in the chunk | forward ms | forward with hooks ms | "
              "saved bytes (forward) | tracker: live after forward |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("mlp_mid", "rk4_lorenz_200"):
        a = alt[name]
        lines.append(f"| {name} | {_ms(a['bare_s'])} | {_mib(a['tracker_peak'])} | {_mib(a['region_peak'])} | "
                     f"{_ms(a['profiler_s'])} | {_mib(a['profiler_peak'])} | {_ms(a['profiler_analysis_s'])} | "
                     f"{a['saved_hooks_bytes_in_chunk']} | {_ms(a['forward_s'])} | {_ms(a['saved_hooks_forward_s'])} | "
                     f"{_mib(a['saved_hooks_forward_bytes'])} | {_mib(a['forward_tracker_live'])} |")
    ru = alt["rusage"]
    lines += ["", f"glibc `mallinfo2()` through ctypes: {alt['mallinfo2_s'] * 1e6:.1f} us a call (current totals "
              f"only, no peak); `getrusage`: {alt['getrusage_s'] * 1e6:.1f} us.", "",
              "## getrusage and the reset", "",
              f"After a 256 MiB peak: ru_maxrss {_mib(ru['maxrss_before'])} MiB, VmHWM {_mib(ru['vmhwm_before'])} MiB. "
              f"After one region (clear_refs 5): ru_maxrss **{_mib(ru['maxrss_after'])} MiB**, VmHWM "
              f"{_mib(ru['vmhwm_after'])} MiB; `process_peak_rss()` {_mib(ru['process_peak_rss'])} MiB.", ""]
    return "\n".join(lines)


def _summary(r: dict, rows: dict, ref: dict) -> list[str]:
    """The headline figures, computed from the tables below."""
    big = [(n, k) for n in WORKLOADS for k in KS if ref[f"{n}/{k}"] >= MiB]
    small = [(n, k) for n in WORKLOADS for k in KS if ref[f"{n}/{k}"] < MiB]

    def span(env: str, key: str) -> str:
        ratios = [statistics.median(rows[env][c][key]) / ref[f"{c[0]}/{c[1]}"] for c in big]
        return f"{min(ratios):.2f}-{max(ratios):.2f}"

    off_small = max(abs(statistics.median(rows["mmap_131072"][c]["peaks"]) - ref[f"{c[0]}/{c[1]}"]) for c in small)
    m = rows["mmap_131072"]
    in_situ = [statistics.median(a - b for a, b in zip(m[c]["region"], m[c]["bare"])) for c in m]
    quartiles = statistics.quantiles(in_situ, n=4)
    over = [(c, statistics.median(a / b - 1 for a, b in zip(m[c]["region"], m[c]["bare"])),
             statistics.median(m[c]["bare"])) for c in m]
    slow = [c for c in over if c[1] > 0.05]
    tracker = [statistics.median(a / b - 1 for a, b in zip(m[c]["tracked"], m[c]["bare_t"])) for c in m]
    fit = []
    for n in WORKLOADS:
        if ref[f"{n}/64"] >= MiB:
            peaks = {k: statistics.median(m[(n, k)]["peaks"]) for k in KS}
            fit.append(_fit_error(peaks, ref[f"{n}/64"])[3])
    anon = max(g["bytes_per_s"] for g in r["growth"] if g["how"] != "file mmap")
    anon_plain = max(g["bytes_per_s"] for g in r["growth"] if g["how"] != "file mmap" and not g["thp"])
    mapped = max(g["bytes_per_s"] for g in r["growth"] if g["how"] == "file mmap")
    return ["", "## Findings", "",
            f"- A region costs {r['inprocess']['mmap_131072']['region_cost_s'] * 1e6:.0f} us in a tight loop and "
            f"{statistics.median(in_situ) * 1e6:.0f} us around real work (median of the chunks; quartiles "
            f"{quartiles[0] * 1e6:.0f} and {quartiles[2] * 1e6:.0f} us); over 5% of the work in {len(slow)} of "
            f"{len(over)} chunks" + (f", all of them under {max(c[2] for c in slow) * 1e3:.1f} ms" if slow else "")
            + f". The tracker: {100 * min(tracker):+.0f}% to {100 * max(tracker):+.0f}%.",
            f"- In a process started with MALLOC_MMAP_THRESHOLD_=131072, region readings are "
            f"{span('mmap_131072', 'peaks')}x the fresh-process reference wherever it is at least 1 MiB "
            f"({len(big)} chunks), and within {off_small / MiB:.2f} MiB of it below that. a + b*k fitted at "
            f"k = 2 and 16 predicts k = 64 within {100 * min(fit):+.0f}% to {100 * max(fit):+.0f}% of the reference.",
            f"- Without it (glibc's default), in a process that has run other work, readings are "
            f"{span('glibc_default', 'peaks')}x the reference: freed heap memory stays resident and is reused, "
            f"so RSS does not grow. With `region(trim=True)` they are {span('glibc_default', 'trim_peaks')}x: "
            "every page is touched afresh, but blocks freed inside the region stay resident, so the reading is "
            "the heap's footprint rather than the live peak. Setting the "
            f"thresholds with mallopt at run time: {span('glibc_mallopt', 'peaks')}x "
            f"({span('glibc_mallopt', 'trim_peaks')}x with trim).",
            f"- RSS grew at most {anon_plain / 2**30:.1f} GiB/s through anonymous memory, "
            f"{anon / 2**30:.1f} GiB/s with transparent huge pages, {mapped / 2**30:.1f} GiB/s by mapping a "
            "cached file."]


def _thp_setting() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "unknown"


if __name__ == "__main__":
    main()
