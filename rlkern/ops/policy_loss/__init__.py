"""Policy losses, KL penalties, loss aggregation and the value loss: the public ops and their autograd.

``policy_loss`` computes the clipped policy objective (PPO and the rest of verl 0.9.1's
``POLICY_LOSS_REGISTRY``), the KL penalty to a reference policy, the entropy bonus, their
aggregation and the training metrics in one pass over the ``[B, T]`` (or packed) tensors, and
its backward writes d loss / d logprobs and d loss / d entropy in one more pass.

The package:

    loss.py         ``policy_loss``: validate -> config -> corrections -> dispatch
    _config.py      argument checks, TRL presets, the normalizers, the advantages' layout
    corrections.py  rollout importance weights / rejection, the clip_cov / kl_cov token choice
    _autograd.py    the custom ops ``rlkern::policy_loss`` / ``policy_loss_backward`` and backends
    aggregate.py    ``kl_penalty``, ``aggregate`` (verl's ``agg_loss``), ``value_loss``

Backends: the C++ kernel (CPU) and the Triton kernels (GPU) cover every loss, ``level="token"``
and ``level="sequence"``. The losses whose ratio is a sequence mean (``gspo``,
``level="sequence"``) read each sequence twice in the forward (the mean log-ratio first);
``geo_mean`` and sequence-level ``ppo`` / ``sapo`` get their per-sequence backward factor from the
forward's per-sequence sums. Both kernel backends compute the loss, the metrics and the
per-sequence partial sums themselves (the aggregation included): the Triton forward is 2 launches
(token pass + a one-program reduction over the B rows), its backward 1, with no other torch op in
between (kernels/policy_loss.py).
"""

from rlkern.ops.policy_loss._autograd import KERNEL_LOSSES, METRIC_KEYS, N_STATS
from rlkern.ops.policy_loss._config import AGG_MODES, LOSS_NAMES, TRL_AGG_PRESETS
from rlkern.ops.policy_loss.aggregate import aggregate, kl_penalty, value_loss
from rlkern.ops.policy_loss.loss import policy_loss

__all__ = ["AGG_MODES", "KERNEL_LOSSES", "LOSS_NAMES", "METRIC_KEYS", "N_STATS", "TRL_AGG_PRESETS", "aggregate",
           "kl_penalty", "policy_loss", "value_loss"]
