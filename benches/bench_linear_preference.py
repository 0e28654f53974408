"""DPO loss from hidden states (LM head + loss, forward + backward): rlkern.linear_preference_loss
vs Liger 0.8.5's LigerFusedLinearDPOLoss, rlkern's composition and materialized logits; with
``--loss kto`` TRL's KTO loss: rlkern.linear_kto_loss vs Liger's LigerFusedLinearKTOLoss.

    python -m rlkern.benches.bench_linear_preference [--pairs P --t T --hidden H --vocab V] [--loss kto]
        [--out FILE]

Defaults: CPU 8 pairs x 1024 positions (16 rows, chosen then rejected), H=256, V=32000, fp32,
2 threads; GPU 4 pairs x 1024 positions (N = 8192), H=4096, V=151936, bf16. The completion
mask marks a random length in [T/2, T] of each row (the rest is padding, label -100;
``--dense``: every position). The loss is the reference-free sigmoid DPO loss (beta 0.1) for
every implementation: Liger's fused DPO would otherwise run the reference model's head itself,
while rlkern takes the reference log-probs as constants (as TRL does); with
``use_ref_model=False`` every row computes the same numbers.

- rlkern: ``linear_preference_loss`` (default plan: whole pairs per tile, 3 GEMMs per
  completion token); "rlkern global": ``chunking="global"`` (4 GEMMs).
- composition: ``linear_token_logprobs`` + ``token_preference_loss`` (rlkern's pieces; the
  head's backward recomputes the logits: 4 GEMMs).
- liger: ``LigerFusedLinearDPOLoss(use_ref_model=False, compiled=False, chunk_size=1)``
  (``torch.compile`` is off on the CPU: it compiles per shape; Liger's default on GPU).
- eager: materialized ``[2B, T, V]`` fp32 logits, ``log_softmax``, gather, masked sums, TRL's
  ``-logsigmoid(beta * delta).mean()``; autograd.
- bare GEMMs: the three ``[2B T, H] x [H, V]``-sized GEMMs over every position, the floor.

``--loss kto``: the same 2P rows as 2P unpaired completions (alternately desirable / not), the
KTO loss with a fixed reference point kl = 0.2 and no reference model (Liger's
``use_ref_model=False``; rlkern's per-sequence reference sums are zeros, the same numbers):
rlkern ``linear_kto_loss`` (whole sequences per tile, 3 GEMMs), composition
(``linear_token_logprobs`` + masked sums + ``kto_loss``), eager, liger
``LigerFusedLinearKTOLoss(use_ref_model=False, compiled=False, chunk_size=1)``.

rlkern computes only completion tokens; the others compute every position (their API has no
mask for the GEMMs). Peak memory: beyond the inputs (CUDA allocator peak; on the CPU the
resident growth in a fresh process, ``common.peak_memory_mib``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import rlkern
from rlkern.benches import common

BETA = 0.1
BENCH = "DPO loss from hidden states fwd+bwd (sigmoid, ref-free)"
KTO_BENCH = "KTO loss from hidden states fwd+bwd (kl=0.2, ref-free)"
KL = 0.2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(device, pairs, length, width, vocab, dtype, seed=0, dense=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, length, width, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, width, generator=gen) * 2 / width**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (rows, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=gen)
    if dense:  # every position a completion token: the same GEMM work for every row of the table
        lengths.fill_(length)
    mask = torch.arange(length) < lengths[:, None]
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    return hidden, weight, labels.to(device), mask.to(device)


def _eager(h, w, labels, mask):
    log_p = torch.log_softmax((h @ w.T).float(), -1)
    logp = log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    sums = (logp * mask).sum(1)
    n = sums.shape[0] // 2
    return -F.logsigmoid(BETA * (sums[:n] - sums[n:])).mean()


def _composition(h, w, labels, mask):
    logp = rlkern.linear_token_logprobs(h, w, labels)
    return rlkern.token_preference_loss(logp, mask, None, beta=BETA)[0]


def _desirable(rows: int, device) -> torch.Tensor:
    return (torch.arange(rows, device=device) % 2) == 0


def _kto_eager(h, w, labels, mask):
    log_p = torch.log_softmax((h @ w.T).float(), -1)
    sums = (log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(1)
    sign = torch.where(_desirable(sums.shape[0], sums.device), 1.0, -1.0)
    return (1 - torch.sigmoid(BETA * (sums - KL) * sign)).mean()


def _kto_args(h, mask):
    rows = mask.shape[0]
    return (torch.zeros(rows, device=h.device), _desirable(rows, h.device), torch.full((1,), KL, device=h.device),
            torch.zeros(1, device=h.device))


def _kto_composition(h, w, labels, mask):
    logp = rlkern.linear_token_logprobs(h, w, labels)
    ref, desirable, kl, ref_kl = _kto_args(h, mask)
    return rlkern.kto_loss((logp * mask).sum(1), ref, desirable, kl, ref_kl, beta=BETA)[0]


def kto_implementations(device: torch.device) -> tuple[dict, dict]:
    """As ``implementations``, for TRL's KTO loss."""
    impls = {
        "rlkern": lambda h, w, y, m: rlkern.linear_kto_loss(h, w, y, m, *_kto_args(h, m), beta=BETA)[0],
        "composition": _kto_composition,
        "eager": _kto_eager,
    }
    missing = {}
    chunked, why = common.peer("liger_kernel.chunked_loss")
    if chunked is not None:
        module = chunked.LigerFusedLinearKTOLoss(beta=BETA, use_ref_model=False, compiled=device.type == "cuda")
        kl = torch.tensor(KL, device=device)
        impls["liger"] = lambda h, w, y, m: module(h, w, y, preference_labels=_desirable(y.shape[0], y.device),
                                                   kl=kl)[0]
    else:
        missing["liger"] = why
    return impls, missing


def implementations(device: torch.device, loss: str = "dpo") -> tuple[dict, dict]:
    """(name -> fn(hidden, weight, labels, mask) -> loss, name -> why a peer did not run)."""
    if loss == "kto":
        return kto_implementations(device)
    impls = {
        "rlkern": lambda h, w, y, m: rlkern.linear_preference_loss(h, w, y, m, beta=BETA)[0],
        "rlkern global": lambda h, w, y, m: rlkern.linear_preference_loss(h, w, y, m, beta=BETA,
                                                                           chunking="global")[0],
        "composition": _composition,
        "eager": _eager,
    }
    missing = {}
    chunked, why = common.peer("liger_kernel.chunked_loss")
    if chunked is not None:
        module = chunked.LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=device.type == "cuda")
        impls["liger"] = lambda h, w, y, m: module(w, h, y)[0]
    else:
        missing["liger"] = why
    return impls, missing


def _step(fn, hidden, weight, labels, mask):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    fn(h, w, labels, mask).backward()


def memory_case(device: torch.device, impl: str, length: int, pairs: int, width: int, vocab: int, dtype_name: str,
                dense: bool = False, loss: str = "dpo"):
    """One fwd+bwd of ``impl`` on fresh inputs (the memory probes' step)."""
    hidden, weight, labels, mask = _inputs(device, pairs, length, width, vocab, DTYPES[dtype_name], dense=dense)
    fn = implementations(device, loss)[0][impl]
    return lambda: _step(fn, hidden, weight, labels, mask)


def run(device: torch.device, pairs: int, length: int, width: int, vocab: int, dtype: torch.dtype,
        rounds: int = 3, memory: bool = True, ops=None, dense: bool = False, loss: str = "dpo") -> list[common.Row]:
    hidden, weight, labels, mask = _inputs(device, pairs, length, width, vocab, dtype, dense=dense)
    name = {v: k for k, v in DTYPES.items()}[dtype]
    tokens = int(mask.sum())
    unit = f"{pairs} pairs" if loss == "dpo" else f"{2 * pairs} completions"
    shape = f"{unit} x T={length} ({tokens} completion tokens) H={width} V={vocab} {name}"
    bench = BENCH if loss == "dpo" else KTO_BENCH
    impls, missing = implementations(device, loss)
    if ops is not None:
        impls = {k: v for k, v in impls.items() if k in ops}
        missing = {k: v for k, v in missing.items() if k in ops}
    steps = {k: (lambda f=f: _step(f, hidden, weight, labels, mask)) for k, f in impls.items()}
    flat = hidden.reshape(-1, width)
    logits = flat @ weight.T
    steps["bare GEMMs"] = lambda: (flat @ weight.T, logits @ weight, logits.T @ flat)
    if device.type == "cuda":
        peaks = {k: common.cuda_peak_mib(fn) for k, fn in steps.items()}
    elif memory:
        peaks = {k: common.peak_memory_mib(__spec__.name, device, k, length, pairs, width, vocab, name, dense, loss)
                 for k in impls}
    else:
        peaks = {}
    rows = []
    gemm_flop = 3 * 2 * flat.shape[0] * width * vocab
    for impl, (med, p20, p80) in common.measure(steps, device, rounds, label=f"fwd+bwd {shape}").items():
        rows.append(common.Row(bench, impl, shape, med, p20, p80, peak_mem_mib=peaks.get(impl),
                               tflops=gemm_flop / (med * 1e-3) / 1e12))
    rows.extend(common.missing_row(bench, impl, shape, why) for impl, why in missing.items())
    common.fill_ratios(rows)
    return rows


def default_shape(device: torch.device) -> tuple[int, int, int, int, torch.dtype]:
    if device.type == "cuda":
        return 4, 1024, 4096, 151936, torch.bfloat16  # N = 8192 positions, the GPU shape
    return 8, 1024, 256, 32000, torch.float32


def main(argv=None) -> list[common.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--t", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory probes")
    parser.add_argument("--dense", action="store_true", help="every position a completion token (no padding)")
    parser.add_argument("--loss", choices=("dpo", "kto"), default="dpo",
                        help="dpo (linear_preference_loss) or kto (linear_kto_loss vs Liger's fused KTO)")
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    pairs, length, width, vocab, dtype = default_shape(device)
    rows = run(device, args.pairs or pairs, args.t or length, args.hidden or width, args.vocab or vocab,
               DTYPES[args.dtype] if args.dtype else dtype, args.rounds, not args.no_memory, dense=args.dense,
               loss=args.loss)
    return common.report(rows, device, args.out, __spec__.name, argv)


if __name__ == "__main__":
    main()
