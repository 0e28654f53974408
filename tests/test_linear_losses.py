"""linear_policy_loss vs the float64 composition (materialized logits -> log-probs -> policy_loss),
rlkern's own linear_token_logprobs + policy_loss composition, Liger 0.8.5's
LigerFusedLinearGRPOLoss, and its contract (gradient formed in the forward, bad calls)."""

import pytest
import torch
from conftest import assert_as_close_as_torch, import_peer

import rlkern
from rlkern.ops import linear_losses
from rlkern.ops.policy_loss import METRIC_KEYS
from rlkern.reference.linear_losses import linear_policy_loss as reference

B, T, H, V = 3, 7, 12, 101  # N = 21 tokens: no multiple of the chunk sizes below


def _inputs(dtype=torch.float64, *, seed=0, packed=False, per_token_adv=False, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H**0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False  # an empty row
    mask[0, 0] = True
    if ignore:
        labels[2, 6] = -100
        mask[2, 6] = False
    # old / ref log-probs near the new ones, so that ratios clip on both sides
    with torch.no_grad():
        logits = hidden @ weight.T + bias
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token_adv else torch.randn(B, generator=g,
                                                                                                dtype=torch.float64)
    t = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=bias.to(dtype), labels=labels, old=old.float() if
             dtype != torch.float64 else old, adv=adv, mask=mask, ref=ref.float() if dtype != torch.float64 else ref)
    if packed:  # the valid prefix of each row, concatenated (lengths 5, 0, 7)
        lengths = [5, 0, 7]
        keep = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(lengths):
            keep[b, :n] = True
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        t["hidden"] = t["hidden"][keep]
        for key in ("labels", "old", "mask", "ref"):
            t[key] = t[key][keep]
        if per_token_adv:
            t["adv"] = t["adv"][keep]
        t["cu_seqlens"] = cu
    return t


def _ours(t, *, bias=True, grad_scale=1.0, **kw):
    leaves = [t["hidden"].detach().clone().requires_grad_(), t["weight"].detach().clone().requires_grad_()]
    if bias:
        leaves.append(t["bias"].detach().clone().requires_grad_())
    loss, metrics = rlkern.linear_policy_loss(
        leaves[0], leaves[1], t["labels"], t["old"], t["adv"], t["mask"], bias=leaves[2] if bias else None,
        ref_logprobs=t["ref"], cu_seqlens=t.get("cu_seqlens"), **kw)
    (loss * grad_scale).backward()
    return loss, metrics, [x.grad for x in leaves]


_REFERENCE_ONLY = ("chunk_size", "deterministic", "advantages_per_sequence")


def _reference(t, *, bias=True, **kw):
    leaves = [t["hidden"].detach().double().requires_grad_(), t["weight"].detach().double().requires_grad_()]
    if bias:
        leaves.append(t["bias"].detach().double().requires_grad_())
    kw = {k: v for k, v in kw.items() if k not in _REFERENCE_ONLY}
    for name in ("temperature", "logit_scale", "logit_softcap"):
        kw.setdefault(name, {"temperature": 1.0, "logit_scale": 1.0, "logit_softcap": None}[name])
    agg = kw.pop("agg", "token-mean")
    presets = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
               "dr_grpo": "seq-mean-token-sum-norm"}
    if agg in ("grpo", "dr_grpo"):
        kw.setdefault("global_seqs", B)
    if "is_weights" in kw:
        kw["is_weights"] = kw["is_weights"]
    loss, metrics = reference(leaves[0], leaves[1], leaves[2] if bias else None, t["labels"], t["old"], t["adv"],
                              t["mask"], ref_logprobs=t["ref"], cu_seqlens=t.get("cu_seqlens"),
                              agg=presets.get(agg, agg), **kw)
    loss.backward()
    return loss, metrics, [x.grad for x in leaves]


CASES = [
    dict(loss="ppo", chunk_size=4),
    dict(loss="ppo", clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
         agg="seq-mean-token-mean", temperature=0.7, logit_softcap=5.0, logit_scale=1.3, chunk_size=5),
    dict(loss="cispo", clip_low=1.0, clip_high=0.2, agg="grpo", kl_coef=0.05, kl_estimator="k3_unclamped",
         kl_bias_correction=True),
    dict(loss="sapo", agg="dr_grpo", loss_scale_factor=9.0, chunk_size=8),
    dict(loss="dro", dro_beta=0.5, agg="seq-mean-token-sum", entropy_coef=0.2, entropy_agg="token-mean",
         chunk_size=3),
    dict(loss="dppo_tv", dual_clip=2.0, agg="token-sum", kl_coef=0.2, kl_estimator="k2"),
    dict(loss="dppo_kl", agg="seq-mean-token-sum-norm", entropy_coef=0.1, entropy_agg="seq-mean-token-mean"),
    dict(loss="reinforce", agg="token-mean", global_tokens=40.0, dp_size=2, kl_coef=0.3, kl_estimator="abs"),
    dict(loss="gpg", agg="seq-mean-token-mean", global_seqs=4, dp_size=2, chunk_size=2),
    # the losses that need whole sequences: two passes
    dict(loss="gspo", clip_low=3e-4, clip_high=4e-4, kl_coef=0.1, entropy_coef=0.05, chunk_size=4),
    dict(loss="geo_mean", clip_low=0.2, chunk_size=6),
    dict(loss="ppo", level="sequence", kl_coef=0.1, kl_estimator="k3+", kl_bias_correction=True, chunk_size=4),
    dict(loss="sapo", level="sequence", agg="grpo", entropy_coef=0.1),
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items() if k in ("loss", "agg", "level"))


def _assert_matches(ours, ref, *, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=rtol, atol=atol)
    for key, value in zip(METRIC_KEYS, ref[1]):
        torch.testing.assert_close(ours[1][key].double(), value.float().double(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
    for name, a, b in zip(("hidden", "weight", "bias"), ours[2], ref[2]):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"d {name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_the_float64_reference(case, backend):
    t = _inputs()
    _assert_matches(_ours(t, **case), _reference(t, **case))


@pytest.mark.parametrize("case", [
    dict(loss="ppo", chunk_size=4, kl_coef=0.1, entropy_coef=0.1),
    dict(loss="cispo", clip_low=1.0, agg="seq-mean-token-mean", chunk_size=3),
    dict(loss="gspo", chunk_size=5),
], ids=_case_id)
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_packed_matches_the_float64_reference(case, per_token_adv):
    t = _inputs(packed=True, per_token_adv=per_token_adv)
    _assert_matches(_ours(t, **case), _reference(t, **case))


def test_packed_without_a_mask_counts_every_token():
    t = _inputs(packed=True, ignore=False)
    t["mask"] = None
    _assert_matches(_ours(t, loss="ppo", chunk_size=4, agg="seq-mean-token-mean"),
                    _reference(t, loss="ppo", agg="seq-mean-token-mean"))


def test_float_mask_weights_tokens_as_policy_loss_does():
    t = _inputs()
    t["mask"] = t["mask"] * torch.rand(B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for agg in ("token-mean", "seq-mean-token-mean"):
        _assert_matches(_ours(t, chunk_size=4, agg=agg, kl_coef=0.1), _reference(t, agg=agg, kl_coef=0.1))


def test_empty_mask_gives_zero_loss_and_gradient():
    t = _inputs()
    t["mask"] = torch.zeros(B, T, dtype=torch.bool)
    for loss in ("ppo", "gspo"):
        value, metrics, grads = _ours(t, loss=loss, chunk_size=4, entropy_coef=0.1, kl_coef=0.1)
        assert value.item() == 0.0 and all(g.abs().max().item() == 0.0 for g in grads)
        assert all(m.item() == 0.0 for m in metrics.values())


def _composition(t, **kw):
    """rlkern's own linear_token_logprobs + policy_loss (the same options)."""
    kw = dict(kw)
    head = {k: kw.pop(k) for k in ("temperature", "logit_scale", "logit_softcap", "chunk_size", "logits_dtype") if k in kw}
    leaves = [t["hidden"].detach().clone().requires_grad_(), t["weight"].detach().clone().requires_grad_(),
              t["bias"].detach().clone().requires_grad_()]
    out = rlkern.linear_token_logprobs(leaves[0], leaves[1], t["labels"], bias=leaves[2], return_entropy=True, **head)
    loss, metrics = rlkern.policy_loss(out.logprobs, t["old"], t["adv"], t["mask"], entropy=out.entropy,
                                       ref_logprobs=t["ref"], cu_seqlens=t.get("cu_seqlens"), **kw)
    loss.backward()
    return loss, metrics, [x.grad for x in leaves]


@pytest.mark.parametrize("case", [
    dict(loss="clip_cov", clip_cov_ratio=0.2, kl_coef=0.1),
    dict(loss="kl_cov", kl_cov_ratio=0.2),
    dict(loss="bypass_mode", bypass_loss="reinforce", rollout_is="token", rollout_is_threshold=1.5,
         rollout_rs="token_k1", rollout_rs_threshold=2.0, use_rollout=True),
    dict(loss="ppo", rollout_is="sequence", use_rollout=True, rollout_is_batch_normalize=True),
    dict(loss="ppo", off_policy_mask_threshold=0.05, agg="grpo"),
    dict(loss="ppo", sequence_metrics=True, dual_clip=3.0),
    dict(loss="ppo", is_weights=True, agg="bnpo", temperature=1.3),
], ids=lambda c: "-".join(str(v) for k, v in c.items() if k in ("loss", "rollout_is", "agg") or k.startswith("off")
                          or k == "sequence_metrics"))
def test_matches_rlkerns_composition_with_every_correction(case):
    case = dict(case)
    t = _inputs(torch.float32)
    g = torch.Generator().manual_seed(5)
    if case.pop("use_rollout", False):
        case["rollout_logprobs"] = t["old"] + 0.2 * torch.randn(B, T, generator=g)
    if case.pop("is_weights", False):
        case["is_weights"] = torch.rand(B, T, generator=g) + 0.5
    torch.manual_seed(0)  # clip_cov draws tokens at random: the same draw in both
    ours = _ours(t, chunk_size=4, **case)
    torch.manual_seed(0)
    comp = _composition(t, chunk_size=4, **case)
    assert set(ours[1]) == set(comp[1])
    torch.testing.assert_close(ours[0], comp[0], rtol=1e-5, atol=1e-6)
    for key in comp[1]:
        torch.testing.assert_close(ours[1][key], comp[1][key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    for a, b in zip(ours[2], comp[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_path_is_taken_for_token_local_losses(monkeypatch):
    calls = []
    for name in ("_one_pass", "_two_pass"):
        original = getattr(linear_losses, name)
        monkeypatch.setattr(linear_losses, name, lambda *a, _n=name, _f=original: calls.append(_n) or _f(*a))
    t = _inputs(torch.float32)
    _ours(t, loss="ppo", chunk_size=4)
    _ours(t, loss="gspo", chunk_size=4)
    assert calls == ["_one_pass", "_two_pass"]
    assert linear_losses.fused_path("dro") and not linear_losses.fused_path("ppo", level="sequence")


def test_float32_and_bfloat16_are_as_close_as_torch():
    case = dict(loss="ppo", kl_coef=0.1, entropy_coef=0.05, chunk_size=4)
    for dtype in (torch.float32, torch.bfloat16):
        t = _inputs(dtype)
        ours = _ours(t, **case)
        ref = _reference(t, **case)
        # PyTorch's own composition at that dtype: materialized logits, log_softmax, the fp32 loss
        leaves = [t[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        logits = (leaves[0] @ leaves[1].T + leaves[2]).float()
        logp = torch.log_softmax(logits, -1)
        lp = logp.gather(-1, t["labels"].clamp(min=0)[..., None])[..., 0].masked_fill(t["labels"] == -100, 0)
        ent = -(logp.exp() * logp).sum(-1)
        torch_loss, _ = rlkern.policy_loss(lp, t["old"], t["adv"], t["mask"], entropy=ent, ref_logprobs=t["ref"],
                                           loss="ppo", kl_coef=0.1, entropy_coef=0.05)
        torch_loss.backward()
        floor = 1e-6 if dtype == torch.float32 else 1e-3
        assert_as_close_as_torch(ours[0], ref[0], torch_loss, floor=floor, factor=4.0, name=f"{dtype} loss")
        for name, a, b, c in zip(("hidden", "weight", "bias"), ours[2], ref[2], [x.grad for x in leaves]):
            assert a.dtype == dtype
            assert_as_close_as_torch(a, b, c, floor=floor, factor=4.0, name=f"{dtype} d {name}")


def test_backward_scales_the_stored_gradient_and_no_grad_skips_it():
    t = _inputs()
    base = _ours(t, chunk_size=4, kl_coef=0.1)
    scaled = _ours(t, chunk_size=4, kl_coef=0.1, grad_scale=-2.5)
    for a, b in zip(base[2], scaled[2]):
        torch.testing.assert_close(b, -2.5 * a, rtol=1e-12, atol=0)
    with torch.no_grad():
        loss, _ = rlkern.linear_policy_loss(t["hidden"], t["weight"], t["labels"], t["old"], t["adv"], t["mask"],
                                            bias=t["bias"], ref_logprobs=t["ref"], chunk_size=4, kl_coef=0.1)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, base[0].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_deterministic_is_bit_for_bit_with_itself(loss):
    t = _inputs(torch.float32)
    runs = [_ours(t, loss=loss, deterministic=True, chunk_size=c, kl_coef=0.1, entropy_coef=0.1) for c in (3, 3, 8)]
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0])
        assert all(torch.equal(a, b) for a, b in zip(runs[0][2], other[2]))


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_gradient_matches_finite_differences_float64(loss):
    # The op forms its gradient in the forward and hands it to the first backward, so
    # torch.autograd.gradcheck (which reuses one graph) does not apply: a central difference of
    # the loss along random directions against <gradient, direction> instead.
    t = _inputs()
    kw = dict(loss=loss, kl_coef=0.1, entropy_coef=0.1, chunk_size=4)

    def f(h, w, b):
        return rlkern.linear_policy_loss(h, w, t["labels"], t["old"], t["adv"], t["mask"], bias=b,
                                         ref_logprobs=t["ref"], **kw)[0]

    args = [t[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    grads = torch.autograd.grad(f(*args), args)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        u = [torch.randn(a.shape, generator=g, dtype=a.dtype) for a in args]
        eps = 1e-6
        with torch.no_grad():
            plus = f(*[a + eps * d for a, d in zip(args, u)])
            minus = f(*[a - eps * d for a, d in zip(args, u)])
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((gr * d).sum() for gr, d in zip(grads, u))
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_a_second_backward_through_one_call_is_refused():
    t = _inputs()
    h = t["hidden"].clone().requires_grad_()
    loss, _ = rlkern.linear_policy_loss(h, t["weight"], t["labels"], t["old"], t["adv"], t["mask"], chunk_size=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="^linear_policy_loss: a second backward"):
        loss.backward()


# Liger 0.8.5's GRPO loss types as rlkern options: (liger loss_type, rlkern options). Liger's
# epsilon_low / epsilon_high are 0.1 / 0.05, tight enough that ratios clip on both sides here
# (cispo: its cap r <= epsilon_high = 1.05, rlkern's 1 + clip_high).
LIGER_TYPES = [
    ("grpo", dict(agg="grpo")),
    ("bnpo", dict(agg="bnpo")),
    ("dr_grpo", dict(agg="dr_grpo", loss_scale_factor=float(T))),
    ("dapo", dict(agg="dapo", global_tokens="mask sum")),
    ("cispo", dict(loss="cispo", clip_low=1.0, clip_high=0.05, agg="dapo", global_tokens="mask sum")),
    ("sapo", dict(loss="sapo", agg="grpo")),
]


@pytest.mark.parametrize("liger_type,options", LIGER_TYPES, ids=[c[0] for c in LIGER_TYPES])
def test_parity_with_liger_fused_linear_grpo(liger_type, options):
    chunked = import_peer("liger_kernel.chunked_loss")
    t = _inputs(torch.float32, ignore=False)
    mask = t["mask"].clone()
    mask[1, :2] = True  # Liger's grpo divides an empty row by clamp(0, 1): keep every row non-empty here
    t["mask"] = mask
    t["adv"] = torch.tensor([0.8, -0.5, -1.3])  # both signs: each side of the clip matters somewhere
    beta, temp = 0.04, 0.9
    with torch.no_grad():  # old log-probs near the new ones at this temperature
        logits = (t["hidden"].double() @ t["weight"].double().T + t["bias"].double()) / temp
        lp = torch.log_softmax(logits, -1).gather(-1, t["labels"][..., None])[..., 0]
    t["old"] = (lp + 0.2 * torch.randn(B, T, generator=torch.Generator().manual_seed(11))).float()
    options = dict(dict(loss="ppo", clip_low=0.1, clip_high=0.05), **options)
    if options.get("global_tokens") == "mask sum":  # Liger's dapo normalizer without num_items_in_batch
        options["global_tokens"] = float(mask.sum())
    peer = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=True, chunk_size=2,
                                            epsilon_low=0.1, epsilon_high=1.05 if liger_type == "cispo" else 0.05,
                                            loss_type=liger_type, max_completion_length=T, temperature=temp)
    leaves = [t[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    peer_loss, _ = peer(leaves[0], leaves[1], t["labels"], mask.long(), t["adv"], bias=leaves[2],
                        ref_per_token_logps=t["ref"], old_per_token_logps=t["old"])
    peer_loss.backward()
    assert min(_clipped_tokens(t, 0.9, 1.05, temp)) > 0  # each side of the clip acts on some token
    ours = _ours(t, kl_coef=beta, kl_estimator="k3_unclamped", temperature=temp, chunk_size=4, **options)
    torch.testing.assert_close(ours[0], peer_loss.detach(), rtol=2e-5, atol=1e-6)
    for name, a, b in zip(("hidden", "weight", "bias"), ours[2], [x.grad for x in leaves]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"d {name}: {m}")


def _clipped_tokens(t, low, high, temperature):
    """(tokens with r > high and A > 0, tokens with r < low and A < 0): where each side of the clip acts."""
    with torch.no_grad():
        logits = (t["hidden"].double() @ t["weight"].double().T + t["bias"].double()) / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, t["labels"][..., None])[..., 0]
        r = (lp - t["old"].double()).exp()
        adv = t["adv"][:, None].expand_as(r)
    return int(((r > high) & (adv > 0) & t["mask"]).sum()), int(((r < low) & (adv < 0) & t["mask"]).sum())


def _bad(**kw):
    t = _inputs(torch.float32)
    args = dict(hidden=t["hidden"], weight=t["weight"], labels=t["labels"], old=t["old"], adv=t["adv"],
                mask=t["mask"])
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return rlkern.linear_policy_loss(args["hidden"], args["weight"], args["labels"], args["old"], args["adv"],
                                     args["mask"], **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(loss="ppo2"), "loss"),
    (dict(agg="mean"), "agg"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(level="sequence", loss="dro", dro_beta=1.0), "level"),
    (dict(weight=torch.randn(V, H + 1)), "weight"),
    (dict(labels=torch.zeros(B, T + 1, dtype=torch.long)), "labels"),
    (dict(old=torch.zeros(B, T + 1)), "old_logprobs"),
    (dict(hidden=torch.randn(B * T, H)), "hidden"),
    (dict(temperature=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(logits_dtype=torch.int32), "logits_dtype"),
    (dict(deterministic=1), "deterministic"),
    (dict(logprobs=torch.zeros(B, T)), "logprobs"),
    (dict(clip_lo=0.2), "unexpected"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(loss="dro"), "dro_beta"),
    (dict(dp_size=2), "global_tokens"),
    (dict(lora_A=torch.randn(2, H), lora_B=torch.randn(V, 3)), "lora_B must be"),
    (dict(lora_A=torch.randn(2, H)), "lora_A and lora_B go together"),
])
def test_bad_calls_name_the_op_and_the_argument(kw, match):
    with pytest.raises((TypeError, ValueError), match=rf"^linear_policy_loss: .*{match}"):
        _bad(**kw)


@pytest.mark.gpu
def test_cuda_matches_the_composition():
    t = _inputs(torch.bfloat16)
    t = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    for loss in ("ppo", "gspo"):
        ours = _ours(t, loss=loss, kl_coef=0.1, entropy_coef=0.1)
        comp = _composition(t, loss=loss, kl_coef=0.1, entropy_coef=0.1)
        torch.testing.assert_close(ours[0], comp[0], rtol=1e-3, atol=1e-4)
        for a, b in zip(ours[2], comp[2]):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_output_dtypes_follow_the_composition(loss):
    # float32 for float16/bfloat16/float32 heads, float64 for float64; metrics always float32
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                            (torch.float64, torch.float64)):
        t = _inputs(dtype)
        value, metrics, grads = _ours(t, loss=loss, chunk_size=4)
        comp = _composition(t, loss=loss, chunk_size=4)
        assert value.dtype == comp[0].dtype == expected
        assert all(m.dtype == torch.float32 for m in metrics.values())
        assert [g.dtype for g in grads] == [dtype] * 3


def test_runs_under_torch_compile():
    t = _inputs(torch.float32)

    def step(h, w):
        loss, metrics = rlkern.linear_policy_loss(h * 1.0, w, t["labels"], t["old"], t["adv"], t["mask"],
                                                  ref_logprobs=t["ref"], kl_coef=0.1, chunk_size=4)
        return 2 * loss, metrics["clipfrac"]

    results = []
    for fn in (step, torch.compile(step, backend="eager")):
        h, w = t["hidden"].clone().requires_grad_(), t["weight"].clone().requires_grad_()
        loss, clipfrac = fn(h, w)
        loss.backward()
        results.append((loss.detach(), clipfrac, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
@pytest.mark.parametrize("logit_scale", [1.0, 1.3])
def test_rounded_tiles_match_the_composition_and_the_rounding_model(loss, logit_scale, backend):
    # logits_dtype=bf16 (TRL's numerics under autocast): the same roundings as
    # linear_token_logprobs(logits_dtype=bf16), and the float64 model of those roundings
    t = _inputs(torch.float32)
    kw = dict(loss=loss, kl_coef=0.1, entropy_coef=0.05, chunk_size=4, logit_scale=logit_scale,
              logits_dtype=torch.bfloat16)
    ours = _ours(t, **kw)
    comp = _composition(t, **kw)
    torch.testing.assert_close(ours[0], comp[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[2], comp[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    ref = _reference(t, **kw)
    plain = _ours(t, **{k: v for k, v in kw.items() if k != "logits_dtype"})
    # nearer the bf16 rounding model than the fp32 tiles are (the roundings are real)
    assert (ours[0].double() - ref[0]).abs() < (plain[0].double() - ref[0]).abs()
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_a_frozen_head_gets_no_gradient_and_hidden_the_same_one(loss):
    t = _inputs()
    full = _ours(t, loss=loss, chunk_size=4, kl_coef=0.1)
    h = t["hidden"].clone().requires_grad_()
    value, _ = rlkern.linear_policy_loss(h, t["weight"], t["labels"], t["old"], t["adv"], t["mask"], bias=t["bias"],
                                         ref_logprobs=t["ref"], loss=loss, chunk_size=4, kl_coef=0.1)
    value.backward()
    torch.testing.assert_close(h.grad, full[2][0], rtol=1e-12, atol=0)
    assert t["weight"].grad is None and t["bias"].grad is None


# On-policy (old_logprobs=None): old = sg(logprob), ratio 1 in value, d ratio = d logprob.
@pytest.mark.parametrize("case", [
    dict(loss="ppo", kl_coef=0.1, entropy_coef=0.05, agg="grpo", chunk_size=4),
    dict(loss="cispo", clip_low=1.0, clip_high=0.2, agg="dr_grpo", loss_scale_factor=7.0, chunk_size=5),
    dict(loss="gspo", clip_low=3e-4, clip_high=4e-4, chunk_size=4),  # two passes
], ids=_case_id)
def test_on_policy_matches_the_composition_with_detached_old(case, backend):
    t = _inputs(torch.float64)
    leaves = [t[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss, metrics = rlkern.linear_policy_loss(leaves[0], leaves[1], t["labels"], None, t["adv"], t["mask"],
                                              bias=leaves[2], ref_logprobs=t["ref"], **case)
    loss.backward()
    # the composition: linear_token_logprobs -> policy_loss with old = lp.detach()
    kw = dict(case)
    head = {k: kw.pop(k) for k in ("chunk_size",) if k in kw}
    comp = [t[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    out = rlkern.linear_token_logprobs(comp[0], comp[1], t["labels"], bias=comp[2], return_entropy=True, **head)
    comp_loss, comp_metrics = rlkern.policy_loss(out.logprobs, out.logprobs.detach(), t["adv"], t["mask"],
                                                 entropy=out.entropy, ref_logprobs=t["ref"], **kw)
    comp_loss.backward()
    torch.testing.assert_close(loss, comp_loss, rtol=1e-9, atol=1e-11)
    for key in comp_metrics:
        torch.testing.assert_close(metrics[key].double(), comp_metrics[key].double(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")
    for name, a, b in zip(("hidden", "weight", "bias"), [x.grad for x in leaves], [x.grad for x in comp]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"d {name}: {m}")
    # and the float64 reference with old = the reference's own detached log-probs
    with torch.no_grad():
        ref_logits = t["hidden"] @ t["weight"].T + t["bias"]
        lp = torch.log_softmax(ref_logits, -1).gather(-1, t["labels"].clamp(min=0)[..., None])[..., 0]
        lp = lp.masked_fill(t["labels"] == -100, 0.0)
    ref = _reference(dict(t, old=lp), **case)
    torch.testing.assert_close(loss, ref[0], rtol=1e-9, atol=1e-11)
    for a, b in zip([x.grad for x in leaves], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("liger_type,options", LIGER_TYPES[:2] + LIGER_TYPES[-2:],
                         ids=[c[0] for c in LIGER_TYPES[:2] + LIGER_TYPES[-2:]])
def test_on_policy_parity_with_liger_fused_linear_grpo(liger_type, options):
    chunked = import_peer("liger_kernel.chunked_loss")
    t = _inputs(torch.float32, ignore=False)
    mask = t["mask"].clone()
    mask[1, :2] = True  # Liger's grpo divides an empty row by clamp(0, 1): keep every row non-empty here
    t["adv"] = torch.tensor([0.8, -0.5, -1.3])
    beta, temp = 0.04, 0.9
    options = dict(dict(loss="ppo", clip_low=0.1, clip_high=0.05), **options)
    if options.get("global_tokens") == "mask sum":
        options["global_tokens"] = float(mask.sum())
    peer = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=True, chunk_size=2,
                                            epsilon_low=0.1, epsilon_high=1.05 if liger_type == "cispo" else 0.05,
                                            loss_type=liger_type, max_completion_length=T, temperature=temp)
    leaves = [t[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    peer_loss, _ = peer(leaves[0], leaves[1], t["labels"], mask.long(), t["adv"], bias=leaves[2],
                        ref_per_token_logps=t["ref"], old_per_token_logps=None)
    peer_loss.backward()
    ours = [t[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss, _ = rlkern.linear_policy_loss(ours[0], ours[1], t["labels"], None, t["adv"], mask, bias=ours[2],
                                        ref_logprobs=t["ref"], kl_coef=beta, kl_estimator="k3_unclamped",
                                        temperature=temp, chunk_size=4, **options)
    loss.backward()
    torch.testing.assert_close(loss, peer_loss.detach(), rtol=2e-5, atol=1e-6)
    for name, a, b in zip(("hidden", "weight", "bias"), [x.grad for x in ours], [x.grad for x in leaves]):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"d {name}: {m}")


# LoRA on the head (PEFT's lora.Linear): the adapter's tiles, d A / d B / d hidden (/ d x)
def _lora_case(seed=50, width=H, vocab=V, rank=3, dtype=torch.float32):
    from test_lm_heads import _adapter, _peft_head

    model, head = _peft_head(width, vocab, rank, 6, 0.0, dtype, bias=True, seed=seed)
    lora_a, lora_b, scaling = _adapter(head)
    return model, head, lora_a, lora_b, scaling


@pytest.mark.parametrize("case", [
    dict(loss="ppo", kl_coef=0.1, entropy_coef=0.05, chunk_size=4),
    dict(loss="cispo", clip_low=1.0, clip_high=0.2, agg="seq-mean-token-mean", chunk_size=5, lora_x=True),
    dict(loss="gspo", clip_low=3e-4, clip_high=4e-4, chunk_size=4),  # two passes
    dict(loss="ppo", chunk_size=4, logits_dtype=torch.bfloat16, logit_scale=1.3),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k in ("loss", "lora_x", "logits_dtype")))
def test_lora_head_matches_peft_and_the_composition(case, backend):
    import_peer("peft")
    case = dict(case)
    lora_x = case.pop("lora_x", False)
    model, head, lora_a, lora_b, scaling = _lora_case()
    t = _inputs(torch.float32)
    weight, bias = head.base_layer.weight, head.base_layer.bias  # frozen by PEFT
    x = (t["hidden"] * 0.7 + 0.1) if lora_x else None  # an explicit A-path input (PEFT's dropout output)

    def run(fn):
        leaves = [t["hidden"].detach().clone().requires_grad_(), lora_a.detach().clone().requires_grad_(),
                  lora_b.detach().clone().requires_grad_()]
        xs = None if x is None else x.detach().clone().requires_grad_()
        loss = fn(leaves, xs)
        loss.backward()
        return loss.detach(), [g.grad for g in leaves + ([xs] if xs is not None else [])]

    ours = run(lambda lv, xs: rlkern.linear_policy_loss(
        lv[0], weight, t["labels"], t["old"], t["adv"], t["mask"], bias=bias, ref_logprobs=t["ref"], lora_A=lv[1],
        lora_B=lv[2], lora_scaling=scaling, lora_hidden=xs, **case)[0])
    head_kw = {k: case[k] for k in ("chunk_size", "logits_dtype", "logit_scale") if k in case}
    pl_kw = {k: v for k, v in case.items() if k not in head_kw}

    def composition(lv, xs):
        out = rlkern.linear_token_logprobs(lv[0], weight, t["labels"], bias=bias, return_entropy=True, lora_A=lv[1],
                                           lora_B=lv[2], lora_scaling=scaling, lora_hidden=xs, **head_kw)
        return rlkern.policy_loss(out.logprobs, t["old"], t["adv"], t["mask"], entropy=out.entropy,
                                  ref_logprobs=t["ref"], **pl_kw)[0]

    comp = run(composition)
    torch.testing.assert_close(ours[0], comp[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], comp[1]):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if "logits_dtype" in case or lora_x:
        return
    # PEFT's own head: materialized logits of model(hidden) (W + s B A never merged by us)
    def peft(lv, xs):
        with torch.no_grad():
            head.lora_A["default"].weight.copy_(lv[1])
            head.lora_B["default"].weight.copy_(lv[2])
        logits = model(lv[0]).float()
        log_p = torch.log_softmax(logits, -1)
        lp = log_p.gather(-1, t["labels"].clamp(min=0)[..., None])[..., 0].masked_fill(t["labels"] == -100, 0)
        ent = -(log_p.exp() * log_p).sum(-1)
        return rlkern.policy_loss(lp, t["old"], t["adv"], t["mask"], entropy=ent, ref_logprobs=t["ref"], **pl_kw)[0]

    head.zero_grad()
    leaves = [t["hidden"].detach().clone().requires_grad_()]
    loss = peft([leaves[0], lora_a.detach(), lora_b.detach()], None)
    loss.backward()
    peft_grads = [leaves[0].grad, head.lora_A["default"].weight.grad, head.lora_B["default"].weight.grad]
    torch.testing.assert_close(ours[0], loss.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], peft_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_cuda_on_policy_and_lora_head_match_the_composition(loss):
    """On CUDA: old_logprobs=None and a LoRA head (fp32 tiles and bf16 rounded tiles) against
    linear_token_logprobs(lora) + policy_loss with old = lp.detach()."""
    t = {k: (v.float().cuda() if isinstance(v, torch.Tensor) and v.is_floating_point() else
             v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _inputs(torch.float32).items()}
    gen = torch.Generator().manual_seed(70)
    lora_a = (torch.randn(3, H, generator=gen) * 0.3).cuda()
    lora_b = (torch.randn(V, 3, generator=gen) * 0.3).cuda()
    for logits_dtype in (None, torch.bfloat16):
        def run(fn):
            leaves = [t["hidden"].clone().requires_grad_(), lora_a.clone().requires_grad_(),
                      lora_b.clone().requires_grad_()]
            out = fn(*leaves)
            out.backward()
            return out.detach(), [x.grad for x in leaves]

        kw = dict(loss=loss, kl_coef=0.1, entropy_coef=0.05)
        ours = run(lambda h, a, b: rlkern.linear_policy_loss(
            h, t["weight"], t["labels"], None, t["adv"], t["mask"], bias=t["bias"], ref_logprobs=t["ref"],
            lora_A=a, lora_B=b, lora_scaling=2.0, chunk_size=4, logits_dtype=logits_dtype, **kw)[0])

        def composition(h, a, b):
            out = rlkern.linear_token_logprobs(h, t["weight"], t["labels"], bias=t["bias"], return_entropy=True,
                                               lora_A=a, lora_B=b, lora_scaling=2.0, logits_dtype=logits_dtype)
            return rlkern.policy_loss(out.logprobs, out.logprobs.detach(), t["adv"], t["mask"], entropy=out.entropy,
                                      ref_logprobs=t["ref"], **kw)[0]

        comp = run(composition)
        torch.testing.assert_close(ours[0], comp[0], rtol=1e-4, atol=1e-5)
        for a, b in zip(ours[1], comp[1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
