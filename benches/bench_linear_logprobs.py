"""Fused linear log-probs (hidden states -> token log-probs + entropy): rlkern vs materialized
logits (eager), TRL 1.16's ChunkedLogProbFunction, Liger's fused-linear CE, cut-cross-entropy.

    python -m rlkern.benches.bench_linear_logprobs [--n N --hidden H --vocab V --dtype bf16] [--out FILE]

Defaults: GPU N=8192, H=4096, V=151936, bf16 (the issue's H100 shape); CPU N=8192, H=256,
V=32000, fp32, 2 threads. TFLOP/s count 2*N*H*V per GEMM: 1 in the forward, 3 in forward +
backward (what a materialized-logits step needs), whatever an implementation recomputes.
"bare GEMMs" times those GEMMs alone on materialized tensors: the floor to compare with.
Peak memory beyond the inputs: the CUDA allocator's peak on GPU; on the CPU the growth of the
peak resident size of a fresh process running one fwd+bwd (the allocator bypasses Python).
Liger and cut-cross-entropy return -logp only (no entropy): their rows compute log-probs only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

import torch

import rlkern
from rlkern.benches import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRL_CHUNK = 32768  # TRL's trainer value (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def _peer(module: str):
    try:
        return importlib.import_module(module)
    except Exception:  # a missing or broken peer is reported as absent, never fatal
        return None


def _eager(hidden, weight, labels):
    log_p = torch.log_softmax((hidden @ weight.T).float(), -1)
    return log_p.gather(-1, labels[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)


def implementations(device: torch.device) -> dict:
    """name -> fn(hidden, weight, labels) -> (logp, entropy or None)."""
    impls = {
        "rlkern": lambda h, w, y: rlkern.linear_token_logprobs(h, w, y, return_entropy=True),
        "eager": _eager,
    }
    if device.type == "cuda" and _peer("rlkern.kernels.linear_logprobs") is not None:
        impls["rlkern fused"] = lambda h, w, y: rlkern.linear_token_logprobs(h, w, y, return_entropy=True,
                                                                              kernel="fused")
    trl_kernels = _peer("trl.kernels")
    if trl_kernels is not None:
        impls["trl"] = lambda h, w, y: trl_kernels.ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, TRL_CHUNK, None, 1.0, ("entropy",))[:2]
    if device.type == "cuda":
        liger = _peer("liger_kernel.transformers.functional")
        if liger is not None:
            impls["liger"] = lambda h, w, y: (-liger.liger_fused_linear_cross_entropy(h, w, y, reduction="none"), None)
        cce = _peer("cut_cross_entropy")
        if cce is not None:
            impls["cut-cross-entropy"] = lambda h, w, y: (-cce.linear_cross_entropy(h, w, y, reduction="none"), None)
    return impls


def _inputs(device, n, width, vocab, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, width, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen, device=device) * 3 / width**0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    return hidden, weight, labels


def _step(fn, hidden, weight, labels):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logp, entropy = fn(h, w, labels)
    loss = logp.sum() if entropy is None else logp.sum() + 0.1 * entropy.sum()
    loss.backward()


def _bare_gemms(hidden, weight):
    logits = hidden @ weight.T
    return lambda: (hidden @ weight.T, logits @ weight, logits.T @ hidden)


# One fwd+bwd in a fresh process (no allocator cache from other implementations).
_CPU_PROBE = """
import json, sys, torch
from rlkern.benches import bench_linear_logprobs as b, common
torch.set_num_threads(2)
n, width, vocab, dtype, name = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), b.DTYPES[sys.argv[4]], sys.argv[5]
hidden, weight, labels = b._inputs(torch.device("cpu"), n, width, vocab, dtype)
fn = b.implementations(torch.device("cpu"))[name]
b._step(fn, hidden[:16], weight, labels[:16])  # load code paths before the baseline
print(json.dumps(common.cpu_peak_rss_growth_mib(lambda: b._step(fn, hidden, weight, labels))))
"""


def _cpu_peak_mib(name, n, width, vocab, dtype_name) -> float | None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **common.CPU_PROBE_ENV)
    out = subprocess.run([sys.executable, "-c", _CPU_PROBE, str(n), str(width), str(vocab), dtype_name, name],
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


def run(device: torch.device, n: int, width: int, vocab: int, dtype: torch.dtype, rounds: int = 5,
        memory: bool = True) -> list[common.Row]:
    hidden, weight, labels = _inputs(device, n, width, vocab, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    shape = f"N={n} H={width} V={vocab} {dtype_name}"
    impls = implementations(device)
    gemm_flop = 2 * n * width * vocab
    rows: list[common.Row] = []

    def timed(fns):
        if device.type == "cuda":
            return {name: common.time_cuda(fn) for name, fn in fns.items()}
        return common.time_alternating(fns, rounds)

    def add(bench, timings, flop, peaks):
        for name, (med, p20, p80) in timings.items():
            rows.append(common.Row(bench, name, shape, med, p20, p80, peak_mem_mib=peaks.get(name),
                                   tflops=flop / (med * 1e-3) / 1e12))

    with torch.no_grad():
        fwd = {name: (lambda f=f: f(hidden, weight, labels)) for name, f in impls.items()}
        fwd["bare GEMM"] = lambda: hidden @ weight.T
        peaks = {name: common.cuda_peak_mib(fn) for name, fn in fwd.items()} if device.type == "cuda" else {}
        add("linear logprobs fwd", timed(fwd), gemm_flop, peaks)
    steps = {name: (lambda f=f: _step(f, hidden, weight, labels)) for name, f in impls.items()}
    steps["bare GEMMs"] = _bare_gemms(hidden, weight)
    if device.type == "cuda":
        peaks = {name: common.cuda_peak_mib(fn) for name, fn in steps.items()}
    elif memory:
        short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        peaks = {name: _cpu_peak_mib(name, n, width, vocab, short) for name in impls}
    else:
        peaks = {}
    add("linear logprobs fwd+bwd", timed(steps), 3 * gemm_flop, peaks)
    common.fill_ratios(rows)
    return rows


def default_shape(device: torch.device) -> tuple[int, int, int, torch.dtype]:
    if device.type == "cuda":
        return 8192, 4096, 151936, torch.bfloat16
    return 8192, 256, 32000, torch.float32


def main(argv=None) -> list[common.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory probes")
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    n, width, vocab, dtype = default_shape(device)
    rows = run(device, args.n or n, args.hidden or width, args.vocab or vocab,
               DTYPES[args.dtype] if args.dtype else dtype, args.rounds, not args.no_memory)
    return common.report(rows, device, args.out, __spec__.name, argv)


if __name__ == "__main__":
    main()
