"""Plain-PyTorch reference of the policy-loss family: the oracle of every kernel.

Padded ``[B, T]`` layout only (the op layer pads packed input before calling it). Runs in
float64 when ``logprobs`` is float64, else in float32, on any device; gradients come from
PyTorch autograd through these formulas, so the kernels' hand-written backward is checked
against autograd of the same math.

Per token (``lr = logprobs - old_logprobs``, ``A`` the advantage, ``m`` the mask weight):

    ppo        r = exp(clamp(lr, -20, 20));  l = max(-A r, -A clip(r, 1-lo, 1+hi));
               with dual-clip c, where A < 0: l = min(l, -A c)
    gspo       s_b = sum_t m lr / max(sum_t m, 1);  r = exp(min(s_b, 10)) carried by the token's
               own log-prob (straight-through: d r / d logprob_t = r);  l = max(-A r, -A clip(r))
    cispo      l = -sg(clip(r, 1-lo, 1+hi)) A logprob
    reinforce  l = -A logprob                      (verl's gpg and bypass_mode "reinforce")
    sapo       l = -A sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos if A > 0 else tau_neg
    clip_cov   l = max(-A e^lr, -A clip(e^lr)) * (1 - selected)        (selection: clip_cov_select)
    kl_cov     l = -A e^lr + ppo_kl_coef |lr| selected                  (selection: kl_cov_select)
    geo_mean   per sequence: -mean_t(A) exp(mean_t(sign(A) min(sign(A) lr, sign(A) clip(lr))))
    dppo_tv    l = -A sg(min(r, c)) logprob valid,  valid from |p - p_old| (binary TV) vs clip
    dppo_kl    same with the binary KL between Bernoulli(p_old) and Bernoulli(p)
    dro        l = -(A logprob - beta/2 lr^2)

The policy term is multiplied by ``is_weights`` (stop-gradient) and aggregated with ``agg``;
``kl_coef * agg(kl_estimator(logprobs, ref_logprobs))`` is added and ``entropy_coef *
agg(entropy)`` subtracted, as verl's actor loss does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

METRIC_KEYS = ("clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl", "ratio_mean",
               "kl_ref", "entropy")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k3_unclamped")
# The float hyper-parameters of the policy-loss custom ops, in the order of their ``hyper`` list,
# and the columns of the per-sequence statistics the kernels emit: one schema for the op layer
# (rlkern/ops/policy_loss.py), the Triton launcher (kernels/policy_loss.py) and the C++ parser
# (csrc/policy_loss.cpp reports its own order through torch.ops.rlkern.cpp_policy_loss_schema;
# tests/test_policy_loss.py compares them). In ``hyper``, NaN marks an optional field that was not
# given (dual_clip, loss_scale_factor, dro_beta, global_tokens / global_seqs given as tensors or
# not at all); the public ops reject NaN from callers.
HYPER_FIELDS = ("clip_low", "clip_high", "dual_clip", "kl_coef", "entropy_coef", "dp_size", "loss_scale_factor",
                "tau_pos", "tau_neg", "dro_beta", "ppo_kl_coef", "global_tokens", "global_seqs", "kl_bias_correction")
STAT_FIELDS = ("policy", "entropy", "kl", "count", "clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac",
               "approx_kl", "ratio", "seq_log_ratio", "seq_grad")


def hyper_list(**values) -> list[float]:
    """The ``hyper`` list from every field of HYPER_FIELDS by name (None: not given, NaN)."""
    missing = set(HYPER_FIELDS) ^ set(values)
    if missing:
        raise TypeError(f"hyper_list: fields {sorted(missing)} missing or unknown")
    return [math.nan if values[name] is None else float(values[name]) for name in HYPER_FIELDS]


LOSSES = ("ppo", "gspo", "cispo", "reinforce", "gpg", "sapo", "clip_cov", "kl_cov", "geo_mean", "dppo_tv",
          "dppo_kl", "dro")
# verl clamps the log-ratio before exp for these losses; the others use it raw.
_CLAMPED = ("ppo", "cispo", "sapo", "dppo_tv", "dppo_kl")
_LOG_RATIO_BOUND = 20.0
_GSPO_LOG_RATIO_MAX = 10.0
_K3_BOUND = 10.0
# verl's masked_mean denominator: sum(mask) + 1e-8.
_MEAN_EPS = 1e-8


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def masked_mean(values: Tensor, mask: Tensor, dim=None) -> Tensor:
    m = mask.to(values.dtype)
    kept = torch.where(m != 0, values, torch.zeros((), dtype=values.dtype, device=values.device)) * m
    total = kept.sum() if dim is None else kept.sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / (count + _MEAN_EPS)


def _safe_div(num: Tensor, den) -> Tensor:
    """num / den, with 0 where den == 0 (an empty mask gives loss 0 and zero gradient)."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den == 0, torch.ones_like(den), den)


def aggregate(values: Tensor, mask: Tensor, agg: str, *, dp_size: int = 1, global_tokens=None, global_seqs=None,
              loss_scale_factor=None) -> Tensor:
    """verl's agg_loss on [B, T]: masked values reduced to a scalar (0 for an empty mask)."""
    m = mask.to(values.dtype)
    kept = torch.where(m != 0, values, torch.zeros((), dtype=values.dtype, device=values.device)) * m
    if agg == "token-mean":
        return _safe_div(kept.sum(), m.sum() if global_tokens is None else global_tokens) * dp_size
    if agg == "token-sum":
        return kept.sum() * dp_size
    counts = m.sum(-1)
    per_seq = kept.sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / (counts + _MEAN_EPS)
    elif agg not in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    live = (counts > 0).to(values.dtype)
    out = _safe_div((per_seq * live).sum(), live.sum() if global_seqs is None else global_seqs) * dp_size
    if agg == "seq-mean-token-sum-norm":
        out = out / (values.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return out


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate; a trailing '+' keeps the value and takes k2's gradient."""
    straight_through = estimator.endswith("+")
    base = estimator[:-1] if straight_through else estimator
    diff = logprobs - ref_logprobs
    if base in ("k1", "kl"):
        value = diff
    elif base == "abs":
        value = diff.abs()
    elif base in ("k2", "mse"):
        value = 0.5 * diff.square()
    elif base in ("k3", "low_var_kl"):
        x = torch.clamp(-diff, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        value = torch.clamp(torch.exp(x) - x - 1, -_K3_BOUND, _K3_BOUND)
    elif base == "k3_unclamped":  # TRL 1.16's beta term: k3 without verl's bounds
        value = torch.exp(-diff) + diff - 1
    else:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS} (optionally with '+'), got {estimator!r}")
    if not straight_through:
        return value
    surrogate = 0.5 * diff.square()
    return surrogate - surrogate.detach() + value.detach()


def clip_cov_select(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio, lower, upper) -> Tensor:
    """verl's Clip-Cov token choice: 1 at the tokens whose gradient is dropped, else 0.

    Candidates are unclipped tokens whose centred covariance (A - mean A)(logp - mean logp) lies
    in (lower, upper); ``max(int(ratio * n_tokens), 1)`` of them are drawn by ``torch.randperm``
    on the default CPU generator, as verl draws them (seed it to reproduce verl's choice).
    """
    with torch.no_grad():
        lp, adv = logprobs.detach(), advantages.expand_as(logprobs)
        r = torch.exp(lp - old_logprobs)
        live = mask != 0
        l1, l2 = -adv * r, -adv * torch.clamp(r, 1 - clip_low, 1 + clip_high)
        cov = (adv - masked_mean(adv, mask)) * (lp - masked_mean(lp, mask))
        cov = cov.masked_fill(~live | ((l2 > l1) & live), -math.inf)
        n_pick = max(int(ratio * float(mask.sum())), 1)
        where = torch.nonzero((cov < upper) & (cov > lower) & live)
        select = torch.zeros_like(lp)
        if len(where):
            where = where[torch.randperm(len(where))[: min(n_pick, len(where))]]
            select[where[:, 0], where[:, 1]] = 1.0
    return select


def kl_cov_select(logprobs, advantages, mask, ratio) -> Tensor:
    """verl's KL-Cov token choice: 1 at the top ``max(1, int(ratio * n))`` covariance tokens."""
    with torch.no_grad():
        live = mask != 0
        adv = advantages.expand_as(logprobs)
        flat_idx = torch.nonzero(live.reshape(-1), as_tuple=True)[0]
        select = torch.zeros_like(logprobs, dtype=compute_dtype(logprobs)).reshape(-1)
        a, lp = adv[live].detach().reshape(-1), logprobs[live].detach().reshape(-1)
        if len(a):
            cov = (a - a.mean()) * (lp - lp.mean())
            top = torch.topk(cov, max(1, int(len(cov) * ratio)), largest=True).indices
            select[flat_idx[top]] = 1.0
    return select.view(logprobs.shape)


def _ppo_clip(adv, r, clip_low, clip_high):
    l1 = -adv * r
    l2 = -adv * torch.clamp(r, 1 - clip_low, 1 + clip_high)
    return l1, l2, torch.maximum(l1, l2)


def _token_terms(loss, lp, old, adv, mask, h, select, is_weights, level):
    """Per-token policy loss ([B, T], or [B] for geo_mean) and per-token metric values."""
    lo, hi = h["clip_low"], h["clip_high"]
    lr = lp - old
    zero = torch.zeros_like(lp)
    out = {"cf": zero, "lo": zero, "hi": zero, "dcf": zero}
    if level == "sequence":  # TRL importance_sampling_level="sequence": the mean carries gradient
        lr = (lr * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        lr = lr.expand_as(lp)
    lrc = torch.clamp(lr, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND) if (loss in _CLAMPED and level == "token") else lr
    out["akl"] = -lrc
    r = torch.exp(lrc)
    if loss in ("ppo", "clip_cov"):
        l1, l2, tok = _ppo_clip(adv, r, lo, hi)
        out["cf"], out["lo"], out["hi"] = (l2 > l1), (l2 > l1) & (adv < 0), (l2 > l1) & (adv > 0)
        if loss == "ppo" and h["dual_clip"] is not None:
            l3 = -adv * h["dual_clip"]
            out["dcf"] = (tok > l3) & (adv < 0)
            tok = torch.where(adv < 0, torch.minimum(l3, tok), tok)
        if loss == "clip_cov":
            tok = tok * (1 - select)
            out["cf"] = select
    elif loss == "gspo":
        seq = (lr * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        r = torch.exp(torch.clamp(lp - lp.detach() + seq.detach(), max=_GSPO_LOG_RATIO_MAX))
        l1, l2, tok = _ppo_clip(adv, r, lo, hi)
        out["cf"], out["lo"], out["hi"] = (l2 > l1), (l2 > l1) & (adv < 0), (l2 > l1) & (adv > 0)
    elif loss == "cispo":
        cr = torch.clamp(r, 1 - lo, 1 + hi)
        tok = -cr.detach() * adv * lp
        # verl's pg_clipfrac counts either side; the halves are the clip against A's sign (TRL's
        # cispo_clip_ratio is the A > 0 half)
        out["cf"], out["lo"], out["hi"] = r != cr, (r < 1 - lo) & (adv < 0), (r > 1 + hi) & (adv > 0)
    elif loss in ("reinforce", "gpg"):
        tok = -adv * lp
    elif loss == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, h["tau_pos"]), torch.full_like(adv, h["tau_neg"]))
        tok = -torch.sigmoid(tau * (r - 1.0)) * (4.0 / tau) * adv
    elif loss == "kl_cov":
        tok = -adv * r + select * (h["ppo_kl_coef"] * lr.abs())
        out["akl"] = lr.abs()
    elif loss == "geo_mean":
        sgn = torch.sign(adv)
        lr_clip = torch.clamp(lr, -lo, hi)
        lr_min = sgn * torch.minimum(sgn * lr, sgn * lr_clip)
        n = mask.sum(-1)
        seq_ratio = torch.exp((lr_min * mask).sum(-1) / (n + _MEAN_EPS))
        seq_adv = (adv * mask).sum(-1) / (n + _MEAN_EPS)
        tok = -seq_adv * seq_ratio
        if is_weights is not None:
            tok = tok * torch.exp((torch.log(is_weights + 1e-10) * mask).sum(-1) / (n + _MEAN_EPS))
        clipped = lr != lr_clip
        out["cf"] = out["hi"] = clipped & (adv > 0)
        out["lo"] = out["dcf"] = clipped & (adv < 0)
        r = torch.exp(lr)
    elif loss in ("dppo_tv", "dppo_kl"):
        cap = math.inf if h["dual_clip"] is None else h["dual_clip"]
        trunc = torch.clamp(r, max=cap).detach()
        p, p_old = torch.exp(lp), torch.exp(old)
        if loss == "dppo_tv":
            up_ok, down_ok = (p - p_old) <= hi, (p - p_old) >= -lo
        else:
            bkl = p_old * (old - lp) + (1 - p_old) * torch.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            up_ok, down_ok = (bkl <= hi) | (p <= p_old), (bkl <= lo) | (p >= p_old)
        valid = torch.where(adv > 0, up_ok, down_ok).detach().to(lp.dtype)
        tok = -adv * trunc * lp * valid
        out["cf"] = 1.0 - valid
        out["lo"] = (1.0 - valid) * (adv <= 0)
        out["hi"] = (1.0 - valid) * (adv > 0)
        out["dcf"] = (r > cap) * valid
    elif loss == "dro":
        tok = -(lp * adv - 0.5 * h["dro_beta"] * lr.square())
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if is_weights is not None and loss != "geo_mean":
        tok = tok * is_weights
    out["ratio"] = r
    out["lr"] = lr  # unclamped (the sequence mean at level="sequence"): kl_bias_correction weighs KL by e^lr
    return tok, out


def policy_loss(
    logprobs: Tensor,  # [B, T]
    old_logprobs: Tensor,  # [B, T]
    advantages: Tensor,  # [B, T] or [B]
    mask: Tensor,  # [B, T] bool/int/float
    *,
    loss: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    level: str = "token",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    agg: str = "token-mean",
    entropy_agg: str | None = None,
    global_tokens=None,
    global_seqs=None,
    dp_size: int = 1,
    loss_scale_factor=None,
    is_weights: Tensor | None = None,
    select: Tensor | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: float | None = None,
    ppo_kl_coef: float = 0.1,
    kl_bias_correction: bool = False,
) -> tuple[Tensor, Tensor]:
    """Returns ``(loss [], metrics [8])`` in the compute dtype; metrics follow METRIC_KEYS.

    ``kl_bias_correction``: the KL estimate is multiplied by the importance ratio exp(lr), unclamped (at
    level="sequence" exp of the sequence mean log-ratio), with the gradient through the ratio:
    TRL 1.16's ``use_bias_correction_kl``. The ``kl_ref`` metric is then the corrected value."""
    cdt = compute_dtype(logprobs)
    lp = logprobs.to(cdt)
    old = old_logprobs.to(cdt)
    adv = advantages.to(cdt)
    if adv.ndim == 1:
        adv = adv[:, None]
    m = mask.to(cdt)
    h = {"clip_low": clip_low, "clip_high": clip_low if clip_high is None else clip_high, "dual_clip": dual_clip,
         "tau_pos": tau_pos, "tau_neg": tau_neg, "dro_beta": dro_beta, "ppo_kl_coef": ppo_kl_coef}
    w = None if is_weights is None else is_weights.to(cdt).detach()
    sel = None if select is None else select.to(cdt)
    tok, terms = _token_terms(loss, lp, old, adv.expand_as(lp) if loss != "geo_mean" else adv.expand_as(lp),
                              m, h, sel, w, level)
    norms = {"dp_size": dp_size, "global_tokens": global_tokens, "global_seqs": global_seqs,
             "loss_scale_factor": loss_scale_factor}
    if loss == "geo_mean":  # verl: a plain mean over the B rows, whatever the agg mode (B = 0: 0)
        total = tok.sum() / max(tok.numel(), 1)
    else:
        total = aggregate(tok, m, agg, **norms)
    kl_mean = torch.zeros((), dtype=cdt, device=lp.device)
    if ref_logprobs is not None:
        kld = kl_penalty(lp, ref_logprobs.to(cdt), kl_estimator)
        if kl_bias_correction:
            kld = kld * torch.exp(terms["lr"])
        if kl_coef != 0:
            total = total + kl_coef * aggregate(kld, m, agg, **norms)
        kl_mean = masked_mean(kld.detach(), m)
    ent_mean = torch.zeros((), dtype=cdt, device=lp.device)
    if entropy is not None:
        ent = entropy.to(cdt)
        if entropy_coef != 0:
            ent_norms = norms if entropy_agg is None else {"loss_scale_factor": loss_scale_factor}
            total = total - entropy_coef * aggregate(ent, m, entropy_agg or agg, **ent_norms)
        ent_mean = masked_mean(ent.detach(), m)
    stats = [terms[k] for k in ("cf", "lo", "hi", "dcf", "akl", "ratio")]
    metrics = [masked_mean(torch.as_tensor(s).to(cdt).detach().expand_as(lp), m) for s in stats]
    metrics = torch.stack(metrics + [kl_mean, ent_mean])
    return total, metrics


def sequence_sums(logprobs, old_logprobs, advantages, mask, *, loss="ppo", clip_low=0.2, clip_high=None,
                  dual_clip=None, level="token", tau_pos=1.0, tau_neg=1.05, dro_beta=None, ppo_kl_coef=0.1,
                  select=None) -> Tensor:
    """Per-sequence masked sums ``[B, 4]`` of (mask, clipfrac, clipfrac_low, clipfrac_high): the
    kernels' stats columns count / clipfrac / clipfrac_low / clipfrac_high."""
    cdt = compute_dtype(logprobs)
    lp, old, m = logprobs.to(cdt), old_logprobs.to(cdt), mask.to(cdt)
    adv = advantages.to(cdt)
    adv = (adv[:, None] if adv.ndim == 1 else adv).expand_as(lp)
    h = {"clip_low": clip_low, "clip_high": clip_low if clip_high is None else clip_high, "dual_clip": dual_clip,
         "tau_pos": tau_pos, "tau_neg": tau_neg, "dro_beta": dro_beta, "ppo_kl_coef": ppo_kl_coef}
    with torch.no_grad():
        _, terms = _token_terms(loss, lp, old, adv, m, h, None if select is None else select.to(cdt), None, level)
        cols = [torch.ones_like(lp)] + [torch.as_tensor(terms[k]).to(cdt).expand_as(lp) for k in ("cf", "lo", "hi")]
        kept = [torch.where(m != 0, c, torch.zeros_like(c)) * m for c in cols]
    return torch.stack([k.sum(-1) for k in kept], -1)


SEQUENCE_METRIC_KEYS = ("clipfrac_low_min", "clipfrac_high_max", "seq_clipfrac", "seq_clipfrac_low",
                        "seq_clipfrac_high")


def sequence_metrics(sums: Tensor) -> Tensor:
    """From per-sequence sums ``[B, 4]`` (mask, clipfrac, low, high): the SEQUENCE_METRIC_KEYS.

    Each sequence's fraction is its masked mean; ``*_min`` / ``*_max`` run over the sequences with
    a token (TRL's ``clip_ratio/low_min`` / ``high_max``: nanmin / nanmax of the per-sequence
    means), ``seq_*`` are plain means over all B rows, an empty row counting 0 (TRL's clip metrics
    at importance_sampling_level="sequence"). 0 where there is no sequence with a token."""
    count = sums[:, 0]
    live = count > 0
    frac = sums[:, 1:] / torch.where(live, count, torch.ones_like(count))[:, None]
    frac = torch.where(live[:, None], frac, torch.zeros_like(frac))
    any_live = live.any()
    inf = torch.full_like(frac[:, 1], math.inf)
    low_min = torch.where(live, frac[:, 1], inf).amin() if count.numel() else count.new_zeros(())
    high_max = torch.where(live, frac[:, 2], -inf).amax() if count.numel() else count.new_zeros(())
    zero = count.new_zeros(())
    low_min, high_max = torch.where(any_live, low_min, zero), torch.where(any_live, high_max, zero)
    means = frac.sum(0) / max(count.numel(), 1)
    return torch.stack([low_min, high_max, means[0], means[1], means[2]])


def value_loss(vpreds, returns, values, mask, cliprange_value, agg="token-mean", **norms):
    """verl / OpenRLHF clipped value loss: 0.5 * agg(max((v - R)^2, (clip(v) - R)^2)) and clipfrac."""
    cdt = compute_dtype(vpreds)
    v, ret, old = vpreds.to(cdt), returns.to(cdt), values.to(cdt)
    clipped = torch.maximum(torch.minimum(v, old + cliprange_value), old - cliprange_value)
    l1, l2 = (v - ret).square(), (clipped - ret).square()
    loss = 0.5 * aggregate(torch.maximum(l1, l2), mask, agg, **norms)
    return loss, masked_mean((l2 > l1).to(cdt), mask)


# --- rollout / training mismatch correction (verl 0.9.1 rollout_corr_helper semantics) -----------

RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def parse_is_threshold(spec) -> tuple[float, float | None]:
    """A number (TIS: truncate above) or ``(lower, upper)`` / verl's ``"lower_upper"`` (IcePop)."""
    if isinstance(spec, bool):
        raise TypeError("rollout_is_threshold must be a number, a (lower, upper) pair or 'lower_upper'")
    if isinstance(spec, str):
        parts = spec.strip().split("_", 1)
        spec = tuple(float(p) for p in parts) if len(parts) == 2 else float(parts[0])
    if isinstance(spec, (tuple, list)):
        lower, upper = float(spec[0]), float(spec[1])
        if not 0 < lower <= upper:
            raise ValueError(f"rollout_is_threshold (lower, upper) must satisfy 0 < lower <= upper, got {spec}")
        return upper, lower
    if not float(spec) > 0:
        raise ValueError(f"rollout_is_threshold must be > 0, got {spec}")
    return float(spec), None


def parse_rs(options: str, spec) -> list[tuple[str, float | None, float]]:
    """verl's rollout_rs / rollout_rs_threshold -> [(option, lower bound or None, upper bound)].

    k1 options compare the log-ratio statistic with log(lower), log(upper) (``"lower_upper"`` or an
    upper bound u with lower 1/u); the others compare with a single upper bound.
    """
    names = []
    for name in (o.strip() for o in options.split(",")):
        if name and name not in names:
            if name not in RS_OPTIONS:
                raise ValueError(f"rollout_rs option must be one of {RS_OPTIONS}, got {name!r}")
            names.append(name)
    if not names:
        raise ValueError("rollout_rs must name at least one option")
    if spec is None:
        raise ValueError("rollout_rs_threshold is required with rollout_rs")
    specs = [str(spec)] if isinstance(spec, (int, float)) else [s.strip() for s in str(spec).split(",") if s.strip()]
    if len(specs) == 1:
        specs = specs * len(names)
    if len(specs) != len(names):
        raise ValueError(f"rollout_rs_threshold needs 1 or {len(names)} thresholds, got {len(specs)}")
    out = []
    for name, s in zip(names, specs):
        if name.endswith("k1"):
            lo, hi = (float(x) for x in s.split("_", 1)) if "_" in s else (1.0 / float(s), float(s))
            if not 0 < lo <= hi:
                raise ValueError(f"rollout_rs_threshold for {name} must be 0 < lower <= upper, got {s!r}")
            out.append((name, math.log(lo), math.log(hi)))
        else:
            if "_" in s or not float(s) > 0:
                raise ValueError(f"rollout_rs_threshold for {name} must be one positive upper bound, got {s!r}")
            out.append((name, None, float(s)))
    return out


class PaddedRows:
    """The sequences of a padded ``[B, T]`` layout for ``rollout_correction``: per-sequence sums and
    maxima ``[B]`` and their broadcast back to the tokens (rlkern.ops has the packed twin)."""

    @staticmethod
    def sum(x: Tensor) -> Tensor:
        return x.sum(-1)

    @staticmethod
    def amax(x: Tensor) -> Tensor:
        if x.shape[-1] == 0:  # T = 0: no token, the maximum of nothing
            return x.new_full(x.shape[:-1], -math.inf)
        return x.amax(-1)

    @staticmethod
    def spread(per_seq: Tensor) -> Tensor:
        return per_seq[:, None]


def rollout_correction(trained, rollout, mask, rollout_is, is_threshold, batch_normalize, rollout_rs, rs_threshold,
                       rows=PaddedRows):
    """IS weights (TIS / IcePop, token or sequence level) and the rejection-sampled mask.

    ``trained`` are the training engine's log-probs, ``rollout`` the inference engine's; both are
    treated as constants. ``rows`` gives the layout's per-sequence reductions (``PaddedRows`` for
    ``[B, T]``). ``mask`` None: every token counts. Returns ``(weights or None, mask)``, both of
    the tokens' shape (mask keeps its dtype; None stays None without ``rollout_rs``).
    """
    with torch.no_grad():
        cdt = compute_dtype(trained)
        lr = trained.to(cdt) - rollout.to(cdt)
        m = torch.ones_like(lr) if mask is None else mask.to(cdt)

        def seq_sum(x):  # masked sum per sequence, [B]
            return rows.sum(torch.where(m != 0, x, torch.zeros_like(x)) * m)

        counts = rows.sum(m)
        weights = None
        if rollout_is is not None:
            if rollout_is not in ("token", "sequence"):
                raise ValueError(f"rollout_is must be 'token' or 'sequence', got {rollout_is!r}")
            upper, lower = parse_is_threshold(is_threshold)
            log_ratio = lr if rollout_is == "token" else rows.spread(seq_sum(lr))
            raw = torch.exp(torch.clamp(log_ratio, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)) * m
            if lower is None:
                weights = raw.clamp(max=upper)
            else:
                weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
            if batch_normalize:
                if rollout_is == "token":
                    mean = masked_mean(weights, m)
                else:
                    live = (counts > 0).to(cdt)
                    mean = (seq_sum(weights) / (counts + _MEAN_EPS) * live).sum() / live.sum().clamp_min(1e-8)
                weights = torch.where(mean > 1e-8, weights / torch.where(mean > 1e-8, mean, 1.0), weights)
        if rollout_rs is not None:
            lrs = torch.clamp(lr, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
            stats = {"k1": -lrs, "k2": 0.5 * lrs.square(), "k3": torch.exp(lrs) - 1.0 - lrs}
            keep = torch.ones_like(lr)
            for name, lower, upper in parse_rs(rollout_rs, rs_threshold):
                stat = stats[name[-2:]]
                if name.startswith("seq_sum"):
                    stat = rows.spread(seq_sum(stat))
                elif name.startswith("seq_mean"):
                    stat = rows.spread(seq_sum(stat) / (counts + _MEAN_EPS))
                elif name.startswith("seq_max"):
                    peak = rows.amax(stat.masked_fill(m == 0, -math.inf))
                    stat = rows.spread(torch.where(torch.isneginf(peak), torch.zeros_like(peak), peak))
                ok = stat <= upper if lower is None else (stat >= lower) & (stat <= upper)
                keep = keep * ok.to(cdt)
            mask = m * keep if mask is None else (m * keep).to(mask.dtype)
    return weights, mask


def off_policy_mask(trained, behaviour, advantages, mask, threshold, rows=PaddedRows):
    """DeepSeek-V3.2's off-policy sequence mask (TRL 1.16 ``off_policy_mask_threshold``): 0 on the
    tokens of a sequence whose mean KL(behaviour || trained) estimate, mean of ``behaviour -
    trained`` over its tokens (NaN counted 0, denominator ``max(sum m, 1)``), exceeds
    ``threshold`` where the token's advantage is negative; else 1. Both log-probs are constants.
    ``advantages``: per token (the tokens' shape) or ``[B]``. Returns the weights, tokens' shape."""
    with torch.no_grad():
        cdt = compute_dtype(trained)
        diff = torch.nan_to_num(behaviour.to(cdt) - trained.to(cdt), nan=0.0)
        m = torch.ones_like(diff) if mask is None else mask.to(cdt)
        total = rows.sum(torch.where(m != 0, diff, torch.zeros_like(diff)) * m)
        mean_kl = total / rows.sum(m).clamp(min=1.0)
        adv = advantages.to(cdt)
        adv = rows.spread(adv) if adv.shape != diff.shape else adv
        keep = (adv >= 0) | (rows.spread(mean_kl) <= threshold)
    return keep.expand_as(diff).to(cdt).contiguous()


# --- OpenRLHF 0.11.2 train/rollout correction (PolicyLoss is_correction_*) ------------------------

OPENRLHF_LEVELS = ("token", "seq")
OPENRLHF_MODES = ("mask", "clip")
OPENRLHF_GATINGS = ("ratio", "binary_kl", "tv")


def openrlhf_is_weights(trained, rollout, mask, level, mode, gating, threshold, rows=PaddedRows):
    """OpenRLHF's correction coefficient per token and its filter fraction.

    A gate reads a statistic per unit (a token, or a sequence's masked mean: the ratio's geometric
    mean, a divergence's mean) and compares it with ``threshold = (low, high)``. ``mode="mask"``:
    a unit outside the band gets 0, a survivor its token's IS ratio exp(trained - rollout);
    ``"clip"`` (token ratio only): the ratio clamped into the band. The coefficient multiplies the
    per-token loss, so rejected tokens stay in the aggregation's normalizer (OpenRLHF), unlike
    verl's rejection sampling which takes them out of the mask. Divergences (rollout p, trained q,
    both clamped to [1e-6, 1 - 1e-6]): binary_kl = p log(p/q) + (1-p) log((1-p)/(1-q)), tv = |p - q|.
    A sequence without tokens has a NaN statistic (OpenRLHF's 0/0) and counts as filtered.
    Returns ``(coef like trained, filtered fraction 0-dim)``: the fraction is over sequences at
    level "seq", over masked tokens at level "token" (0 for an empty mask, where OpenRLHF's is NaN).
    """
    low, high = float(threshold[0]), float(threshold[1])
    with torch.no_grad():
        cdt = compute_dtype(trained)
        lr = trained.to(cdt) - rollout.to(cdt)
        m = torch.ones_like(lr) if mask is None else mask.to(cdt)
        seq = level == "seq"

        def seq_mean(x):  # OpenRLHF's masked_mean over a row: sum(x m) / sum(m), NaN for an empty row
            return rows.spread(rows.sum(torch.where(m != 0, x, torch.zeros_like(x)) * m) / rows.sum(m))

        token_is = torch.exp(lr)
        if gating == "ratio":
            stat = torch.exp(seq_mean(lr)) if seq else token_is
        else:
            p = torch.exp(rollout.to(cdt)).clamp(1e-6, 1 - 1e-6)
            q = torch.exp(trained.to(cdt)).clamp(1e-6, 1 - 1e-6)
            div = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q)) if gating == "binary_kl" \
                else (p - q).abs()
            stat = seq_mean(div) if seq else div
        if mode == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, torch.zeros_like(token_is))
            filtered = ~keep
        filtered = filtered.to(cdt)
        if seq:  # one value per sequence (spread values are equal within a row; a row without tokens: 1)
            per_seq = rows.amax(filtered)
            per_seq = torch.where(torch.isneginf(per_seq), torch.ones_like(per_seq), per_seq)
            n_seqs = per_seq.numel()
            frac = per_seq.sum() / n_seqs if n_seqs else per_seq.sum()
        else:
            total = m.sum()
            frac = torch.where(total > 0, (filtered * m).sum() / torch.where(total > 0, total, 1.0), 0.0)
    return coef, frac
