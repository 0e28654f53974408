"""rlkern.token_preference_loss (TRL 1.16's DPO loss from token log-probs, LD-DPO, WPO, TGDPO)
and rlkern.dpo_token_rewards (the DPO-implied token reward, RTO): every backend against the float64
reference (rlkern/reference/preference_tokens.py), padded and packed, odd sizes and edges,
gradcheck, torch.compile / opcheck, against TRL 1.16's own ``DPOTrainer._compute_loss`` (built
with ``object.__new__``, the model call stubbed with fixed logits, as tests/test_preference.py
does), hand-computed TGDPO and RTO examples, and RTO's rewards through ``rlkern.gae``.
"""

import contextlib
import math
import os
import subprocess
import sys
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_as_close_as_torch, compile_for_sm90, import_peer

import rlkern
from rlkern.reference import preference_tokens as reference
from rlkern.reference.preference import METRIC_KEYS


def _case(seed=0, n=3, width=11, dtype=torch.float32, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(2 * n, width, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(2 * n, width, generator=g) > 0.35
    if empty_row and n > 1:
        mask[1] = False  # a chosen completion with no token
    ref = lp + torch.randn(2 * n, width, generator=g, dtype=torch.float64) * 0.3
    adj = lp - torch.rand(2 * n, width, generator=g, dtype=torch.float64) * 0.5
    rewards = torch.randn(2 * n, width, generator=g, dtype=torch.float64) * 0.3
    lp[~mask] = float("nan")  # never read: a masked token cannot reach a sum
    return lp.to(dtype), mask, ref.to(dtype), adj.to(dtype), rewards.to(dtype)


def _packed(lp, mask, *others):
    lengths = torch.tensor([int(torch.nonzero(m).max()) + 2 if m.any() else 1 for m in mask]).clamp(max=mask.shape[1])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    cut = lambda x: None if x is None else torch.cat([row[:k] for row, k in zip(x, lengths)])  # noqa: E731
    return cut(lp), cut(mask), cu, [cut(o) for o in others]


VARIANTS = {
    "sigmoid": dict(loss_type="sigmoid", ref="token"),
    "per_sequence_ref": dict(loss_type="sigmoid", ref="sequence"),
    "ld_alpha": dict(loss_type="sigmoid", ref="token", ld_alpha=0.4),
    "wpo": dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], ref="token", wpo=True),
    "tgdpo": dict(loss_type="sigmoid", ref="token", tgdpo=True, tgdpo_alpha=0.7),
    "mpo_sft_ld": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], ref="token",
                       ld_alpha=0.3),
    "simpo": dict(loss_type="simpo", ref=None, beta=2.0),
    "sigmoid_norm_tgdpo_ld": dict(loss_type="sigmoid_norm", ref="token", tgdpo=True, ld_alpha=0.5, beta=0.3),
}


def _args(variant, lp, mask, ref, adj, rewards):
    v = dict(VARIANTS[variant])
    kind = v.pop("ref")
    if kind == "sequence":
        ref = torch.where(mask, ref, 0).sum(1)
    elif kind is None:
        ref = None
    kw = dict(v)
    kw.pop("wpo", None), kw.pop("tgdpo", None)
    if v.get("wpo"):
        kw["wpo_adjustment"] = adj
    if v.get("tgdpo"):
        kw["token_rewards"] = rewards
    return ref, kw


def _ours(lp, mask, ref, kw, cu=None):
    leaf = lp.clone().requires_grad_()
    loss, metrics = rlkern.token_preference_loss(leaf, mask, ref, cu_seqlens=cu, **kw)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def _reference(lp, mask, ref, kw, cu=None):
    leaf = lp.double().clone().requires_grad_()
    d = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    loss, metrics = reference.token_preference_loss(leaf, mask, d(ref), cu_seqlens=cu,
                                                    **{k: d(x) for k, x in kw.items()})
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), torch.where(mask, grad, 0), metrics


def _check(ours, ref, rtol=1e-5, atol=1e-6):
    loss, grad, metrics = ours
    r_loss, r_grad, r_metrics = ref
    torch.testing.assert_close(loss.double(), r_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), r_grad, rtol=rtol, atol=atol)
    for key in METRIC_KEYS:
        torch.testing.assert_close(metrics[key].double(), r_metrics[key].double(), rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_reference_padded_and_packed(backend, variant):
    lp, mask, ref, adj, rewards = _case(seed=len(variant), n=3, width=37)  # > 2 lanes blocks of the C++ sums
    r, kw = _args(variant, lp, mask, ref, adj, rewards)
    padded = _ours(lp, mask, r, kw)
    want = _reference(lp, mask, r, kw)
    _check(padded, want)
    assert not torch.isnan(padded[1]).any()
    # packed: the same rows, cut after their last valid token
    token_kw = {k: v for k, v in kw.items() if k in ("wpo_adjustment", "token_rewards")}
    p_lp, p_mask, cu, packed_others = _packed(lp, mask, r if r is not None and r.ndim == 2 else None,
                                              *token_kw.values())
    p_ref = packed_others[0] if r is not None and r.ndim == 2 else r
    p_kw = dict(kw, **dict(zip(token_kw, packed_others[1:])))
    loss, grad, metrics = _ours(p_lp, p_mask, p_ref, p_kw, cu=cu)
    # identical: every backend sums a row's tokens in the same order in both layouts
    torch.testing.assert_close(loss, padded[0], rtol=0, atol=0)
    torch.testing.assert_close(grad, _packed(padded[1], mask)[0], rtol=0, atol=0)
    for key in METRIC_KEYS:
        torch.testing.assert_close(metrics[key], padded[2][key], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    lp, mask, ref, adj, rewards = _case(seed=5, n=4, width=41, dtype=dtype)
    kw = dict(ld_alpha=0.5, wpo_adjustment=adj, loss_type=["sigmoid", "ipo"])
    loss, grad, metrics = _ours(lp, mask, ref, kw)
    assert grad.dtype == dtype and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    r_loss, r_grad, _ = _reference(lp, mask, ref, kw)
    # PyTorch's own error at this dtype: the reference run on the same inputs in their dtype
    t_loss = reference.token_preference_loss(lp.clone().requires_grad_(), mask, ref, **kw)[0]
    ulp = torch.finfo(loss.dtype).eps * float(r_loss.abs())  # the float32 loss's own rounding: a few ulp
    assert_as_close_as_torch(loss, r_loss, t_loss.detach(), floor=4 * ulp)
    tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float64: 1e-12}[dtype]  # the gradient's own rounding
    torch.testing.assert_close(grad.double(), r_grad, rtol=tol, atol=tol)


def test_mixed_dtypes_and_int_mask(backend):
    lp, mask, ref, adj, _ = _case(seed=6, n=2, width=7, dtype=torch.bfloat16)
    kw = dict(wpo_adjustment=adj.float(), loss_type="sigmoid")
    ours = _ours(lp, mask.long(), ref.double(), kw)
    want = _reference(lp, mask, ref.double(), kw)
    torch.testing.assert_close(ours[0].double(), want[0], rtol=1e-5, atol=1e-6)


def test_row_strided_inputs(backend):
    # TRL slices its outputs (log_probs[:, -seq_len:], completion_mask[..., 1:]): rows with a stride
    lp, mask, ref, adj, rewards = _case(seed=12, n=3, width=40)
    wide = lambda x: torch.cat([torch.zeros_like(x[:, :3]), x], 1)[:, 3:]  # noqa: E731
    kw = dict(ld_alpha=0.5, token_rewards=wide(rewards), wpo_adjustment=wide(adj), loss_type=["sigmoid", "sft"])
    assert wide(lp).stride(0) != wide(lp).shape[1]
    ours = _ours(wide(lp), wide(mask), wide(ref), kw)
    _check(ours, _reference(lp, mask, ref, dict(kw, token_rewards=rewards, wpo_adjustment=adj)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_every_layout_and_dtype_runs_a_kernel(kernels_only, monkeypatch, dtype):
    lp, mask, ref, adj, rewards = _case(seed=13, n=2, width=20, dtype=dtype)
    kw = dict(ld_alpha=0.5, token_rewards=rewards, wpo_adjustment=adj)
    for backend in ("cpp", "triton"):
        monkeypatch.setenv("RLKERN_BACKEND", backend)
        padded = _ours(lp, mask, ref, kw)
        p_lp, p_mask, cu, (p_ref, p_adj, p_tr) = _packed(lp, mask, ref, adj, rewards)
        packed = _ours(p_lp, p_mask, p_ref, dict(kw, token_rewards=p_tr, wpo_adjustment=p_adj), cu=cu)
        torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=0)
        out = rlkern.dpo_token_rewards(p_lp, p_ref, p_mask, cu_seqlens=cu)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_cpp_baseline_isa_matches_reference():
    # The C++ sums have an AVX2 path (float compute) chosen once per process; RLKERN_NO_SIMD=1
    # forces the portable lane loops, which a fresh interpreter checks against the reference.
    script = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_preference_tokens as T
for variant in sorted(T.VARIANTS):
    for dtype in (torch.float32, torch.bfloat16):
        lp, mask, ref, adj, rewards = T._case(seed=len(variant), n=3, width=37, dtype=dtype)
        r, kw = T._args(variant, lp, mask, ref, adj, rewards)
        T._check(T._ours(lp, mask, r, kw), T._reference(lp, mask, r, kw), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                 atol=1e-6 if dtype == torch.float32 else 1e-2)
print("ok")
""".format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RLKERN_NO_SIMD="1", RLKERN_BACKEND="cpp")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_edges_one_pair_empty_rows_and_no_pairs(backend):
    lp, mask, ref, _, _ = _case(seed=7, n=1, width=5, empty_row=False)
    _check(_ours(lp, mask, ref, {}), _reference(lp, mask, ref, {}))
    mask = torch.zeros_like(mask)  # every row empty: sums 0, lengths 0, no NaN
    loss, grad, metrics = _ours(lp, mask, ref, dict(loss_type=["ipo", "sigmoid_norm"], ld_alpha=0.2))
    assert torch.isfinite(loss) and (grad == 0).all() and all(torch.isfinite(v) for v in metrics.values())
    _check((loss, grad, metrics), _reference(lp, mask, ref, dict(loss_type=["ipo", "sigmoid_norm"], ld_alpha=0.2)))
    empty = torch.zeros(0, 4)
    loss, metrics = rlkern.token_preference_loss(empty.clone().requires_grad_(), empty.bool(), empty)
    assert float(loss.detach()) == 0.0
    loss.backward()
    loss, _ = rlkern.token_preference_loss(torch.zeros(0), None, cu_seqlens=torch.zeros(1, dtype=torch.int32))
    assert float(loss) == 0.0


def test_gradcheck(backend):
    lp, mask, ref, adj, rewards = _case(seed=8, n=2, width=6, dtype=torch.float64)
    lp = torch.where(mask, lp, 0.0)

    def f(x):
        # (not WPO: its weights are constants by definition, detached from the log-probs)
        return rlkern.token_preference_loss(x, mask, ref, ld_alpha=0.6, token_rewards=rewards,
                                            pair_weights=adj[::2, 0].exp(), loss_type=["sigmoid", "ipo", "sft"])[0]

    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(),))


def test_compile_and_opcheck():
    lp, mask, ref, adj, rewards = _case(seed=9, n=2, width=6)
    lp = torch.where(mask, lp, 0.0)
    kw = dict(ld_alpha=0.5, token_rewards=rewards)
    eager = rlkern.token_preference_loss(lp, mask, ref, **kw)[0]
    compiled = torch.compile(lambda x: rlkern.token_preference_loss(x, mask, ref, **kw)[0], fullgraph=True,
                             backend="eager")(lp)
    torch.testing.assert_close(compiled, eager)
    p_lp, p_mask, cu, (p_ref,) = _packed(lp, mask, ref)
    packed = lambda x: rlkern.token_preference_loss(x, p_mask, p_ref, cu_seqlens=cu, ld_alpha=0.5)[0]  # noqa: E731
    torch.testing.assert_close(torch.compile(packed, fullgraph=True, backend="eager")(p_lp), packed(p_lp))
    rewards_fn = lambda x: rlkern.dpo_token_rewards(x, p_ref, p_mask, cu_seqlens=cu, beta=0.3)  # noqa: E731
    torch.testing.assert_close(torch.compile(rewards_fn, fullgraph=True, backend="eager")(p_lp), rewards_fn(p_lp))
    from rlkern.ops import preference_tokens as op

    torch.library.opcheck(op._sums_op, (lp.clone().requires_grad_(), mask, ref, adj, rewards, None, 0.5, True, 0.7))
    cu = torch.tensor([0, 3, 5, 9, 12], dtype=torch.int32)
    torch.library.opcheck(op._rewards_op, (torch.randn(12), torch.randn(12), None, None, torch.randn(4), cu, 0.1,
                                           0.0, 1.0))


BAD = [
    (lambda lp, m: rlkern.token_preference_loss(lp[:3], m[:3]), "2B rows"),
    (lambda lp, m: rlkern.token_preference_loss(lp, None), "response_mask is required"),
    (lambda lp, m: rlkern.token_preference_loss(lp, m, lp[:, :3]), "ref_logprobs must have"),
    (lambda lp, m: rlkern.token_preference_loss(lp, m, lp.sum(1), token_rewards=lp), "token-level"),
    (lambda lp, m: rlkern.token_preference_loss(lp, m, ld_alpha=1.5), "ld_alpha must be"),
    (lambda lp, m: rlkern.token_preference_loss(lp, m, lp.requires_grad_()), "requires grad"),
    (lambda lp, m: rlkern.token_preference_loss(lp, m, loss_type="dpo"), "loss_type must be one of"),
    (lambda lp, m: rlkern.token_preference_loss(lp, m, wpo_adjustment=lp[:, :2]), "wpo_adjustment must have"),
    (lambda lp, m: rlkern.token_preference_loss(lp.long(), m), "logprobs must be"),
    (lambda lp, m: rlkern.token_preference_loss(lp.flatten(), None, cu_seqlens=torch.tensor([0, 5])),
     "cu_seqlens must rise"),
    (lambda lp, m: rlkern.dpo_token_rewards(lp, None, m), "ref_logprobs is required"),
    (lambda lp, m: rlkern.dpo_token_rewards(lp, lp, m, sequence_rewards=lp[0]), "sequence_rewards must have"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(case):
    lp, mask = torch.randn(4, 5), torch.ones(4, 5)
    call, match = BAD[case]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(lp, mask)
    assert str(info.value).split(":")[0] in ("token_preference_loss", "dpo_token_rewards"), str(info.value)


# ------------------------------------------------------------------------------------------------
# TRL 1.16's own DPOTrainer._compute_loss (the model stubbed: fixed logits, TRL's fused-head outputs)

class _StubModule(torch.nn.Module):
    """What _compute_loss reads of self.model: training, no gradient checkpointing, no PEFT."""

    is_gradient_checkpointing = False


def _trl_trainer(*, loss_type, beta, ld_alpha, use_weighting, precompute, ref_model, loss_weights=None, **extra):
    dpo = import_peer("trl.trainer.dpo_trainer")
    trainer = object.__new__(dpo.DPOTrainer)
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    identity = lambda x, **_: x  # noqa: E731  (one process: accelerate's gathers are the identity)
    trainer.__dict__.update(
        model=_StubModule(), ref_model=ref_model,
        aux_loss_enabled=False, beta=beta, loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types),
        ld_alpha=ld_alpha, f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
        label_smoothing=extra.get("label_smoothing", 0.0), use_weighting=use_weighting, precompute_ref_logps=precompute,
        args=types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None), _total_train_tokens=0,
        _tp_size=1, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=types.SimpleNamespace(gather=identity, gather_for_metrics=identity, device=torch.device("cpu"),
                                          autocast=contextlib.nullcontext))
    return trainer


def _fused_outputs(logits, labels):
    """What TRL's fused LM head returns for these logits: log-probs of the labels (0 where -100),
    and WPO's log_sum_sq_probs (the rest are logged only)."""
    target = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    token = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    token = torch.where(target != -100, token, 0.0)
    zeros = torch.zeros_like(token)
    return types.SimpleNamespace(log_probs=token, log_sum_sq_probs=torch.logsumexp(2 * logp, -1), entropy=zeros,
                                 mean_logits=zeros, is_top1=zeros.bool())


def _trl_batch(seed, n=3, width=8, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * n, width + 1, vocab, generator=g)
    ref_logits = logits + 0.4 * torch.randn(2 * n, width + 1, vocab, generator=g)
    ids = torch.randint(0, vocab, (2 * n, width + 1), generator=g)
    completion = torch.zeros(2 * n, width + 1, dtype=torch.long)
    lengths = torch.randint(1, width + 1, (2 * n,), generator=g)
    for row, k in enumerate(lengths):
        completion[row, 1:1 + k] = 1  # one prompt token, then the completion (TRL's flushed-left layout)
    return logits, ref_logits, ids, completion


@pytest.mark.peer
@pytest.mark.parametrize("case", ["sigmoid", "ipo_ld", "wpo_precompute", "mpo_sft_ld", "sigmoid_norm_wpo_ld",
                                  "robust_precompute_ld", "every_other_type_ld"])
def test_matches_trl_dpo_trainer(backend, case):
    opts = {
        "sigmoid": dict(loss_type="sigmoid", beta=0.3, ld_alpha=None, use_weighting=False, precompute=False),
        "ipo_ld": dict(loss_type="ipo", beta=0.2, ld_alpha=0.5, use_weighting=False, precompute=False),
        "wpo_precompute": dict(loss_type=["sigmoid", "apo_zero"], beta=0.1, ld_alpha=None, use_weighting=True,
                               precompute=True, loss_weights=[1.0, 0.4]),
        "mpo_sft_ld": dict(loss_type=["sigmoid", "bco_pair", "sft"], beta=0.2, ld_alpha=0.3, use_weighting=False,
                           precompute=False, loss_weights=[0.8, 0.2, 1.0]),
        "sigmoid_norm_wpo_ld": dict(loss_type="sigmoid_norm", beta=0.5, ld_alpha=0.7, use_weighting=True,
                                    precompute=False),
        "robust_precompute_ld": dict(loss_type="robust", beta=0.25, ld_alpha=0.2, use_weighting=False, precompute=True,
                                     label_smoothing=0.1),
        "every_other_type_ld": dict(loss_type=["hinge", "exo_pair", "nca_pair", "sppo_hard", "aot", "aot_unpaired",
                                               "apo_down", "discopop"], beta=0.3, ld_alpha=0.6, use_weighting=False,
                                    precompute=False, label_smoothing=0.05,
                                    loss_weights=[0.5, 1.0, 0.7, 0.01, 1.0, 0.3, 0.2, 0.9]),
    }[case]
    logits, ref_logits, ids, completion = _trl_batch(seed=len(case))
    labels = ids.masked_fill(completion == 0, -100)
    ref_out = _fused_outputs(ref_logits, labels)
    ref_model = lambda **_: ref_out  # noqa: E731
    trainer = _trl_trainer(ref_model=ref_model, **opts)
    inputs = dict(input_ids=ids, completion_mask=completion, attention_mask=torch.ones_like(ids))
    if opts["precompute"]:  # TRL's compute_ref_log_probs (LD-DPO weighting included), as it fills the dataset
        ref_c, ref_r = trainer.compute_ref_log_probs(ref_model, inputs)
        inputs.update(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    leaf = logits.clone().requires_grad_()
    loss = trainer._compute_loss(lambda **_: _fused_outputs(leaf, labels), inputs, False)
    (want_grad,) = torch.autograd.grad(loss, leaf)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # ours: the token log-probs (the masked positions hold garbage: never read), the mask
    leaf2 = logits.clone().requires_grad_()
    mask = completion[:, 1:]
    target = labels[:, 1:]
    logp = torch.log_softmax(leaf2[:, :-1], -1)
    token = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    ref = (torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]) if opts["precompute"]
           else ref_out.log_probs)
    kw = dict(loss_type=opts["loss_type"], beta=opts["beta"], ld_alpha=opts["ld_alpha"],
              loss_weights=opts.get("loss_weights"), label_smoothing=opts.get("label_smoothing", 0.0))
    if opts["use_weighting"]:
        kw["wpo_adjustment"] = torch.logsumexp(2 * logp, -1).detach()
    ours, metrics = rlkern.token_preference_loss(token, mask, ref, **kw)
    (grad,) = torch.autograd.grad(ours, leaf2)
    torch.testing.assert_close(ours, loss.float(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, want_grad, rtol=2e-5, atol=2e-7)
    for key in METRIC_KEYS:
        assert math.isclose(float(metrics[key]), trl_metrics[key], rel_tol=2e-5, abs_tol=2e-6), key


# ------------------------------------------------------------------------------------------------
# TGDPO: a hand-computed pair

def test_tgdpo_hand_computed(backend):
    # one pair: chosen tokens (a, b), rejected token (c) and a masked one
    lp = torch.tensor([[-0.5, -1.0], [-2.0, -9.0]], dtype=torch.float64)
    ref = torch.tensor([[-0.7, -0.8], [-1.5, -3.0]], dtype=torch.float64)
    r = torch.tensor([[0.4, -0.2], [0.5, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    beta, alpha = 0.2, 0.5
    # chosen: beta * [(1 + a r_a)(lp_a - ref_a) + (1 + a r_b)(lp_b - ref_b)], rejected: beta * (1 - a r_c)(lp_c - ref_c)
    chosen = (1 + alpha * 0.4) * (-0.5 + 0.7) + (1 + alpha * -0.2) * (-1.0 + 0.8)
    rejected = (1 - alpha * 0.5) * (-2.0 + 1.5)
    x = beta * (chosen - rejected)
    want = math.log1p(math.exp(-x))
    leaf = lp.clone().requires_grad_()
    loss, metrics = rlkern.token_preference_loss(leaf, mask, ref, token_rewards=r, tgdpo_alpha=alpha, beta=beta)
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-12)
    assert math.isclose(float(metrics["rewards/chosen"]), beta * chosen, rel_tol=1e-6)
    loss.backward()
    s = -1 / (1 + math.exp(x))  # d softplus(-x) / dx
    want_grad = torch.tensor([[s * beta * (1 + alpha * 0.4), s * beta * (1 - alpha * 0.2)],
                              [-s * beta * (1 - alpha * 0.5), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(leaf.grad, want_grad, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# dpo_token_rewards: "From r to Q*" / RTO

def test_dpo_token_rewards_hand_computed_and_gae(backend):
    lp = torch.tensor([[-0.5, -1.0, -0.2, -4.0], [-1.5, -0.1, -3.0, -2.0]])
    ref = torch.tensor([[-0.7, -0.8, -0.4, -1.0], [-1.0, -0.6, -1.0, -1.0]])
    old = torch.tensor([[-0.6, -0.9, -0.3, -5.0], [-1.2, -0.3, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]])
    seq = torch.tensor([2.0, -1.0])
    beta, kl, c3 = 0.5, 0.1, 0.25
    out = rlkern.dpo_token_rewards(lp, ref, mask, old, seq, beta=beta, kl_coef=kl, sequence_reward_coef=c3)
    def tok(b, t):
        return beta * (float(lp[b, t]) - float(ref[b, t])) - kl * (float(old[b, t]) - float(ref[b, t]))

    want = torch.tensor([[tok(0, 0), tok(0, 1), tok(0, 2) + c3 * 2.0, 0.0],
                         [tok(1, 0), 0.0, tok(1, 2) + c3 * -1.0, 0.0]])
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    # as PPO's rewards: GAE with gamma = lam = 1 and zero values is the reward-to-go over valid tokens
    adv, _ = rlkern.gae(out, torch.zeros_like(out), mask)
    want_adv = torch.tensor([[want[0, :3].sum(), want[0, 1:3].sum(), want[0, 2], 0.0],
                             [want[1, 0] + want[1, 2], 0.0, want[1, 2], 0.0]])
    torch.testing.assert_close(adv, want_adv, rtol=1e-6, atol=1e-6)
    # gamma = 0.9, lam = 0.8, values: delta_t = r_t + 0.9 V_next - V_t, A_t = delta_t + 0.72 A_next
    values = torch.tensor([[0.3, -0.2, 0.1, 9.0], [0.5, 9.0, -0.4, 9.0]])
    adv, _ = rlkern.gae(out, values, mask, gamma=0.9, lam=0.8)
    d02 = float(want[0, 2]) - 0.3 * 0 - 0.1
    d01 = float(want[0, 1]) + 0.9 * 0.1 + 0.2
    d00 = float(want[0, 0]) + 0.9 * -0.2 - 0.3
    d12 = float(want[1, 2]) + 0.4
    d10 = float(want[1, 0]) + 0.9 * -0.4 - 0.5
    want_adv = torch.tensor([[d00 + 0.72 * (d01 + 0.72 * d02), d01 + 0.72 * d02, d02, 0.0],
                             [d10 + 0.72 * d12, 0.0, d12, 0.0]])
    torch.testing.assert_close(adv, want_adv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dpo_token_rewards_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(3)
    lp, ref, old = (-torch.rand(5, 13, generator=g) * 2 for _ in range(3))
    lp = lp.to(dtype)
    mask = torch.rand(5, 13, generator=g) > 0.3
    mask[2] = False
    seq = torch.randn(5, generator=g)
    kw = dict(beta=0.3, kl_coef=0.05, sequence_reward_coef=0.7)
    out = rlkern.dpo_token_rewards(lp, ref, mask, old, seq, **kw)
    want = reference.dpo_token_rewards(lp.double(), ref.double(), mask, old.double(), seq.double(), **kw)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    p_lp, p_mask, cu, (p_ref, p_old) = _packed(lp, mask, ref, old)
    packed = rlkern.dpo_token_rewards(p_lp, p_ref, p_mask, p_old, seq, cu_seqlens=cu, **kw)
    torch.testing.assert_close(packed, _packed(out, mask)[0])
    # packed without a mask: every token, the sequence reward at each segment's last token
    packed = rlkern.dpo_token_rewards(p_lp, p_ref, None, None, seq, cu_seqlens=cu.int(), beta=0.3)
    want = reference.dpo_token_rewards(p_lp.double(), p_ref.double(), None, None, seq.double(), beta=0.3,
                                       cu_seqlens=cu)
    torch.testing.assert_close(packed.double(), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Triton: sm_90 compile, CUDA runs

def test_triton_kernels_compile_for_sm90():
    compile_for_sm90("""
from rlkern.kernels import preference_tokens as k
for fp64, dt in ((False, "bf16"), (False, "fp32"), (True, "fp64")):
    acc = "*fp64" if fp64 else "*fp32"
    t = "*" + dt
    s = {"lp_ptr": t, "m_ptr": "*u8", "ref_ptr": t, "adj_ptr": t, "tr_ptr": t, "cu_ptr": "*i32", "sum_ptr": acc,
         "raw_ptr": acc, "refsum_ptr": acc, "len_ptr": acc, "wpo_ptr": acc, "par_ptr": "*fp64",
         "lp_stride": "i64", "m_stride": "i64", "ref_stride": "i64", "adj_stride": "i64", "tr_stride": "i64",
         "T": "i32", "B": "i32", "ld_alpha": "fp32", "tg_alpha": "fp32"}
    for packed in (False, True):
        build(k._sums_kernel, s, {"HAS_MASK": True, "HAS_REF": True, "HAS_ADJ": True, "HAS_TR": True, "LD": True,
                                  "PACKED": packed, "FP64": fp64, "BLOCK": 256})
    s = {"gs_ptr": acc, "gr_ptr": acc, "len_ptr": acc, "m_ptr": "*u8", "tr_ptr": t, "cu_ptr": "*i32", "out_ptr": t,
         "par_ptr": "*fp64", "m_stride": "i64", "tr_stride": "i64", "T": "i32", "B": "i32", "ld_alpha": "fp32",
         "tg_alpha": "fp32"}
    build(k._sums_backward_kernel, s, {"HAS_MASK": True, "HAS_TR": True, "LD": True, "PACKED": False, "FP64": fp64,
                                       "BLOCK": 256})
    s = {"lp_ptr": t, "ref_ptr": t, "old_ptr": t, "m_ptr": "*u8", "seq_ptr": acc, "cu_ptr": "*i32", "out_ptr": acc,
         "par_ptr": "*fp64", "lp_stride": "i64", "ref_stride": "i64", "old_stride": "i64", "m_stride": "i64",
         "T": "i32", "beta": "fp32", "kl_coef": "fp32", "seq_coef": "fp32"}
    build(k._rewards_kernel, s, {"HAS_OLD": True, "HAS_MASK": True, "HAS_SEQ": True, "PACKED": True, "FP64": fp64,
                                 "BLOCK": 256})
print("ok")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_matches_reference(dtype):
    lp, mask, ref, adj, rewards = _case(seed=11, n=16, width=2048, dtype=dtype)
    kw = dict(ld_alpha=0.5, wpo_adjustment=adj, token_rewards=rewards, loss_type=["sigmoid", "sft"])
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    loss, grad, metrics = _ours(cuda(lp), cuda(mask), cuda(ref), {k: cuda(v) for k, v in kw.items()})
    r_loss, r_grad, _ = _reference(lp, mask, ref, kw)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(loss.cpu().double(), r_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.cpu().double(), r_grad, rtol=tol, atol=tol)
    out = rlkern.dpo_token_rewards(cuda(lp), cuda(ref), cuda(mask), None, cuda(ref[:, 0].float()), beta=0.2)
    want = reference.dpo_token_rewards(lp.double(), ref.double(), mask, None, ref[:, 0].double(), beta=0.2)
    torch.testing.assert_close(out.cpu().double(), want, rtol=tol, atol=tol)
