"""Timing, bandwidth and table helpers shared by every benchmark (installed as rlkern.benches).

CPU: implementations are timed alternately in one process (round-robin), so a slow phase of
the shared machine hits all of them alike; reported as median and p20/p80 over rounds.
GPU: triton.testing.do_bench per implementation (median, p20, p80), CUDA peak memory.
Every timing goes through ``measure``, which shows progress (family, bench, shape,
implementation) and, under ``collect()``, hands the cases to benches/test_benchmarks.py
(pytest-benchmark) instead of timing them. A peer that is missing or fails to import gets a
row with the reason (``peer`` + ``missing_row``), never a silent gap.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Row:
    bench: str  # e.g. "logprobs fwd+entropy"
    impl: str  # "rlkern", "eager", "trl", ...
    shape: str
    median_ms: float | None  # None: not run (a memory-only row, or a peer that is missing: extra["not run"])
    p20_ms: float | None
    p80_ms: float | None
    gbps: float | None = None  # from an explicit byte count
    pct_peak: float | None = None  # of the measured copy bandwidth of this machine
    peak_mem_mib: float | None = None  # peak memory during the call beyond its inputs (CUDA allocator, or CPU RSS growth)
    speedup: float | None = None  # this impl's median / rlkern's median (>1: rlkern faster)
    extra: dict = field(default_factory=dict)
    tflops: float | None = None  # from an explicit flop count (GEMM benchmarks)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    s = sorted(samples_ms)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return statistics.median(s), pick(0.2), pick(0.8)


def time_alternating(fns: dict, rounds: int, warmup: int = 1, on_call=None) -> dict[str, tuple[float, float, float]]:
    """CPU timing: run every fn once per round, in turn, so noise hits all of them alike.
    ``on_call(name)`` after each call (progress)."""
    for _ in range(warmup):
        for name, fn in fns.items():
            fn()
            if on_call is not None:
                on_call(name)
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
            if on_call is not None:
                on_call(name)
    return {name: _quantiles(v) for name, v in samples.items()}


# --- progress, and the cases pytest-benchmark runs -------------------------------------------

_FAMILY = {"name": ""}
_COLLECTED: list | None = None


def set_family(name: str) -> None:
    """The family name progress lines start with (``rlkern bench`` sets it per family)."""
    _FAMILY["name"] = name


@contextlib.contextmanager
def collect():
    """Within this block ``measure`` times nothing: it records ``(label, impl, fn)`` in the list
    it yields (benches/test_benchmarks.py hands each to pytest-benchmark)."""
    global _COLLECTED
    previous, _COLLECTED = _COLLECTED, []
    try:
        yield _COLLECTED
    finally:
        _COLLECTED = previous


class _Progress:
    """One bar per measured case on stderr (tqdm when installed, else one line per case)."""

    def __init__(self, label: str, total: int):
        self.bar = None
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="call", leave=False, dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            print(f"  {label} ...", file=sys.stderr, flush=True)

    def step(self, impl: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(impl, refresh=False)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _labelled(label: str) -> str:
    return f"[{_FAMILY['name']}] {label}" if _FAMILY["name"] else label


def measure(fns: dict, device: torch.device, rounds: int, *, label: str, warmup: int = 1
            ) -> dict[str, tuple[float, float, float]]:
    """Time every implementation of one case: ``time_alternating`` on the CPU, ``time_cuda``
    per implementation on a GPU. ``label`` ("bench shape") names the case in the progress bar."""
    label = _labelled(label)
    if _COLLECTED is not None:
        _COLLECTED.extend((label, name, fn) for name, fn in fns.items())
        return {name: (1.0, 1.0, 1.0) for name in fns}
    cuda = device.type == "cuda"
    progress = _Progress(label, len(fns) if cuda else (warmup + rounds) * len(fns))
    try:
        if cuda:
            timings = {}
            for name, fn in fns.items():
                timings[name] = time_cuda(fn)
                progress.step(name)
            return timings
        return time_alternating(fns, rounds, warmup, on_call=progress.step)
    finally:
        progress.close()


BROKEN_PEERS: dict[str, str] = {}  # installed peers that failed to import: module -> reason


def peer(module: str):
    """``(module, None)``, or ``(None, reason)`` when it is not installed or fails to import.
    An installed peer that fails to import (a version conflict, a shadowed dependency) is also
    recorded in ``BROKEN_PEERS``: ``rlkern bench`` lists them, and exits 1 on them under
    ``RLKERN_REQUIRE_PEERS=1``."""
    try:
        return importlib.import_module(module), None
    except Exception as error:  # a missing or broken peer gets a row with the reason, never a crash
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"{type(error).__name__}: {first[:160]}"
        top = module.split(".")[0]
        if isinstance(error, ModuleNotFoundError) and error.name == top:
            return None, f"not installed ({top})"
        BROKEN_PEERS[module] = reason
        return None, reason


def missing_row(bench: str, impl: str, shape: str, reason: str) -> Row:
    """The row of a peer that did not run, with the reason (not installed, import error, needs CUDA)."""
    return Row(bench, impl, shape, None, None, None, extra={"not run": reason})


NEEDS_CUDA = "needs a CUDA device (a Triton/CUDA kernel)"


def time_cuda(fn, *, rep_ms: int = 200) -> tuple[float, float, float]:
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=rep_ms, return_mode="median")
    return med, p20, p80


def cuda_peak_mib(fn) -> float:
    """Peak CUDA memory allocated while fn runs, beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


# Environment of a process that runs cpu_peak_rss_growth_mib: glibc raises its mmap threshold
# (up to 32 MiB) after large frees, and buffers below it then come from a heap that stays
# resident, so a reused buffer would add nothing to the peak. A fixed 1 MiB threshold keeps
# every large tensor a fresh mapping that the high-water mark sees.
CPU_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def cpu_peak_rss_growth_mib(fn) -> float:
    """Peak resident size while fn runs minus the resident size before it (Linux): CPU tensors
    bypass tracemalloc, but every page the allocator touches is resident. The kernel's peak
    (VmHWM) is reset first (``clear_refs`` 5), so earlier, freed allocations do not hide it.
    Run it in a process started with ``CPU_PROBE_ENV``."""
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return (_proc_status_kib("VmHWM") - before) / 1024


# One case in a fresh process (no allocator cache from other implementations): MODULE's
# ``memory_case(device, impl, n, *args)`` builds the inputs and returns the step to measure.
_CPU_PROBE = """
import json, sys, importlib, torch
from rlkern.benches import common
torch.set_num_threads(2)
module, impl, n, args = importlib.import_module(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
module.memory_case(torch.device("cpu"), impl, 16, *args)()  # load code paths before the baseline
print(json.dumps(common.cpu_peak_rss_growth_mib(module.memory_case(torch.device("cpu"), impl, n, *args))))
"""


def peak_memory_mib(module: str, device: torch.device, impl: str, n: int, *args) -> float | None:
    """Peak memory of one ``memory_case`` step beyond its inputs: the CUDA allocator's peak on a
    GPU; on the CPU the peak resident growth in a fresh process (``CPU_PROBE_ENV``). None when
    the probe failed."""
    if _COLLECTED is not None:
        return None
    if device.type == "cuda":
        fn = importlib.import_module(module).memory_case(device, impl, n, *args)
        fn()
        return cuda_peak_mib(fn)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **CPU_PROBE_ENV)
    out = subprocess.run([sys.executable, "-c", _CPU_PROBE, module, impl, str(n), json.dumps(args)],
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


def memory_sweep(module: str, device: torch.device, impls: list[str], ns: list[int], bench: str, shape_of,
                 *args) -> list[Row]:
    """Rows of peak memory against N (``peak_mem_mib``; no timing), one per impl and N."""
    rows = []
    if _COLLECTED is not None:
        return rows
    progress = _Progress(_labelled(bench), len(ns) * len(impls))
    try:
        for n in ns:
            for impl in impls:
                rows.append(Row(bench, impl, shape_of(n), None, None, None,
                                peak_mem_mib=peak_memory_mib(module, device, impl, n, *args), extra={"n": n}))
                progress.step(impl)
    finally:
        progress.close()
    return rows


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured read+write bandwidth of a large copy: the '100%' of the % peak column."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    if device.type == "cuda":
        ms = time_cuda(fn)[0]
    else:
        ms = time_alternating({"copy": fn}, rounds=9)["copy"][0]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def fill_ratios(rows: list[Row]) -> None:
    """speedup = impl median / rlkern median, per bench."""
    ours = {r.bench: r.median_ms for r in rows if r.impl == "rlkern" and r.median_ms}
    for r in rows:
        if r.bench in ours and r.median_ms:
            r.speedup = r.median_ms / ours[r.bench]


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def _timing_cells(r: Row) -> str:
    if r.median_ms is None:
        reason = r.extra.get("not run")
        return f"not run: {reason} | — | " if reason else "— | — | "
    return f"{r.median_ms:.3f} | {r.p20_ms:.3f}–{r.p80_ms:.3f} | "


def markdown_table(rows: list[Row]) -> str:
    flops = any(r.tflops is not None for r in rows)
    head = "| bench | impl | shape | median ms | p20–p80 ms | " + ("TFLOP/s | " if flops else "")
    head += "GB/s | % peak BW | peak MiB | rlkern speedup |\n"
    head += "|---|---|---|---:|---:|" + ("---:|" if flops else "") + "---:|---:|---:|---:|\n"
    lines = [
        f"| {r.bench} | {r.impl} | {r.shape} | " + _timing_cells(r)
        + (f"{_fmt(r.tflops, '.3g')} | " if flops else "")
        + f"{_fmt(r.gbps, '.1f')} | {_fmt(r.pct_peak, '.0f')} | {_fmt(r.peak_mem_mib, '.0f')} | "
        + (f"{r.speedup:.2f}x |" if r.speedup is not None else "— |")
        for r in rows
    ]
    return head + "\n".join(lines)


def rows_of(results: dict) -> list[Row]:
    """The rows of a results file (FILE.json as ``write_results`` writes it)."""
    return [Row(**r) for r in results["rows"]]


def render(results: dict) -> str:
    """FILE.md from FILE.json: device line, command, table. The README's benchmark tables are
    these blocks (``python -m rlkern.benches.readme`` writes them, a test compares them)."""
    return (f"Device: {results['device']} · torch {results['torch']} · triton {results['triton']} · "
            f"commit {results['commit']} · {results['date']}\n\nCommand: `{results['command']}`\n\n"
            + markdown_table(rows_of(results)) + "\n")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def report(rows: list[Row], device: torch.device, out: str | None, module: str, argv: list[str] | None) -> list[Row]:
    """Print the device and the table; with ``out``, also write ``out.json`` and ``out.md``."""
    print(f"# {device_name(device)}\n")
    print(markdown_table(rows))
    if out:
        write_results(out, device, rows, module, argv)
    return rows


def write_results(path: str, device: torch.device, rows: list[Row], module: str, argv: list[str] | None) -> None:
    """Write FILE.json and FILE.md, recording the command that reproduces them: ``module`` is
    the bench's dotted name (``__spec__.name``), ``argv`` what its ``main`` parsed (None: the
    command line)."""
    command = " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])
    results = {**environment(device), "command": command, "rows": [asdict(r) for r in rows]}
    base, _ = os.path.splitext(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(render(results))
