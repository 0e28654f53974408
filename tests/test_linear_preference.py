"""linear_preference_loss vs the float64 composition (materialized logits -> token log-probs ->
token_preference_loss), both plans (pairs: 3 GEMMs, global: 4), Liger 0.8.5's fused linear
preference losses, and the op's contract."""

import pytest
import torch
from conftest import assert_as_close_as_torch, import_peer

import rlkern
from rlkern.ops import linear_logprobs as head
from rlkern.reference.linear_preference import linear_preference_loss as reference


def _batch(pairs, length, width, vocab, *, seed=0, dtype=torch.float32, bias=False, empty_rows=()):
    """Padded concatenated batch [2B, T, H]: random prompt/pad masks, some rows with no token."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, length, width, generator=gen).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen) * 2 / width**0.5).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (rows, length), generator=gen)
    starts = torch.randint(0, max(length // 2, 1), (rows,), generator=gen)
    ends = torch.randint(0, length + 1, (rows,), generator=gen).clamp(min=starts + 1)
    pos = torch.arange(length)
    mask = (pos >= starts[:, None]) & (pos < ends[:, None])
    for r in empty_rows:
        mask[r] = False
    labels = torch.where(mask, labels, torch.full_like(labels, -100))  # TRL's prompt/pad labels
    ref = (torch.randn(rows, length, generator=gen) - 3).clamp(max=0)
    return hidden, weight, b, labels, mask, ref


def _packed(hidden, labels, mask, ref):
    """The same batch packed: each row's tokens from its first to its last position kept."""
    lengths = torch.full((hidden.shape[0],), hidden.shape[1])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), mask.reshape(-1), ref.reshape(-1), cu


def _ours(hidden, weight, bias, labels, mask, ref, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss, metrics = rlkern.linear_preference_loss(leaves[0], leaves[1], labels, mask, ref,
                                                  bias=leaves[2] if bias is not None else None, **kw)
    loss.backward()
    return loss, metrics, [t.grad for t in leaves]


def _theirs(hidden, weight, bias, labels, mask, ref, **kw):
    kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "chunking", "deterministic")}
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    r = None if ref is None else ref.double()
    for k in ("wpo_adjustment", "token_rewards", "pair_weights"):
        if kw.get(k) is not None:
            kw[k] = kw[k].double()
    loss, metrics = reference(leaves[0], leaves[1], labels, mask, r, bias=leaves[2] if bias is not None else None,
                              **kw)
    loss.backward()
    return loss, metrics, [t.grad for t in leaves]


def _close(ours, theirs, atol):
    loss, metrics, grads = ours
    r_loss, r_metrics, r_grads = theirs
    scale = max(1.0, abs(float(r_loss.detach())))
    torch.testing.assert_close(loss.double(), r_loss.detach(), rtol=0, atol=atol * scale)
    assert set(metrics) == set(r_metrics)
    for k in r_metrics:
        torch.testing.assert_close(metrics[k].double(), r_metrics[k].detach(), rtol=1e-5, atol=atol, msg=k)
    for g, r in zip(grads, r_grads):
        gscale = max(float(r.abs().max()), 1e-3)
        torch.testing.assert_close(g.double().reshape(r.shape), r, rtol=0, atol=atol * gscale)


# Odd sizes, every option family: (loss kwargs, batch kwargs, head kwargs)
CASES = [
    (dict(loss_type="sigmoid"), dict(pairs=3, length=9, width=11, vocab=101, bias=True), {}),
    (dict(loss_type="ipo", beta=0.3), dict(pairs=2, length=7, width=8, vocab=67), dict(temperature=0.7)),
    (dict(loss_type="sigmoid_norm"), dict(pairs=2, length=8, width=9, vocab=53, empty_rows=(1,)), {}),
    (dict(loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[1.0, 0.5, 0.25]),
     dict(pairs=3, length=6, width=5, vocab=37), dict(logit_softcap=4.0, logit_scale=1.3)),
    (dict(loss_type="aot"), dict(pairs=4, length=5, width=6, vocab=29), {}),
    (dict(loss_type="sigmoid", ld_alpha=0.4), dict(pairs=3, length=8, width=7, vocab=41, bias=True), {}),
    (dict(loss_type="simpo", simpo_gamma=0.3, beta=2.0, ref=False), dict(pairs=2, length=9, width=8, vocab=43), {}),
    (dict(loss_type="orpo", ref=False), dict(pairs=3, length=6, width=7, vocab=31), {}),
    (dict(loss_type="hinge", f_divergence_type="js_divergence"), dict(pairs=2, length=7, width=6, vocab=47), {}),
]


@pytest.mark.parametrize("chunking", [None, "global"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_float64_composition(backend, case, chunking):
    loss_kw, batch_kw, head_kw = (dict(x) for x in CASES[case])
    use_ref = loss_kw.pop("ref", True)
    hidden, weight, b, labels, mask, ref = _batch(**batch_kw)
    ref = ref if use_ref else None
    kw = dict(loss_kw, **head_kw, chunk_size=12, chunking=chunking)
    _close(_ours(hidden, weight, b, labels, mask, ref, **kw), _theirs(hidden, weight, b, labels, mask, ref, **kw),
           2e-5)


def test_packed_layout_and_options_match(backend):
    hidden, weight, b, labels, mask, ref = _batch(3, 8, 9, 61, bias=True, seed=3)
    gen = torch.Generator().manual_seed(5)
    wpo = torch.randn(mask.shape, generator=gen) * 0.1 - 4
    rewards = torch.randn(mask.shape, generator=gen) * 0.2
    pair_w = torch.rand(3, generator=gen) + 0.5
    kw = dict(wpo_adjustment=wpo, token_rewards=rewards, tgdpo_alpha=0.5, pair_weights=pair_w, ld_alpha=0.6,
              chunk_size=20)
    expected = _theirs(hidden, weight, b, labels, mask, ref, **kw)
    _close(_ours(hidden, weight, b, labels, mask, ref, **kw), expected, 2e-5)
    h, lab, m, r, cu = _packed(hidden, labels, mask, ref)
    kw.update(wpo_adjustment=wpo.reshape(-1), token_rewards=rewards.reshape(-1))
    _close(_ours(h, weight, b, lab, m, r, cu_seqlens=cu, **kw), expected, 2e-5)


def test_per_sequence_reference():
    hidden, weight, _, labels, mask, ref = _batch(3, 7, 8, 45, seed=4)
    ref_rows = torch.where(mask, ref, 0).sum(1)
    for lt in ("sigmoid", "apo_down", "aot_unpaired"):
        kw = dict(loss_type=lt, chunk_size=16)
        _close(_ours(hidden, weight, None, labels, mask, ref_rows, **kw),
               _theirs(hidden, weight, None, labels, mask, ref_rows, **kw), 2e-5)


def test_pairs_plan_runs_three_gemms_and_global_four(monkeypatch):
    """Count the tile GEMMs: pairs = forward GEMM + 2 gradient GEMMs per tile; global adds the
    recompute. Both equal the reference."""
    calls = {"logits": 0, "grads": 0}
    logits_into, grad_products = head._logits_into, head._grad_products

    def count_logits(*a, **k):
        calls["logits"] += 1
        return logits_into(*a, **k)

    def count_grads(*a, **k):
        calls["grads"] += 1
        return grad_products(*a, **k)

    monkeypatch.setattr(head, "_logits_into", count_logits)
    monkeypatch.setattr(head, "_grad_products", count_grads)
    hidden, weight, _, labels, mask, ref = _batch(4, 6, 5, 33, seed=6)
    per_pair = (mask[:4].sum(1) + mask[4:].sum(1)).tolist()
    budget = max(per_pair)
    expected = _theirs(hidden, weight, None, labels, mask, ref)
    _close(_ours(hidden, weight, None, labels, mask, ref, chunk_size=budget, chunking="pairs"), expected, 2e-5)
    assert calls["logits"] == calls["grads"] >= 1  # one logits GEMM per tile, none again in the backward
    tiles = calls["logits"]
    assert tiles <= len(per_pair)
    calls.update(logits=0, grads=0)
    _close(_ours(hidden, weight, None, labels, mask, ref, chunk_size=budget, chunking="global"), expected, 2e-5)
    total = int(mask.sum())
    assert calls["logits"] == 2 * calls["grads"] == 2 * -(-total // budget)
    # The default falls back to the global plan when a pair does not fit the tile.
    calls.update(logits=0, grads=0)
    _close(_ours(hidden, weight, None, labels, mask, ref, chunk_size=budget - 1), expected, 2e-5)
    assert calls["logits"] == 2 * calls["grads"]
    # Under no_grad only the forward GEMMs run (leaves that require grad or not).
    calls.update(logits=0, grads=0)
    with torch.no_grad():
        loss, _ = rlkern.linear_preference_loss(hidden.requires_grad_(), weight, labels, mask, ref, chunk_size=budget)
    torch.testing.assert_close(loss.double(), expected[0].detach(), rtol=0, atol=2e-5)
    assert calls["grads"] == 0 and calls["logits"] == tiles


def test_gradcheck_float64():
    hidden, weight, b, labels, mask, ref = _batch(2, 4, 3, 7, bias=True, seed=7)
    leaves = [t.double().requires_grad_() for t in (hidden, weight, b)]

    def fn(h, w, bb):
        return rlkern.linear_preference_loss(h, w, labels, mask, ref.double(), bias=bb, chunk_size=5,
                                             loss_type=["sigmoid", "ipo"], beta=0.5)[0]

    assert torch.autograd.gradcheck(fn, leaves)


def _torch_at_bf16(hidden, weight, bias, labels, mask, ref):
    """PyTorch's own result at bf16 (materialized bf16 logits, fp32 log-softmax and loss): the
    error yardstick of CONTRIBUTING.md."""
    from rlkern.reference.preference_tokens import token_preference_loss as token_loss

    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].T + leaves[2]
    log_p = torch.log_softmax(logits.float(), -1)
    logp = log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    loss, _ = token_loss(logp, mask, ref)
    loss.backward()
    return loss, [t.grad for t in leaves]


def test_bf16_inputs_as_close_as_torch():
    hidden, weight, b, labels, mask, ref = _batch(3, 8, 16, 97, dtype=torch.bfloat16, bias=True, seed=8)
    loss, metrics, grads = _ours(hidden, weight, b, labels, mask, ref, chunk_size=24)
    r_loss, _, r_grads = _theirs(hidden, weight, b, labels, mask, ref)
    t_loss, t_grads = _torch_at_bf16(hidden, weight, b, labels, mask, ref)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    # products in fp32: the loss is fp32-accurate, far inside torch's bf16 error
    torch.testing.assert_close(loss.double(), r_loss.detach(), rtol=0, atol=1e-5)
    assert_as_close_as_torch(loss.detach(), r_loss.detach(), t_loss.detach(), floor=1e-6, name="loss")
    for name, g, r, t in zip(("hidden", "weight", "bias"), grads, r_grads, t_grads):
        assert_as_close_as_torch(g, r, t, floor=1e-6, name=name)


@pytest.mark.parametrize("dtype,logit_scale,chunking", [(torch.float32, 1.0, None), (torch.bfloat16, 1.3, "global"),
                                                        (torch.bfloat16, 1.0, "pairs")])
def test_bf16_logits_tiles_as_close_as_torch(backend, dtype, logit_scale, chunking):
    """logits_dtype=bf16 (a DPO step under bf16 autocast): TRL's roundings, as
    linear_token_logprobs(logits_dtype=bf16) makes them; as close to the float64 composition as
    PyTorch's own bf16 composition, equal to rlkern's composition, nearer the rounding model than
    fp32 tiles are."""
    hidden, weight, b, labels, mask, ref = _batch(3, 8, 16, 97, dtype=dtype, bias=True, seed=21)
    kw = dict(chunk_size=24, chunking=chunking, logit_scale=logit_scale, loss_type=["sigmoid", "ipo"],
              loss_weights=[1.0, 0.3])
    ours = _ours(hidden, weight, b, labels, mask, ref, logits_dtype=torch.bfloat16, **kw)
    assert ours[0].dtype == torch.float32 and all(g.dtype == dtype for g in ours[2])
    r_loss, _, r_grads = _theirs(hidden, weight, b, labels, mask, ref, **kw)
    # PyTorch's composition with bf16 logits (TRL under autocast): bf16 GEMM + bias, fp32 softmax
    from rlkern.reference.preference_tokens import token_preference_loss as token_loss

    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    bf = [x.to(torch.bfloat16) for x in leaves]
    logits = (bf[0] @ bf[1].T + bf[2]).float() * logit_scale
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    t_loss, _ = token_loss(logp, mask, ref, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.3])
    t_loss.backward()
    assert_as_close_as_torch(ours[0].detach(), r_loss.detach(), t_loss.detach(), floor=1e-6, factor=2.0,
                             name="loss")
    for name, g, r, t in zip(("hidden", "weight", "bias"), ours[2], r_grads, [x.grad for x in leaves]):
        assert_as_close_as_torch(g, r, t, floor=1e-6, factor=2.0, name=name)
    # rlkern's composition at the same roundings (4 GEMMs)
    comp = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    lp = rlkern.linear_token_logprobs(comp[0], comp[1], labels, bias=comp[2], logit_scale=logit_scale,
                                      logits_dtype=torch.bfloat16)
    c_loss, _ = rlkern.token_preference_loss(lp, mask, ref, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.3])
    c_loss.backward()
    torch.testing.assert_close(ours[0], c_loss.detach(), rtol=1e-5, atol=1e-6)
    for g, c in zip(ours[2], comp):
        torch.testing.assert_close(g.float(), c.grad.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                                   atol=1e-5)
    # the float64 model of those roundings: nearer it than the fp32 tiles are
    model = _theirs(hidden, weight, b, labels, mask, ref, logits_dtype=torch.bfloat16, **kw)[0].detach()
    plain = _ours(hidden, weight, b, labels, mask, ref, **kw)[0].detach()
    assert (ours[0].double() - model).abs() < (plain.double() - model).abs()
    torch.testing.assert_close(ours[0].double(), model, rtol=0, atol=1e-5)


def test_empty_masks_and_empty_batch():
    hidden, weight, _, labels, mask, ref = _batch(2, 5, 4, 19, seed=9)
    none = torch.zeros_like(mask)
    loss, metrics, grads = _ours(hidden, weight, None, labels, none, ref)
    r_loss, _, _ = _theirs(hidden, weight, None, labels, none, ref)
    torch.testing.assert_close(loss.double(), r_loss.detach())
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    h0 = hidden[:0]
    loss, _, grads = _ours(h0, weight, None, labels[:0], mask[:0], ref[:0])
    assert float(loss.detach()) == 0 and torch.count_nonzero(grads[1]) == 0


def test_deterministic_is_repeatable_and_chunk_invariant():
    hidden, weight, _, labels, mask, ref = _batch(4, 40, 8, 57, seed=10)
    runs = [_ours(hidden, weight, None, labels, mask, ref, deterministic=True, chunk_size=c, chunking="global")
            for c in (50, 50, 130)]
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))
    assert torch.equal(runs[0][0], runs[2][0])  # per-token log-probs are batch invariant
    _close(runs[0], _theirs(hidden, weight, None, labels, mask, ref), 2e-5)
    pairs = _ours(hidden, weight, None, labels, mask, ref, deterministic=True, chunk_size=200, chunking="pairs")
    assert torch.equal(pairs[0], runs[0][0])  # the same token log-probs whatever the plan
    _close(pairs, _theirs(hidden, weight, None, labels, mask, ref), 2e-5)


def test_upstream_gradient_scales_the_stored_gradients():
    hidden, weight, _, labels, mask, ref = _batch(2, 6, 5, 23, seed=11)
    h = hidden.clone().requires_grad_()
    loss, _ = rlkern.linear_preference_loss(h, weight, labels, mask, ref)
    (loss * -2.5).backward()
    h2 = hidden.clone().requires_grad_()
    rlkern.linear_preference_loss(h2, weight, labels, mask, ref)[0].backward()
    torch.testing.assert_close(h.grad, -2.5 * h2.grad)



def test_runs_under_torch_compile():
    """Under torch.compile (one custom op in the graph; tests/test_compile.py has fullgraph): the same
    loss, metrics and gradients as eager (under dynamo the op used to see the reference log-probs as
    requiring grad and raise)."""
    hidden, weight, _, labels, mask, ref = _batch(2, 6, 5, 23, seed=13)

    def step(h, w):
        loss, metrics = rlkern.linear_preference_loss(h * 1.0, w, labels, mask, ref, loss_type="ipo")
        return 2 * loss, metrics["rewards/margins"]

    results = []
    for fn in (step, torch.compile(step, backend="eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, margin = fn(h, w)
        loss.backward()
        results.append((loss.detach(), margin, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

def test_matches_rlkern_composition():
    """linear_token_logprobs + token_preference_loss (4 GEMMs, rlkern's own pieces)."""
    hidden, weight, b, labels, mask, ref = _batch(3, 10, 12, 77, bias=True, seed=12)
    ours = _ours(hidden, weight, b, labels, mask, ref, loss_type="robust", label_smoothing=0.1)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    logp = rlkern.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2])
    loss, metrics = rlkern.token_preference_loss(logp, mask, ref, loss_type="robust", label_smoothing=0.1)
    loss.backward()
    torch.testing.assert_close(ours[0], loss.detach(), rtol=1e-6, atol=1e-6)
    for g, r in zip(ours[2], leaves):
        torch.testing.assert_close(g, r.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Liger 0.8.5's fused linear preference losses (their own code, on the CPU)

def _liger_case(seed=13, pairs=3, length=9, width=16, vocab=83):
    hidden, weight, b, labels, mask, _ = _batch(pairs, length, width, vocab, seed=seed, bias=True)
    gen = torch.Generator().manual_seed(seed + 1)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=gen)
    ref_weight = weight + 0.05 * torch.randn(weight.shape, generator=gen)
    with torch.no_grad():  # the reference model's token log-probs, as the caller computes them
        ref = rlkern.linear_token_logprobs(ref_hidden, ref_weight, labels, bias=b)
    return hidden, weight, b, labels, mask, ref, ref_hidden, ref_weight


def _liger(module, hidden, weight, b, labels, **refs):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    loss = module(leaves[1], leaves[0], labels, leaves[2], **refs)[0]
    loss.backward()
    return loss, [t.grad for t in leaves]


def _assert_liger(ours, theirs):
    torch.testing.assert_close(ours[0].double(), theirs[0].detach().double(), rtol=1e-5, atol=1e-6)
    for g, r in zip(ours[2], theirs[1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 + 1e-4 * float(r.abs().max()))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "nca_pair", "robust", "bco_pair", "sppo_hard",
                                       "apo_zero", "apo_down", "discopop", "exo_pair"])
def test_parity_with_liger_dpo(loss_type):
    chunked = import_peer("liger_kernel.chunked_loss")
    hidden, weight, b, labels, mask, ref, ref_hidden, ref_weight = _liger_case()
    ls = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    module = chunked.LigerFusedLinearDPOLoss(beta=0.2, compiled=False, loss_type=loss_type, label_smoothing=ls)
    theirs = _liger(module, hidden, weight, b, labels, ref_input=ref_hidden, ref_weight=ref_weight, ref_bias=b)
    ours = _ours(hidden, weight, b, labels, mask, ref, loss_type=loss_type, beta=0.2, label_smoothing=ls)
    _assert_liger(ours, theirs)


def test_parity_with_liger_simpo_orpo_cpo():
    chunked = import_peer("liger_kernel.chunked_loss")
    hidden, weight, b, labels, mask, *_ = _liger_case(seed=14)
    simpo = chunked.LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.4, label_smoothing=0.1, compute_nll_loss=False,
                                              compiled=False)
    _assert_liger(_ours(hidden, weight, b, labels, mask, None, loss_type="simpo", beta=2.0, simpo_gamma=0.4,
                        label_smoothing=0.1), _liger(simpo, hidden, weight, b, labels))
    # ORPO = the chosen tokens' NLL (rlkern's "sft") + the odds-ratio term
    orpo = chunked.LigerFusedLinearORPOLoss(beta=0.3, compiled=False)
    _assert_liger(_ours(hidden, weight, b, labels, mask, None, loss_type=["orpo", "sft"], beta=0.3),
                  _liger(orpo, hidden, weight, b, labels))
    # CPO (sigmoid, summed log-probs, no reference) = reference-free sigmoid + alpha * NLL
    cpo = chunked.LigerFusedLinearCPOLoss(beta=0.2, alpha=0.7, compiled=False)
    _assert_liger(_ours(hidden, weight, b, labels, mask, None, loss_type=["sigmoid", "sft"], beta=0.2,
                        loss_weights=[1.0, 0.7]), _liger(cpo, hidden, weight, b, labels))


# ------------------------------------------------------------------------------------------------
# Contract

BAD = [
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h[:3], w, lab[:3], m[:3]), "2B rows"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, None), "response_mask is required"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w[:, :2], lab, m), "weight must be"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab.float(), m), "labels must be int"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m[:, :2]), "response_mask"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab.clamp(min=0) + 100, m), "label"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, torch.zeros(3)), "ref_logprobs must"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, loss_type="aot", chunking="pairs"),
     "pair-local"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, chunking="tiles"), "chunking"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, chunk_size=0), "chunk_size"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, loss_type="nope"), "loss_type"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, temperature=0.0), "temperature"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, chunk_size=1, chunking="pairs"), "fit"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, pair_weights=torch.ones(5)), "pair_weights"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h.reshape(-1, 4), w, lab.reshape(-1), None), "cu_seqlens"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, wpo_adjustment=torch.zeros(4, 3)),
     "wpo_adjustment must have"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, torch.zeros(4, 5, requires_grad=True)),
     "constant"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, torch.zeros(4), token_rewards=torch.zeros(4, 5)),
     "token_rewards"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, ld_alpha=2.0), "ld_alpha"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, logits_dtype=torch.int32), "logits_dtype"),
    (lambda h, w, lab, m: rlkern.linear_preference_loss(h, w, lab, m, lora_A=torch.randn(2, 4),
                                                        lora_B=torch.randn(13, 3)), "lora_B must be"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_calls(case):
    hidden, weight, _, labels, mask, _ = _batch(2, 5, 4, 13, seed=15)
    call, match = BAD[case]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(hidden, weight, labels, mask)
    assert str(info.value).startswith("linear_preference_loss: "), str(info.value)


def test_benchmark_runs_at_a_tiny_shape():
    """The benchmark's implementations compute the same loss (the table compares like with like)
    and its run gives a row per implementation."""
    from rlkern.benches import bench_linear_preference as bench

    device = torch.device("cpu")
    hidden, weight, labels, mask = bench._inputs(device, 2, 12, 8, 97, torch.float32)
    impls, missing = bench.implementations(device)
    assert {"rlkern", "rlkern global", "composition", "eager", "liger"} <= set(impls) and not missing
    losses = {name: fn(hidden, weight, labels, mask) for name, fn in impls.items()}
    for name, loss in losses.items():
        torch.testing.assert_close(loss.detach(), losses["eager"].detach(), rtol=1e-5, atol=1e-6, msg=name)
    rows = bench.run(device, 1, 16, 8, 64, torch.float32, rounds=1, memory=False)
    assert {r.impl for r in rows} == set(impls) | {"bare GEMMs"}
    assert all(r.median_ms > 0 for r in rows)


def test_kto_benchmark_runs_at_a_tiny_shape():
    """--loss kto: every implementation computes the same KTO loss (Liger's fused KTO included)."""
    from rlkern.benches import bench_linear_preference as bench

    device = torch.device("cpu")
    hidden, weight, labels, mask = bench._inputs(device, 2, 12, 8, 97, torch.float32)
    impls, missing = bench.implementations(device, "kto")
    assert {"rlkern", "composition", "eager", "liger"} <= set(impls) and not missing
    losses = {name: fn(hidden, weight, labels, mask) for name, fn in impls.items()}
    for name, loss in losses.items():
        torch.testing.assert_close(loss.detach(), losses["eager"].detach(), rtol=1e-5, atol=1e-6, msg=name)
    rows = bench.run(device, 1, 16, 8, 64, torch.float32, rounds=1, memory=False, loss="kto")
    assert {r.impl for r in rows} == set(impls) | {"bare GEMMs"} and all(r.bench == bench.KTO_BENCH for r in rows)


@pytest.mark.gpu
def test_cuda_matches_reference():
    hidden, weight, b, labels, mask, ref = _batch(4, 33, 64, 1001, bias=True, seed=16)
    for chunking in (None, "global"):
        ours = _ours(*(t.cuda() if t is not None else None for t in (hidden, weight, b, labels, mask, ref)),
                     chunking=chunking, chunk_size=80)
        expected = _theirs(hidden, weight, b, labels, mask, ref)
        _close((ours[0].cpu(), {k: v.cpu() for k, v in ours[1].items()}, [g.cpu() for g in ours[2]]), expected,
               1e-4)


# ------------------------------------------------------------------------------------------------
# linear_kto_loss: TRL's KTO loss from hidden states (unpaired sequences)

from rlkern.reference.linear_preference import linear_kto_loss as kto_reference  # noqa: E402


def _kto_case(rows=5, length=9, width=11, vocab=89, *, seed=30, dtype=torch.float32, bias=True):
    hidden, weight, b, labels, mask, ref = _batch((rows + 1) // 2, length, width, vocab, seed=seed, dtype=dtype,
                                                  bias=bias)
    hidden, labels, mask, ref = hidden[:rows], labels[:rows], mask[:rows], ref[:rows]
    mask[1] = False  # a sequence with no completion token
    desirable = torch.tensor([True, False, True, False, False, True, True][:rows])
    gen = torch.Generator().manual_seed(seed + 1)
    kl = -torch.rand(4, generator=gen) * 3  # the KL completions' policy / reference sums: mean gap > 0
    return hidden, weight, b, labels, mask, ref, desirable, kl + 0.8, kl


def _kto_ours(hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((b,) if b is not None else ())]
    loss, metrics = rlkern.linear_kto_loss(leaves[0], leaves[1], labels, mask, ref, desirable, kl, ref_kl,
                                           bias=leaves[2] if b is not None else None, **kw)
    loss.backward()
    return loss, metrics, [t.grad for t in leaves]


def _kto_theirs(hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl, **kw):
    kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "deterministic")}
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((b,) if b is not None else ())]
    dbl = lambda t: None if t is None else t.double()  # noqa: E731
    loss, metrics = kto_reference(leaves[0], leaves[1], labels, mask, ref.double(), desirable, dbl(kl), dbl(ref_kl),
                                  bias=leaves[2] if b is not None else None, **kw)
    loss.backward()
    return loss, metrics, [t.grad for t in leaves]


KTO_CASES = [
    dict(beta=0.3, chunk_size=12),  # sequences per tile: 3 GEMMs
    dict(beta=0.5, desirable_weight=1.3, undesirable_weight=0.6, temperature=0.8, logit_softcap=5.0,
         logit_scale=1.2, chunk_size=4),  # a sequence longer than the tile: the global plan (4 GEMMs)
    dict(loss_type="apo_zero_unpaired", beta=0.2, no_kl=True),
    dict(beta=0.1, per_sequence_ref=True, chunk_size=30),
    dict(beta=0.4, deterministic=True, chunk_size=20),
]


@pytest.mark.parametrize("case", range(len(KTO_CASES)))
def test_kto_matches_float64_composition(backend, case):
    kw = dict(KTO_CASES[case])
    hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl = _kto_case(seed=30 + case)
    if kw.pop("no_kl", False):
        kl = ref_kl = None
    if kw.pop("per_sequence_ref", False):
        ref = (ref * mask).sum(1)
    _close(_kto_ours(hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl, **kw),
           _kto_theirs(hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl, **kw), 2e-5)


def test_kto_packed_and_plans_agree():
    hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl = _kto_case(seed=40)
    lengths = torch.tensor([9, 4, 7, 9, 2])
    keep = torch.arange(9)[None] < lengths[:, None]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    args = (hidden[keep], weight, b, labels[keep], mask[keep], ref[keep], desirable, kl, ref_kl)
    expected = _kto_theirs(*args, cu_seqlens=cu)
    for chunk_size in (None, 5):  # one tile of whole sequences; a sequence over the tile: global
        _close(_kto_ours(*args, cu_seqlens=cu, chunk_size=chunk_size), expected, 2e-5)


def test_kto_tiles_and_gemms(monkeypatch):
    """Whole sequences per tile: each token's logits computed once (3 GEMMs); the global plan twice."""
    hidden, weight, _, labels, mask, ref, desirable, kl, ref_kl = _kto_case(seed=41, bias=False)
    calls = {"logits": 0}
    original = head._logits_into

    def counted(out, *a, **k):
        calls["logits"] += out.shape[0]
        return original(out, *a, **k)

    monkeypatch.setattr(head, "_logits_into", counted)
    tokens = int(mask.sum())
    for chunk_size, times in ((64, 1), (4, 2)):
        calls["logits"] = 0
        _kto_ours(hidden, weight, None, labels, mask, ref, desirable, kl, ref_kl, chunk_size=chunk_size)
        assert calls["logits"] == times * tokens


def test_kto_gradcheck_float64():
    hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl = _kto_case(3, 4, 3, 7, seed=42)
    leaves = [t.double().requires_grad_() for t in (hidden, weight, b)]

    def fn(h, w, bb):
        return rlkern.linear_kto_loss(h, w, labels, mask, ref.double(), desirable, kl.double(), ref_kl.double(),
                                      bias=bb, chunk_size=5, beta=0.7, undesirable_weight=1.5)[0]

    assert torch.autograd.gradcheck(fn, leaves)


def test_kto_matches_rlkern_composition_and_bf16_tiles():
    """linear_token_logprobs -> masked sums -> kto_loss (rlkern's own pieces, 4 GEMMs), in fp32 and
    with bf16 logits tiles (TRL's KTOTrainer under bf16 autocast)."""
    hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl = _kto_case(seed=43)
    for logits_dtype in (None, torch.bfloat16):
        ours = _kto_ours(hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl, beta=0.3,
                         logits_dtype=logits_dtype)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        logp = rlkern.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], logits_dtype=logits_dtype)
        loss, metrics = rlkern.kto_loss((logp * mask).sum(1), (ref * mask).sum(1), desirable, kl, ref_kl, beta=0.3)
        loss.backward()
        torch.testing.assert_close(ours[0], loss.detach(), rtol=1e-6, atol=1e-6)
        for key in metrics:
            torch.testing.assert_close(ours[1][key], metrics[key], rtol=1e-5, atol=1e-5, msg=key)
        for g, r in zip(ours[2], leaves):
            torch.testing.assert_close(g, r.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_ref", [True, False])
def test_kto_parity_with_liger(use_ref):
    chunked = import_peer("liger_kernel.chunked_loss")
    hidden, weight, b, labels, mask, *_ = _liger_case(seed=44, pairs=3)
    desirable = torch.tensor([True, False, False, True, True, False])
    gen = torch.Generator().manual_seed(45)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=gen)
    ref_weight = weight + 0.05 * torch.randn(weight.shape, generator=gen)
    kl = torch.tensor(0.35)
    module = chunked.LigerFusedLinearKTOLoss(beta=0.4, compiled=False, use_ref_model=use_ref, chunk_size=2)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    refs = dict(ref_input=ref_hidden, ref_weight=ref_weight, ref_bias=b) if use_ref else {}
    theirs = module(leaves[0], leaves[1], labels, leaves[2], preference_labels=desirable, kl=kl, **refs)[0]
    theirs.backward()
    with torch.no_grad():  # the reference's per-sequence sums, as the caller (TRL) precomputes them
        ref = (rlkern.linear_token_logprobs(ref_hidden, ref_weight, labels, bias=b) * mask).sum(1) if use_ref \
            else torch.zeros(labels.shape[0])
    ours = _kto_ours(hidden, weight, b, labels, mask, ref, desirable, kl.reshape(1), torch.zeros(1), beta=0.4)
    _assert_liger(ours, (theirs, [t.grad for t in leaves]))


KTO_BAD = [
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, m, torch.zeros(3), d, torch.zeros(2), torch.zeros(2)),
     "ref_logprobs must"),
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, m, torch.zeros(4), d[:2]), "desirable must"),
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, m, torch.zeros(4), d), "kl_logps"),
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, m, torch.zeros(4), d, torch.zeros(2), torch.zeros(2),
                                                    loss_type="apo_zero_unpaired"), "no KL term"),
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, m, torch.zeros(4), d, loss_type="bco"), "loss_type"),
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, m, torch.zeros(4), d, torch.zeros(2), torch.zeros(2),
                                                    beta=0.0), "beta"),
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, None, torch.zeros(4), d), "response_mask"),
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, m, torch.zeros(4), d, torch.zeros(2),
                                                    torch.zeros(2), logits_dtype=torch.int8), "logits_dtype"),
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, m, torch.zeros(4, requires_grad=True), d,
                                                    torch.zeros(2), torch.zeros(2)), "constant"),
    (lambda h, w, lab, m, d: rlkern.linear_kto_loss(h, w, lab, m, torch.zeros(4), d, torch.zeros(2), torch.zeros(2),
                                                    lora_B=torch.randn(13, 3)), "lora_A and lora_B go together"),
]


def test_kto_runs_under_torch_compile():
    hidden, weight, _, labels, mask, ref, desirable, kl, ref_kl = _kto_case(seed=47, bias=False)

    def step(h, w):
        loss, metrics = rlkern.linear_kto_loss(h * 1.0, w, labels, mask, ref, desirable, kl, ref_kl, beta=0.3)
        return 2 * loss, metrics["rewards/margins"]

    results = []
    for fn in (step, torch.compile(step, backend="eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, margin = fn(h, w)
        loss.backward()
        results.append((loss.detach(), margin, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", range(len(KTO_BAD)))
def test_kto_bad_calls(case):
    hidden, weight, _, labels, mask, _ = _batch(2, 5, 4, 13, seed=15)
    call, match = KTO_BAD[case]
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(hidden, weight, labels, mask, torch.tensor([True, False, True, False]))
    assert str(info.value).startswith("linear_kto_loss: "), str(info.value)


@pytest.mark.gpu
def test_kto_cuda_matches_reference():
    case = _kto_case(6, 33, 64, 1001, seed=46)
    for chunk_size in (None, 20):
        ours = _kto_ours(*(t.cuda() for t in case), chunk_size=chunk_size)
        expected = _kto_theirs(*case)
        _close((ours[0].cpu(), {k: v.cpu() for k, v in ours[1].items()}, [g.cpu() for g in ours[2]]), expected,
               1e-4)


# ------------------------------------------------------------------------------------------------
# LoRA on the head (PEFT's lora.Linear), in both fused preference losses


def _peft_lora(width, vocab, seed):
    from test_lm_heads import _adapter, _peft_head

    import_peer("peft")
    model, peft_head = _peft_head(width, vocab, 3, 6, 0.0, torch.float32, bias=True, seed=seed)
    return (model, peft_head, *_adapter(peft_head))


def _lora_run(fn, hidden, lora_a, lora_b, x=None):
    leaves = [hidden.detach().clone().requires_grad_(), lora_a.detach().clone().requires_grad_(),
              lora_b.detach().clone().requires_grad_()]
    xs = None if x is None else x.detach().clone().requires_grad_()
    loss = fn(*leaves, xs)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves + ([xs] if xs is not None else [])]


def _assert_lora(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[1], theirs[1]):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", [
    dict(kto=False, chunking=None),
    dict(kto=False, chunking="global", deterministic=True, lora_x=True),
    dict(kto=False, chunking=None, logits_dtype=torch.bfloat16, logit_scale=1.2),
    dict(kto=True, chunk_size=64),
    dict(kto=True, chunk_size=4, lora_x=True),  # the global plan
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_lora_head_matches_the_composition_and_peft(backend, case):
    case = dict(case)
    kto, lora_x = case.pop("kto"), case.pop("lora_x", False)
    model, peft_head, lora_a, lora_b, scaling = _peft_lora(16, 97, seed=60)
    weight, bias = peft_head.base_layer.weight, peft_head.base_layer.bias
    if kto:
        hidden, _, _, labels, mask, ref, desirable, kl, ref_kl = _kto_case(5, 8, 16, 97, seed=61)
    else:
        hidden, _, _, labels, mask, ref = _batch(3, 8, 16, 97, seed=61)
    x = hidden * 0.6 - 0.2 if lora_x else None
    head_kw = {k: case[k] for k in ("logits_dtype", "logit_scale") if k in case}

    def loss_of(logp):  # the loss of the token log-probs
        if kto:
            return rlkern.kto_loss((logp * mask).sum(1), (ref * mask).sum(1), desirable, kl, ref_kl, beta=0.3)[0]
        return rlkern.token_preference_loss(logp, mask, ref, loss_type=["sigmoid", "ipo"], loss_weights=[1, .2])[0]

    def ours(h, a, b, xs):
        lora = dict(bias=bias, lora_A=a, lora_B=b, lora_scaling=scaling, lora_hidden=xs, **case)
        if kto:
            return rlkern.linear_kto_loss(h, weight, labels, mask, ref, desirable, kl, ref_kl, beta=0.3, **lora)[0]
        return rlkern.linear_preference_loss(h, weight, labels, mask, ref, loss_type=["sigmoid", "ipo"],
                                             loss_weights=[1, .2], **lora)[0]

    def composition(h, a, b, xs):
        return loss_of(rlkern.linear_token_logprobs(h, weight, labels, bias=bias, lora_A=a, lora_B=b,
                                                    lora_scaling=scaling, lora_hidden=xs, **head_kw))

    mine = _lora_run(ours, hidden, lora_a, lora_b, x)
    _assert_lora(mine, _lora_run(composition, hidden, lora_a, lora_b, x))
    if head_kw or lora_x:
        return

    def peft(h, a, b, xs):  # PEFT's own forward, materialized logits
        with torch.no_grad():
            peft_head.lora_A["default"].weight.copy_(a)
            peft_head.lora_B["default"].weight.copy_(b)
        log_p = torch.log_softmax(model(h).float(), -1)
        return loss_of(log_p.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask)

    model.zero_grad()
    h = hidden.detach().clone().requires_grad_()
    loss = peft(h, lora_a.detach(), lora_b.detach(), None)
    loss.backward()
    _assert_lora(mine, (loss.detach(), [h.grad, peft_head.lora_A["default"].weight.grad,
                                        peft_head.lora_B["default"].weight.grad]))


# ------------------------------------------------------------------------------------------------
# FSDP2: 2 gloo CPU processes (tests/_dist_fused.py) vs the single-process run


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    out = tmp_path_factory.mktemp("dist_fused") / "runs.pt"
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(here, "_dist_fused.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = torch.load(out)
    assert "error" not in runs, runs["error"]
    sys.path.insert(0, here)
    return runs


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("loss", ["policy", "preference", "kto"])
def test_fsdp2_sharded_head_matches_single_process(fsdp2_runs, loss, lora):
    """fully_shard'ed head (W, and A / B of a LoRA adapter, Shard(0) DTensors taken as they are):
    after one SGD step every weight equals the unsharded run's (gradients averaged over the
    ranks as FSDP2 reduces the module's own); a frozen W does not move."""
    import _dist_fused
    import _dist_heads

    ours = fsdp2_runs[f"{loss}_lora" if lora else loss]
    single = _dist_fused.single_process_reference(loss, lora)
    start = _dist_heads.build(_dist_heads.TinyLora if lora else _dist_heads.Tiny).state_dict()
    assert ours.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ours[key], single[key], rtol=0, atol=1e-6, msg=key)
        moved = not torch.equal(single[key], start[key])
        assert moved == (not (lora and key == "head.weight")), key  # the step is real; PEFT's W is frozen


@pytest.mark.gpu
@pytest.mark.parametrize("kto", [False, True])
def test_cuda_bf16_tiles_and_lora_match_the_composition(kto):
    """On CUDA (tensor-core bf16 tiles): logits_dtype=bf16 with a LoRA head, both fused preference
    losses against linear_token_logprobs(lora, logits_dtype) + the loss."""
    hidden, weight, b, labels, mask, ref, desirable, kl, ref_kl = (
        t.cuda() for t in _kto_case(6, 33, 64, 1001, seed=71, dtype=torch.bfloat16))
    gen = torch.Generator().manual_seed(72)
    lora_a = (torch.randn(4, 64, generator=gen) * 0.2).to("cuda", torch.bfloat16)
    lora_b = (torch.randn(1001, 4, generator=gen) * 0.2).to("cuda", torch.bfloat16)

    def loss_of(logp):
        if kto:
            return rlkern.kto_loss((logp * mask).sum(1), (ref * mask).sum(1), desirable, kl, ref_kl)[0]
        return rlkern.token_preference_loss(logp, mask, ref)[0]

    def ours(h, a, lb, _):
        kw = dict(bias=b, lora_A=a, lora_B=lb, lora_scaling=1.5, logits_dtype=torch.bfloat16, chunk_size=40)
        if kto:
            return rlkern.linear_kto_loss(h, weight, labels, mask, ref, desirable, kl, ref_kl, **kw)[0]
        return rlkern.linear_preference_loss(h, weight, labels, mask, ref, **kw)[0]

    def composition(h, a, lb, _):
        return loss_of(rlkern.linear_token_logprobs(h, weight, labels, bias=b, lora_A=a, lora_B=lb, lora_scaling=1.5,
                                                    logits_dtype=torch.bfloat16))

    mine, comp = _lora_run(ours, hidden, lora_a, lora_b), _lora_run(composition, hidden, lora_a, lora_b)
    torch.testing.assert_close(mine[0], comp[0], rtol=1e-4, atol=1e-5)
    for g, r in zip(mine[1], comp[1]):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.peer
@pytest.mark.parametrize("trainer", ["grpo", "dpo"])
def test_trl_fused_losses_on_an_fsdp2_head(fsdp2_runs, trainer):
    """TRL's GRPOTrainer / DPOTrainer on a fully_shard'ed tiny Qwen2, patch(loss="fused"): the
    captured head is the sharded DTensor, gathered by the fused loss with FSDP2's gradient
    averaging; after one SGD step every parameter equals the loss=True step's (rlkern's fused
    head, which reduces the DTensor head the same way)."""
    assert fsdp2_runs[f"trl_{trainer}_fused_calls"] == 1
    fused, plain = fsdp2_runs[f"trl_{trainer}_fused"], fsdp2_runs[f"trl_{trainer}_loss"]
    assert fused.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=2e-6, msg=key)
