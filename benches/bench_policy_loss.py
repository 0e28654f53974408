"""Fused policy loss (forward + backward): rlkern vs verl 0.9.1's compute_policy_loss_vanilla and
the eager formula as TRL 1.16's GRPOTrainer writes it, both with autograd.

    python -m rlkern.benches.bench_policy_loss [--b B --t T --dtype fp32|bf16] [--loss ppo|gspo|geo_mean]
                                              [--out FILE]
    python -m rlkern.benches.bench_policy_loss --from-logits [--b B --t L --v V] [--out FILE]
    python -m rlkern.benches.bench_policy_loss --kl-aggregate [--b B --t T] [--out FILE]

Defaults: CPU B=64, T=4096 fp32, 2 threads (the issue's CPU target: >= 3x verl); GPU B=64,
T=8192. With ``--loss ppo`` (default) every implementation computes the PPO clipped surrogate
with dual-clip (verl's clip_ratio_c=3.0), clip-higher (0.2 / 0.28) and token-mean aggregation
over a bool mask; ``gspo`` and ``geo_mean`` (GMPO) are verl's sequence-ratio losses (the
kernels read each sequence twice for GSPO), against verl's own functions. Every step adds the
k3 KL penalty to a reference policy (kl_coef 0.001, verl's kl_loss) and the entropy bonus; the
timed step is forward + backward (grads w.r.t. logprobs and entropy).

``--from-logits`` measures the GRPO step from the LM head's logits ``[B, L + 1, V]`` (bf16 on
GPU), which is what Liger's Triton GRPO loss (``liger_kernel.transformers.grpo_loss
.triton_grpo_loss``, CUDA only) fuses: rlkern's ``token_logprobs`` (temperature 0.9) then
``policy_loss`` (clip 0.2 / 0.28, k3 KL with beta 0.04, per-sequence advantages, TRL's "bnpo"
token mean), against Liger and the eager formula (log_softmax + gather + TRL's loss), all with
the gradient w.r.t. the logits (not in place). Defaults: GPU B=8 L=1024 V=151936, CPU B=4
L=256 V=32000 (on a GPU, a run without shape arguments, as ``rlkern bench``, adds this table).
Bytes: the logits read twice and their gradient written once.

``--kl-aggregate`` times the KL term alone, forward + backward w.r.t. logprobs:
``aggregate(kl_penalty(lp, ref, kl_estimator="k3"), mask, agg="token-mean")`` against verl's
``agg_loss(kl_penalty(lp, ref, "low_var_kl"), mask, "token-mean")``, on float32 and on float64
tensors (bytes: lp, ref and the mask read, the [B, T] estimate written and read back, and the
gradient written).

The float64 rows (runs in fp32) time the same step on float64 tensors (float64 loss and
gradients, computed in double by the kernels) beside the float32 step, alternately.

Bytes counted (the minimum traffic of a fused pass): forward reads logprobs, old_logprobs,
advantages, ref_logprobs, entropy (element size each) and the mask (1 byte); backward reads the
same and writes d logprobs and d entropy.
"""

from __future__ import annotations

import argparse
import importlib
import os

import torch

from rlkern.benches import common
from rlkern.ops import policy_loss as ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLIP_LOW, CLIP_HIGH, CLIP_C, KL_COEF, ENT_COEF = 0.2, 0.28, 3.0, 0.001, 0.01


def _inputs(device, b, t, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, device=device) * 3
    data = {
        "lp": lp.to(dtype),
        "old": (lp + torch.randn(b, t, generator=g, device=device) * 0.2).to(dtype),
        "ref": (lp + torch.randn(b, t, generator=g, device=device) * 0.2).to(dtype),
        "adv": torch.randn(b, t, generator=g, device=device).to(dtype),
        "ent": (torch.rand(b, t, generator=g, device=device) * 2).to(dtype),
    }
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g, device=device)
    data["mask"] = torch.arange(t, device=device)[None, :] < lengths[:, None]
    return data


LOSSES = ("ppo", "gspo", "geo_mean")
_VERL_FUNCTIONS = {"ppo": "compute_policy_loss_vanilla", "gspo": "compute_policy_loss_gspo",
                   "geo_mean": "compute_policy_loss_geo_mean"}


def _rlkern_step(loss):
    def step(d, lp, ent):
        return ops.policy_loss(lp, d["old"], d["adv"], d["mask"], loss=loss, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                               dual_clip=CLIP_C if loss == "ppo" else None, ref_logprobs=d["ref"], kl_coef=KL_COEF,
                               kl_estimator="k3", entropy=ent, entropy_coef=ENT_COEF, agg="token-mean")

    return step


def _verl_step(core_algos, config, loss):
    policy = getattr(core_algos, _VERL_FUNCTIONS[loss])

    def step(d, lp, ent):
        pg_loss, metrics = policy(old_log_prob=d["old"], log_prob=lp, advantages=d["adv"], response_mask=d["mask"],
                                  loss_agg_mode="token-mean", config=config)
        ent_loss = core_algos.agg_loss(ent, d["mask"], "token-mean")
        kl = core_algos.agg_loss(core_algos.kl_penalty(lp, d["ref"], "low_var_kl"), d["mask"], "token-mean")
        return pg_loss - ENT_COEF * ent_loss + KL_COEF * kl, metrics

    return step


def _trl_eager_step(d, lp, ent):
    """The per-token formula and bnpo normalization of TRL 1.16's GRPOTrainer._compute_loss."""
    mask = d["mask"]
    coef_1 = torch.exp(lp - d["old"])
    coef_2 = torch.clamp(coef_1, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    coef_1 = torch.clamp(coef_1, max=CLIP_C)
    per_token = -torch.min(coef_1 * d["adv"], coef_2 * d["adv"])
    kl = torch.exp(d["ref"] - lp) - (d["ref"] - lp) - 1
    per_token = per_token + KL_COEF * kl
    n = mask.sum().clamp(min=1.0)
    loss = (per_token * mask).sum() / n - ENT_COEF * (ent * mask).sum() / n
    clipped = ((coef_1 < 1 - CLIP_LOW) & (d["adv"] < 0)) | ((coef_1 > 1 + CLIP_HIGH) & (d["adv"] > 0))
    return loss, {"clip": (clipped * mask).sum() / n}


def implementations(loss: str = "ppo") -> tuple[dict, dict]:
    """(name -> step(d, lp, ent) -> (loss, metrics), name -> why a peer did not run)."""
    impls, missing = {"rlkern": _rlkern_step(loss)}, {}
    core_algos, why = common.peer("verl.trainer.ppo.core_algos")
    workers_config, why_config = common.peer("verl.workers.config")
    if core_algos is not None and workers_config is not None:
        config = workers_config.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                                            clip_ratio=CLIP_LOW, clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH,
                                            clip_ratio_c=CLIP_C)
        impls["verl"] = _verl_step(core_algos, config, loss)
    else:
        missing["verl"] = why or why_config
    if loss == "ppo":
        impls["eager (TRL formula)"] = _trl_eager_step
    return impls, missing


def run(device: torch.device, b: int, t: int, dtype: torch.dtype, rounds: int = 15,
        loss: str = "ppo") -> list[common.Row]:
    d = _inputs(device, b, t, dtype)
    shape = f"B={b} T={t} {str(dtype).removeprefix('torch.')}"
    elt = d["lp"].element_size()
    fwd_bytes = b * t * (5 * elt + 1)
    bytes_moved = 2 * fwd_bytes + 2 * b * t * elt
    peak_bw = common.copy_bandwidth_gbps(device)
    rows: list[common.Row] = []
    leaves = {}

    def make(step):
        lp = d["lp"].detach().clone().requires_grad_()
        ent = d["ent"].detach().clone().requires_grad_()
        leaves[step] = (lp, ent)

        def fn():
            total, _ = step(d, lp, ent)
            torch.autograd.grad(total, (lp, ent))
        return fn

    impls, missing = implementations(loss)
    fns = {name: make(step) for name, step in impls.items()}
    bench = ("policy_loss fwd+bwd (ppo dual-clip + k3 + entropy, token-mean)" if loss == "ppo"
             else f"policy_loss fwd+bwd ({loss} + k3 + entropy)")
    peaks = {name: common.cuda_peak_mib(fn) for name, fn in fns.items()} if device.type == "cuda" else {}
    timings = common.measure(fns, device, rounds, label=f"{loss} {shape}", warmup=2)
    for name, (med, p20, p80) in timings.items():
        gbps = bytes_moved / (med * 1e-3) / 1e9
        rows.append(common.Row(bench, name, shape, med,
                               p20, p80, gbps, 100 * gbps / peak_bw, peaks.get(name),
                               extra={"backend": _backend_name(device, dtype) if name == "rlkern" else None}))
    rows.extend(common.missing_row(bench, name, shape, why) for name, why in missing.items())
    if dtype == torch.float32:
        rows += _float64_rows(device, b, t, rounds, loss, shape, peak_bw)
    common.fill_ratios(rows)
    return rows


def _float64_rows(device, b, t, rounds, loss, shape, peak_bw) -> list[common.Row]:
    """float64 inputs (float64 out), beside the same step on float32 inputs, timed alternately."""
    d64, d32 = _inputs(device, b, t, torch.float64), _inputs(device, b, t, torch.float32)
    steps = {"rlkern": (_rlkern_step(loss), d64), "rlkern (float32 inputs)": (_rlkern_step(loss), d32)}
    if loss == "ppo":
        steps["eager (TRL formula)"] = (_trl_eager_step, d64)

    def make(step, d):
        lp = d["lp"].detach().clone().requires_grad_()
        ent = d["ent"].detach().clone().requires_grad_()

        def fn():
            total, _ = step(d, lp, ent)
            torch.autograd.grad(total, (lp, ent))
        return fn

    fns = {name: make(step, d) for name, (step, d) in steps.items()}
    shape64 = shape.rsplit(" ", 1)[0] + " float64"
    timings = common.measure(fns, device, rounds, label=f"{loss} {shape64}", warmup=2)
    bench = ("policy_loss fwd+bwd, float64 (ppo dual-clip + k3 + entropy, token-mean)" if loss == "ppo"
             else f"policy_loss fwd+bwd, float64 ({loss} + k3 + entropy)")
    rows = []
    for name, (med, p20, p80) in timings.items():
        elt = 4 if "float32" in name else 8
        gbps = (2 * b * t * (5 * elt + 1) + 2 * b * t * elt) / (med * 1e-3) / 1e9
        dtype = torch.float32 if "float32" in name else torch.float64
        rows.append(common.Row(bench, name, shape64, med, p20, p80, gbps, 100 * gbps / peak_bw, None,
                               extra={"backend": _backend_name(device, dtype) if name.startswith("rlkern") else None}))
    return rows


# --- the KL term alone: kl_penalty + aggregate ------------------------------------------------


def run_kl_aggregate(device: torch.device, b: int, t: int, rounds: int = 15) -> list[common.Row]:
    # the module (the package exports a function of the same name)
    kl_module = importlib.import_module("rlkern.ops.policy_loss.aggregate")
    core_algos, why = common.peer("verl.trainer.ppo.core_algos")
    peak_bw = common.copy_bandwidth_gbps(device)
    rows = []
    for dtype in (torch.float32, torch.float64):
        bench = f"kl_penalty (k3) + aggregate (token-mean) fwd+bwd, {str(dtype).removeprefix('torch.')}"
        d = _inputs(device, b, t, dtype)
        shape = f"B={b} T={t} {str(dtype).removeprefix('torch.')}"
        elt = d["lp"].element_size()
        bytes_moved = b * t * (5 * elt + 2)  # lp, ref, mask (twice), the estimate out and back, the gradient

        def make(step):
            lp = d["lp"].detach().clone().requires_grad_()

            def fn():
                torch.autograd.grad(step(lp), (lp,))
            return fn

        steps = {"rlkern": lambda lp: ops.aggregate(ops.kl_penalty(lp, d["ref"], kl_estimator="k3"), d["mask"],
                                                    agg="token-mean")}
        if core_algos is not None:
            steps["verl"] = lambda lp: core_algos.agg_loss(core_algos.kl_penalty(lp, d["ref"], "low_var_kl"),
                                                           d["mask"], "token-mean")
        fns = {name: make(step) for name, step in steps.items()}
        timings = common.measure(fns, device, rounds, label=f"kl_penalty + aggregate {shape}", warmup=2)
        for name, (med, p20, p80) in timings.items():
            gbps = bytes_moved / (med * 1e-3) / 1e9
            backend = kl_module._KL.backend(d["lp"]) if name == "rlkern" else None
            rows.append(common.Row(bench, name, shape, med, p20, p80, gbps, 100 * gbps / peak_bw, None,
                                   extra={"backend": backend}))
        if core_algos is None:
            rows.append(common.missing_row(bench, "verl", shape, why))
    common.fill_ratios(rows)
    return rows


# --- from logits: token log-probs + GRPO loss (the step Liger's triton_grpo_loss fuses) -------

TEMPERATURE, BETA = 0.9, 0.04


def _logits_inputs(device, b, t, v, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(b, t + 1, v, generator=g, device=device) * 2).to(dtype)
    ids = torch.randint(0, v, (b, t), generator=g, device=device)
    with torch.no_grad():
        lp = torch.log_softmax(logits[:, :-1].float() / TEMPERATURE, -1).gather(-1, ids[..., None])[..., 0]
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g, device=device)
    return {"logits": logits, "ids": ids, "adv": torch.randn(b, generator=g, device=device),
            "old": lp + torch.randn(b, t, generator=g, device=device) * 0.2,
            "ref": lp + torch.randn(b, t, generator=g, device=device) * 0.2,
            "mask": torch.arange(t, device=device)[None, :] < lengths[:, None]}


def _rlkern_logits_step(d, logits):
    from rlkern.ops.logprobs import token_logprobs

    lp = token_logprobs(logits[:, :-1], d["ids"], temperature=TEMPERATURE)
    loss, _ = ops.policy_loss(lp, d["old"], d["adv"], d["mask"], clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                              ref_logprobs=d["ref"], kl_coef=BETA, kl_estimator="k3", agg="bnpo")
    return loss


def _eager_logits_step(d, logits):
    lp = torch.log_softmax(logits[:, :-1].float() / TEMPERATURE, -1).gather(-1, d["ids"][..., None])[..., 0]
    adv = d["adv"][:, None]
    coef_1 = torch.exp(lp - d["old"])
    coef_2 = torch.clamp(coef_1, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv) + BETA * (torch.exp(d["ref"] - lp) - (d["ref"] - lp) - 1)
    return (per_token * d["mask"]).sum() / d["mask"].sum().clamp(min=1.0)


def _liger_logits_step(grpo):
    def step(d, logits):
        loss, _ = grpo.triton_grpo_loss(logits, d["old"], d["ref"], d["ids"], d["adv"], d["mask"].to(torch.int32),
                                        temperature=TEMPERATURE, beta=BETA, eps_low=CLIP_LOW, eps_high=CLIP_HIGH,
                                        inplace=False, loss_type="bnpo", reduce=True)
        return loss

    return step


def run_from_logits(device: torch.device, b: int, t: int, v: int, dtype: torch.dtype, rounds: int = 10):
    d = _logits_inputs(device, b, t, v, dtype)
    impls = {"rlkern": _rlkern_logits_step, "eager (TRL formula)": _eager_logits_step}
    grpo, why = common.peer("liger_kernel.transformers.grpo_loss")
    if device.type == "cuda" and grpo is not None:
        impls["liger triton_grpo_loss"] = _liger_logits_step(grpo)
    missing = {} if "liger triton_grpo_loss" in impls else {
        "liger triton_grpo_loss": common.NEEDS_CUDA if device.type != "cuda" else why}
    shape = f"B={b} L={t} V={v} {str(dtype).removeprefix('torch.')}"
    bytes_moved = 3 * b * (t + 1) * v * d["logits"].element_size()
    peak_bw = common.copy_bandwidth_gbps(device)
    losses = {}

    def make(name, step):
        logits = d["logits"].detach().clone().requires_grad_()

        def fn():
            total = step(d, logits)
            torch.autograd.grad(total, (logits,))
            return total
        losses[name] = float(fn().detach())  # the same loss from every implementation, recorded beside the time
        return fn

    fns = {name: make(name, step) for name, step in impls.items()}
    peaks = {name: common.cuda_peak_mib(fn) for name, fn in fns.items()} if device.type == "cuda" else {}
    timings = common.measure(fns, device, rounds, label=f"grpo step from logits {shape}")
    rows = []
    bench = "grpo step from logits fwd+bwd (log-probs + clip + k3, bnpo)"
    for name, (med, p20, p80) in timings.items():
        gbps = bytes_moved / (med * 1e-3) / 1e9
        rows.append(common.Row(bench, name, shape, med, p20,
                               p80, gbps, 100 * gbps / peak_bw, peaks.get(name), extra={"loss": losses[name]}))
    rows.extend(common.missing_row(bench, name, shape, why) for name, why in missing.items())
    common.fill_ratios(rows)
    return rows


def _backend_name(device, dtype):
    from rlkern import _backend

    return _backend.REGISTRY["policy_loss"].backend_at(device, dtype)


def default_shape(device: torch.device) -> tuple[int, int, torch.dtype]:
    return (64, 8192, torch.float32) if device.type == "cuda" else (64, 4096, torch.float32)


def main(argv=None) -> list[common.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--b", type=int)
    parser.add_argument("--t", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the issue's target: 2)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loss", choices=LOSSES, default="ppo")
    parser.add_argument("--from-logits", action="store_true",
                        help="the GRPO step from [B, L + 1, V] logits, against Liger's triton_grpo_loss")
    parser.add_argument("--v", type=int, help="vocabulary size with --from-logits")
    parser.add_argument("--kl-aggregate", action="store_true",
                        help="kl_penalty + aggregate alone, float32 and float64, against verl's kl_penalty + agg_loss")
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        torch.set_num_threads(args.threads)
    if args.kl_aggregate:
        b, t, _ = default_shape(device)
        rows = run_kl_aggregate(device, args.b or b, args.t or t, args.rounds)
    elif args.from_logits:
        b, t, v, dtype = (8, 1024, 151936, torch.bfloat16) if device.type == "cuda" else (4, 256, 32000, torch.float32)
        rows = run_from_logits(device, args.b or b, args.t or t, args.v or v,
                               DTYPES[args.dtype] if args.dtype else dtype, args.rounds)
    else:
        b, t, dtype = default_shape(device)
        rows = run(device, args.b or b, args.t or t, DTYPES[args.dtype] if args.dtype else dtype, args.rounds,
                   args.loss)
        if device.type == "cuda" and not (args.b or args.t or args.dtype or args.v):  # `rlkern bench`: Liger too
            rows += run_from_logits(device, 8, 1024, 151936, torch.bfloat16)
    print(f"# {common.device_name(device)}\n")
    print(common.markdown_table(rows))
    if args.out:
        common.write_results(args.out, device, rows, __spec__.name, argv)
    return rows


if __name__ == "__main__":
    main()
