"""Fused linear log-probs (hidden states -> token log-probs + entropy): rlkern vs materialized
logits (eager), TRL 1.16's ChunkedLogProbFunction, Liger's fused-linear CE, cut-cross-entropy.

    python -m rlkern.benches.bench_linear_logprobs [--n N --hidden H --vocab V --dtype bf16] [--autocast] [--out FILE]

Defaults: GPU N=8192, H=4096, V=151936, bf16 (the issue's H100 shape); CPU N=8192, H=256,
V=32000, fp32, 2 threads. TFLOP/s count 2*N*H*V per GEMM: 1 in the forward, 3 in forward +
backward (what a materialized-logits step needs), whatever an implementation recomputes.
"bare GEMMs" times those GEMMs alone on materialized tensors: the floor to compare with.
Peak memory beyond the inputs: the CUDA allocator's peak on GPU; on the CPU the growth of the
peak resident size of a fresh process running one fwd+bwd (the allocator bypasses Python).
Liger and cut-cross-entropy return -logp only (no entropy): their rows compute log-probs only.
``--autocast``: fp32 hidden and head under bf16 autocast, TRL's default (``bf16=True``): TRL's
fused head (bf16 tiles) against rlkern's TRL adapter (the "rlkern" rows:
``rlkern.integrations.trl``, the same rounded tiles) and ``linear_token_logprobs`` with its
default fp32 tiles ("rlkern fp32 tiles", what ``patch(fp32=True)`` runs).
"""

from __future__ import annotations

import argparse

import torch

import rlkern
from rlkern.benches import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
TRL_CHUNK = 32768  # TRL's trainer value (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def _eager(hidden, weight, labels):
    log_p = torch.log_softmax((hidden @ weight.T).float(), -1)
    return log_p.gather(-1, labels[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)


def implementations(device: torch.device) -> tuple[dict, dict]:
    """(name -> fn(hidden, weight, labels) -> (logp, entropy or None), name -> why a peer did not run)."""
    impls = {
        "rlkern": lambda h, w, y: rlkern.linear_token_logprobs(h, w, y, return_entropy=True),
        "eager": _eager,
    }
    missing = {}
    if device.type == "cuda" and common.peer("rlkern.kernels.linear_logprobs")[0] is not None:
        impls["rlkern fused"] = lambda h, w, y: rlkern.linear_token_logprobs(h, w, y, return_entropy=True,
                                                                              kernel="fused")
    trl_kernels, why = common.peer("trl.kernels")
    if trl_kernels is not None:
        impls["trl"] = lambda h, w, y: trl_kernels.ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, TRL_CHUNK, None, 1.0, ("entropy",))[:2]
    else:
        missing["trl"] = why
    liger, why = common.peer("liger_kernel.transformers.functional")
    cce, cce_why = common.peer("cut_cross_entropy")
    if device.type != "cuda":
        missing["liger"] = missing["cut-cross-entropy"] = common.NEEDS_CUDA
    else:
        if liger is not None:
            impls["liger"] = lambda h, w, y: (-liger.liger_fused_linear_cross_entropy(h, w, y, reduction="none"), None)
        else:
            missing["liger"] = why
        if cce is not None:
            impls["cut-cross-entropy"] = lambda h, w, y: (-cce.linear_cross_entropy(h, w, y, reduction="none"), None)
        else:
            missing["cut-cross-entropy"] = cce_why
    return impls, missing


def autocast_implementations(device: torch.device) -> tuple[dict, dict]:
    """Under bf16 autocast: TRL's fused head, what ``rlkern.integrations.trl.patch()`` runs in its
    place (bf16 tiles, as TRL), and rlkern's fp32 tiles (``patch(fp32=True)``)."""
    trl_kernels, why = common.peer("trl.kernels")
    if trl_kernels is None:
        return {"rlkern fp32 tiles": implementations(device)[0]["rlkern"]}, {"trl": why, "rlkern": why}
    from rlkern.integrations import trl as rt

    def head(fn):
        return lambda h, w, y: fn.apply(h, w, None, y, 1.0, TRL_CHUNK, None, 1.0, ("entropy",))[:2]

    impls = {"rlkern": head(rt.ChunkedLogProbFunction),  # the TRL adapter: what patch() runs
             "trl": head(trl_kernels.ChunkedLogProbFunction),
             "rlkern fp32 tiles": implementations(device)[0]["rlkern"], "eager": _eager}
    return {name: _under_autocast(device, fn) for name, fn in impls.items()}, {}


def _under_autocast(device, fn):
    def run(h, w, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(h, w, y)

    return run


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


def memory_case(device: torch.device, impl: str, n: int, width: int, vocab: int, dtype_name: str):
    """One fwd+bwd of implementation ``impl`` on fresh inputs (the memory probes' step)."""
    hidden, weight, labels = _inputs(device, n, width, vocab, DTYPES[dtype_name])
    fn = implementations(device)[0][impl]
    return lambda: _step(fn, hidden, weight, labels)


def run(device: torch.device, n: int, width: int, vocab: int, dtype: torch.dtype, rounds: int = 5,
        memory: bool = True, autocast: bool = False) -> list[common.Row]:
    hidden, weight, labels = _inputs(device, n, width, vocab, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    shape = f"N={n} H={width} V={vocab} {dtype_name}" + (" bf16 autocast" if autocast else "")
    impls, missing = autocast_implementations(device) if autocast else implementations(device)
    memory = memory and not autocast  # the memory probes run the plain implementations
    gemm_flop = 2 * n * width * vocab
    rows: list[common.Row] = []

    def add(bench, timings, flop, peaks):
        for name, (med, p20, p80) in timings.items():
            rows.append(common.Row(bench, name, shape, med, p20, p80, peak_mem_mib=peaks.get(name),
                                   tflops=flop / (med * 1e-3) / 1e12))
        rows.extend(common.missing_row(bench, name, shape, why) for name, why in missing.items())

    if dtype == torch.float64:  # float64 beside the same call in float32, timed in the same rounds
        h32, w32 = hidden.float(), weight.float()
        impls = {**impls, "rlkern (float32 inputs)": lambda h, w, y, f=impls["rlkern"]: f(
            h32.detach().requires_grad_(h.requires_grad), w32.detach().requires_grad_(w.requires_grad), y)}
    with torch.no_grad():
        fwd = {name: (lambda f=f: f(hidden, weight, labels)) for name, f in impls.items()}
        if not autocast:
            fwd["bare GEMM"] = lambda: hidden @ weight.T
        peaks = {name: common.cuda_peak_mib(fn) for name, fn in fwd.items()} if device.type == "cuda" else {}
        add("linear logprobs fwd", common.measure(fwd, device, rounds, label=f"fwd {shape}"), gemm_flop, peaks)
    steps = {name: (lambda f=f: _step(f, hidden, weight, labels)) for name, f in impls.items()}
    if not autocast:
        steps["bare GEMMs"] = _bare_gemms(hidden, weight)
    if device.type == "cuda":
        peaks = {name: common.cuda_peak_mib(fn) for name, fn in steps.items()}
    elif memory:
        short = {v: k for k, v in DTYPES.items()}[dtype]
        peaks = {name: common.peak_memory_mib(__spec__.name, device, name, n, width, vocab, short) for name in impls}
    else:
        peaks = {}
    add("linear logprobs fwd+bwd", common.measure(steps, device, rounds, label=f"fwd+bwd {shape}"), 3 * gemm_flop,
        peaks)
    common.fill_ratios(rows)
    return rows


MEMORY_BENCH = "peak memory fwd+bwd (logp+entropy)"


def memory_rows(device: torch.device, ns: list[int], width: int, vocab: int, dtype: torch.dtype) -> list[common.Row]:
    """Peak memory beyond the inputs against N: rlkern vs materialized logits (eager)."""
    name = str(dtype).removeprefix("torch.")
    short = {v: k for k, v in DTYPES.items()}[dtype]
    return common.memory_sweep(__spec__.name, device, ["rlkern", "eager"], ns, MEMORY_BENCH,
                               lambda n: f"N={n} H={width} V={vocab} {name}", width, vocab, short)


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
    parser.add_argument("--autocast", action="store_true", help="fp32 inputs under bf16 autocast (TRL's default)")
    parser.add_argument("--memory-n", default="", help="comma-separated N: peak memory of fwd+bwd against N")
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    n, width, vocab, dtype = default_shape(device)
    width, vocab, dtype = args.hidden or width, args.vocab or vocab, DTYPES[args.dtype] if args.dtype else dtype
    rows = run(device, args.n or n, width, vocab, dtype, args.rounds, not args.no_memory, args.autocast)
    if args.memory_n:
        rows += memory_rows(device, [int(x) for x in args.memory_n.split(",")], width, vocab, dtype)
    return common.report(rows, device, args.out, __spec__.name, argv)


if __name__ == "__main__":
    main()
