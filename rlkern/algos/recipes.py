"""Training recipes whose RL update is GRPO (and DPO) over rewards a model computes: URPO,
Cooper, VerIPO.

Registered: ``urpo``, ``cooper``, ``veripo``. In each paper the new part is where the reward
comes from (the policy judging itself, a co-trained reference-based reward model, a small-LLM
verifier choosing DPO pairs); those models run outside rlkern and their scores reach the module
as ``batch.scores``. ``advantages`` is GRPO's (``grpo``), ``loss`` GRPO's PPO-clip
(``policy_loss``); VerIPO's DPO phase is ``extra["dpo_loss"]`` (``preference_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlkern.algos._registry import Batch, register
from rlkern.algos.grpo import GRPOConfig, grpo_advantages
from rlkern.algos.ppo import clipped_policy_loss
from rlkern.algos.preference import DPOConfig, _pair_loss


@dataclass(frozen=True)
class URPOConfig(GRPOConfig):
    """URPO ("URPO: A Unified Reward & Policy Optimization Framework for Large Language
    Models"): one model is both the player and the referee; preference pairs, verifiable
    reasoning and open-ended instructions are all recast as generation tasks and trained by one
    GRPO loop. The referee's rewards (its own judgments of open-ended answers, scored against
    the ground truth for preference data) are computed by the trainer from the model's outputs:
    ``batch.scores``. Defaults: GRPO's (``GRPOConfig``: kl 0.04, k3, clip 0.2,
    seq-mean-token-mean, eps 1e-6); the paper's run values override them."""


@dataclass(frozen=True)
class CooperConfig(GRPOConfig):
    """Cooper ("Cooper: Co-Optimizing Policy and Reward Models in Reinforcement Learning for
    Large Language Models"): GRPO on the reward model's scores (VerifyRM, a
    reference-based reward model), while the reward model itself is updated during RL on
    positive / negative pairs chosen by the rule-based verifier. The policy side is GRPO over
    ``batch.scores`` (the reward model's); the reward model's update and the pair selection are
    the trainer's (its objective is the reward model's, not a token-policy loss). Defaults:
    GRPO's (``GRPOConfig``)."""


@dataclass(frozen=True)
class VerIPOConfig(GRPOConfig):
    """VerIPO ("VerIPO: Cultivating Long Reasoning in Video-LLMs via Verifier-Gudied Iterative
    Policy Optimization"): a GRPO -> verifier -> DPO loop. The GRPO phase is
    ``advantages`` / ``loss``; the rollout-aware verifier (a small LLM judge) builds preference
    pairs from the rollouts, and the DPO phase is ``extra["dpo_loss"]``:
    ``-log sigmoid(dpo_beta * ((c - c_ref) - (r - r_ref)))`` (``preference_loss``, sigmoid).
    Defaults: GRPO's (``GRPOConfig``); dpo_beta 0.1 (DPO's, the paper's text we have gives no
    other)."""

    dpo_beta: float = 0.1


def veripo_dpo_loss(batch: Batch, cfg: VerIPOConfig | None = None):
    """``preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
    loss_type="sigmoid", beta=dpo_beta)`` over the verifier's pairs."""
    cfg = cfg or VerIPOConfig()
    return _pair_loss("dpo")(batch, DPOConfig(beta=cfg.dpo_beta))


def _loss(name, config):
    def fn(batch: Batch, cfg=None):
        return clipped_policy_loss(name, batch, cfg or config())
    fn.__name__ = f"{name}_loss"
    fn.__doc__ = "GRPO's PPO-clip loss (``policy_loss``) with the config's clip, KL and aggregation."
    return fn


def _advantages(name, config):
    def fn(batch: Batch, cfg=None):
        return grpo_advantages(batch, cfg or config())
    fn.__name__ = f"{name}_advantages"
    fn.__doc__ = "``grpo(scores, group_ids, response_mask)`` of the model-computed rewards."
    return fn


register("urpo", URPOConfig, advantages=_advantages("urpo", URPOConfig), loss=_loss("urpo", URPOConfig),
         paper="URPO: A Unified Reward & Policy Optimization Framework for Large Language Models")
register("cooper", CooperConfig, advantages=_advantages("cooper", CooperConfig), loss=_loss("cooper", CooperConfig),
         paper="Cooper: Co-Optimizing Policy and Reward Models in Reinforcement Learning for Large Language Models")
register("veripo", VerIPOConfig, advantages=_advantages("veripo", VerIPOConfig), loss=_loss("veripo", VerIPOConfig),
         dpo_loss=veripo_dpo_loss,
         paper="VerIPO: Cultivating Long Reasoning in Video-LLMs via Verifier-Gudied Iterative Policy Optimization")
