"""Fused linear policy loss (hidden states -> GRPO loss, gradient formed in the forward): rlkern
vs Liger's LigerFusedLinearGRPOLoss, rlkern's composition (linear_token_logprobs + policy_loss),
and the three bare GEMMs of the same shapes.

    python -m rlkern.benches.bench_linear_losses [--n N --t T --hidden H --vocab V --dtype bf16] [--out FILE]

Defaults: GPU N=8192, H=4096, V=151936, bf16 (the issue's H100 shape); CPU N=8192, H=256,
V=32000, fp32, 2 threads. N tokens are B = N / T sequences of T tokens (T=512), a quarter of
them masked out. Every implementation computes the same loss: ppo-clip (0.2 / 0.28), k3 KL to
reference log-probs (beta 0.04, Liger's default), TRL's token-mean (``bnpo``); rlkern's op also
computes the entropy (its metric), the others do not. Liger runs eager (``compiled=False``:
torch.compile of its chunk function is not part of a CPU step; on a GPU it is compiled, as
its default). TFLOP/s count 3 GEMMs of 2*N*H*V (what a step needs), whatever an
implementation recomputes. Peak memory beyond the inputs: the CUDA allocator's peak on GPU; on
the CPU the growth of the peak resident size of a fresh process running one fwd+bwd.
"""

from __future__ import annotations

import argparse

import torch

import rlkern
from rlkern.benches import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BETA, CLIP_LOW, CLIP_HIGH = 0.04, 0.2, 0.28


def _inputs(device, n, t, width, vocab, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    b = max(n // t, 1)
    hidden = torch.randn(b, t, width, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen, device=device) * 3 / width**0.5).to(dtype)
    labels = torch.randint(0, vocab, (b, t), generator=gen, device=device)
    mask = torch.rand(b, t, generator=gen, device=device) > 0.25
    old = -torch.rand(b, t, generator=gen, device=device) * 8
    ref = old + 0.1 * torch.randn(b, t, generator=gen, device=device)
    adv = torch.randn(b, generator=gen, device=device)
    return hidden, weight, labels, mask, old, ref, adv


def implementations(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """(name -> fn(hidden, weight, labels, mask, old, ref, adv) -> loss, name -> why a peer did not run).
    For bf16 inputs also "rlkern bf16 tiles": ``logits_dtype=torch.bfloat16`` (TRL's rounded
    tiles; the GEMMs run in bf16, on the CPU the forward one)."""
    options = dict(loss="ppo", clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_coef=BETA, kl_estimator="k3_unclamped",
                   agg="bnpo")

    def fused(h, w, y, m, old, ref, adv, **extra):
        return rlkern.linear_policy_loss(h, w, y, old, adv, m, ref_logprobs=ref, **options, **extra)[0]

    def composition(h, w, y, m, old, ref, adv):
        lp = rlkern.linear_token_logprobs(h, w, y)
        return rlkern.policy_loss(lp, old, adv, m, ref_logprobs=ref, **options)[0]

    impls = {"rlkern": fused, "rlkern composition": composition}
    if dtype == torch.bfloat16:
        impls["rlkern bf16 tiles"] = lambda *args: fused(*args, logits_dtype=torch.bfloat16)
    missing = {}
    chunked, why = common.peer("liger_kernel.chunked_loss")
    if chunked is None:
        missing["liger"] = why
    else:
        peer = chunked.LigerFusedLinearGRPOLoss(beta=BETA, compiled=device.type == "cuda", use_ref_model=True,
                                                epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="bnpo")
        impls["liger"] = lambda h, w, y, m, old, ref, adv: peer(h, w, y, m.long(), adv, ref_per_token_logps=ref,
                                                                old_per_token_logps=old)[0]
    return impls, missing


def _step(fn, hidden, weight, *rest):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    fn(h, w, *rest).backward()


def _bare_gemms(hidden, weight):
    flat = hidden.reshape(-1, hidden.shape[-1])
    logits = flat @ weight.T
    return lambda: (flat @ weight.T, logits @ weight, logits.T @ flat)


def memory_case(device: torch.device, impl: str, n: int, t: int, width: int, vocab: int, dtype_name: str):
    """One fwd+bwd of implementation ``impl`` on fresh inputs (the memory probes' step)."""
    inputs = _inputs(device, n, min(t, n), width, vocab, DTYPES[dtype_name])
    if impl == "bare GEMMs":
        return _bare_gemms(*inputs[:2])
    fn = implementations(device, DTYPES[dtype_name])[0][impl]
    return lambda: _step(fn, *inputs)


def run(device: torch.device, n: int, t: int, width: int, vocab: int, dtype: torch.dtype, rounds: int = 3,
        memory: bool = True) -> list[common.Row]:
    inputs = _inputs(device, n, t, width, vocab, dtype)
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    shape = f"N={n} (B={inputs[0].shape[0]} T={t}) H={width} V={vocab} {dtype_name}"
    impls, missing = implementations(device, dtype)
    steps = {name: (lambda f=f: _step(f, *inputs)) for name, f in impls.items()}
    steps["bare GEMMs"] = _bare_gemms(*inputs[:2])
    if device.type == "cuda":
        peaks = {name: common.cuda_peak_mib(fn) for name, fn in steps.items()}
    elif memory:
        peaks = {name: common.peak_memory_mib(__spec__.name, device, name, n, t, width, vocab, dtype_name)
                 for name in steps}
    else:
        peaks = {}
    bench = "linear policy loss fwd+bwd"
    flop = 3 * 2 * n * width * vocab
    rows = []
    for name, (med, p20, p80) in common.measure(steps, device, rounds, label=f"fwd+bwd {shape}").items():
        rows.append(common.Row(bench, name, shape, med, p20, p80, peak_mem_mib=peaks.get(name),
                               tflops=flop / (med * 1e-3) / 1e12))
    rows.extend(common.missing_row(bench, name, shape, why) for name, why in missing.items())
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
    parser.add_argument("--t", type=int, default=512, help="tokens per sequence (B = N / T)")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    n, width, vocab, dtype = default_shape(device)
    width, vocab, dtype = args.hidden or width, args.vocab or vocab, DTYPES[args.dtype] if args.dtype else dtype
    n = args.n or n
    rows = run(device, n, min(args.t, n), width, vocab, dtype, args.rounds, not args.no_memory)
    return common.report(rows, device, args.out, __spec__.name, argv)


if __name__ == "__main__":
    main()
