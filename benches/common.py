"""Timing, bandwidth and table helpers shared by every benchmark (installed as rlkern.benches).

CPU: implementations are timed alternately in one process (round-robin), so a slow phase of
the shared machine hits all of them alike; reported as median and p20/p80 over rounds.
GPU: triton.testing.do_bench per implementation (median, p20, p80), CUDA peak memory.
"""

from __future__ import annotations

import datetime
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
    median_ms: float
    p20_ms: float
    p80_ms: float
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


def time_alternating(fns: dict, rounds: int, warmup: int = 1) -> dict[str, tuple[float, float, float]]:
    """CPU timing: run every fn once per round, in turn, so noise hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _quantiles(v) for name, v in samples.items()}


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
    ours = {r.bench: r.median_ms for r in rows if r.impl == "rlkern"}
    for r in rows:
        if r.bench in ours and r.median_ms > 0:
            r.speedup = r.median_ms / ours[r.bench]


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def markdown_table(rows: list[Row]) -> str:
    flops = any(r.tflops is not None for r in rows)
    head = "| bench | impl | shape | median ms | p20–p80 ms | " + ("TFLOP/s | " if flops else "")
    head += "GB/s | % peak BW | peak MiB | rlkern speedup |\n"
    head += "|---|---|---|---:|---:|" + ("---:|" if flops else "") + "---:|---:|---:|---:|\n"
    lines = [
        f"| {r.bench} | {r.impl} | {r.shape} | {r.median_ms:.3f} | {r.p20_ms:.3f}–{r.p80_ms:.3f} | "
        + (f"{_fmt(r.tflops, '.3g')} | " if flops else "")
        + f"{_fmt(r.gbps, '.1f')} | {_fmt(r.pct_peak, '.0f')} | {_fmt(r.peak_mem_mib, '.0f')} | "
        f"{_fmt(r.speedup, '.2f')}x |"
        for r in rows
    ]
    return head + "\n".join(lines)


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
    env = environment(device)
    base, _ = os.path.splitext(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump({**env, "command": command, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · "
                f"commit {env['commit']} · {env['date']}\n\nCommand: `{command}`\n\n")
        f.write(markdown_table(rows) + "\n")
