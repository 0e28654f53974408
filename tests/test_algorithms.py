"""The algorithm registry (rlkern.algos.get / available) and docs/algorithms.md.

Registry: every algorithm has a frozen config and advantages and/or loss; on a tiny batch each
function returns exactly what the op it wraps returns when called directly with the config's
values (default config, and one changed config per algorithm). Docs: every title of the research
list has a row, statuses are known, every ``get("name")`` the doc names is registered, every
registered algorithm is in the doc, and every ```python block runs.
"""

import dataclasses
import os
import re

import pytest
import torch

import rlkern
import rlkern.algos as algos
from rlkern.algos import Batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "algorithms.md")
TITLES = os.path.join(ROOT, "docs", "research-list.txt")
SHARED_LIST = os.path.join(ROOT, "..", "shared", "research-papers.md")


# --- tiny batches ---------------------------------------------------------------------------------


def _token_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = 4, 5
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mask = torch.ones(b, t)
    mask[1, 3:] = 0
    mask[3, 4:] = 0
    return Batch(logprobs=(rand(b, t) * 0.1 - 1).requires_grad_(), old_logprobs=rand(b, t) * 0.1 - 1,
                 ref_logprobs=rand(b, t) * 0.1 - 1, entropy=rand(b, t).abs(), response_mask=mask,
                 scores=torch.tensor([1.0, 0.0, 0.5, 1.0]), group_ids=[0, 0, 1, 1], rewards=rand(b, t),
                 values=rand(b, t), vpreds=rand(b, t).requires_grad_(), returns=rand(b, t),
                 truncated=torch.tensor([True, False, True, False]), reward_baselines=rand(b),
                 step_returns=rand(b), anchor_keys=["s0", "s1", "s0", "s0"], dpo_logprobs=rand(b, t) * 0.1 - 1)


def _with_advantages(batch):
    g = torch.Generator().manual_seed(11)
    return batch.replace(advantages=torch.randn(batch.logprobs.shape, generator=g))


def _tree_batch():
    parent = torch.tensor([-1, 0, 0, 1, 1, 2, 2, -1, 7, 7])
    reward = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.3, 0.9])
    return _with_advantages(_token_batch()).replace(parent=parent, node_rewards=reward)


def _chain_batch():
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 6, 13])
    old = -torch.rand(13, generator=g) * 2
    start = torch.zeros(13, dtype=torch.bool)
    start[[0, 3, 7, 10]] = True
    return Batch(old_logprobs=old, cu_seqlens=cu, segment_start=start, cut_values=torch.rand(13, generator=g),
                 scores=torch.tensor([1.0, 0.0]), logprobs=(old + 0.1 * torch.randn(13, generator=g)).requires_grad_(),
                 advantages=torch.randn(13, generator=g))


def _pair_batch():
    g = torch.Generator().manual_seed(4)
    p = 5
    rand = lambda: -torch.rand(p, generator=g) * 10 - 1  # noqa: E731
    return Batch(chosen_logps=rand().requires_grad_(), rejected_logps=rand().requires_grad_(),
                 ref_chosen_logps=rand(), ref_rejected_logps=rand(),
                 chosen_lengths=torch.tensor([3, 4, 5, 6, 7]), rejected_lengths=torch.tensor([2, 5, 5, 8, 3]),
                 seq_logps=rand().requires_grad_(), ref_seq_logps=rand(),
                 labels=torch.tensor([True, False, True, True, False]), kl_logps=rand(), ref_kl_logps=rand(),
                 delta=torch.tensor(0.05), chosen_win_rates=torch.rand(p, generator=g),
                 rejected_win_rates=torch.rand(p, generator=g), sampled_logps=rand().requires_grad_(),
                 prev_ref_chosen_logps=rand(), prev_ref_rejected_logps=rand(), iterate_chosen_logps=rand(),
                 iterate_rejected_logps=rand(), chosen_advantages=torch.rand(p, generator=g),
                 rejected_advantages=torch.rand(p, generator=g), gold_logps=rand().requires_grad_(),
                 gold_lengths=torch.tensor([4, 4, 6, 2, 3]))


def _shaping_batch():
    g = torch.Generator().manual_seed(12)
    b = _with_advantages(_token_batch())
    return b.replace(scores=torch.tensor([1.0, 0.0, 1.0, 1.0]), lengths=torch.tensor([10.0, 30.0, 20.0, 40.0]),
                     seq_logps=-torch.rand(4, generator=g) * 9, exit_positions=torch.tensor([3, 1, 2, 5]),
                     tool_calls=torch.tensor([2, 0, 1, 3]), budgets=torch.tensor([512, 512, 1024, 1024]),
                     rm_scores=torch.randn(4, 3, generator=g),
                     vocab_logprobs=torch.log_softmax(torch.randn(4, 5, 7, generator=g), -1),
                     step_ends=torch.tensor([[0, 1, 0, 0, 1], [0, 0, 1, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 1, 0]]),
                     judges=torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1]]),
                     baseline_rewards=torch.randn(4, generator=g))


def _critic_batch():
    g = torch.Generator().manual_seed(12)
    b = _with_advantages(_token_batch())
    return b.replace(scores=torch.tensor([1.0, 0.0, 1.0, 1.0]),
                     step_ends=torch.tensor([[0, 1, 0, 0, 1], [0, 0, 1, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 1, 0]]),
                     judges=torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1]]),
                     baseline_rewards=torch.randn(4, generator=g))


def _group_batch():
    g = torch.Generator().manual_seed(8)
    n = 7
    rand = lambda: -torch.rand(n, generator=g) * 5  # noqa: E731
    return Batch(seq_logps=rand().requires_grad_(), ref_seq_logps=rand(), old_seq_logps=rand(),
                 scores=torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.9]),
                 group_ids=[0, 0, 0, 1, 1, 2, 2])


def _srpo_batch():
    g = torch.Generator().manual_seed(9)
    return Batch(seq_logps=(-torch.rand(3, 6, generator=g) * 5).requires_grad_(),
                 ref_seq_logps=-torch.rand(3, 6, generator=g) * 5)


def _tgdpo_batch():
    g = torch.Generator().manual_seed(6)
    mask = torch.ones(4, 3)
    mask[3, 2] = 0
    return Batch(logprobs=(-torch.rand(4, 3, generator=g)).requires_grad_(),
                 ref_logprobs=-torch.rand(4, 3, generator=g),
                 response_mask=mask, token_rewards=torch.randn(4, 3, generator=g))


# --- what each algorithm must equal: the op called directly with the config's values ---------------


def _policy(loss, **extra):
    def expected(b, c):
        return rlkern.policy_loss(b.logprobs, b.old_logprobs, b.advantages, b.response_mask, loss=loss,
                                  clip_low=c.clip_low, clip_high=c.clip_high, dual_clip=c.dual_clip,
                                  ref_logprobs=b.ref_logprobs if c.kl_coef else None, kl_coef=c.kl_coef,
                                  kl_estimator=c.kl_estimator, entropy=b.entropy if c.entropy_coef else None,
                                  entropy_coef=c.entropy_coef, agg=c.agg, cu_seqlens=b.cu_seqlens,
                                  **{k: getattr(c, v) for k, v in extra.items()})
    return expected


def _grpo_adv(b, c):
    return rlkern.grpo(b.scores, b.group_ids, b.response_mask, eps=c.eps, norm_by_std=c.norm_by_std)


def _dapo_loss(b, c):
    keep = rlkern.dynamic_sampling_mask(b.scores, b.group_ids, b.response_mask)
    return _policy("ppo")(b.replace(response_mask=keep) if c.dynamic_sampling else b, c)


def _pref(loss_type=None, reference=True, lengths=False, **names):
    def expected(b, c):
        kw = dict(loss_type=loss_type or c.loss_type, beta=c.beta)
        kw.update({k: getattr(c, v) for k, v in names.items()})
        if hasattr(c, "label_smoothing"):
            kw["label_smoothing"] = c.label_smoothing
        refs = (b.ref_chosen_logps, b.ref_rejected_logps) if reference else (None, None)
        lens = dict(chosen_lengths=b.chosen_lengths, rejected_lengths=b.rejected_lengths)
        return rlkern.preference_loss(b.chosen_logps, b.rejected_logps, *refs, **lens, **kw)
    return expected


def _cpo(b, c):
    return rlkern.preference_loss(b.chosen_logps, b.rejected_logps, chosen_lengths=b.chosen_lengths,
                                  rejected_lengths=b.rejected_lengths, loss_type=[c.loss_type, "sft"],
                                  loss_weights=[1.0, c.cpo_alpha], beta=c.beta, label_smoothing=c.label_smoothing)


def _rto_adv(b, c):
    rewards = rlkern.dpo_token_rewards(b.dpo_logprobs, b.ref_logprobs, b.response_mask,
                                       b.old_logprobs if c.dpo_kl_coef else None, b.scores, beta=c.beta,
                                       kl_coef=c.dpo_kl_coef, sequence_reward_coef=c.reward_coef)
    return rlkern.gae(rewards, b.values, b.response_mask, gamma=c.gamma, lam=c.lam, whiten=c.whiten)


TOKEN = lambda: _with_advantages(_token_batch())  # noqa: E731

# name: (batch, expected advantages or None, expected loss or None, a changed config's fields)
CASES = {
    "ppo": (TOKEN, lambda b, c: rlkern.gae(b.rewards, b.values, b.response_mask, gamma=c.gamma, lam=c.lam,
                                           whiten=c.whiten),
            _policy("ppo"), dict(gamma=0.9, lam=0.8, clip_low=0.1, dual_clip=None, kl_coef=0.1, entropy_coef=0.01)),
    "tppo": (TOKEN, lambda b, c: rlkern.egae(b.rewards, b.values, b.response_mask, b.truncated, gamma=c.gamma,
                                             lam=c.lam, whiten=c.whiten),
             _policy("ppo"), dict(gamma=0.95, lam=0.9, whiten=False, clip_high=0.3)),
    "grpo": (TOKEN, _grpo_adv, _policy("ppo"), dict(eps=1e-3, kl_coef=0.5, kl_estimator="k2", agg="token-sum")),
    "dr_grpo": (TOKEN, _grpo_adv, _policy("ppo", loss_scale_factor="max_response_length"),
                dict(max_response_length=16, norm_by_std=True)),
    "dapo": (TOKEN, _grpo_adv, _dapo_loss, dict(dynamic_sampling=False, clip_high=0.4)),
    "gspo": (TOKEN, _grpo_adv, _policy("gspo"), dict(clip_low=1e-3, clip_high=2e-3)),
    "cispo": (TOKEN, _grpo_adv, _policy("cispo"), dict(clip_high=2.0, agg="seq-mean-token-mean")),
    "lite_ppo": (TOKEN, lambda b, c: rlkern.group_normalize(b.scores, b.group_ids, eps=c.eps, std=c.std, scale="batch",
                                                            response_mask=b.response_mask),
                 _policy("ppo"), dict(std="population", eps=1e-4)),
    "bnpo": (TOKEN, lambda b, c: rlkern.bnpo(b.scores, b.group_ids, b.response_mask, min_value=c.min_value,
                                             max_value=c.max_value), _policy("ppo"), dict(max_value=2.0)),
    "grpo_passk": (TOKEN, lambda b, c: rlkern.grpo_passk(b.scores, b.group_ids, b.response_mask, eps=c.eps,
                                                         norm_by_std=c.norm_by_std), _policy("ppo"),
                   dict(norm_by_std=False)),
    "gpg": (TOKEN, lambda b, c: rlkern.gpg(b.scores, b.group_ids, b.response_mask, f_norm=c.f_norm),
            _policy("gpg"), dict(f_norm=2.0)),
    "opo": (TOKEN, lambda b, c: rlkern.opo(b.scores, b.group_ids, b.response_mask), _policy("ppo"),
            dict(clip_low=0.3)),
    "rloo": (TOKEN, lambda b, c: rlkern.rloo(b.scores, b.group_ids, b.response_mask, singleton=c.singleton),
             _policy("reinforce"), dict(singleton="zero", agg="token-mean")),
    "reinforce_pp": (TOKEN, lambda b, c: rlkern.reinforce_pp(b.rewards, b.response_mask, gamma=c.gamma),
                     _policy("ppo"), dict(gamma=0.7)),
    "reinforce_pp_baseline": (TOKEN, lambda b, c: rlkern.reinforce_pp_baseline(b.scores, b.group_ids,
                                                                               b.response_mask),
                              _policy("ppo"), dict(kl_coef=0.2)),
    "remax": (TOKEN, lambda b, c: rlkern.remax(b.rewards, b.reward_baselines, b.response_mask),
              _policy("reinforce"), dict(agg="token-mean")),
    "gigpo": (TOKEN, lambda b, c: rlkern.gigpo_advantages(
        rlkern.grpo(b.scores, b.group_ids, eps=c.eps, norm_by_std=c.norm_by_std),
        rlkern.gigpo_step_groups(b.step_returns, b.anchor_keys, b.group_ids, eps=c.eps, norm_by_std=c.norm_by_std),
        b.response_mask, step_weight=c.step_weight), _policy("ppo"), dict(norm_by_std=True, step_weight=0.5)),
    "spo_chain": (_chain_batch, lambda b, c: rlkern.segment_advantages(b.segment_start, b.cut_values, b.scores,
                                                                       b.cu_seqlens, logprobs=b.old_logprobs,
                                                                       threshold=c.threshold),
                  _policy("ppo"), dict(threshold=0.5, clip_low=0.1)),
    "spo_tree": (_tree_batch, lambda b, c: rlkern.tree_advantages(b.parent, b.node_rewards, method=c.method, eps=c.eps),
                 _policy("ppo"), dict(method="spo_grpo")),
    "treerl": (_tree_batch, lambda b, c: rlkern.tree_advantages(b.parent, b.node_rewards, method="treerl",
                                                                leaf_rloo=c.leaf_rloo),
               _policy("ppo"), dict(leaf_rloo=True)),
    "treepo": (_tree_batch, lambda b, c: rlkern.tree_advantages(b.parent, b.node_rewards, method="treepo",
                                                                subgroup_weighting=c.subgroup_weighting,
                                                                whiten=c.whiten),
               _policy("ppo"), dict(subgroup_weighting="group_size", whiten=False)),
    "dpo": (_pair_batch, None, _pref(), dict(beta=0.5, label_smoothing=0.1)),
    "ipo": (_pair_batch, None, _pref(), dict(beta=0.3)),
    "rso": (_pair_batch, None, _pref(), dict(beta=0.2)),
    "sppo_hard": (_pair_batch, None, _pref(), dict(beta=0.2)),
    "apo_zero": (_pair_batch, None, _pref(), dict(beta=0.2)),
    "simpo": (_pair_batch, None, _pref(reference=False, simpo_gamma="simpo_gamma"), dict(beta=2.0, simpo_gamma=1.0)),
    "cpo": (_pair_batch, None, _cpo, dict(cpo_alpha=0.5, beta=0.2)),
    "orpo": (_pair_batch, None, lambda b, c: rlkern.preference_loss(
        b.chosen_logps, b.rejected_logps, chosen_lengths=b.chosen_lengths, rejected_lengths=b.rejected_lengths,
        loss_type=["orpo", "sft"], beta=c.beta), dict(beta=0.3)),
    "kto": (_pair_batch, None, lambda b, c: rlkern.kto_loss(
        b.seq_logps, b.ref_seq_logps, b.labels, b.kl_logps, b.ref_kl_logps, loss_type=c.loss_type, beta=c.beta,
        desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight),
        dict(beta=0.4, undesirable_weight=1.5)),
    "bco": (_pair_batch, None, lambda b, c: rlkern.bco_loss(b.seq_logps, b.ref_seq_logps, b.labels, b.delta,
                                                            beta=c.beta), dict(beta=0.3)),
    "tgdpo": (_tgdpo_batch, None, lambda b, c: rlkern.token_preference_loss(
        b.logprobs, b.response_mask, b.ref_logprobs, token_rewards=b.token_rewards, tgdpo_alpha=c.tgdpo_alpha,
        loss_type=c.loss_type, beta=c.beta, label_smoothing=c.label_smoothing), dict(tgdpo_alpha=0.5)),
    "sppo": (_pair_batch, None, lambda b, c: rlkern.preference_loss(
        b.chosen_logps, b.rejected_logps, b.ref_chosen_logps, b.ref_rejected_logps, loss_type="sppo", beta=c.beta,
        chosen_win_rates=b.chosen_win_rates, rejected_win_rates=b.rejected_win_rates), dict(beta=0.3)),
    "xpo": (_pair_batch, None, lambda b, c: rlkern.preference_loss(
        b.chosen_logps, b.rejected_logps, b.ref_chosen_logps, b.ref_rejected_logps, loss_type="xpo", beta=c.beta,
        sampled_logps=b.sampled_logps, xpo_alpha=c.xpo_alpha), dict(xpo_alpha=0.1)),
    "vpo": (_pair_batch, None, lambda b, c: rlkern.preference_loss(
        b.chosen_logps, b.rejected_logps, b.ref_chosen_logps, b.ref_rejected_logps, loss_type="vpo", beta=c.beta,
        sampled_logps=b.sampled_logps, vpo_alpha=c.vpo_alpha), dict(vpo_alpha=0.5)),
    "accelerated_po": (_pair_batch, None, lambda b, c: rlkern.preference_loss(
        b.chosen_logps, b.rejected_logps, b.ref_chosen_logps, b.ref_rejected_logps, loss_type=c.loss_type,
        beta=c.beta, label_smoothing=c.label_smoothing, prev_ref_chosen_logps=b.prev_ref_chosen_logps,
        prev_ref_rejected_logps=b.prev_ref_rejected_logps, apo_momentum=c.apo_momentum),
        dict(apo_momentum=0.6, loss_type="hinge")),
    "inpo": (_pair_batch, None, lambda b, c: rlkern.preference_loss(
        b.chosen_logps, b.rejected_logps, b.ref_chosen_logps, b.ref_rejected_logps, loss_type="inpo", beta=c.beta,
        iterate_chosen_logps=b.iterate_chosen_logps, iterate_rejected_logps=b.iterate_rejected_logps,
        inpo_tau=c.inpo_tau, inpo_eta=c.inpo_eta), dict(inpo_tau=0.2, inpo_eta=0.3)),
    "cpl": (_pair_batch, None, lambda b, c: rlkern.preference_loss(
        b.chosen_logps, b.rejected_logps, loss_type="cpl", beta=c.beta, cpl_lambda=c.cpl_lambda),
        dict(cpl_lambda=0.9)),
    "step_apo": (_pair_batch, None, lambda b, c: rlkern.preference_loss(
        b.chosen_logps, b.rejected_logps, b.ref_chosen_logps, b.ref_rejected_logps, loss_type="step_apo",
        beta=c.beta, chosen_advantages=b.chosen_advantages, rejected_advantages=b.rejected_advantages),
        dict(beta=0.4)),
    "triple_po": (_pair_batch, None, lambda b, c: rlkern.preference_loss(
        b.chosen_logps, b.rejected_logps,
        chosen_lengths=b.chosen_lengths if c.length_normalized else None,
        rejected_lengths=b.rejected_lengths if c.length_normalized else None,
        loss_type=["simpo" if c.length_normalized else "sigmoid", "tpo_nll"], loss_weights=[1.0, c.tpo_alpha],
        beta=c.beta, label_smoothing=c.label_smoothing, simpo_gamma=c.tpo_l_gamma, gold_logps=b.gold_logps,
        gold_lengths=b.gold_lengths), dict(length_normalized=True, tpo_alpha=0.5)),
    "tpo_tree": (_group_batch, None, lambda b, c: rlkern.group_preference_loss(
        b.seq_logps, b.group_ids, b.scores, b.ref_seq_logps, b.old_seq_logps, loss_type="tpo", beta=c.beta),
        dict(beta=0.5)),
    "p3o": (_group_batch, None, lambda b, c: rlkern.group_preference_loss(
        b.seq_logps, b.group_ids, b.scores, b.ref_seq_logps, b.old_seq_logps, loss_type="p3o", clip_eps=c.clip_eps),
        dict(clip_eps=0.05)),
    "trpa": (_group_batch, None, lambda b, c: rlkern.group_preference_loss(
        b.seq_logps, b.group_ids, b.scores, b.ref_seq_logps, b.old_seq_logps, loss_type="trpa", beta=c.beta,
        kl_coef=c.kl_coef), dict(kl_coef=0.5)),
    "brain": (_group_batch, None, lambda b, c: rlkern.group_preference_loss(
        b.seq_logps, b.group_ids, b.scores, b.ref_seq_logps, b.old_seq_logps, loss_type="brain", beta=c.beta),
        dict(beta=0.7)),
    "srpo": (_srpo_batch, None, lambda b, c: rlkern.srpo_loss(b.seq_logps, b.ref_seq_logps, beta=c.beta,
                                                              alpha=c.alpha), dict(alpha=0.3, beta=0.2)),
    "self_play": (TOKEN, None, _policy("ppo"), dict(clip_low=0.1)),
    "grpo_lambda": (_shaping_batch, lambda b, c: rlkern.grpo(rlkern.shape_rewards(
        b.scores, b.group_ids, method="grpo_lambda", lengths=b.lengths, threshold=c.threshold,
        top_fraction=c.top_fraction, length_coef=c.length_coef, eps=c.length_eps), b.group_ids, b.response_mask,
        eps=c.eps, norm_by_std=c.norm_by_std), _policy("ppo"), dict(threshold=0.9, length_coef=0.5)),
    "unlikeliness": (_shaping_batch, lambda b, c: rlkern.grpo(rlkern.shape_rewards(
        b.scores, b.group_ids, method="unlikeliness", logprobs=b.seq_logps, rank_coef=c.rank_coef), b.group_ids,
        b.response_mask, eps=c.eps, norm_by_std=c.norm_by_std), _policy("ppo"), dict(rank_coef=0.5)),
    "s_grpo": (_shaping_batch, lambda b, c: rlkern.grpo(rlkern.shape_rewards(
        b.scores, b.group_ids, method="s_grpo", exit_positions=b.exit_positions, decay=c.decay), b.group_ids,
        b.response_mask, eps=c.eps, norm_by_std=c.norm_by_std), _policy("ppo"), dict(decay=0.8)),
    "otc": (_shaping_batch, lambda b, c: rlkern.grpo(rlkern.shape_rewards(
        b.scores, b.group_ids, method="otc", tool_calls=b.tool_calls, tool_c=c.tool_c, tool_coef=c.tool_coef),
        b.group_ids, b.response_mask, eps=c.eps, norm_by_std=c.norm_by_std), _policy("ppo"), dict(tool_c=2.0)),
    "hbpo": (_shaping_batch, lambda b, c: rlkern.outcome_to_tokens(rlkern.hbpo_advantages(rlkern.shape_rewards(
        b.scores, b.group_ids, method="hbpo", lengths=b.lengths, budgets=b.budgets, max_length=c.max_length,
        budget_scale=c.budget_scale, deviation_coef=c.deviation_coef), b.group_ids, b.budgets,
        max_length=c.max_length, budget_scale=c.budget_scale, eps=c.eps), b.response_mask),
        _policy("ppo"), dict(max_length=2048, budget_scale=2.0)),
    "rm_ensemble": (_shaping_batch, None, _policy("ppo"), dict(clip_low=0.1)),
    "mo_grpo": (_shaping_batch, lambda b, c: rlkern.grpo(
        rlkern.ensemble_rewards(b.rm_scores, method="mean") if c.weights is None else
        rlkern.ensemble_rewards(b.rm_scores, method="weighted", weights=list(c.weights)),
        b.group_ids, b.response_mask, eps=c.eps, norm_by_std=c.norm_by_std), _policy("ppo"),
        dict(weights=(0.5, 0.3, 0.2))),
    "tw_grpo": (_shaping_batch, _grpo_adv, lambda b, c: rlkern.policy_loss(
        b.logprobs, b.old_logprobs, b.advantages, b.response_mask, clip_low=c.clip_low, clip_high=c.clip_high,
        dual_clip=c.dual_clip, ref_logprobs=b.ref_logprobs, kl_coef=c.kl_coef, kl_estimator=c.kl_estimator,
        agg=c.agg, is_weights=rlkern.token_weights(b.vocab_logprobs, b.group_ids, b.response_mask,
                                                   max_weight=c.max_weight)), dict(max_weight=1.7)),
    "oreo": (_critic_batch, None, lambda b, c: rlkern.soft_bellman_loss(
        b.logprobs, b.response_mask, b.ref_logprobs, b.values, b.scores, beta=c.beta, kl_coef=c.kl_coef),
        dict(beta=0.3, kl_coef=0.1)),
    "direct_advantage_po": (_critic_batch, None, lambda b, c: rlkern.step_advantage_loss(
        b.logprobs, b.response_mask, b.ref_logprobs, b.advantages, b.step_ends, beta=c.beta), dict(beta=0.5)),
    "ppo_max": (_critic_batch, lambda b, c: rlkern.gae(b.rewards, b.values, b.response_mask, gamma=c.gamma,
                                                        lam=c.lam, whiten=c.whiten),
                _policy("ppo"), dict(lam=0.9)),
    "cgpo": (_critic_batch, lambda b, c: rlkern.grpo(rlkern.constrained_rewards(
        b.scores, b.group_ids, b.judges, b.baseline_rewards).rewards, b.group_ids, b.response_mask, eps=c.eps,
        norm_by_std=c.norm_by_std), _policy("ppo"), dict(norm_by_std=False)),
    "rto": (TOKEN, _rto_adv, _policy("ppo"), dict(beta=0.2, dpo_kl_coef=0.1, reward_coef=0.5, lam=0.9)),
    "ui_r1": (lambda: TOKEN().replace(
        action_types=torch.tensor([0, 1, 0, 2]), true_action_types=torch.tensor([0, 0, 0, 2]),
        points=torch.tensor([[1.0, 1.0], [5.0, 5.0], [9.0, 1.0], [0.0, 0.0]]),
        boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3 + [[float("nan")] * 4]), format_ok=torch.tensor([1, 1, 0, 1])),
        lambda b, c: rlkern.grpo(rlkern.action_rewards(b.action_types, b.true_action_types, b.points, b.boxes,
                                                       b.format_ok), b.group_ids, b.response_mask, eps=c.eps,
                                 norm_by_std=c.norm_by_std), _policy("ppo"), dict(norm_by_std=False)),
    "arpo": (TOKEN, _grpo_adv, _policy("ppo"), dict(norm_by_std=False, clip_high=0.3)),
    "mobile_r1": (TOKEN, _grpo_adv, _policy("ppo"), dict(eps=1e-3, kl_coef=0.1)),
    "urpo": (TOKEN, _grpo_adv, _policy("ppo"), dict(kl_coef=0.0, agg="token-mean")),
    "cooper": (TOKEN, _grpo_adv, _policy("ppo"), dict(norm_by_std=False)),
    "veripo": (TOKEN, _grpo_adv, _policy("ppo"), dict(clip_low=0.1, dpo_beta=0.5)),
}


def _assert_same(ours, want, name):
    if isinstance(want, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.shape == want.shape and ours.dtype == want.dtype, name
        assert torch.equal(ours.detach(), want.detach()) or (ours.isnan() == want.isnan()).all() and torch.equal(
            ours.detach().nan_to_num(), want.detach().nan_to_num()), name
    elif isinstance(want, dict):
        assert set(ours) == set(want), name
        for k in want:
            _assert_same(ours[k], want[k], f"{name}.{k}")
    else:
        assert len(ours) == len(want), name
        for i, (o, w) in enumerate(zip(ours, want)):
            _assert_same(o, w, f"{name}[{i}]")


def test_every_registered_algorithm_has_a_case_and_the_registry_is_sorted():
    names = algos.available()
    assert names == sorted(names) and len(names) == len(set(names))
    assert set(names) == set(CASES), set(names) ^ set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_is_frozen_and_functions_exist(name):
    algo = algos.get(name)
    assert algo.name == name
    cfg = algo.config()
    assert dataclasses.is_dataclass(cfg)
    field = dataclasses.fields(cfg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, getattr(cfg, field))
    assert algo.advantages is not None or algo.loss is not None
    assert algo.family.startswith("rlkern.algos.") and algo.paper and algo.config.__doc__


@pytest.mark.parametrize("changed", [False, True], ids=["defaults", "changed"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_algorithm_equals_its_ops(name, changed):
    make, want_adv, want_loss, fields = CASES[name]
    algo = algos.get(name)
    cfg = dataclasses.replace(algo.config(), **fields) if changed else algo.config()
    assert (want_adv is None) == (algo.advantages is None) and (want_loss is None) == (algo.loss is None), name
    if want_adv is not None:
        _assert_same(algo.advantages(make(), cfg), want_adv(make(), cfg), f"{name}.advantages")
    if want_loss is not None:
        ours_loss, ours_metrics = algo.loss(make(), cfg)
        loss, metrics = want_loss(make(), cfg)
        _assert_same(ours_loss, loss, f"{name}.loss")
        _assert_same(ours_metrics, metrics, f"{name}.metrics")
        assert ours_loss.requires_grad  # the loss is differentiable in the batch's log-probs
    if not changed and want_adv is None and algo.advantages is None:
        assert algo.config() == cfg  # the defaults call above used the paper's config


def test_dapo_filter_removes_all_equal_groups_from_the_loss():
    b = _with_advantages(_token_batch()).replace(scores=torch.tensor([1.0, 1.0, 0.0, 1.0]))
    keep = algos.get("dapo").extra["keep_mask"](b)
    assert not keep[:2].any() and torch.equal(keep[2:], b.response_mask[2:] != 0)
    # the filtered loss equals the loss over groups 1 alone
    loss, _ = algos.get("dapo").loss(b)
    rows = slice(2, 4)
    alone = b.replace(logprobs=b.logprobs[rows], old_logprobs=b.old_logprobs[rows], advantages=b.advantages[rows],
                      response_mask=b.response_mask[rows])
    want, _ = rlkern.policy_loss(alone.logprobs, alone.old_logprobs, alone.advantages, alone.response_mask,
                                 clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(loss, want)


def test_ppo_value_loss_and_spo_cutpoints_extras():
    b = _token_batch()
    cfg = algos.get("ppo").config()
    ours = algos.get("ppo").extra["value_loss"](b, cfg)
    want = rlkern.value_loss(b.vpreds, b.returns, b.values, b.response_mask, cliprange_value=cfg.cliprange_value)
    _assert_same(ours, want, "ppo.value_loss")
    for name in ("tppo", "rto"):
        _assert_same(algos.get(name).extra["value_loss"](b), want, f"{name}.value_loss")
    c = _chain_batch()
    _assert_same(algos.get("spo_chain").extra["cutpoints"](c),
                 rlkern.spo_cutpoints(c.old_logprobs, c.cu_seqlens, threshold=0.9, interval=5), "cutpoints")


def test_group_weights_extras():
    b = _group_batch()
    _assert_same(algos.get("self_play").extra["rewards"](b),
                 rlkern.group_weights(b.scores, b.group_ids, method="win_rate"), "self_play.rewards")
    _assert_same(algos.get("rso").extra["acceptance"](b),
                 rlkern.group_weights(b.scores, b.group_ids, method="rso", beta=0.1), "rso.acceptance")
    _assert_same(algos.get("brain").extra["weights"](b),
                 rlkern.group_weights(b.scores, b.group_ids, b.ref_seq_logps, b.old_seq_logps, method="brain",
                                      beta=0.1), "brain.weights")


def test_missing_fields_and_unknown_names_raise():
    with pytest.raises(ValueError, match=r"^grpo: batch.scores is required"):
        algos.get("grpo").advantages(Batch())
    with pytest.raises(KeyError, match="nope"):
        algos.get("nope")


def test_paper_defaults():
    """The defaults the config docstrings cite (a changed default fails here and in the doc)."""
    assert algos.get("dapo").config().clip_high == 0.28 and algos.get("dapo").config().clip_low == 0.2
    assert (algos.get("gspo").config().clip_low, algos.get("gspo").config().clip_high) == (3e-4, 4e-4)
    assert algos.get("grpo").config().kl_coef == 0.04
    assert algos.get("ppo").config().dual_clip == 3.0 and algos.get("ppo").config().clip_low == 0.2
    assert algos.get("spo_chain").config().threshold == 0.9 and algos.get("spo_chain").config().interval == 5
    assert algos.get("dpo").config().beta == 0.1
    dapo = algos.get("dapo").config()  # DAPO's L_max = 16384 + 4096 cache, factor 1
    assert (dapo.max_length, dapo.cache_length, dapo.penalty_factor) == (20480, 4096, 1.0)
    assert algos.get("gigpo").config().step_weight == 1.0 and not algos.get("gigpo").config().norm_by_std


def test_drop_ins_are_unchanged():
    from rlkern.algos import advantages, policy_loss
    assert "grpo" in advantages.VERL_ADV_ESTIMATORS and callable(policy_loss.openrlhf_is_weights)


# --- docs/algorithms.md ------------------------------------------------------------------------------


def _doc():
    with open(DOC) as f:
        return f.read()


def _rows():
    rows = {}
    for line in _doc().splitlines():
        m = re.match(r"^\| (\d+) \| (.+?) \| (provided|not yet \(in progress\)|not yet|out of scope) \| (.+) \|$", line)
        if m:
            rows[m.group(2)] = (int(m.group(1)), m.group(3), m.group(4))
    return rows


def _titles():
    with open(TITLES) as f:
        return [t for t in f.read().splitlines() if t]


def test_research_list_copy_matches_the_shared_list():
    titles = _titles()
    assert len(titles) == 81 and len(set(titles)) == 81
    if not os.path.exists(SHARED_LIST):
        pytest.skip(f"{SHARED_LIST} is not in this checkout (the repository's copy docs/research-list.txt is "
                    "checked by the other tests)")
    with open(SHARED_LIST) as f:
        shared = [re.sub(r"^## \d+\. ", "", line) for line in f.read().splitlines() if re.match(r"^## \d+\. ", line)]
    assert shared == titles


def test_every_paper_has_a_row():
    rows = _rows()
    titles = _titles()
    missing = [t for t in titles if t not in rows]
    assert not missing, missing
    assert len(rows) == len(titles)
    for i, t in enumerate(titles, 1):
        number, status, text = rows[t]
        assert number == i, t
        assert len(text) > 10, t  # a reason / what is provided
        if status == "provided":
            assert "`" in text, t  # names an op or a registered algorithm


def test_every_name_the_doc_uses_exists():
    doc = _doc()
    names = set(re.findall(r'get\("([a-z_]+)"\)', doc))
    assert names and names <= set(algos.available()), names - set(algos.available())
    for name in algos.available():
        assert f"| `{name}` |" in doc, name  # the registered-algorithms table
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{name}` |"))
        cfg = algos.get(name).config()
        for field in dataclasses.fields(cfg):  # the documented defaults are the config's
            assert f"{field.name}={getattr(cfg, field.name)!r}" in row, (name, field.name)
    called = set(re.findall(r"`([a-z_]+)\(", doc)) - {"get"}
    ops = called | {m for m in re.findall(r"`([a-z_]+)`", doc) if m in rlkern.__all__}
    assert {"gae", "grpo", "dynamic_sampling_mask"} <= ops
    assert ops <= set(rlkern.__all__), ops - set(rlkern.__all__)


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", _doc(), flags=re.S)


def test_the_doc_has_an_example_per_family():
    blocks = _python_blocks()
    assert len(blocks) >= 4
    for name in ("ppo", "dapo", "treerl", "dpo", "oreo", "grpo_lambda"):
        assert any(f'get("{name}")' in b for b in blocks), name


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_doc_examples_run(index):
    blocks = _python_blocks()
    exec(compile(blocks[index], f"docs/algorithms.md block {index}", "exec"), {})


# --- hand-computed examples (the papers' formulas on numbers small enough to do by hand) ------------


def test_hand_computed_grpo_dr_grpo_rloo():
    b = Batch(scores=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64), group_ids=[0, 0, 1, 1])
    std = (0.5 ** 2 * 2 / 1) ** 0.5  # unbiased std of {1, 0}
    want = torch.tensor([0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(algos.get("grpo").advantages(b), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(algos.get("dr_grpo").advantages(b), torch.tensor([0.5, -0.5, 0, 0]).double())
    torch.testing.assert_close(algos.get("rloo").advantages(b), torch.tensor([1.0, -1.0, 0, 0]).double())


def test_hand_computed_lite_ppo():
    b = Batch(scores=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64), group_ids=[0, 0, 1, 1])
    batch_std = (sum((s - 0.75) ** 2 for s in (1.0, 0.0, 1.0, 1.0)) / 3) ** 0.5  # unbiased, over the batch
    want = torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=torch.float64) / (batch_std + 1e-6)  # minus the group mean
    torch.testing.assert_close(algos.get("lite_ppo").advantages(b), want, rtol=0, atol=1e-12)


def test_hand_computed_ppo_remax_spo_tree_dpo():
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    b = Batch(rewards=rewards, values=torch.full((1, 3), 0.5, dtype=torch.float64), response_mask=torch.ones(1, 3))
    cfg = dataclasses.replace(algos.get("ppo").config(), whiten=False)
    adv, ret = algos.get("ppo").advantages(b, cfg)  # gamma = lam = 1: A_t = sum_{u >= t} r_u - V_t
    torch.testing.assert_close(adv, torch.full((1, 3), 0.5, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.ones(1, 3, dtype=torch.float64))
    b = Batch(rewards=torch.tensor([[0.0, 1.0], [0.0, 0.0]]), reward_baselines=torch.tensor([0.5, 0.25]),
              response_mask=torch.ones(2, 2))
    adv, _ = algos.get("remax").advantages(b)  # reward-to-go minus the greedy baseline
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5], [-0.25, -0.25]]))
    tree = Batch(parent=torch.tensor([-1, 0, 0]), node_rewards=torch.tensor([0.0, 1.0, 0.0]))
    adv, keep = algos.get("spo_tree").advantages(tree)  # V(root) = mean(1, 0) = 0.5; A = V(n) - V(root)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.5, -0.5]))
    c, r = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-3.0, -1.0], dtype=torch.float64)
    rc, rr = torch.tensor([-1.5, -2.0], dtype=torch.float64), torch.tensor([-2.5, -1.5], dtype=torch.float64)
    loss, _ = algos.get("dpo").loss(Batch(chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc,
                                          ref_rejected_logps=rr))
    margins = [(-1.0 + 1.5) - (-3.0 + 2.5), (-2.0 + 2.0) - (-1.0 + 1.5)]  # 1.0, -0.5
    want = sum(torch.nn.functional.softplus(torch.tensor(-0.1 * m, dtype=torch.float64)) for m in margins) / 2
    torch.testing.assert_close(loss, want)


def test_hand_computed_dapo_overlong_and_gigpo():
    # DAPO's soft overlong punishment (L_max 20, L_cache 8): lengths 10 / 16 / 24 -> penalties 0 / -0.5 / -1, then GRPO
    cfg = dataclasses.replace(algos.get("dapo").config(), max_length=20, cache_length=8)
    b = Batch(scores=torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64), group_ids=[0, 0, 0, 0],
              lengths=torch.tensor([10, 16, 24, 5]))
    shaped = [1.0, 0.5, 0.0, 0.0]
    mean = sum(shaped) / 4
    std = (sum((r - mean) ** 2 for r in shaped) / 3) ** 0.5
    want = torch.tensor([(r - mean) / (std + 1e-6) for r in shaped], dtype=torch.float64)
    torch.testing.assert_close(algos.get("dapo").advantages(b, cfg), want, rtol=0, atol=1e-12)
    # the filter reads the verifier's scores, not the shaped rewards: a group of equal scores stays out
    equal = b.replace(scores=torch.ones(4, dtype=torch.float64), response_mask=torch.ones(4, 2))
    assert not algos.get("dapo").extra["keep_mask"](equal).any()
    assert algos.get("dapo").advantages(equal, cfg).abs().sum() > 0  # while the shaped rewards differ
    # GiGPO (mean_norm, omega 0.5): episodes [1, 0] of one group, steps 0 and 2 share an anchor
    b = Batch(scores=torch.tensor([1.0, 1.0, 0.0]), group_ids=[0, 0, 0], step_returns=torch.tensor([0.8, 0.4, 0.2]),
              anchor_keys=["a", "b", "a"], response_mask=torch.ones(3, 2))
    cfg = dataclasses.replace(algos.get("gigpo").config(), step_weight=0.5)
    e = [1 - 2 / 3, 1 - 2 / 3, 0 - 2 / 3]
    st = [0.8 - 0.5, 0.0, 0.2 - 0.5]  # the anchor group of one ("b") gets 0
    want = torch.tensor([[x + 0.5 * y] * 2 for x, y in zip(e, st)])
    torch.testing.assert_close(algos.get("gigpo").advantages(b, cfg), want, rtol=0, atol=1e-6)


def test_hand_computed_arpo_recipes_and_veripo_dpo():
    # ARPO (soft attribution) / Mobile-R1 / URPO / Cooper / VerIPO: GRPO over the scores; a shared
    # prefix token of trajectories 0 and 1 keeps each trajectory's own advantage
    b = Batch(scores=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), group_ids=[0, 0, 0],
              response_mask=torch.ones(3, 2))
    std = ((2 / 3) ** 2 + 2 * (1 / 3) ** 2) ** 0.5 / 2 ** 0.5  # unbiased
    want = torch.tensor([[2 / 3], [-1 / 3], [-1 / 3]], dtype=torch.float64) / (std + 1e-6) * torch.ones(3, 2)
    for name in ("arpo", "mobile_r1", "urpo", "cooper", "veripo"):
        torch.testing.assert_close(algos.get(name).advantages(b), want, rtol=0, atol=1e-12, msg=name)
    c, r = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)
    rc, rr = torch.tensor([-1.5], dtype=torch.float64), torch.tensor([-2.5], dtype=torch.float64)
    cfg = dataclasses.replace(algos.get("veripo").config(), dpo_beta=0.5)
    loss, _ = algos.get("veripo").extra["dpo_loss"](Batch(chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc,
                                                          ref_rejected_logps=rr), cfg)
    margin = (-1.0 + 1.5) - (-3.0 + 2.5)  # 1.0
    torch.testing.assert_close(loss, torch.nn.functional.softplus(torch.tensor(-0.5 * margin, dtype=torch.float64)))


def test_hand_computed_arpo_hard_attribution():
    # Two questions' rollout trees (rlkern.trees.from_nested, preorder): question 0 has a global
    # trajectory t (r=1) and a tool-call step s branched into b1, b2 (r=0, 0); question 1 a single
    # trajectory (r=0.5). Tree 0's leaves 1, 0, 0: mean 1/3, Bessel variance
    # ((2/3)^2 + (1/3)^2 + (1/3)^2) / 2 = 1/3; tree 1: one leaf, mean 0 and std 1 (grpo's group of one).
    q0 = {"num_tokens": 3, "children": [{"reward": 1.0, "num_tokens": 4},
                                        {"num_tokens": 2, "children": [{"reward": 0.0, "num_tokens": 5},
                                                                       {"reward": 0.0, "num_tokens": 1}]}]}
    q1 = {"num_tokens": 3, "children": [{"reward": 0.5, "num_tokens": 2}]}
    forest = rlkern.trees.from_nested([q0, q1], dtype=torch.float64)
    assert forest.parent.tolist() == [-1, 0, 0, 2, 2, -1, 5]
    batch = Batch(parent=forest.parent, node_rewards=forest.reward)
    algo = algos.get("arpo")
    hard = dataclasses.replace(algo.config(), attribution="hard")
    adv, keep = algo.advantages(batch, hard)
    den = (1 / 3) ** 0.5 + 1e-6
    want = torch.tensor([0.0, (2 / 3) / den, (-1 / 3) / den, (-1 / 3) / den, (-1 / 3) / den, 0.0, 0.5 / (1 + 1e-6)],
                        dtype=torch.float64)
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-12)
    assert keep.tolist() == [False, True, True, True, True, False, True]
    # per token: each node's advantage over its own segment (the shared step s once, its mean)
    tokens = rlkern.broadcast_to_tokens(adv, forest.segment_start, forest.segment_end, int(forest.segment_end[-1]))
    assert tokens[3:7].eq(adv[1]).all() and tokens[7:9].eq(adv[2]).all() and tokens[:3].eq(0).all()
    # soft is the default and unchanged: GRPO over the trajectories, each keeping its shared prefix
    assert algo.config().attribution == "soft"
    soft = Batch(scores=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), group_ids=[0, 0, 0],
                 response_mask=torch.ones(3, 2))
    want_soft = torch.tensor([[2 / 3], [-1 / 3], [-1 / 3]], dtype=torch.float64) / den * torch.ones(3, 2)
    torch.testing.assert_close(algo.advantages(soft), want_soft, rtol=0, atol=1e-12)
    _assert_same(algo.advantages(soft, dataclasses.replace(hard, attribution="soft")), algo.advantages(soft), "soft")
    with pytest.raises(ValueError, match=r"^arpo: attribution must be 'soft' .* or 'hard' .*got 'mean'"):
        algo.advantages(batch, dataclasses.replace(hard, attribution="mean"))
    with pytest.raises(ValueError, match=r"^arpo: attribution='hard' divides by each tree's reward std"):
        algo.advantages(batch, dataclasses.replace(hard, norm_by_std=False))
    with pytest.raises(ValueError, match=r"^arpo: batch.parent is required"):
        algo.advantages(soft, hard)


def test_hand_computed_ui_r1():
    # a click inside the box with the format (1 + 1 + 1) vs a wrong type outside it without (0 + 0 + 0);
    # without the std division (norm_by_std False) the advantages are R - mean
    b = Batch(action_types=torch.tensor([0, 1]), true_action_types=torch.tensor([0, 0]),
              points=torch.tensor([[2.0, 3.0], [7.0, 3.0]]), boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 2),
              format_ok=torch.tensor([1, 0]), group_ids=[0, 0])
    ui = algos.get("ui_r1")
    assert ui.extra["rewards"](b).tolist() == [3.0, 0.0]
    cfg = dataclasses.replace(ui.config(), norm_by_std=False)
    assert ui.advantages(b, cfg).tolist() == [1.5, -1.5]
