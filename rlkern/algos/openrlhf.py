"""OpenRLHF 0.11.2's log-prob, entropy, KL and loss functions with its own signatures, computed by
rlkern's kernels.

Each name matches OpenRLHF's and takes the same arguments. ``out_dtype`` is rlkern's
keyword-only addition, spelled and meant as in TRL's drop-ins (``rlkern.selective_log_softmax``):
None (default) returns OpenRLHF's dtypes; a float dtype returns that dtype, computed unrounded
(float32, float64 for float64 inputs) and rounded once. A bad value raises TypeError.

- ``log_probs_from_logits(logits, labels, temperature=1.0)`` (``openrlhf.models.utils``):
  ``rlkern.token_logprobs``; dtype of the logits (OpenRLHF computes bfloat16/float16 logits in
  their own dtype, rlkern in float32 and rounds). A temperature != 1 divides ``logits`` in place
  first, as OpenRLHF does (its callers may read the scaled logits afterwards).
- ``compute_entropy(logits)`` (``openrlhf.models.utils``, which OpenRLHF wraps in
  ``torch.compile``): ``rlkern.entropy_from_logits``; dtype of the logits.
- ``compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
  unbiased_gradient=False)`` (``openrlhf.models.utils``): ``rlkern.kl_penalty`` on the float32
  log-probs, always float32 as OpenRLHF. OpenRLHF clamps every estimator's value to [-10, 10]
  (k3 after bounding the log-ratio below at -10); rlkern's k3 has the same bounds where they
  matter (its log-ratio bound of 20 only cuts where the value is already at 10), k1 and k2 get
  the clamp here. ``unbiased_gradient`` keeps the value and takes k2's gradient (rlkern's
  ``"k3+"`` form) times OpenRLHF's detached importance weight ``min(exp(lp - lp_old), 10)``;
  the value is the estimator's exactly (OpenRLHF's ``v + g - g`` rounds at the scale of ``g``).
- ``ValueLoss(clip_eps=None, token_level_loss=True)`` (``openrlhf.models.loss``): its forward
  ``(values, old_values, returns, action_mask, dp_size, batch_num_tokens, global_batch_size)``
  through ``rlkern.value_loss`` / ``rlkern.aggregate``; an empty mask gives 0 (OpenRLHF: NaN).
- ``PolicyLoss``: ``rlkern.algos.policy_loss.PolicyLoss``, re-exported.
- ``DPOLoss(beta, label_smoothing=0.0, ipo=False)`` (``openrlhf.models.loss``): DPO, cDPO and
  IPO through ``rlkern.preference_loss``; returns ``(loss, chosen_rewards, rejected_rewards)``
  as OpenRLHF (the rewards per pair, detached).
- ``PairWiseLoss`` / ``LogExpLoss`` (``openrlhf.models.loss``, the reward-model losses):
  ``rlkern.preference_loss`` sigmoid, reference-free, beta 1 (PairWiseLoss's margin as the
  chosen side's reference log-prob).
- ``KTOLoss(beta, desirable_weight, undesirable_weight, world_size, device)``: the KTO loss of
  OpenRLHF 0.1.10 to 0.9.5 (removed in 0.9.6; 0.11.2 ships none), through ``rlkern.kto_loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlkern.algos.policy_loss import PolicyLoss, openrlhf_agg_dtype, promote, to_peer_dtype, wide_dtype
from rlkern.ops import _checks
from rlkern.ops._layout import out_dtype as wide_of
from rlkern.ops.logprobs import entropy_from_logits, token_logprobs
from rlkern.ops.policy_loss import aggregate, kl_penalty, value_loss
from rlkern.ops.preference import kto_loss, preference_loss

__all__ = ["DPOLoss", "KTOLoss", "LogExpLoss", "PairWiseLoss", "PolicyLoss", "ValueLoss", "compute_approx_kl",
           "compute_entropy", "log_probs_from_logits"]

# OpenRLHF 0.11.2 models/utils.py: every estimator's value is clamped to [-10, 10] and the
# importance weight of the unbiased KL gradient to <= 10 (its KL_IS_WEIGHT_CLIP).
_KL_BOUND = 10.0
_KL_IS_WEIGHT_CLIP = 10.0
_KL_ESTIMATORS = ("k1", "k2", "k3")


def _rows(logits: Tensor) -> tuple[Tensor, tuple]:
    """token_logprobs takes [N, V] or [B, T, V] with a contiguous last dim; OpenRLHF takes any."""
    lead = tuple(logits.shape[:-1])
    if logits.ndim not in (2, 3):
        logits = logits.reshape(-1, logits.shape[-1])
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, lead


def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0, *,
                          out_dtype: torch.dtype | None = None) -> Tensor:
    """OpenRLHF's ``log_probs_from_logits``: log softmax(logits) at ``labels``, shape of ``labels``.

    ``logits`` ``[..., V]`` float16/bfloat16/float32/float64, ``labels`` int64 ``logits.shape[:-1]``.
    Returns the dtype of ``logits`` (``out_dtype``: that dtype).
    """
    _checks.out_dtype("log_probs_from_logits", out_dtype, "OpenRLHF")
    if temperature != 1.0:
        logits.div_(temperature)
    rows, lead = _rows(logits)
    out = token_logprobs(rows, labels.reshape(rows.shape[:-1])).reshape(lead)
    return to_peer_dtype(out, logits.dtype, out_dtype)


def compute_entropy(logits: Tensor, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """OpenRLHF's ``compute_entropy``: entropy of softmax(logits), ``logits.shape[:-1]``, dtype of
    ``logits`` (``out_dtype``: that dtype)."""
    _checks.out_dtype("compute_entropy", out_dtype, "OpenRLHF")
    rows, lead = _rows(logits)
    # rlkern's unrounded result (fp32, fp64 for fp64 logits), rounded once.
    entropy = entropy_from_logits(rows, out_dtype=wide_of(logits)).reshape(lead)
    return to_peer_dtype(entropy, logits.dtype, out_dtype)


def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, log_probs_old: Tensor | None = None,
                      kl_estimator: str = "k1", unbiased_gradient: bool = False) -> Tensor:
    """OpenRLHF's ``compute_approx_kl``: per-token KL estimate, shape of ``log_probs``, float32.

    ``kl_estimator`` k1 (lp - base), k2 ((lp - base)^2 / 2), k3 (e^(base - lp) - (base - lp) - 1),
    each clamped to [-10, 10]; ``unbiased_gradient`` as OpenRLHF (see the module docstring).
    """
    if kl_estimator not in _KL_ESTIMATORS:
        raise ValueError(f"compute_approx_kl: kl_estimator must be one of {_KL_ESTIMATORS}, got {kl_estimator!r}")
    # OpenRLHF computes in float32 whatever the input dtype; float16/bfloat16 go into the kernel
    # as they are (it computes in float32), float64 is rounded first as OpenRLHF rounds it.
    lp = log_probs.float() if log_probs.dtype == torch.float64 else log_probs
    base = log_probs_base.float() if log_probs_base.dtype == torch.float64 else log_probs_base
    value = kl_penalty(lp, base, kl_estimator=kl_estimator + "+" if unbiased_gradient else kl_estimator)
    if kl_estimator != "k3":  # rlkern's k1 / k2 are unclamped (verl's kl / mse)
        value = value.clamp(-_KL_BOUND, _KL_BOUND) if not unbiased_gradient else _clamp_value(value)
    if not unbiased_gradient or log_probs_old is None:
        return value
    with torch.no_grad():
        weight = (log_probs.float() - log_probs_old.float()).exp().clamp(max=_KL_IS_WEIGHT_CLIP)
    detached = value.detach()
    return detached + weight * (value - detached)  # value unchanged, gradient times the weight


def _clamp_value(value: Tensor) -> Tensor:
    # straight-through: clamp the value, keep the (k2) gradient unclamped, as OpenRLHF does
    detached = value.detach()
    return value - detached + detached.clamp(-_KL_BOUND, _KL_BOUND)


class ValueLoss(torch.nn.Module):
    """Drop-in for ``openrlhf.models.loss.ValueLoss``: ``0.5 * aggregate(max((v - R)^2,
    (v_old + clamp(v - v_old, -c, c) - R)^2))`` (no clip when ``clip_eps`` is None), token mean
    or per-sample mean with OpenRLHF's global normalizers. Returns the loss in OpenRLHF's dtype
    (``out_dtype``: that dtype)."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True, *,
                 out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _checks.out_dtype("ValueLoss", out_dtype, "OpenRLHF")
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss
        self.out_dtype = out_dtype

    def _out_dtype(self, wide: torch.dtype) -> torch.dtype | None:
        """As ``PolicyLoss._out_dtype`` (``rlkern.algos.policy_loss``)."""
        return self.out_dtype

    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Tensor | None = None,
                dp_size: int = 1, batch_num_tokens: float | None = None,
                global_batch_size: float | None = None) -> Tensor:
        mask = action_mask if action_mask is not None else torch.ones_like(values, dtype=torch.bool)
        norm = batch_num_tokens if self.token_level_loss else global_batch_size
        kw = dict(agg="token-mean" if self.token_level_loss else "seq-mean-token-mean",
                  dp_size=dp_size if norm is not None else 1,  # OpenRLHF ignores dp_size without its normalizer
                  global_tokens=batch_num_tokens if self.token_level_loss else None,
                  global_seqs=None if self.token_level_loss else global_batch_size)
        if self.clip_eps is not None:
            loss, _ = value_loss(values, returns, old_values, mask, cliprange_value=self.clip_eps, **kw)
            per_token = promote(values.dtype, old_values.dtype, returns.dtype)
        else:
            diff = values.float() - returns.float() if values.dtype in (torch.float16, torch.bfloat16) else values - returns
            loss = 0.5 * aggregate(diff.square(), mask, **kw)
            per_token = promote(values.dtype, returns.dtype)
        out_dtype = self._out_dtype(wide_dtype(values, old_values, returns))
        return to_peer_dtype(loss, openrlhf_agg_dtype(per_token, action_mask, self.token_level_loss, norm), out_dtype)



# --- preference losses ---------------------------------------------------------------------------


def _constant(op: str, name: str, t: Tensor | None) -> None:
    # rlkern's preference ops take the reference log-probs as constants (no gradient computed for
    # them); OpenRLHF's trainers compute them under torch.no_grad(), so this only stops a misuse
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name} requires grad, but rlkern takes it as a constant of the loss; compute it "
                         "under torch.no_grad() or pass .detach() (OpenRLHF's trainers do)")


def _flat(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).reshape(-1)


class DPOLoss(torch.nn.Module):
    """Drop-in for ``openrlhf.models.loss.DPOLoss``: per pair, with ``x = (pc - pr) - (rc - rr)``
    (the policy's and the reference's summed log-probs of the chosen / rejected completions),

    - ``ipo=False``: cDPO (Mitchell's conservative DPO; DPO at ``label_smoothing=0``),
      ``-(1 - ls) * logsigmoid(beta * x) - ls * logsigmoid(-beta * x)``;
    - ``ipo=True``: IPO (arXiv 2310.12036, Eq. 17) without length normalization,
      ``(x - 1 / (2 * beta))^2`` (label_smoothing unused, as in OpenRLHF),

    the loss their mean over the pairs. Returns ``(loss, chosen_rewards, rejected_rewards)``:
    the 0-dim loss and ``beta * (pc - rc)`` / ``beta * (pr - rr)`` per pair, detached, in
    OpenRLHF's dtypes (``out_dtype``: that dtype, computed in float32 / float64).

    How it maps onto ``rlkern.preference_loss``: DPO is ``loss_type="sigmoid"``; IPO is
    ``"ipo"`` with lengths of ones (TRL's IPO divides the log-ratios by the token counts,
    OpenRLHF's does not); cDPO is TRL's reference-free sigmoid with CPO's label smoothing,
    ``"simpo"`` with ``simpo_gamma=0`` and lengths of ones, over the log-ratios ``pc - rc`` and
    ``pr - rr`` (TRL 1.16's DPO ``sigmoid`` ignores label_smoothing and its ``robust`` is the
    unbiased estimator, another formula). label_smoothing in (0.5, 1] is the same loss with
    chosen and rejected swapped and ``1 - label_smoothing`` (the formula is symmetric so);
    outside [0, 1] it raises ValueError (not with ``ipo=True``, which ignores it). Computed in float32 (float64 for float64 inputs) and
    rounded once, where OpenRLHF computes in the inputs' dtype. The reference log-probs are
    constants (one that requires grad raises; OpenRLHF's trainer computes them under no_grad).
    B = 0 gives a loss of 0 (OpenRLHF: NaN).
    """

    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False, *,
                 out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _checks.out_dtype("DPOLoss", out_dtype, "OpenRLHF")
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.ipo = ipo
        self.out_dtype = out_dtype

    def _out_dtype(self, wide: torch.dtype) -> torch.dtype | None:
        """As ``PolicyLoss._out_dtype`` (``rlkern.algos.policy_loss``)."""
        return self.out_dtype

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
                reference_rejected_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
        _constant("DPOLoss", "reference_chosen_logps", rc)
        _constant("DPOLoss", "reference_rejected_logps", rr)
        ls = float(self.label_smoothing)
        if not self.ipo and not 0.0 <= ls <= 1.0:  # IPO ignores it, as OpenRLHF
            raise ValueError(f"DPOLoss: label_smoothing must be in [0, 1] (cDPO's probability of a flipped label), "
                             f"got {self.label_smoothing!r}")
        wide = wide_dtype(pc, pr, rc, rr)
        out_dtype = self._out_dtype(wide)
        if self.ipo or ls == 0.0:
            policy = promote(pc.dtype, pr.dtype)
            ones = torch.ones(pc.numel(), dtype=wide, device=pc.device)
            loss, _ = preference_loss(
                _flat(pc, policy), _flat(pr, policy), rc.detach().reshape(-1), rr.detach().reshape(-1),
                loss_type="ipo" if self.ipo else "sigmoid", beta=self.beta,
                chosen_lengths=ones if self.ipo else None, rejected_lengths=ones if self.ipo else None)
        else:
            # cDPO: the reference-free sigmoid with label smoothing over the log-ratios
            chosen = _flat(pc, wide) - _flat(rc.detach(), wide)
            rejected = _flat(pr, wide) - _flat(rr.detach(), wide)
            if ls > 0.5:  # f(x, ls) = f(-x, 1 - ls): swap the pair, rlkern takes ls <= 0.5
                chosen, rejected, ls = rejected, chosen, 1.0 - ls
            ones = torch.ones_like(chosen)
            loss, _ = preference_loss(chosen, rejected, loss_type="simpo", beta=self.beta, label_smoothing=ls,
                                      simpo_gamma=0.0, chosen_lengths=ones, rejected_lengths=ones)
        loss = to_peer_dtype(loss, promote(pc.dtype, pr.dtype, rc.dtype, rr.dtype), out_dtype)
        with torch.no_grad():
            if out_dtype is None:  # OpenRLHF's own elementwise product, in its dtype
                chosen_rewards = self.beta * (pc - rc)
                rejected_rewards = self.beta * (pr - rr)
            else:
                chosen_rewards = (self.beta * (pc.to(wide) - rc.to(wide))).to(out_dtype)
                rejected_rewards = (self.beta * (pr.to(wide) - rr.to(wide))).to(out_dtype)
        return loss, chosen_rewards, rejected_rewards


def _reward_model_loss(op: str, chosen_reward: Tensor, reject_reward: Tensor, margin: Tensor | None,
                       out_dtype: torch.dtype | None) -> Tensor:
    """mean(-logsigmoid(chosen - reject - margin)): rlkern.preference_loss's sigmoid, reference-
    free, beta 1, the margin taken as the chosen side's reference log-prob (x = (c - m) - r)."""
    peer = promote(chosen_reward.dtype, reject_reward.dtype)
    if margin is not None:
        _constant(op, "margin", margin)
        margin = torch.as_tensor(margin, device=chosen_reward.device)
        peer = promote(peer, margin.dtype) if margin.is_floating_point() else peer
    shape = torch.broadcast_shapes(chosen_reward.shape, reject_reward.shape,
                                   *(() if margin is None else (margin.shape,)))
    dtype = promote(chosen_reward.dtype, reject_reward.dtype)
    chosen = chosen_reward.to(dtype).expand(shape).reshape(-1)
    rejected = reject_reward.to(dtype).expand(shape).reshape(-1)
    if margin is None:
        loss, _ = preference_loss(chosen, rejected, loss_type="sigmoid", beta=1.0)
    else:
        ref_chosen = margin.detach().to(wide_of(chosen)).expand(shape).reshape(-1)
        loss, _ = preference_loss(chosen, rejected, ref_chosen, torch.zeros_like(ref_chosen), loss_type="sigmoid",
                                  beta=1.0)
    return to_peer_dtype(loss, peer, out_dtype)


class PairWiseLoss(torch.nn.Module):
    """Drop-in for ``openrlhf.models.loss.PairWiseLoss`` (the reward model's Bradley-Terry loss):
    ``mean(-logsigmoid(chosen_reward - reject_reward - margin))`` (no margin: 0), through
    ``rlkern.preference_loss`` (sigmoid, reference-free, beta 1; the margin, a constant of the
    data, as the chosen side's reference log-prob). The 0-dim loss in OpenRLHF's dtype
    (``out_dtype``: that dtype); the rewards may have any (broadcastable) shapes, the mean is
    over all their elements. A margin that requires grad raises (rlkern takes it as a constant).
    """

    def __init__(self, *, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _checks.out_dtype("PairWiseLoss", out_dtype, "OpenRLHF")
        self.out_dtype = out_dtype

    def _out_dtype(self, wide: torch.dtype) -> torch.dtype | None:
        return self.out_dtype

    def forward(self, chosen_reward: Tensor, reject_reward: Tensor, margin: Tensor | None = None) -> Tensor:
        out_dtype = self._out_dtype(wide_dtype(chosen_reward, reject_reward, margin))
        return _reward_model_loss("PairWiseLoss", chosen_reward, reject_reward, margin, out_dtype)


class LogExpLoss(torch.nn.Module):
    """Drop-in for ``openrlhf.models.loss.LogExpLoss``: ``mean(log(1 + exp(reject_reward -
    chosen_reward)))``, the same loss as PairWiseLoss without a margin (OpenRLHF ignores the
    ``margin`` argument here, so does this). OpenRLHF's form overflows to inf once the reward gap
    passes exp's range; rlkern's softplus does not.
    """

    def __init__(self, *, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _checks.out_dtype("LogExpLoss", out_dtype, "OpenRLHF")
        self.out_dtype = out_dtype

    def _out_dtype(self, wide: torch.dtype) -> torch.dtype | None:
        return self.out_dtype

    def forward(self, chosen_reward: Tensor, reject_reward: Tensor, margin: Tensor | None = None) -> Tensor:
        out_dtype = self._out_dtype(wide_dtype(chosen_reward, reject_reward))
        return _reward_model_loss("LogExpLoss", chosen_reward, reject_reward, None, out_dtype)


class KTOLoss(torch.nn.Module):
    """The KTO loss of OpenRLHF 0.1.10 to 0.9.5 (``openrlhf.models.loss.KTOLoss``, "KTO loss for
    uneven sampling"; removed in 0.9.6, OpenRLHF 0.11.2 ships no KTO loss), with that class's
    constructor, forward and return values, through ``rlkern.kto_loss``.

    ``KTOLoss(beta, desirable_weight, undesirable_weight, world_size, device)``;
    ``forward(policy_chosen_logps, policy_rejected_logps, policy_KL_logps,
    reference_chosen_logps, reference_rejected_logps, reference_KL_logps)`` returns
    ``(loss, chosen_rewards, rejected_rewards, KL)``:

    - ``KL``: the reference point, ``mean(policy_KL_logps - reference_KL_logps)``, detached,
      averaged over the ``world_size`` processes (an all-reduce sum / world_size, run when
      torch.distributed is initialized; without it ``world_size`` must be 1), clamped at 0;
      0-dim, the dtype of the KL log-probs.
    - ``loss``: the mean over the chosen (desirable) and rejected (undesirable) completions
      together of ``desirable_weight * (1 - sigmoid(beta * (pc - rc - KL)))`` and
      ``undesirable_weight * (1 - sigmoid(beta * (KL - (pr - rr))))`` (KTO, arXiv 2402.01306,
      Eq. 7), which is ``rlkern.kto_loss(cat(pc, pr), cat(rc, rr), labels, kl_logps=[KL],
      ref_kl_logps=[0])``; 0-dim, the policy log-probs' dtype (``out_dtype``: that dtype,
      computed in float32 / float64 and rounded once). No completion at all gives 0 (the old
      class: NaN).
    - ``chosen_rewards`` / ``rejected_rewards``: ``beta * (pc - rc)`` / ``beta * (pr - rr)`` per
      completion, detached (empty where that group is).

    ``device`` is kept for the signature (the old class built its empty tensors there). The
    reference log-probs are constants (one that requires grad raises).
    """

    def __init__(self, beta: float, desirable_weight: float, undesirable_weight: float, world_size: int,
                 device: torch.device, *, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _checks.out_dtype("KTOLoss", out_dtype, "OpenRLHF")
        self.beta = beta
        self.world_size = world_size
        self.device = device
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.out_dtype = out_dtype

    def _out_dtype(self, wide: torch.dtype) -> torch.dtype | None:
        return self.out_dtype

    def _reference_point(self, policy_kl: Tensor, reference_kl: Tensor, dtype: torch.dtype | None) -> Tensor:
        with torch.no_grad():
            if dtype is None:
                kl = (policy_kl - reference_kl).mean()
            else:
                kl = (policy_kl.to(dtype) - reference_kl.to(dtype)).mean()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(kl, op=torch.distributed.ReduceOp.SUM)
            elif self.world_size != 1:
                raise ValueError(f"KTOLoss: world_size={self.world_size!r} needs torch.distributed initialized (the "
                                 "reference point is averaged over the processes)")
            return (kl / self.world_size).clamp(min=0)

    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, policy_KL_logps: Tensor,
                reference_chosen_logps: Tensor, reference_rejected_logps: Tensor,
                reference_KL_logps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
        for name, t in (("reference_chosen_logps", rc), ("reference_rejected_logps", rr),
                        ("policy_KL_logps", policy_KL_logps), ("reference_KL_logps", reference_KL_logps)):
            _constant("KTOLoss", name, t)  # the KL completions' log-probs enter detached, as in the old class
        wide = wide_dtype(pc, pr, rc, rr, policy_KL_logps, reference_KL_logps)
        out_dtype = self._out_dtype(wide)
        kl = self._reference_point(policy_KL_logps, reference_KL_logps, None if out_dtype is None else wide)
        policy = promote(pc.dtype, pr.dtype)
        logps = torch.cat([pc.to(policy).reshape(-1), pr.to(policy).reshape(-1)])
        ref = torch.cat([rc.detach().to(wide).reshape(-1), rr.detach().to(wide).reshape(-1)])
        labels = torch.cat([torch.ones(pc.numel(), dtype=torch.bool, device=logps.device),
                            torch.zeros(pr.numel(), dtype=torch.bool, device=logps.device)])
        point = kl.to(wide).reshape(1)
        loss, _ = kto_loss(logps, ref, labels, point, torch.zeros_like(point), beta=self.beta,
                           desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        # the old class's dtype: its per-completion losses follow the log-ratios and the KL
        loss = to_peer_dtype(loss, promote(policy, rc.dtype, rr.dtype, kl.dtype), out_dtype)
        with torch.no_grad():
            if out_dtype is None:
                chosen_rewards = self.beta * (pc - rc)
                rejected_rewards = self.beta * (pr - rr)
            else:
                chosen_rewards = (self.beta * (pc.to(wide) - rc.to(wide))).to(out_dtype)
                rejected_rewards = (self.beta * (pr.to(wide) - rr.to(wide))).to(out_dtype)
                kl = kl.to(out_dtype)
        return loss, chosen_rewards, rejected_rewards, kl
