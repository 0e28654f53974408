"""The bad-input matrix: every public op against wrong shapes, dtypes, devices, strided views,
out-of-range indices, bad enum strings, bad scalars and NaN where it is rejected, plus each op's
NaN policy (docs/reliability.md).

Each op has one good call (``SPECS``); the rows are made from it by changing one argument. A bad
row must raise ValueError or TypeError whose message starts with ``"<op>: "`` and names the
argument; a strided view of an input must give exactly the contiguous result. ``SPECS`` has to
cover ``rlkern.__all__``, so a new op without rows fails ``test_every_public_op_has_rows``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import pytest
import torch

import rlkern
from _op_cases import flat

NOT_OPS = {"LogprobsEntropy", "trees"}  # a NamedTuple and the trees module, not callables with inputs
B, T, V, H = 4, 5, 7, 3
NAN, INF = float("nan"), float("inf")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mask():
    m = torch.ones(B, T)
    m[0, 3:] = 0  # right padding
    m[2, 0] = 0  # left padding
    m[1, 2] = 0  # a hole
    return m


@dataclass
class Spec:
    """One good call and what the rows may change in it.

    kinds: name -> "float" (values), "mask" (response_mask-like), "index" (labels, parents,
    positions: an integer tensor), "ids" (group ids given as a tensor), "offsets" (cu_seqlens).
    main: the tensor the others are checked against (shape rows change the others).
    enums: name -> a string that is not one of the choices.
    scalars: name -> bad values (each must be rejected); by default every keyword-only float
    hyper-parameter is also tried with NaN and inf, except those in ``unread``.
    index_oob: name -> an out-of-range replacement.
    nan_rejected: tensor names whose NaN the op rejects.
    masked: (mask name, tensor names) whose masked-out positions must not leak into results.
    own_masked_outputs: the op transforms masked-out positions too (verl's masked_whiten), so
    only the valid positions of its output are compared.
    short_dim: name -> the dim the "wrong shape" row shortens (default: 0 for a tensor of more
    dims than main, such as the response_mask of an outcome op, else the last).
    nan_ok: keyword-only floats for which NaN/inf is a meaningful value (a fill value).
    grad: inputs whose gradients the masked-NaN test compares.
    """

    make: callable
    kinds: dict
    main: str
    enums: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)
    unread: tuple = ()
    index_oob: dict = field(default_factory=dict)
    nan_rejected: tuple = ()
    masked: tuple | None = None
    no_extra_dim: tuple = ()
    no_short: tuple = ()
    short_dim: dict = field(default_factory=dict)
    nan_ok: tuple = ()
    own_masked_outputs: bool = False
    grad: tuple = ()


def _x(*shape, seed=0, neg=False):
    t = torch.randn(*shape, generator=_gen(seed))
    return -t.abs() - 0.1 if neg else t


IDS = torch.tensor([0, 0, 1, 1])


def _ids():
    return IDS.clone()


SPECS: dict[str, Spec] = {
    # ------------------------------------------------------------------ advantages (token level)
    "gae": Spec(lambda: dict(rewards=_x(B, T), values=_x(B, T, seed=1), response_mask=_mask(), gamma=0.9, lam=0.95),
                {"rewards": "float", "values": "float", "response_mask": "mask"}, "rewards",
                scalars={"gamma": [NAN, -0.1, 1.5], "lam": [NAN, -0.1]}, masked=("response_mask", ("rewards", "values")),
                nan_rejected=()),
    "egae": Spec(lambda: dict(rewards=_x(B, T), values=_x(B, T, seed=1), response_mask=_mask(),
                              truncated=torch.tensor([True, False, False, True]), gamma=0.9, lam=0.95),
                 {"rewards": "float", "values": "float", "response_mask": "mask", "truncated": "mask"}, "rewards",
                 scalars={"gamma": [NAN, -0.1], "lam": [NAN]}, masked=("response_mask", ("rewards", "values"))),
    "discounted_returns": Spec(lambda: dict(rewards=_x(B, T), response_mask=_mask(), gamma=0.9),
                               {"rewards": "float", "response_mask": "mask"}, "rewards",
                               scalars={"gamma": [NAN, -0.5]}, masked=("response_mask", ("rewards",))),
    "reinforce_pp": Spec(lambda: dict(rewards=_x(B, T), response_mask=_mask(), gamma=0.9),
                         {"rewards": "float", "response_mask": "mask"}, "rewards",
                         scalars={"gamma": [NAN, -0.5]}, masked=("response_mask", ("rewards",))),
    "masked_whiten": Spec(lambda: dict(values=_x(B, T), response_mask=_mask()),
                          {"values": "float", "response_mask": "mask"}, "values",
                          scalars={"shift_mean": ["yes"]}, masked=("response_mask", ("values",)),
                          own_masked_outputs=True),
    "remax": Spec(lambda: dict(rewards=_x(B, T), reward_baselines=_x(B, seed=1), response_mask=_mask()),
                  {"rewards": "float", "reward_baselines": "float", "response_mask": "mask"}, "rewards",
                  masked=("response_mask", ("rewards",))),
    "outcome_to_tokens": Spec(lambda: dict(scores=_x(B), response_mask=_mask()),
                              {"scores": "float", "response_mask": "mask"}, "scores"),
    # ------------------------------------------------------------------ advantages (outcome level)
    "group_normalize": Spec(lambda: dict(scores=_x(B), group_ids=_ids()), {"scores": "float", "group_ids": "ids"},
                            "scores", enums={"std": "sample", "scale": "global", "singleton": "none"},
                            scalars={"eps": [NAN, -1.0], "skip_nan": [1]}),
    "grpo": Spec(lambda: dict(scores=_x(B), group_ids=_ids(), response_mask=_mask()),
                 {"scores": "float", "group_ids": "ids", "response_mask": "mask"}, "scores",
                 scalars={"eps": [NAN, -1.0], "norm_by_std": ["no"]}),
    "rloo": Spec(lambda: dict(scores=_x(B), group_ids=_ids(), response_mask=_mask()),
                 {"scores": "float", "group_ids": "ids", "response_mask": "mask"}, "scores",
                 enums={"singleton": "none"}),
    "gpg": Spec(lambda: dict(scores=_x(B), group_ids=_ids(), response_mask=_mask()),
                {"scores": "float", "group_ids": "ids", "response_mask": "mask"}, "scores",
                scalars={"f_norm": [NAN, INF]}),
    "grpo_passk": Spec(lambda: dict(scores=(_x(B) > 0).float(), group_ids=_ids(), response_mask=_mask()),
                       {"scores": "float", "group_ids": "ids", "response_mask": "mask"}, "scores",
                       scalars={"eps": [NAN]}, nan_rejected=("scores",)),
    "bnpo": Spec(lambda: dict(scores=(_x(B) > 0).float(), group_ids=_ids(), response_mask=_mask()),
                 {"scores": "float", "group_ids": "ids", "response_mask": "mask"}, "scores",
                 scalars={"min_value": [NAN], "max_value": [INF]}),
    "dynamic_sampling_mask": Spec(lambda: dict(scores=_x(B), group_ids=_ids(), response_mask=_mask()),
                                  {"scores": "float", "group_ids": "ids", "response_mask": "mask"}, "scores"),
    "opo": Spec(lambda: dict(scores=_x(B), group_ids=_ids(), response_mask=_mask()),
                {"scores": "float", "group_ids": "ids", "response_mask": "mask"}, "scores"),
    "reinforce_pp_baseline": Spec(lambda: dict(scores=_x(B), group_ids=_ids(), response_mask=_mask()),
                                  {"scores": "float", "group_ids": "ids", "response_mask": "mask"}, "scores"),
    "gdpo": Spec(lambda: dict(scores=_x(B, 2), group_ids=_ids(), response_mask=_mask()),
                 {"scores": "float", "group_ids": "ids", "response_mask": "mask"}, "scores",
                 scalars={"eps": [NAN], "weights": [[1.0, NAN]]}, short_dim={"response_mask": 0}),
    "gigpo_step_groups": Spec(lambda: dict(step_returns=_x(B), anchor_keys=torch.tensor([0, 1, 0, 1]),
                                           group_ids=_ids(), response_mask=_mask()),
                              {"step_returns": "float", "anchor_keys": "ids", "group_ids": "ids",
                               "response_mask": "mask"}, "step_returns", scalars={"eps": [NAN, "x"]}),
    "group_index": Spec(lambda: dict(group_ids=_ids()), {"group_ids": "ids"}, "group_ids",
                        scalars={"n": [-1, 2.5]}),
    "optimal_token_baseline": Spec(
        lambda: dict(rewards=_x(B, T), group_ids=_ids(), response_mask=_mask(), old_logprobs=_x(B, T, neg=True),
                     sum_pi_squared=torch.rand(B, T, generator=_gen(3))),
        {"rewards": "float", "group_ids": "ids", "response_mask": "mask", "old_logprobs": "float",
         "sum_pi_squared": "float"}, "rewards", scalars={"eps": [NAN, -1.0]},
        masked=("response_mask", ("rewards", "old_logprobs", "sum_pi_squared"))),
    # ------------------------------------------------------------------ log-probs
    "token_logprobs": Spec(lambda: dict(logits=_x(B, T, V), labels=torch.randint(0, V, (B, T), generator=_gen(1))),
                           {"logits": "float", "labels": "index"}, "logits",
                           scalars={"temperature": [NAN, 0.0, -1.0], "logit_softcap": [NAN, -1.0],
                                    "return_entropy": ["yes"]},
                           index_oob={"labels": V}, grad=("logits",)),
    "selective_log_softmax": Spec(lambda: dict(logits=_x(B, T, V), index=torch.randint(0, V, (B, T), generator=_gen(1))),
                                  {"logits": "float", "index": "index"}, "logits",
                                  scalars={"temperature": [NAN, 0.0]}, index_oob={"index": V}, grad=("logits",)),
    "selective_log_softmax_and_entropy": Spec(
        lambda: dict(logits=_x(B, T, V), index=torch.randint(0, V, (B, T), generator=_gen(1))),
        {"logits": "float", "index": "index"}, "logits", scalars={"temperature": [NAN, 0.0]},
        index_oob={"index": V}, grad=("logits",)),
    "entropy_from_logits": Spec(lambda: dict(logits=_x(B, T, V)), {"logits": "float"}, "logits",
                                scalars={"chunk_size": [0, 2.5]}, grad=("logits",)),
    "linear_token_logprobs": Spec(
        lambda: dict(hidden=_x(B * T, H), weight=_x(V, H, seed=1), labels=torch.randint(0, V, (B * T,), generator=_gen(2))),
        {"hidden": "float", "weight": "float", "labels": "index"}, "hidden",
        enums={"kernel": "cutlass"}, scalars={"temperature": [NAN, 0.0], "logit_scale": [NAN],
                                              "logit_softcap": [NAN, -1.0]}, unread=("lora_scaling",),
        index_oob={"labels": V}, grad=("hidden", "weight")),
    # ------------------------------------------------------------------ policy losses
    "policy_loss": Spec(
        lambda: dict(logprobs=_x(B, T, neg=True), old_logprobs=_x(B, T, seed=1, neg=True), advantages=_x(B, T, seed=2),
                     response_mask=_mask()),
        {"logprobs": "float", "old_logprobs": "float", "advantages": "float", "response_mask": "mask"}, "logprobs",
        enums={"loss": "ppo2", "level": "tok", "kl_estimator": "k4", "agg": "mean"},
        scalars={"clip_low": [NAN, -0.1], "clip_high": [NAN], "dual_clip": [NAN, 0.5], "kl_coef": [NAN]},
        unread=("rollout_is_threshold", "tau_pos", "tau_neg", "dro_beta", "clip_cov_ratio", "clip_cov_lb",
                "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "off_policy_mask_threshold", "rollout_rs_threshold"),
        masked=("response_mask", ("logprobs", "old_logprobs", "advantages")), grad=("logprobs",)),
    "linear_policy_loss": Spec(
        lambda: dict(hidden=_x(B, T, H), weight=_x(V, H, seed=1), labels=torch.randint(0, V, (B, T), generator=_gen(2)),
                     old_logprobs=_x(B, T, seed=3, neg=True) - 1.5, advantages=_x(B, T, seed=4),
                     response_mask=_mask()),
        {"hidden": "float", "weight": "float", "labels": "index", "old_logprobs": "float", "advantages": "float",
         "response_mask": "mask"}, "hidden",
        enums={"loss": "ppo2", "agg": "mean", "level": "tok"},
        scalars={"temperature": [NAN, 0.0], "entropy_coef": [NAN]},
        unread=("off_policy_mask_threshold", "lora_scaling"), index_oob={"labels": V},
        masked=("response_mask", ("old_logprobs", "advantages")), grad=("hidden",)),
    "value_loss": Spec(
        lambda: dict(vpreds=_x(B, T), returns=_x(B, T, seed=1), values=_x(B, T, seed=2), response_mask=_mask()),
        {"vpreds": "float", "returns": "float", "values": "float", "response_mask": "mask"}, "vpreds",
        enums={"agg": "mean"}, scalars={"cliprange_value": [NAN, -1.0], "dp_size": [0, 2.5]},
        unread=("global_tokens", "global_seqs", "loss_scale_factor"),
        masked=("response_mask", ("vpreds", "returns", "values")), grad=("vpreds",)),
    "aggregate": Spec(lambda: dict(values=_x(B, T), response_mask=_mask()),
                      {"values": "float", "response_mask": "mask"}, "values",
                      enums={"agg": "mean"}, scalars={"dp_size": [0, 2.5], "global_tokens": [NAN, -1.0],
                                                      "loss_scale_factor": [NAN, 0.0]},
                      masked=("response_mask", ("values",)), grad=("values",)),
    "kl_penalty": Spec(lambda: dict(logprobs=_x(B, T, neg=True), ref_logprobs=_x(B, T, seed=1, neg=True)),
                       {"logprobs": "float", "ref_logprobs": "float"}, "logprobs", enums={"kl_estimator": "k4"},
                       grad=("logprobs",)),
    # ------------------------------------------------------------------ preference
    "preference_loss": Spec(
        lambda: dict(chosen_logps=_x(B, neg=True), rejected_logps=_x(B, seed=1, neg=True),
                     ref_chosen_logps=_x(B, seed=2, neg=True), ref_rejected_logps=_x(B, seed=3, neg=True)),
        {"chosen_logps": "float", "rejected_logps": "float", "ref_chosen_logps": "float",
         "ref_rejected_logps": "float"}, "chosen_logps",
        enums={"loss_type": "dpo", "f_divergence_type": "kl"},
        scalars={"beta": [NAN, INF], "label_smoothing": [NAN, -0.1, 1.5]},
        unread=("f_alpha_divergence_coef", "discopop_tau", "simpo_gamma", "xpo_alpha", "vpo_alpha", "apo_momentum",
                "inpo_tau", "inpo_eta", "cpl_lambda", "alpha"), grad=("chosen_logps",)),
    "kto_loss": Spec(
        lambda: dict(policy_logps=_x(B, neg=True), ref_logps=_x(B, seed=1, neg=True),
                     labels=torch.tensor([True, False, True, False]), kl_logps=_x(B, seed=2, neg=True),
                     ref_kl_logps=_x(B, seed=3, neg=True)),
        {"policy_logps": "float", "ref_logps": "float", "labels": "mask", "kl_logps": "float", "ref_kl_logps": "float"},
        "policy_logps", enums={"loss_type": "bco"},
        scalars={"beta": [NAN], "desirable_weight": [NAN, -1.0], "undesirable_weight": [INF]},
        grad=("policy_logps",)),
    "bco_loss": Spec(
        lambda: dict(policy_logps=_x(B, neg=True), ref_logps=_x(B, seed=1, neg=True),
                     labels=torch.tensor([True, False, True, False]), delta=torch.tensor(0.05)),
        {"policy_logps": "float", "ref_logps": "float", "labels": "mask", "delta": "float"}, "policy_logps",
        scalars={"beta": [NAN, INF]}, grad=("policy_logps",)),
    "token_preference_loss": Spec(
        lambda: dict(logprobs=_x(B, T, neg=True), response_mask=_mask(), ref_logprobs=_x(B, T, seed=1, neg=True)),
        {"logprobs": "float", "response_mask": "mask", "ref_logprobs": "float"}, "logprobs",
        enums={"loss_type": "dpo"}, scalars={"beta": [NAN], "label_smoothing": [NAN], "ld_alpha": [NAN, -0.5]},
        unread=("f_alpha_divergence_coef", "discopop_tau", "simpo_gamma", "tgdpo_alpha"),
        masked=("response_mask", ("logprobs", "ref_logprobs")), grad=("logprobs",)),
    "linear_preference_loss": Spec(
        lambda: dict(hidden=_x(B, T, H), weight=_x(V, H, seed=1), labels=torch.randint(0, V, (B, T), generator=_gen(2)),
                     response_mask=_mask(), ref_logprobs=_x(B, T, seed=3, neg=True)),
        {"hidden": "float", "weight": "float", "labels": "index", "response_mask": "mask", "ref_logprobs": "float"},
        "hidden", enums={"loss_type": "dpo"}, scalars={"beta": [NAN], "temperature": [NAN, 0.0]},
        unread=("f_alpha_divergence_coef", "discopop_tau", "simpo_gamma", "tgdpo_alpha", "logit_scale", "lora_scaling"),
        index_oob={"labels": V}, masked=("response_mask", ("ref_logprobs",)), grad=("hidden",)),
    "linear_kto_loss": Spec(
        lambda: dict(hidden=_x(B, T, H), weight=_x(V, H, seed=1), labels=torch.randint(0, V, (B, T), generator=_gen(2)),
                     response_mask=_mask(), ref_logprobs=_x(B, T, seed=3, neg=True),
                     desirable=torch.tensor([True, False, True, False]), kl_logps=_x(B, seed=4, neg=True),
                     ref_kl_logps=_x(B, seed=5, neg=True)),
        {"hidden": "float", "weight": "float", "labels": "index", "response_mask": "mask", "ref_logprobs": "float",
         "desirable": "mask", "kl_logps": "float", "ref_kl_logps": "float"},
        "hidden", enums={"loss_type": "bco"},
        scalars={"beta": [NAN], "temperature": [NAN, 0.0], "desirable_weight": [NAN, -1.0]},
        unread=("logit_scale", "lora_scaling"), index_oob={"labels": V},
        masked=("response_mask", ("ref_logprobs",)), grad=("hidden",)),
    "dpo_token_rewards": Spec(
        lambda: dict(logprobs=_x(B, T, neg=True), ref_logprobs=_x(B, T, seed=1, neg=True), response_mask=_mask()),
        {"logprobs": "float", "ref_logprobs": "float", "response_mask": "mask"}, "logprobs",
        scalars={"beta": [NAN, INF], "kl_coef": [NAN]}, unread=("sequence_reward_coef",),
        masked=("response_mask", ("logprobs", "ref_logprobs"))),
    "group_preference_loss": Spec(
        lambda: dict(logps=_x(B, neg=True), group_ids=_ids(), scores=_x(B, seed=1), ref_logps=_x(B, seed=2, neg=True)),
        {"logps": "float", "group_ids": "ids", "scores": "float", "ref_logps": "float"}, "logps",
        enums={"loss_type": "dpo"}, scalars={"beta": [NAN]}, unread=("clip_eps", "kl_coef"), grad=("logps",),
        nan_rejected=("scores",)),
    "group_weights": Spec(lambda: dict(scores=_x(B), group_ids=_ids()), {"scores": "float", "group_ids": "ids"},
                          "scores", enums={"method": "winrate"}, unread=("beta",), nan_rejected=("scores",)),
    "srpo_loss": Spec(lambda: dict(logps=_x(3, 6, neg=True), ref_logps=_x(3, 6, seed=1, neg=True)),
                      {"logps": "float", "ref_logps": "float"}, "logps", scalars={"beta": [NAN], "alpha": [NAN]},
                      grad=("logps",)),
    # ------------------------------------------------------------------ critics
    "soft_bellman_loss": Spec(
        lambda: dict(logprobs=_x(B, T, neg=True), response_mask=_mask(), ref_logprobs=_x(B, T, seed=1, neg=True),
                     values=_x(B, T, seed=2), rewards=_x(B, seed=3), beta=0.1),
        {"logprobs": "float", "response_mask": "mask", "ref_logprobs": "float", "values": "float", "rewards": "float"},
        "logprobs", scalars={"beta": [NAN, -1.0], "kl_coef": [NAN, -1.0]},
        masked=("response_mask", ("logprobs", "ref_logprobs", "values")), grad=("logprobs", "values")),
    "running_reward_norm": Spec(lambda: dict(rewards=_x(B)), {"rewards": "float"}, "rewards",
                                scalars={"clip": [NAN, 0.0], "eps": [NAN, -1.0]}),
    "constrained_rewards": Spec(lambda: dict(rewards=_x(B), group_ids=_ids(), judges=(_x(B, 2, seed=1) > 0).long()),
                                {"rewards": "float", "group_ids": "ids", "judges": "mask"}, "rewards"),
    "step_advantage_loss": Spec(
        lambda: dict(logprobs=_x(B, T, neg=True), response_mask=_mask(), ref_logprobs=_x(B, T, seed=1, neg=True),
                     advantages=_x(B, T, seed=2), step_ends=torch.tensor([[0, 1, 0, 0, 1], [0, 0, 1, 0, 0],
                                                                          [1, 0, 0, 0, 1], [0, 0, 0, 1, 0]]),
                     beta=0.1),
        {"logprobs": "float", "response_mask": "mask", "ref_logprobs": "float", "advantages": "float",
         "step_ends": "mask"}, "logprobs", scalars={"beta": [NAN, -1.0]},
        masked=("response_mask", ("logprobs", "ref_logprobs", "advantages")), grad=("logprobs",)),
    # ------------------------------------------------------------------ shaping
    "ensemble_rewards": Spec(lambda: dict(rewards=_x(B, 3)), {"rewards": "float"}, "rewards",
                             enums={"method": "uwo2"}, unread=("coef",)),
    "shape_rewards": Spec(lambda: dict(scores=(_x(B) > 0).float(), group_ids=_ids(), method="grpo_lambda",
                                       lengths=torch.tensor([10.0, 30.0, 20.0, 40.0])),
                          {"scores": "float", "group_ids": "ids", "lengths": "count"}, "scores",
                          enums={"method": "lambda"}, scalars={"threshold": [NAN, 1.5], "eps": [NAN]},
                          unread=("rank_coef", "decay", "tool_c", "tool_coef", "budget_scale", "deviation_coef")),
    "hbpo_advantages": Spec(lambda: dict(rewards=_x(B), group_ids=_ids(), budgets=torch.tensor([512, 512, 1024, 1024])),
                            {"rewards": "float", "group_ids": "ids", "budgets": "count"}, "rewards",
                            scalars={"max_length": [0, 2.5], "budget_scale": [NAN], "eps": [NAN, -1.0]}),
    "token_weights": Spec(lambda: dict(logprobs=torch.log_softmax(_x(B, T, V), -1), group_ids=_ids(),
                                       response_mask=_mask()),
                          {"logprobs": "float", "group_ids": "ids", "response_mask": "mask"}, "logprobs",
                          scalars={"max_weight": [NAN, -1.0]}, masked=("response_mask", ("logprobs",)),
                          nan_rejected=("logprobs",)),
    # ------------------------------------------------------------------ rewards
    "overlong_rewards": Spec(lambda: dict(scores=_x(B), lengths=torch.tensor([3.0, 14.0, 19.0, 25.0]), max_length=20,
                                          cache_length=8),
                             {"scores": "float", "lengths": "count"}, "scores",
                             scalars={"max_length": [0, 2.5], "cache_length": [0, 21, 2.5]},
                             nan_rejected=("lengths",)),
    "kl_rewards": Spec(
        lambda: dict(scores=_x(B), logprobs=_x(B, T, neg=True), ref_logprobs=_x(B, T, seed=1, neg=True),
                     response_mask=_mask(), kl_coef=0.1),
        {"scores": "float", "logprobs": "float", "ref_logprobs": "float", "response_mask": "mask"}, "logprobs",
        enums={"kl_estimator": "k4"},
        scalars={"kl_coef": [NAN, INF, -1.0], "kl_clip": [NAN, -1.0], "reward_clip": [(NAN, 1.0), (1.0, -1.0), "x"]},
        masked=("response_mask", ("logprobs", "ref_logprobs"))),
    "gigpo_advantages": Spec(lambda: dict(episode=_x(B), step=_x(B, seed=1), response_mask=_mask(), step_weight=0.5),
                             {"episode": "float", "step": "float", "response_mask": "mask"}, "episode"),
    "action_rewards": Spec(
        lambda: dict(pred_types=torch.tensor([0, 1, 2, -1]), true_types=torch.tensor([0, 1, 1, 2]),
                     points=_x(B, 2), boxes=torch.tensor([[-1.0, -1.0, 1.0, 1.0]] * 3 + [[NAN] * 4]),
                     format_ok=torch.tensor([True, False, True, True])),
        {"pred_types": "index", "true_types": "index", "points": "float", "boxes": "float", "format_ok": "mask"},
        "pred_types"),
    # ------------------------------------------------------------------ trees
    "broadcast_to_tokens": Spec(lambda: dict(node_values=_x(2), segment_start=torch.tensor([0, 3]),
                                             segment_end=torch.tensor([2, 6]), num_tokens=6),
                                {"node_values": "float", "segment_start": "index", "segment_end": "index"},
                                "node_values", scalars={"num_tokens": [-1, 2.5]}, nan_ok=("fill",),
                                index_oob={"segment_end": torch.tensor([2, 9])}),
    "segment_advantages": Spec(lambda: dict(segment_start=torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool),
                                            cut_values=torch.rand(10, generator=_gen(1)), final_reward=_x(2),
                                            cu_seqlens=torch.tensor([0, 5, 10])),
                               {"segment_start": "mask", "cut_values": "float", "final_reward": "float",
                                "cu_seqlens": "offsets"}, "segment_start", scalars={"threshold": [NAN]},
                               index_oob={"cu_seqlens": torch.tensor([0, 5, 12])}),
    "spo_cutpoints": Spec(lambda: dict(logprobs=_x(10, neg=True), cu_seqlens=torch.tensor([0, 5, 10])),
                          {"logprobs": "float", "cu_seqlens": "offsets"}, "logprobs",
                          scalars={"threshold": [NAN], "interval": [0, 2.5]}, nan_rejected=("logprobs",),
                          index_oob={"cu_seqlens": torch.tensor([0, 5, 12])}),
    "tree_advantages": Spec(lambda: dict(parent=torch.tensor([-1, 0, 0, 1, 1, 2, 2]),
                                         reward=torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])),
                            {"parent": "index", "reward": "float"}, "reward",
                            enums={"method": "spo", "subgroup_weighting": "none"},
                            scalars={"eps": [NAN, 0.0], "max_depth": [-1, 2.5], "whiten": ["yes"]},
                            index_oob={"parent": torch.tensor([-1, 0, 0, 9, 1, 2, 2])}),
    "tree_values": Spec(lambda: dict(parent=torch.tensor([-1, 0, 0, 1, 1, 2, 2]),
                                     reward=torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])),
                        {"parent": "index", "reward": "float"}, "reward", enums={"mode": "mean"},
                        scalars={"max_depth": [-1, 2.5]},
                        index_oob={"parent": torch.tensor([-1, 0, 0, 9, 1, 2, 2])}),
}


# ---------------------------------------------------------------------------------------- rows


def _strided(t):
    """The same values as ``t`` in a non-contiguous view."""
    if t.ndim == 0:
        return t
    if t.ndim >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    big = torch.zeros(2 * t.numel(), dtype=t.dtype)
    big[::2] = t
    return big[::2]


def _short(t):
    return t[..., :-1] if t.ndim else t.reshape(1).repeat(2)


def _rows():
    rows = []
    for op, spec in SPECS.items():
        good = spec.make()
        tensors = [n for n in spec.kinds if isinstance(good.get(n), torch.Tensor)]
        for name in tensors:
            kind = spec.kinds[name]
            t = good[name]
            if kind == "float":
                rows += [(op, name, "int dtype", {name: t.round().long()}),
                         (op, name, "bool dtype", {name: t > 0}),
                         (op, name, "complex dtype", {name: t.to(torch.complex64)})]
            elif kind in ("index", "ids", "offsets"):
                rows += [(op, name, "float index", {name: t.double()})]
            elif kind in ("mask", "count"):
                rows += [(op, name, f"complex {kind}", {name: t.to(torch.complex64)})]
            if name != spec.main:
                rows += [(op, name, "meta device", {name: t.to("meta")})]
                if name not in spec.no_short and kind != "offsets" and t.numel() > 1:
                    dim = spec.short_dim.get(name, 0 if t.ndim > good[spec.main].ndim else -1)
                    rows += [(op, name, "wrong shape", {name: t.narrow(dim, 0, t.shape[dim] - 1)})]
                if name not in spec.no_extra_dim and kind not in ("offsets",):
                    rows += [(op, name, "extra dim", {name: t.unsqueeze(0).expand(2, *t.shape).clone()})]
        for name, value in spec.index_oob.items():
            if isinstance(value, int):  # one entry of the good tensor set to this value
                bad = good[name].clone()
                bad.view(-1)[1] = value
                value = bad
            rows += [(op, name, "out of range", {name: value})]
        for name in spec.nan_rejected:
            t = good[name].clone()
            t.view(-1)[0] = NAN
            rows += [(op, name, "nan", {name: t})]
        for name, bad in spec.enums.items():
            rows += [(op, name, "bad choice", {name: bad}), (op, name, "not a string", {name: 3})]
        scalars = {n: list(v) for n, v in spec.scalars.items()}
        for p in inspect.signature(getattr(rlkern, op)).parameters.values():
            if (p.kind is p.KEYWORD_ONLY and isinstance(p.default, float) and not isinstance(p.default, bool)
                    and p.name not in spec.unread and p.name not in spec.nan_ok):
                scalars.setdefault(p.name, [])
                scalars[p.name] += [v for v in (NAN, INF) if all(v is not w for w in scalars[p.name])]
        for name, values in scalars.items():
            for v in values:
                rows += [(op, name, f"{name}={v!r}", {name: v})]
    return rows


ROWS = _rows()


def test_every_public_op_has_rows():
    public = set(rlkern.__all__) - NOT_OPS
    assert public == set(SPECS), (public - set(SPECS), set(SPECS) - public)
    assert all(callable(getattr(rlkern, n)) for n in public)


@pytest.mark.parametrize("op", sorted(SPECS))
def test_the_good_call_runs(op):
    out = getattr(rlkern, op)(**SPECS[op].make())
    assert flat(out)


@pytest.mark.parametrize("op,name,what,change", ROWS, ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in ROWS])
def test_bad_input_raises_a_clear_error(op, name, what, change):
    kwargs = {**SPECS[op].make(), **change}
    with pytest.raises((TypeError, ValueError)) as info:
        getattr(rlkern, op)(**kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{op}: "), msg
    assert name in msg, msg


def _same(a, b):
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


STRIDED = [(op, n) for op, s in SPECS.items() for n in s.kinds
           if isinstance(s.make().get(n), torch.Tensor) and s.make()[n].numel() > 1]


@pytest.mark.parametrize("op,name", STRIDED, ids=[f"{o}-{n}" for o, n in STRIDED])
def test_a_strided_view_gives_the_contiguous_result(op, name, backend):
    kwargs = SPECS[op].make()
    strided = {**kwargs, name: _strided(kwargs[name])}
    assert not strided[name].is_contiguous() or strided[name].numel() < 2
    fn = getattr(rlkern, op)
    _same(fn(**kwargs), fn(**strided))


MASKED = [op for op, s in SPECS.items() if s.masked]


@pytest.mark.parametrize("op", MASKED)
@pytest.mark.parametrize("poison", [NAN, INF])
def test_masked_out_positions_do_not_leak(op, poison, backend):
    # NaN/inf where response_mask is 0 gives what 0 there gives: outputs, metrics and gradients
    spec = SPECS[op]
    mask_name, names = spec.masked
    kwargs = spec.make()
    off = kwargs[mask_name] == 0
    zero, bad = dict(kwargs), dict(kwargs)
    for n in names:
        here = off.reshape(off.shape + (1,) * (kwargs[n].ndim - off.ndim))  # [B, T] -> [B, T, V]
        zero[n] = kwargs[n].masked_fill(here, 0.0)
        bad[n] = kwargs[n].masked_fill(here, poison)
    fn = getattr(rlkern, op)
    results = []
    for kw in (zero, bad):
        kw = {k: (v.clone().requires_grad_() if k in spec.grad else v) for k, v in kw.items()}
        out = fn(**kw)
        grads = []
        if spec.grad:
            loss = flat(out)[0]
            grads = torch.autograd.grad(loss.sum(), [kw[k] for k in spec.grad])
        results.append((out, grads))
    if spec.own_masked_outputs:
        results = [([o[~off] for o in flat(out)], grads) for out, grads in results]
    _same(results[0][0], results[1][0])
    _same(results[0][1], results[1][1])


# ------------------------------------------------------------------------------ the NaN policy
# (docs/reliability.md): arithmetic propagates NaN, as far as the statistic the op computes
# reaches and no further; comparisons reject it (above: nan_rejected rows); hyper-parameters
# reject NaN and inf (above: the scalar rows); masked-out positions never leak (above).


def _poisoned(op, name, index):
    kwargs = SPECS[op].make()
    bad = dict(kwargs)
    bad[name] = kwargs[name].clone()
    bad[name][index] = NAN
    fn = getattr(rlkern, op)
    return flat(fn(**kwargs)), flat(fn(**bad))


# op, the tensor poisoned at (1, 1, ...): its row 1 of every output may change, no other row
ROW_LOCAL = [("token_logprobs", "logits"), ("selective_log_softmax", "logits"),
             ("selective_log_softmax_and_entropy", "logits"), ("entropy_from_logits", "logits"),
             ("linear_token_logprobs", "hidden"), ("kl_penalty", "logprobs"), ("kl_penalty", "ref_logprobs"),
             ("dpo_token_rewards", "logprobs"), ("gae", "rewards"), ("gae", "values"), ("egae", "rewards"),
             ("egae", "values"), ("discounted_returns", "rewards"), ("remax", "rewards"),
             ("remax", "reward_baselines"), ("outcome_to_tokens", "scores"), ("constrained_rewards", "rewards"),
             ("ensemble_rewards", "rewards"), ("shape_rewards", "scores"), ("overlong_rewards", "scores"),
             ("kl_rewards", "logprobs"), ("kl_rewards", "scores"), ("gigpo_advantages", "episode"),
             ("gigpo_advantages", "step")]
# ... its group (samples 0 and 1) may change, not the other group
GROUP_LOCAL = [("group_normalize", "scores"), ("grpo", "scores"), ("rloo", "scores"), ("gpg", "scores"),
               ("bnpo", "scores"), ("opo", "scores"), ("hbpo_advantages", "rewards"),
               ("optimal_token_baseline", "rewards"), ("optimal_token_baseline", "old_logprobs")]
# ... a batch statistic (whitening, running moments): NaN everywhere, never a silently finite batch
BATCH_WIDE = [("masked_whiten", "values"), ("reinforce_pp", "rewards"), ("reinforce_pp_baseline", "scores"),
              ("gdpo", "scores"), ("running_reward_norm", "rewards")]
# ... a loss over the batch: the loss is NaN
LOSSES = [("policy_loss", "logprobs"), ("policy_loss", "advantages"), ("linear_policy_loss", "hidden"),
          ("value_loss", "vpreds"), ("aggregate", "values"), ("preference_loss", "chosen_logps"),
          ("kto_loss", "policy_logps"), ("bco_loss", "policy_logps"), ("token_preference_loss", "logprobs"),
          ("linear_preference_loss", "hidden"), ("group_preference_loss", "logps"), ("srpo_loss", "logps"),
          ("soft_bellman_loss", "logprobs"), ("soft_bellman_loss", "values"), ("step_advantage_loss", "logprobs"),
          ("linear_kto_loss", "hidden")]


def _at(t, rows):
    return t[rows] if t.ndim else t


@pytest.mark.parametrize("op,name", ROW_LOCAL, ids=[f"{o}-{n}" for o, n in ROW_LOCAL])
def test_nan_stays_in_its_row(op, name, backend):
    t = SPECS[op].make()[name]
    clean, bad = _poisoned(op, name, (1,) * t.ndim)
    others = [r for r in range(clean[0].shape[0]) if r != 1]
    assert any(o.ndim and o[1].isnan().any() for o in bad), "the NaN row must show NaN"
    for c, b in zip(clean, bad):
        if c.ndim:
            torch.testing.assert_close(b[others], c[others], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op,name", GROUP_LOCAL, ids=[f"{o}-{n}" for o, n in GROUP_LOCAL])
def test_nan_stays_in_its_group(op, name, backend):
    t = SPECS[op].make()[name]
    clean, bad = _poisoned(op, name, (1,) * t.ndim)  # sample 1, group 0 = samples 0 and 1
    assert any(o[:2].isnan().any() for o in bad if o.ndim), "the NaN group must show NaN"
    for c, b in zip(clean, bad):
        if c.ndim:
            torch.testing.assert_close(b[2:], c[2:], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op,name", BATCH_WIDE, ids=[f"{o}-{n}" for o, n in BATCH_WIDE])
def test_nan_in_a_batch_statistic_reaches_every_row(op, name, backend):
    t = SPECS[op].make()[name]
    _, bad = _poisoned(op, name, (1,) * t.ndim)
    valid = SPECS[op].make().get("response_mask")
    out = bad[0]
    where = (valid != 0) if valid is not None and out.shape == valid.shape else torch.ones_like(out, dtype=torch.bool)
    assert out[where].isnan().all(), out


@pytest.mark.parametrize("op,name", LOSSES, ids=[f"{o}-{n}" for o, n in LOSSES])
def test_nan_at_a_valid_position_makes_the_loss_nan(op, name, backend):
    t = SPECS[op].make()[name]
    clean, bad = _poisoned(op, name, (1,) * t.ndim)  # (1, 1): valid in _mask()
    assert torch.isfinite(clean[0]) and bad[0].isnan(), (clean[0], bad[0])


# ... positions the formula does not read: an inner node's reward (trees read leaf rewards), a
# cut value off the segment starts, an advantage off the step ends
NOT_READ = [("tree_values", "reward"), ("tree_advantages", "reward"), ("segment_advantages", "cut_values"),
            ("step_advantage_loss", "advantages")]


@pytest.mark.parametrize("op,name", NOT_READ, ids=[f"{o}-{n}" for o, n in NOT_READ])
def test_nan_where_the_formula_reads_nothing_changes_nothing(op, name, backend):
    t = SPECS[op].make()[name]
    clean, bad = _poisoned(op, name, (1,) * t.ndim)
    _same(clean, bad)


def test_group_normalize_skip_nan_leaves_the_nan_sample_out():
    # skip_nan=True (TRL 1.16's nan-aware statistics): a NaN score is in no statistic, so the
    # others get what they get without that sample, and it gets advantage 0 (as TRL)
    scores = torch.tensor([0.3, NAN, 1.0, -0.5, 0.25, 2.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    out = rlkern.group_normalize(scores, ids, skip_nan=True)
    keep = torch.tensor([0, 2, 3, 4, 5])
    torch.testing.assert_close(out[keep], rlkern.group_normalize(scores[keep], ids[keep], skip_nan=True),
                               rtol=0, atol=0)
    assert out[1] == 0


PACKED_SCANS = ["gae", "egae", "discounted_returns", "remax"]


def _packed_call(op, rewards, cu):
    n = rewards.numel()
    mask = torch.ones(n)
    values = torch.randn(n, generator=_gen(5))
    if op == "gae":
        return flat(rlkern.gae(rewards, values, mask, gamma=0.9, lam=0.95, cu_seqlens=cu))
    if op == "egae":
        return flat(rlkern.egae(rewards, values, mask, torch.tensor([True, False, True]), gamma=0.9, lam=0.95,
                                 cu_seqlens=cu))
    if op == "discounted_returns":
        return flat(rlkern.discounted_returns(rewards, mask, gamma=0.9, cu_seqlens=cu))
    return flat(rlkern.remax(rewards, torch.randn(3, generator=_gen(6)), mask, cu_seqlens=cu))


@pytest.mark.parametrize("op", PACKED_SCANS)
def test_nan_stays_in_its_sequence_when_packed(op, backend):
    cu = torch.tensor([0, 3, 7, 12])
    rewards = torch.randn(12, generator=_gen(4))
    bad = rewards.clone()
    bad[5] = NAN  # sequence 1
    clean, got = _packed_call(op, rewards, cu), _packed_call(op, bad, cu)
    others = torch.tensor([0, 1, 2, 7, 8, 9, 10, 11])
    assert any(g[3:7].isnan().any() for g in got)
    for c, g in zip(clean, got):
        torch.testing.assert_close(g[others], c[others], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ on CUDA


def _to(kwargs, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


CUDA_MIX = [(op, n) for op, s in SPECS.items() for n, kind in s.kinds.items()
            if n != s.main and kind != "ids" and isinstance(s.make().get(n), torch.Tensor)]


@pytest.mark.gpu
@pytest.mark.parametrize("op,name", CUDA_MIX, ids=[f"{o}-{n}" for o, n in CUDA_MIX])
def test_a_cpu_tensor_in_a_cuda_call_raises(op, name):
    kwargs = _to(SPECS[op].make(), "cuda")
    kwargs[name] = kwargs[name].cpu()
    with pytest.raises((TypeError, ValueError)) as info:
        getattr(rlkern, op)(**kwargs)
    assert str(info.value).startswith(f"{op}: ") and name in str(info.value), str(info.value)


OOB = [(op, n) for op, s in SPECS.items() for n in s.index_oob]


@pytest.mark.gpu
@pytest.mark.parametrize("op,name", OOB, ids=[f"{o}-{n}" for o, n in OOB])
def test_out_of_range_indices_raise_on_cuda_with_validate(op, name, monkeypatch):
    # on CUDA the range checks are a host sync: they run under RLKERN_VALIDATE=1 (rlkern/_backend.py)
    monkeypatch.setenv("RLKERN_VALIDATE", "1")
    row = next(r for r in ROWS if r[:3] == (op, name, "out of range"))
    kwargs = _to({**SPECS[op].make(), **row[3]}, "cuda")
    with pytest.raises((TypeError, ValueError)) as info:
        getattr(rlkern, op)(**kwargs)
    assert str(info.value).startswith(f"{op}: ") and name in str(info.value), str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("op", MASKED)
def test_masked_out_nan_does_not_leak_on_cuda(op):
    spec = SPECS[op]
    mask_name, names = spec.masked
    kwargs = _to(spec.make(), "cuda")
    off = kwargs[mask_name] == 0
    zero, bad = dict(kwargs), dict(kwargs)
    for n in names:
        here = off.reshape(off.shape + (1,) * (kwargs[n].ndim - off.ndim))
        zero[n] = kwargs[n].masked_fill(here, 0.0)
        bad[n] = kwargs[n].masked_fill(here, NAN)
    fn = getattr(rlkern, op)
    a, b = flat(fn(**zero)), flat(fn(**bad))
    if spec.own_masked_outputs:
        a, b = [t[~off] for t in a], [t[~off] for t in b]
    _same(a, b)
