"""TRL 1.16's own trainers, two optimizer steps, plain and with ``rlkern.integrations.trl.patch()``
(and DPO / KTO with ``patch(loss=True)``: their losses on rlkern too).

GRPO, RLOO, DPO, KTO and SFT on a tiny in-process Qwen2 (tests/_tiny_models.py), CPU, offline,
from the same seed, in float32 and under bf16 autocast (``bf16=True, use_cpu=True``: accelerate
runs the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, so TRL's fused head
computes bf16 tiles), plus GRPO's ``cast_lm_head_to_fp32``. The patched run must call rlkern
(the call counter) and give TRL's losses, gradient norms and parameters.

Plain SGD (``optim="sgd"``): an update is linear in the gradient, so a parameter difference is
lr x a gradient difference; Adam's normalisation would blow a 1e-7 gradient difference on a
near-zero gradient up to a full lr step and hide what is compared.

Tolerances, measured per case (printed with -s): TRL against TRL itself with another
``chunk_size`` (97 vocabulary columns instead of 32768) is the noise; rlkern must stay within
20x that noise + 2e-6 (the noise is often exactly 0), relative on losses and grad norms,
absolute on parameters. Under bf16 a tenth of TRL's own bf16 error (TRL bf16 against TRL fp32,
3e-4 to 2e-3 on grad norms) is added: one bf16 rounding of a tile element that goes the other
way (the fp32 sums it is rounded from depend on GEMM shapes) moves a run by that order.
Measured (TRL 1.16, torch 2.13 CPU):
- fp32 and cast_lm_head_to_fp32: noise 0 to 8e-8 on losses and grad norms, <= 1.5e-8 on
  parameters; rlkern-vs-TRL 0 to 1.2e-7, parameters <= 7.5e-9.
- bf16: noise 0 to 2.4e-7 on losses, 0 to 8e-4 on grad norms, <= 1.1e-5 on parameters;
  rlkern-vs-TRL at or below it (0 to 2.4e-7, 0 to 8e-4, <= 1.1e-5): the rounded tiles of
  ``linear_token_logprobs(logits_dtype=bf16)``.
"""

import functools
import math

import pytest
import torch

from _tiny_models import prompts, tiny_qwen2, tiny_tokenizer
from conftest import import_peer

trl = import_peer("trl")
trl_utils = import_peer("trl.trainer.utils")
datasets = import_peer("datasets")
import rlkern.integrations.trl as rt  # noqa: E402

TRAINERS = ["grpo", "rloo", "dpo", "kto", "sft"]
PRECISIONS = ["fp32", "bf16"]


def _reward(completions, **kwargs):
    return [float(len(set(c.split()))) + 0.1 * len(c) for c in completions]


def _words(n, seed, length=(3, 6)):
    return [" " + p for p in prompts(n, seed=seed, length=length)]


@functools.cache
def _model_dir(tmp_root):
    """GRPO and RLOO load the policy (and their reference model) from a path."""
    tokenizer = tiny_tokenizer()
    path = f"{tmp_root}/tiny-qwen2"
    tiny_qwen2(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _trainer(name, precision, output_dir, tmp_root):
    tokenizer = tiny_tokenizer()
    common = dict(output_dir=output_dir, report_to="none", save_strategy="no", max_steps=2, logging_steps=1,
                  per_device_train_batch_size=4, use_cpu=True, bf16=precision != "fp32", seed=0, optim="sgd",
                  learning_rate=0.05, disable_tqdm=True, dataloader_num_workers=0)
    if name in ("grpo", "rloo"):
        data = datasets.Dataset.from_dict({"prompt": prompts(8)})
        config_cls, trainer_cls = (trl.GRPOConfig, trl.GRPOTrainer) if name == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
        extra = dict(beta=0.04, cast_lm_head_to_fp32=precision == "bf16-lm-head-fp32") if name == "grpo" else {}
        args = config_cls(**common, num_generations=4, max_completion_length=8, **extra)
        return trainer_cls(model=_model_dir(tmp_root), reward_funcs=_reward, args=args, train_dataset=data,
                           processing_class=tokenizer)
    model = tiny_qwen2(tokenizer)
    if name == "dpo":
        data = datasets.Dataset.from_dict({"prompt": prompts(8), "chosen": _words(8, 1), "rejected": _words(8, 2)})
        return trl.DPOTrainer(model=model, ref_model=tiny_qwen2(tokenizer), args=trl.DPOConfig(**common),
                              train_dataset=data, processing_class=tokenizer)
    if name == "kto":
        data = datasets.Dataset.from_dict({"prompt": prompts(8), "completion": _words(8, 1),
                                           "label": [True, False] * 4})
        return trl.KTOTrainer(model=model, ref_model=tiny_qwen2(tokenizer), args=trl.KTOConfig(**common),
                              train_dataset=data, processing_class=tokenizer)
    data = datasets.Dataset.from_dict({"text": prompts(8, length=(6, 12))})
    return trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=data, processing_class=tokenizer)


@functools.cache
def _train(name, precision, mode, tmp_root):
    """mode: "trl" (TRL as shipped), "trl-chunk97" (TRL, another chunk_size), "rlkern" (patched),
    "rlkern-loss" (``patch(loss=True)``: the trainer's loss too), "rlkern-fused"
    (``patch(loss="fused")``, tests/test_trl_fused.py). Returns (losses, grad norms,
    final parameters, rlkern fused-head calls, rlkern trainer-loss calls)."""
    rt.unpatch()
    saved_chunk = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    if mode == "trl-chunk97":
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = 97
    if mode.startswith("rlkern"):
        rt.patch(loss={"rlkern-loss": True, "rlkern-fused": "fused"}.get(mode, False))
    before = rt.calls["ChunkedLogProbFunction"]
    loss_key = {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer", "dpo": "DPOTrainer",
                "kto": "KTOTrainer"}.get(name, "") + "._compute_loss"
    loss_before = rt.calls[loss_key]
    try:
        trainer = _trainer(name, precision, f"{tmp_root}/{name}-{precision}-{mode}", tmp_root)
        trainer.train()
    finally:
        rt.unpatch()
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = saved_chunk
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2, trainer.state.log_history
    params = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    return ([float(h["loss"]) for h in logs], [float(h["grad_norm"]) for h in logs], params,
            rt.calls["ChunkedLogProbFunction"] - before, rt.calls[loss_key] - loss_before)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("trl-trainers"))


def _gaps(a, b):
    """Largest differences of losses, grad norms and parameters between two runs, relative to
    the first run's scale (losses and norms) or absolute (parameters)."""
    loss = max(abs(x - y) / (1 + abs(x)) for x, y in zip(a[0], b[0]))
    norm = max(abs(x - y) / (1e-6 + abs(x)) for x, y in zip(a[1], b[1]))
    param = max((a[2][n] - b[2][n]).abs().max().item() for n in a[2])
    return {"loss": loss, "grad_norm": norm, "params": param}


@pytest.mark.peer
@pytest.mark.parametrize(("name", "precision"), [(n, p) for n in TRAINERS for p in PRECISIONS]
                         + [("grpo", "bf16-lm-head-fp32")])  # cast_lm_head_to_fp32 is a GRPO option
def test_trainer_with_rlkern_matches_trl(name, precision, tmp_root):
    trl_run = _train(name, precision, "trl", tmp_root)
    ours = _train(name, precision, "rlkern", tmp_root)
    assert trl_run[3] == 0 and ours[3] > 0, (trl_run[3], ours[3])  # the patched run scored on rlkern
    assert all(math.isfinite(x) for x in ours[0] + ours[1])
    _assert_within_trl_noise(name, precision, trl_run, ours, tmp_root, label=precision)


def _assert_within_trl_noise(name, precision, trl_run, ours, root, *, label):
    """rlkern's run may differ from TRL's by 20x TRL's own noise (TRL against TRL with another
    chunking) plus, in bf16, a tenth of TRL's own bf16 error."""
    gap = _gaps(trl_run, ours)
    noise = _gaps(trl_run, _train(name, precision, "trl-chunk97", root))
    slack = {key: 0.0 for key in gap}
    if precision == "bf16":
        # One bf16 rounding that goes the other way moves a run by a fraction of TRL's own bf16
        # error (TRL bf16 against TRL fp32): a tenth of it is allowed on top of the noise.
        slack = {key: 0.1 * value for key, value in _gaps(_train(name, "fp32", "trl", root), trl_run).items()}
    print(f"{name} {label}: rlkern-vs-TRL {gap}, TRL-vs-TRL(chunk 97) {noise}, bf16 slack {slack}")
    for key in gap:
        assert gap[key] <= 20 * noise[key] + slack[key] + 2e-6, (key, gap, noise, slack)


@pytest.mark.peer
@pytest.mark.parametrize("name", ["dpo", "kto"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_preference_trainer_loss_through_rlkern(name, precision, tmp_root):
    # patch(loss=True): DPOTrainer._compute_loss / KTOTrainer._compute_loss run rlkern's
    # preference_loss / kto_loss on every step
    trl_run = _train(name, precision, "trl", tmp_root)
    ours = _train(name, precision, "rlkern-loss", tmp_root)
    assert trl_run[4] == 0 and ours[4] > 0 and ours[3] > 0, (trl_run[4], ours[3], ours[4])
    _assert_within_trl_noise(name, precision, trl_run, ours, tmp_root, label=f"{precision} loss=True")
