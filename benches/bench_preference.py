"""DPO loss from token log-probs (forward + backward): rlkern.token_preference_loss vs the eager
loss of TRL 1.16's DPOTrainer and Liger 0.8.5's DPO loss over the same token log-probs.

    python -m rlkern.benches.bench_preference [--pairs P --t T --dtype fp32|bf16] [--out FILE]

Defaults: 16 pairs x 2048 tokens (32 rows, chosen then rejected), fp32 and bf16 token log-probs
(both unless ``--dtype``), a bool completion mask (random lengths in [T/4, T]), token-level
reference log-probs, the sigmoid loss with beta 0.1. Every implementation returns the loss and
TRL's logged rewards; the timed step is forward + backward (the gradient w.r.t. the token
log-probs):

- rlkern: ``token_preference_loss`` (one kernel for the sums, the sequence-level kernel, one
  kernel spreading the gradient).
- eager (TRL 1.16 formula): ``DPOTrainer._compute_loss``'s lines on the same tensors (its fused
  head returns 0 at masked tokens: ``per_token_logps * mask``; then ``.sum(1)``, chunk, log-ratios,
  ``-logsigmoid(beta * delta).mean()``, the detached rewards).
- liger: the masked sums as Liger's ``LigerFusedLinearPreferenceBase`` forms them (``(logps *
  mask).sum(-1)``), then ``LigerFusedLinearDPOFunction.preference_loss_fn`` (Liger's own DPO loss
  over per-sequence log-probs; its fused linear layer is not part of this step).

Peak memory: beyond the inputs (CUDA allocator peak; on the CPU the resident growth in a fresh
process, ``common.peak_memory_mib``). Bytes counted: the log-probs and the reference read
(element size each), the mask (1 byte), the gradient written (element size).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import rlkern
from rlkern.benches import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BETA = 0.1
BENCH = "DPO loss from token log-probs fwd+bwd (sigmoid)"


def _inputs(device, pairs, t, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rows = 2 * pairs
    lp = -torch.rand(rows, t, generator=g, device=device) * 3
    ref = lp + torch.randn(rows, t, generator=g, device=device) * 0.2
    lengths = torch.randint(t // 4, t + 1, (rows,), generator=g, device=device)
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    return {"lp": lp.to(dtype), "ref": ref.to(dtype), "mask": mask}


def _rlkern_step(d, lp):
    return rlkern.token_preference_loss(lp, d["mask"], d["ref"], beta=BETA)


def _trl_eager_step(d, lp):
    """DPOTrainer._compute_loss (TRL 1.16), loss_type sigmoid, reverse KL, no ld_alpha / WPO."""
    mask = d["mask"]
    per_token_logps = lp * mask  # TRL's fused head gives 0 where the label is -100
    logps = per_token_logps.sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    with torch.no_grad():
        ref_logps = (d["ref"] * mask).sum(dim=1)
    ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    loss = (-F.logsigmoid(BETA * delta_score)).mean()
    chosen_rewards = BETA * chosen_logratios.detach()
    rejected_rewards = BETA * rejected_logratios.detach()
    return loss, {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean()}


def _liger_step(dpo):
    fn = dpo.LigerFusedLinearDPOFunction.preference_loss_fn

    def step(d, lp):
        mask = d["mask"]
        logps = (lp * mask).sum(-1)  # Liger's chunk_forward: (per-token log-probs * loss_mask).sum(-1)
        with torch.no_grad():
            ref_logps = (d["ref"] * mask).sum(-1)
        n = logps.shape[0] // 2
        out = fn(logps[:n], logps[n:], mask, ref_logps[:n], ref_logps[n:], beta=BETA)
        return out[0], {"rewards/chosen": out[1].mean(), "rewards/rejected": out[2].mean()}

    return step


def implementations() -> tuple[dict, dict]:
    """(name -> step(d, lp) -> (loss, metrics), name -> why a peer did not run)."""
    impls, missing = {"rlkern": _rlkern_step, "eager (TRL 1.16 formula)": _trl_eager_step}, {}
    dpo, why = common.peer("liger_kernel.chunked_loss.dpo_loss")
    if dpo is not None:
        impls["liger preference_loss_fn"] = _liger_step(dpo)
    else:
        missing["liger preference_loss_fn"] = why
    return impls, missing


def memory_case(device, impl, n, dtype_name, pairs):
    """One fwd+bwd step of ``impl`` on [2 * pairs, n] inputs (``common.peak_memory_mib``)."""
    d = _inputs(device, pairs, n, DTYPES[dtype_name])
    step = implementations()[0][impl]
    lp = d["lp"].detach().clone().requires_grad_()

    def fn():
        loss, _ = step(d, lp)
        torch.autograd.grad(loss, (lp,))

    return fn


def run(device: torch.device, pairs: int, t: int, dtype: torch.dtype, rounds: int = 15,
        memory: bool = True) -> list[common.Row]:
    d = _inputs(device, pairs, t, dtype)
    name = {v: k for k, v in DTYPES.items()}[dtype]
    shape = f"pairs={pairs} T={t} {str(dtype).removeprefix('torch.')}"
    elt = d["lp"].element_size()
    bytes_moved = 2 * pairs * t * (3 * elt + 1)
    peak_bw = common.copy_bandwidth_gbps(device)
    impls, missing = implementations()
    losses = {}

    def make(label, step):
        lp = d["lp"].detach().clone().requires_grad_()

        def fn():
            loss, _ = step(d, lp)
            torch.autograd.grad(loss, (lp,))
            return loss

        losses[label] = float(fn().detach())  # the same loss from every implementation, beside the time
        return fn

    fns = {label: make(label, step) for label, step in impls.items()}
    peaks = {}
    if memory:
        peaks = {label: common.peak_memory_mib(__spec__.name, device, label, t, name, pairs) for label in fns}
    timings = common.measure(fns, device, rounds, label=f"token_preference_loss {shape}", warmup=2)
    rows = []
    for label, (med, p20, p80) in timings.items():
        gbps = bytes_moved / (med * 1e-3) / 1e9
        extra = {"loss": losses[label]}
        if label == "rlkern":
            extra["backend"] = rlkern._backend.REGISTRY["token_preference_loss"].backend_at(device, dtype)
        rows.append(common.Row(BENCH, label, shape, med, p20, p80, gbps, 100 * gbps / peak_bw, peaks.get(label),
                               extra=extra))
    rows.extend(common.missing_row(BENCH, label, shape, why) for label, why in missing.items())
    return rows


def main(argv=None) -> list[common.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--t", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="one dtype (default: fp32 and bf16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        torch.set_num_threads(args.threads)
    rows = []
    for key in [args.dtype] if args.dtype else ["fp32", "bf16"]:
        rows += run(device, args.pairs, args.t, DTYPES[key], args.rounds, memory=not args.no_memory)
    # rlkern's speedup per dtype (fill_ratios keys on the bench name: one table per dtype)
    for key in {r.shape for r in rows}:
        common.fill_ratios([r for r in rows if r.shape == key])
    print(f"# {common.device_name(device)}\n")
    print(common.markdown_table(rows))
    if args.out:
        common.write_results(args.out, device, rows, __spec__.name, argv)
    return rows


if __name__ == "__main__":
    main()
