"""rlkern: fused kernels for the hot path of LLM reinforcement learning and preference optimization.

Every op takes the tensors a trainer already has and returns the numbers the trainer's own
code would compute, in float32, through Triton/CUDA kernels on GPU and C++ kernels on CPU.
"""

import os as _os

from rlkern import _checkout  # noqa: F401  (first: in a source checkout, maps kernels/ and benches/)
from rlkern import _backend  # noqa: F401  (loads rlkern._C once, warns once if it is missing)
from rlkern import trees
from rlkern.ops import advantages as _advantages
from rlkern.ops.advantages import *  # noqa: F401,F403  (the names of its __all__)
from rlkern.ops.advantages.dynamic_sampling import dynamic_sampling_mask
from rlkern.ops.critics import constrained_rewards, running_reward_norm, soft_bellman_loss, step_advantage_loss
from rlkern.ops.linear_logprobs import linear_token_logprobs
from rlkern.ops.linear_preference import linear_kto_loss, linear_preference_loss
from rlkern.ops.linear_losses import linear_policy_loss
from rlkern.ops.logprobs import (
    LogprobsEntropy,
    entropy_from_logits,
    selective_log_softmax,
    selective_log_softmax_and_entropy,
    token_logprobs,
)
from rlkern.ops.policy_loss import aggregate, kl_penalty, policy_loss, value_loss
from rlkern.ops.preference import bco_loss, kto_loss, preference_loss
from rlkern.ops.preference_tokens import dpo_token_rewards, token_preference_loss
from rlkern.ops.preference_groups import group_preference_loss, group_weights, srpo_loss
from rlkern.ops.rewards import action_rewards, gigpo_advantages, kl_rewards, overlong_rewards
from rlkern.ops.shaping import ensemble_rewards, hbpo_advantages, shape_rewards, token_weights
from rlkern.trees import (
    broadcast_to_tokens,
    segment_advantages,
    spo_cutpoints,
    tree_advantages,
    tree_values,
)

__version__ = "0.1.0"

__all__ = [
    # log-probs
    "LogprobsEntropy",
    "entropy_from_logits",
    "linear_token_logprobs",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "token_logprobs",
    # policy losses
    "aggregate",
    "kl_penalty",
    "linear_policy_loss",
    "policy_loss",
    "value_loss",
    # preference optimization
    "preference_loss",
    "kto_loss",
    "bco_loss",
    "token_preference_loss",
    "linear_kto_loss",
    "linear_preference_loss",
    "dpo_token_rewards",
    "group_preference_loss",
    "group_weights",
    "srpo_loss",
    # critics (value-based / soft Bellman losses of the research list)
    "soft_bellman_loss",
    "running_reward_norm",
    "constrained_rewards",
    "step_advantage_loss",
    # reward shaping (before an outcome op)
    "ensemble_rewards",
    "shape_rewards",
    "hbpo_advantages",
    "token_weights",
    # reward-side math of the trainers (rlkern/ops/rewards.py)
    "overlong_rewards",
    "kl_rewards",
    "gigpo_advantages",
    "action_rewards",
    # trees
    "broadcast_to_tokens",
    "segment_advantages",
    "spo_cutpoints",
    "tree_advantages",
    "tree_values",
    "trees",
]
__all__ += _advantages.__all__  # advantages
__all__ += ["dynamic_sampling_mask"]  # DAPO's group filter (rlkern/ops/advantages/dynamic_sampling.py)

# RLKERN_PATCH_TRL=1: TRL on rlkern's kernels, rlkern.integrations.trl.patch() with its default
# options (fp32=False, loss=False), run when that module is imported (rlkern/integrations/trl.py).
if _os.environ.get("RLKERN_PATCH_TRL") == "1":
    import rlkern.integrations.trl  # noqa: E402,F401
