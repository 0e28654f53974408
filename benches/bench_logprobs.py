"""Token log-probs (+ entropy) from logits: rlkern vs eager PyTorch, TRL 1.16, Liger.

    python -m rlkern.benches.bench_logprobs [--n N --vocab V --dtype bf16] [--out FILE]

Defaults: GPU N=8192, V=151936, bf16 (the issue's H100 target shape); CPU N=4096, V=32000,
fp32, 2 threads. Bytes counted: forward reads N*V logits; backward reads them and writes N*V
grads (the [N] vectors are negligible). ``--memory-n 1024,2048`` adds the peak memory of one
fwd+bwd beyond the logits against N (rlkern vs the materialized log-softmax; on the CPU in a
fresh process per point). Liger (CUDA) and TRL get a "not run" row with the reason when absent.
The float64 rows time the same call on float64 logits (float64 outputs), beside float32.
"""

from __future__ import annotations

import argparse

import torch

import rlkern
from rlkern.benches import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _eager_logp(logits, labels):
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]


def _eager_logp_entropy(logits, labels, dtype=torch.float32):
    logp_all = torch.log_softmax(logits.to(dtype), -1)
    return logp_all.gather(-1, labels[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


def _rlkern_logp_entropy(logits, labels):
    return rlkern.token_logprobs(logits, labels, return_entropy=True)


def implementations(device: torch.device):
    """(name -> (logp+entropy fn or None, logp-only fn or None), name -> why a peer did not run)."""
    impls = {
        "rlkern": (_rlkern_logp_entropy, lambda z, y: rlkern.token_logprobs(z, y)),
        "eager": (_eager_logp_entropy, _eager_logp),
    }
    missing = {}
    trl_utils, why = common.peer("trl.trainer.utils")
    if trl_utils is not None:
        impls["trl"] = (trl_utils.selective_log_softmax_and_entropy, trl_utils.selective_log_softmax)
    else:
        missing["trl"] = why
    liger, why = common.peer("liger_kernel.transformers.functional")
    if device.type != "cuda":
        missing["liger"] = common.NEEDS_CUDA
    elif liger is None:
        missing["liger"] = why
    else:
        # Liger's CE gives -logp per token and no entropy: it only enters the logp-only rows.
        impls["liger"] = (None, lambda z, y: -liger.liger_cross_entropy(z, y, reduction="none"))
    return impls, missing


def memory_case(device: torch.device, impl: str, n: int, vocab: int, dtype_name: str):
    """One fwd+bwd of log-probs + entropy on fresh [n, vocab] logits (the memory sweep's step)."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen, device=device) * 3).to(DTYPES[dtype_name]).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    fn = {"rlkern": _rlkern_logp_entropy, "eager": _eager_logp_entropy}[impl]

    def step():
        logp, entropy = fn(logits, labels)
        (logp.sum() + 0.01 * entropy.sum()).backward()
        logits.grad = None

    return step


def run(device: torch.device, n: int, vocab: int, dtype: torch.dtype, rounds: int = 7) -> list[common.Row]:
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen, device=device, dtype=torch.float32) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    shape = f"N={n} V={vocab} {str(dtype).removeprefix('torch.')}"
    peak_bw = common.copy_bandwidth_gbps(device)
    elt = logits.element_size()
    impls, missing = implementations(device)
    rows: list[common.Row] = []

    def add(bench, measured, bytes_moved, logp_only=False):
        timings, peaks = measured
        for name, (med, p20, p80) in timings.items():
            gbps = bytes_moved / (med * 1e-3) / 1e9
            rows.append(common.Row(bench, name, shape, med, p20, p80, gbps, 100 * gbps / peak_bw, peaks.get(name)))
        for name, why in missing.items():
            if logp_only or name != "liger":  # Liger has no entropy: only the logp-only rows name it
                rows.append(common.missing_row(bench, name, shape, why))

    def timed(fns, bench):
        peaks = {name: common.cuda_peak_mib(fn) for name, fn in fns.items()} if device.type == "cuda" else {}
        return common.measure(fns, device, rounds, label=f"{bench} {shape}"), peaks

    with torch.no_grad():
        fns = {k: (lambda f=f: f(logits, labels)) for k, (f, _) in impls.items() if f is not None}
        add("logprobs fwd+entropy", timed(fns, "logprobs fwd+entropy"), n * vocab * elt)
        fns = {k: (lambda f=f: f(logits, labels)) for k, (_, f) in impls.items() if f is not None}
        add("logprobs fwd", timed(fns, "logprobs fwd"), n * vocab * elt, logp_only=True)

    # float64 logits (numpy's default): float64 in, float64 out, beside the same call in float32
    logits64 = logits.double()
    with torch.no_grad():
        fns = {"rlkern": lambda: _rlkern_logp_entropy(logits64, labels),
               "rlkern (float32 logits)": lambda: _rlkern_logp_entropy(logits.float(), labels),
               "eager": lambda: _eager_logp_entropy(logits64, labels, torch.float64)}
        shape64 = shape.rsplit(" ", 1)[0] + " float64"
        timings = common.measure(fns, device, rounds, label=f"logprobs fwd+entropy {shape64}")
        for name, (med, p20, p80) in timings.items():
            gbps = n * vocab * (4 if "float32" in name else 8) / (med * 1e-3) / 1e9
            rows.append(common.Row("logprobs fwd+entropy, float64", name, shape64, med, p20, p80, gbps,
                                   100 * gbps / peak_bw, None))

    # Backward alone: the graph is kept and re-differentiated, so only the backward is timed.
    grad_fns = {}
    g = torch.randn(n, device=device, generator=gen)
    for name, (f, _) in impls.items():
        if f is None:
            continue
        leaf = logits.detach().clone().requires_grad_()
        logp, entropy = f(leaf, labels)
        loss = (logp * g).sum() + 0.01 * entropy.sum()
        grad_fns[name] = lambda loss=loss, leaf=leaf: torch.autograd.grad(loss, leaf, retain_graph=True)
    add("logprobs bwd (logp+entropy)", timed(grad_fns, "logprobs bwd (logp+entropy)"), 2 * n * vocab * elt)
    del grad_fns
    common.fill_ratios(rows)
    return rows


MEMORY_BENCH = "peak memory fwd+bwd (logp+entropy)"


def memory_rows(device: torch.device, ns: list[int], vocab: int, dtype: torch.dtype) -> list[common.Row]:
    """Peak memory beyond the logits against N: rlkern vs the materialized log-softmax (eager)."""
    name = str(dtype).removeprefix("torch.")
    short = {v: k for k, v in DTYPES.items()}[dtype]
    return common.memory_sweep(__spec__.name, device, ["rlkern", "eager"], ns, MEMORY_BENCH,
                               lambda n: f"N={n} V={vocab} {name}", vocab, short)


def default_shape(device: torch.device) -> tuple[int, int, torch.dtype]:
    if device.type == "cuda":
        return 8192, 151936, torch.bfloat16
    return 4096, 32000, torch.float32


def main(argv=None) -> list[common.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory-n", default="", help="comma-separated N: peak memory of fwd+bwd against N")
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    n, vocab, dtype = default_shape(device)
    vocab, dtype = args.vocab or vocab, DTYPES[args.dtype] if args.dtype else dtype
    rows = run(device, args.n or n, vocab, dtype, args.rounds)
    if args.memory_n:
        rows += memory_rows(device, [int(x) for x in args.memory_n.split(",")], vocab, dtype)
    return common.report(rows, device, args.out, __spec__.name, argv)


if __name__ == "__main__":
    main()
