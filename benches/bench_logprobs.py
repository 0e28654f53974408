"""Token log-probs (+ entropy) from logits: rlkern vs eager PyTorch, TRL 1.16, Liger.

    python -m rlkern.benches.bench_logprobs [--n N --vocab V --dtype bf16] [--out FILE]

Defaults: GPU N=8192, V=151936, bf16 (the issue's H100 target shape); CPU N=4096, V=32000,
fp32, 2 threads. Bytes counted: forward reads N*V logits; backward reads them and writes N*V
grads (the [N] vectors are negligible).
"""

from __future__ import annotations

import argparse
import importlib

import torch

import rlkern
from rlkern.benches import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _eager_logp(logits, labels):
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]


def _eager_logp_entropy(logits, labels):
    logp_all = torch.log_softmax(logits.float(), -1)
    return logp_all.gather(-1, labels[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


def _rlkern_logp_entropy(logits, labels):
    return rlkern.token_logprobs(logits, labels, return_entropy=True)


def _peer(module: str):
    try:
        return importlib.import_module(module)
    except Exception:  # a missing or broken peer is reported as absent, never fatal
        return None


def implementations(device: torch.device):
    """name -> (logp+entropy fn or None, logp-only fn or None); the peers that are importable."""
    impls = {
        "rlkern": (_rlkern_logp_entropy, lambda z, y: rlkern.token_logprobs(z, y)),
        "eager": (_eager_logp_entropy, _eager_logp),
    }
    trl_utils = _peer("trl.trainer.utils")
    if trl_utils is not None:
        impls["trl"] = (trl_utils.selective_log_softmax_and_entropy, trl_utils.selective_log_softmax)
    liger = _peer("liger_kernel.transformers.functional") if device.type == "cuda" else None
    if liger is not None:
        # Liger's CE gives -logp per token and no entropy: it only enters the logp-only rows.
        impls["liger"] = (None, lambda z, y: -liger.liger_cross_entropy(z, y, reduction="none"))
    return impls


def run(device: torch.device, n: int, vocab: int, dtype: torch.dtype, rounds: int = 7) -> list[common.Row]:
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen, device=device, dtype=torch.float32) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    shape = f"N={n} V={vocab} {str(dtype).removeprefix('torch.')}"
    peak_bw = common.copy_bandwidth_gbps(device)
    elt = logits.element_size()
    impls = implementations(device)
    rows: list[common.Row] = []

    def add(bench, measured, bytes_moved):
        timings, peaks = measured
        for name, (med, p20, p80) in timings.items():
            gbps = bytes_moved / (med * 1e-3) / 1e9
            rows.append(common.Row(bench, name, shape, med, p20, p80, gbps, 100 * gbps / peak_bw, peaks.get(name)))

    def timed(fns):
        if device.type == "cuda":
            peaks = {name: common.cuda_peak_mib(fn) for name, fn in fns.items()}
            return {name: common.time_cuda(fn) for name, fn in fns.items()}, peaks
        return common.time_alternating(fns, rounds), {}

    with torch.no_grad():
        fns = {k: (lambda f=f: f(logits, labels)) for k, (f, _) in impls.items() if f is not None}
        add("logprobs fwd+entropy", timed(fns), n * vocab * elt)
        fns = {k: (lambda f=f: f(logits, labels)) for k, (_, f) in impls.items() if f is not None}
        add("logprobs fwd", timed(fns), n * vocab * elt)

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
    add("logprobs bwd (logp+entropy)", timed(grad_fns), 2 * n * vocab * elt)
    del grad_fns
    common.fill_ratios(rows)
    return rows


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
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    n, vocab, dtype = default_shape(device)
    rows = run(device, args.n or n, args.vocab or vocab, DTYPES[args.dtype] if args.dtype else dtype, args.rounds)
    return common.report(rows, device, args.out, __spec__.name, argv)


if __name__ == "__main__":
    main()
