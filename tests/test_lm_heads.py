"""LM heads as trainers hold them (issue 17): a LoRA adapter on the head (vs PEFT's own
``lora.Linear``), FSDP2 DTensor shards and DDP (gloo, 2 CPU processes) for
``rlkern.linear_token_logprobs``."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_as_close_as_torch, import_peer

import rlkern
from rlkern.reference.linear_logprobs import linear_logprobs as reference

# ---------------------------------------------------------------------------------------------
# LoRA on the head.


def _peft_head(width, vocab, rank, alpha, dropout, dtype, *, bias=False, seed=0):
    """PEFT 0.21's lora.Linear around a tiny nn.Linear head, with non-zero A and B."""
    peft = import_peer("peft")
    torch.manual_seed(seed)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(width, vocab, bias=bias)

        def forward(self, x):
            return self.lm_head(x)

    tiny = Tiny()
    with torch.no_grad():
        tiny.lm_head.weight.mul_(3.0)  # log-probs spanning 0 .. -10
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["lm_head"],
                             init_lora_weights=False)
    model = peft.get_peft_model(tiny, config).to(dtype)
    head = model.base_model.model.lm_head
    assert isinstance(head, peft.tuners.lora.Linear)
    with torch.no_grad():  # B is zero-initialized by default elsewhere: make the adapter count
        head.lora_B["default"].weight.normal_(0, 0.5)
    return model, head


def _adapter(head):
    return head.lora_A["default"].weight, head.lora_B["default"].weight, head.scaling["default"]


def _peft_logprobs(model, hidden, labels, *, temperature=1.0):
    log_p = torch.log_softmax(model(hidden).float() / temperature, -1)
    ignored = labels == -100
    return log_p.gather(1, labels.clamp(min=0)[:, None])[:, 0].masked_fill(ignored, 0)


def _zero_grads(*tensors):
    for t in tensors:
        t.grad = None


LORA_CASES = [
    dict(n=37, width=24, vocab=301, rank=4, alpha=8, bias=False, chunk_size=8),
    dict(n=13, width=17, vocab=129, rank=3, alpha=5, bias=True, chunk_size=None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(LORA_CASES)))
def test_lora_head_matches_peft(backend, dtype, case):
    spec = LORA_CASES[case]
    model, head = _peft_head(spec["width"], spec["vocab"], spec["rank"], spec["alpha"], 0.0, dtype,
                             bias=spec["bias"], seed=case)
    lora_a, lora_b, scaling = _adapter(head)
    weight, bias = head.base_layer.weight, head.base_layer.bias
    assert not weight.requires_grad  # PEFT freezes the base head
    if bias is not None:
        bias.requires_grad_(True)  # a trainable head bias (PEFT's bias="all"), to check its gradient
    gen = torch.Generator().manual_seed(10 + case)
    hidden = torch.randn(spec["n"], spec["width"], generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, spec["vocab"], (spec["n"],), generator=gen)
    labels[1] = -100
    upstream = torch.randn(spec["n"], generator=gen)
    trainable = (hidden, lora_a, lora_b) + ((bias,) if bias is not None else ())

    peft_logp = _peft_logprobs(model, hidden, labels)
    (peft_logp * upstream).sum().backward()
    peft_grads = [t.grad.clone() for t in trainable]
    _zero_grads(*trainable)

    ours = rlkern.linear_token_logprobs(hidden, weight, labels, bias=bias, lora_A=lora_a, lora_B=lora_b,
                                        lora_scaling=scaling, chunk_size=spec["chunk_size"])
    (ours * upstream).sum().backward()
    grads = [t.grad for t in trainable]
    assert weight.grad is None  # the frozen base head gets no gradient

    leaves = [t.detach().double().requires_grad_() for t in trainable]
    b64 = leaves[3] if bias is not None else None
    ref, _, _ = reference(leaves[0], weight.detach(), b64, labels,
                          lora=(leaves[1], leaves[2], scaling, None))
    (ref * upstream.double()).sum().backward()
    assert ours.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(ours, peft_logp, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)
        for name, g, p, leaf in zip(("hidden", "lora_A", "lora_B", "bias"), grads, peft_grads, leaves):
            scale = leaf.grad.abs().max().item()
            torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-5 * scale, msg=name)
            torch.testing.assert_close(g.double(), leaf.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    else:  # PEFT computes in bf16; rlkern accumulates in fp32: no worse than PEFT against float64
        assert_as_close_as_torch(ours, ref, peft_logp, floor=1e-3, name="logprobs")
        for name, g, p, leaf in zip(("hidden", "lora_A", "lora_B", "bias"), grads, peft_grads, leaves):
            assert g.dtype == dtype
            assert_as_close_as_torch(g, leaf.grad, p, floor=1e-2 * leaf.grad.abs().max().item(), factor=1.5,
                                     name=name)


def test_lora_head_dropout_matches_peft(backend):
    """p > 0: the caller applies the dropout and passes its output as ``lora_hidden`` (PEFT's
    ``lora_A(dropout(x))``). Protocol: the same seed before PEFT's forward and before
    ``torch.nn.functional.dropout`` draws the same mask (PEFT's dropout is the first random draw
    of its forward), so the two runs see one mask and must agree exactly in fp32."""
    model, head = _peft_head(20, 157, 4, 16, 0.3, torch.float32, seed=3)
    model.train()
    lora_a, lora_b, scaling = _adapter(head)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(29, 20, generator=gen).requires_grad_()
    labels = torch.randint(0, 157, (29,), generator=gen)
    upstream = torch.randn(29, generator=gen)
    torch.manual_seed(1234)
    peft_logp = _peft_logprobs(model, hidden, labels)
    (peft_logp * upstream).sum().backward()
    peft_grads = [t.grad.clone() for t in (hidden, lora_a, lora_b)]
    _zero_grads(hidden, lora_a, lora_b)

    torch.manual_seed(1234)
    dropped = torch.nn.functional.dropout(hidden, p=0.3, training=True)
    ours = rlkern.linear_token_logprobs(hidden, head.base_layer.weight, labels, lora_A=lora_a, lora_B=lora_b,
                                        lora_scaling=scaling, lora_hidden=dropped, chunk_size=7)
    (ours * upstream).sum().backward()
    # the dropout did something: without it the A path differs
    plain = rlkern.linear_token_logprobs(hidden.detach(), head.base_layer.weight, labels, lora_A=lora_a.detach(),
                                         lora_B=lora_b.detach(), lora_scaling=scaling)
    assert (plain - peft_logp).abs().max() > 1e-3
    torch.testing.assert_close(ours, peft_logp, rtol=0, atol=1e-5)
    for name, g, p in zip(("hidden", "lora_A", "lora_B"), (hidden.grad, lora_a.grad, lora_b.grad), peft_grads):
        torch.testing.assert_close(g, p, rtol=1e-4, atol=1e-5 * p.abs().max().item(), msg=name)


@pytest.mark.parametrize("deterministic", [False, True])
def test_lora_head_transforms_vs_reference(backend, deterministic):
    """logit_scale, softcap, temperature, entropy and the extras with the adapter, vs float64."""
    gen = torch.Generator().manual_seed(5)
    n, width, vocab, rank = 23, 19, 211, 5
    hidden = torch.randn(n, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.6
    lora_a, lora_b = torch.randn(rank, width, generator=gen) * 0.3, torch.randn(vocab, rank, generator=gen) * 0.3
    x = torch.randn(n, width, generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[4] = -100
    hyper = dict(temperature=0.8, logit_scale=1.3, logit_softcap=6.0)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, lora_a, lora_b, x)]
    out = rlkern.linear_token_logprobs(leaves[0], leaves[1], labels, lora_A=leaves[2], lora_B=leaves[3],
                                       lora_scaling=0.7, lora_hidden=leaves[4], return_entropy=True,
                                       extra_outputs=("mean_logits", "is_top1"), chunk_size=6,
                                       deterministic=deterministic, **hyper)
    g_l, g_e = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    (out.logprobs * g_l + out.entropy * g_e).sum().backward()
    refs = [t.double().requires_grad_() for t in (hidden, weight, lora_a, lora_b, x)]
    r_logp, r_ent, r_extras = reference(refs[0], refs[1], None, labels, lora=(refs[2], refs[3], 0.7, refs[4]),
                                        extra_outputs=("mean_logits", "is_top1"), **hyper)
    (r_logp * g_l.double() + r_ent * g_e.double()).sum().backward()
    torch.testing.assert_close(out.logprobs.double(), r_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.entropy.double(), r_ent, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.extras["mean_logits"].double(), r_extras["mean_logits"], rtol=0, atol=2e-5)
    assert torch.equal(out.extras["is_top1"], r_extras["is_top1"])
    for name, leaf, ref in zip(("hidden", "weight", "lora_A", "lora_B", "lora_hidden"), leaves, refs):
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-4, atol=1e-5 * ref.grad.abs().max().item(),
                                   msg=name)


def test_lora_head_batched_hidden_equals_flat():
    """[B, T, H] hidden and lora_hidden (a non-contiguous slice, as a causal LM's hidden[:, :-1])
    give the flat call's outputs and gradients."""
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 6, 12, generator=gen)[:, :-1]
    x = torch.randn(2, 5, 12, generator=gen)
    weight, lora_a = torch.randn(41, 12, generator=gen), torch.randn(3, 12, generator=gen)
    lora_b = torch.randn(41, 3, generator=gen)
    labels = torch.randint(0, 41, (2, 5), generator=gen)
    outs = []
    for shape in ((2, 5, 12), (10, 12)):
        leaves = [t.reshape(shape).detach().clone().requires_grad_() for t in (hidden, x)]
        a, b = lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()
        logp = rlkern.linear_token_logprobs(leaves[0], weight, labels.reshape(shape[:-1]), lora_A=a, lora_B=b,
                                            lora_scaling=0.5, lora_hidden=leaves[1])
        assert logp.shape == shape[:-1]
        logp.sum().backward()
        outs.append([logp.reshape(-1), leaves[0].grad.reshape(10, 12), leaves[1].grad.reshape(10, 12), a.grad, b.grad])
    for ours, flat in zip(*outs):
        torch.testing.assert_close(ours, flat, rtol=0, atol=1e-6)


def test_lora_head_gradcheck():
    gen = torch.Generator().manual_seed(6)
    n, width, vocab, rank = 5, 4, 9, 2
    tensors = [torch.randn(n, width, generator=gen, dtype=torch.float64),
               torch.randn(rank, width, generator=gen, dtype=torch.float64),
               torch.randn(vocab, rank, generator=gen, dtype=torch.float64),
               torch.randn(n, width, generator=gen, dtype=torch.float64)]
    weight = torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=gen)

    def fn(h, a, b, x):
        out = rlkern.linear_token_logprobs(h, weight, labels, lora_A=a, lora_B=b, lora_scaling=1.5, lora_hidden=x,
                                           return_entropy=True, chunk_size=2, logit_softcap=3.0)
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in tensors])

    def fn_no_x(h, a, b):  # the A path reads hidden itself: d hidden sums both paths
        return rlkern.linear_token_logprobs(h, weight, labels, lora_A=a, lora_B=b, lora_scaling=0.5)

    assert torch.autograd.gradcheck(fn_no_x, tensors[:3])


@pytest.mark.parametrize("logit_scale", [1.0, 1.3])
def test_lora_head_logits_dtype_bf16_vs_reference(backend, logit_scale):
    """logits_dtype=bf16 (TRL under autocast): xa and each tile rounded to bf16; the error is
    bf16-sized against the exact float64 value."""
    gen = torch.Generator().manual_seed(7)
    n, width, vocab, rank = 17, 16, 203, 4
    hidden = torch.randn(n, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.5
    lora_a, lora_b = torch.randn(rank, width, generator=gen) * 0.5, torch.randn(vocab, rank, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=gen)
    leaves = [t.clone().requires_grad_() for t in (hidden, lora_a, lora_b)]
    ours = rlkern.linear_token_logprobs(leaves[0], weight, labels, lora_A=leaves[1], lora_B=leaves[2],
                                        lora_scaling=2.0, logits_dtype=torch.bfloat16, chunk_size=5,
                                        logit_scale=logit_scale)
    ours.sum().backward()
    refs = [t.double().requires_grad_() for t in (hidden, lora_a, lora_b)]
    ref, _, _ = reference(refs[0], weight, None, labels, lora=(refs[1], refs[2], 2.0, None), logit_scale=logit_scale)
    ref.sum().backward()
    # |logit| ~ 6: a bf16 rounding of a logit is ~ 2e-2; each log-prob sees a few of them.
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=0.1)
    for leaf, r in zip(leaves, refs):
        torch.testing.assert_close(leaf.grad.double(), r.grad, rtol=0.05, atol=0.05 * r.grad.abs().max().item())


def test_lora_head_bad_calls():
    h, w, labels = torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2])
    a, b = torch.randn(2, 4), torch.randn(7, 2)
    with pytest.raises(ValueError, match="^linear_token_logprobs: lora_A and lora_B go together"):
        rlkern.linear_token_logprobs(h, w, labels, lora_A=a)
    with pytest.raises(ValueError, match=r"^linear_token_logprobs: lora_B must be \[V, r\] = \(7, 2\)"):
        rlkern.linear_token_logprobs(h, w, labels, lora_A=a, lora_B=b[:, :1])
    with pytest.raises(ValueError, match=r"^linear_token_logprobs: lora_A must be \[r, H\]"):
        rlkern.linear_token_logprobs(h, w, labels, lora_A=a[:, :3], lora_B=b)
    with pytest.raises(ValueError, match="^linear_token_logprobs: lora_hidden must have hidden's shape"):
        rlkern.linear_token_logprobs(h, w, labels, lora_A=a, lora_B=b, lora_hidden=h[:2])
    with pytest.raises(ValueError, match="^linear_token_logprobs: lora_hidden was given without"):
        rlkern.linear_token_logprobs(h, w, labels, lora_hidden=h)
    with pytest.raises(ValueError, match="^linear_token_logprobs: lora_scaling"):
        rlkern.linear_token_logprobs(h, w, labels, lora_A=a, lora_B=b, lora_scaling=float("nan"))
    with pytest.raises(TypeError, match="^linear_token_logprobs: lora_A must be a float tensor"):
        rlkern.linear_token_logprobs(h, w, labels, lora_A=a.long(), lora_B=b)


# Memory in a fresh process (peak resident size, as tests/test_linear_logprobs.py measures it):
# with V x H = 32000 x 1024 the merged weight W + s B A is 125 MiB fp32 (its gradient as much
# again), far above what the LoRA path adds: the 16 MiB tile, xa / d xa [N, r], d B [V, r].
_LORA_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch, rlkern
    from rlkern.benches.common import cpu_peak_rss_growth_mib
    torch.manual_seed(0)
    n, width, vocab, rank = 256, 1024, 32000, 8
    hidden = torch.randn(n, width, requires_grad=True)
    weight = torch.randn(vocab, width) / 32  # frozen
    lora_a = (torch.randn(rank, width) / 32).requires_grad_()
    lora_b = (torch.randn(vocab, rank) / 4).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    def step(merged):
        if merged:
            logp = rlkern.linear_token_logprobs(hidden, weight + 2.0 * lora_b @ lora_a, labels)
        else:
            logp = rlkern.linear_token_logprobs(hidden, weight, labels, lora_A=lora_a, lora_B=lora_b,
                                                lora_scaling=2.0)
        logp.sum().backward()
    step(False)  # warm up code paths
    hidden.grad = lora_a.grad = lora_b.grad = None
    print(json.dumps({"extra_mib": cpu_peak_rss_growth_mib(lambda: step(sys.argv[1] == "merged"))}))
""")


def test_lora_head_never_forms_the_merged_weight():
    from rlkern.benches.common import CPU_PROBE_ENV

    env = dict(os.environ, OMP_NUM_THREADS="1", **CPU_PROBE_ENV)

    def peak(mode):
        out = subprocess.run([sys.executable, "-c", _LORA_MEMORY_SCRIPT, mode], capture_output=True, text=True,
                             env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]

    merged, lora = peak("merged"), peak("lora")
    assert merged > 125, f"the probe must see the merged weight, saw only {merged:.0f} MiB"
    assert lora < 60, f"LoRA fwd+bwd peaked {lora:.0f} MiB above its inputs"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_lora_head_vs_reference(dtype):
    gen = torch.Generator().manual_seed(8)
    n, width, vocab, rank = 300, 64, 5003, 8
    hidden = torch.randn(n, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) * 0.3
    lora_a, lora_b = torch.randn(rank, width, generator=gen) * 0.3, torch.randn(vocab, rank, generator=gen) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=gen)
    leaves = [t.cuda().to(dtype).requires_grad_() for t in (hidden, lora_a, lora_b)]
    ours = rlkern.linear_token_logprobs(leaves[0], weight.cuda().to(dtype), labels.cuda(), lora_A=leaves[1],
                                        lora_B=leaves[2], lora_scaling=2.0, chunk_size=64)
    ours.sum().backward()
    refs = [t.detach().to(dtype).double().requires_grad_() for t in (hidden, lora_a, lora_b)]
    ref, _, _ = reference(refs[0], weight.to(dtype), None, labels, lora=(refs[1], refs[2], 2.0, None))
    ref.sum().backward()
    torch.testing.assert_close(ours.double().cpu(), ref, rtol=0, atol=5e-2 if dtype == torch.bfloat16 else 1e-3)
    for leaf, r in zip(leaves, refs):
        tol = (5e-2 if dtype == torch.bfloat16 else 1e-3) * r.grad.abs().max().item()
        torch.testing.assert_close(leaf.grad.double().cpu(), r.grad, rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------
# TRL's fused head (add_fused_lm_head, what every TRL trainer scores tokens with) on a PEFT model
# whose lm_head carries a LoRA adapter.


@pytest.fixture
def trl_patched():
    rt = pytest.importorskip("rlkern.integrations.trl")
    rt.unpatch()
    yield rt
    rt.unpatch()


def _lora_lm(dropout):
    from _tiny_models import tiny_qwen2, tiny_tokenizer

    peft = import_peer("peft")
    trl_utils = import_peer("trl.trainer.utils")
    model = tiny_qwen2(tiny_tokenizer(n_words=90), hidden_size=32)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))  # before PEFT, as TRL does
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["lm_head", "q_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    head = model.get_output_embeddings()
    assert isinstance(head, peft.tuners.lora.Linear)
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(0, 0.5)
    return model, head


def _check_fused_matches_unfused(rt, model, head, ids, labels, *, seed=5, trl_drops_adapter=False):
    """Loss and every trainable gradient of TRL's fused forward, patched, equal the unfused
    forward's (the model's own logits through PEFT's lora.Linear, HF's cross-entropy); the same
    seed before each forward gives the backbone's adapters the same dropout masks."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert head.lora_B["default"].weight.requires_grad and not head.base_layer.weight.requires_grad
    torch.manual_seed(seed)
    unfused = model(input_ids=ids, labels=labels)
    unfused.loss.backward()
    ref_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    if trl_drops_adapter:
        trl_own = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        assert abs(trl_own.item() - unfused.loss.item()) > 1e-3  # TRL's fused head skips the adapter
    rt.patch()
    before = rt.calls["ChunkedLogProbFunction[lora]"]
    torch.manual_seed(seed)
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert rt.calls["ChunkedLogProbFunction[lora]"] == before + 1
    fused.loss.backward()
    torch.testing.assert_close(fused.loss, unfused.loss, rtol=0, atol=2e-6)
    for p, r in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6 * max(r.abs().max().item(), 1.0))
    assert head.base_layer.weight.grad is None


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_trl_fused_head_with_lora_head(trl_patched, dropout):
    """rlkern's TRL fused head adds the adapter (TRL's own reads lm_head.weight, the frozen base,
    and drops it). With dropout > 0 the model is in eval mode (PEFT's dropout off)."""
    model, head = _lora_lm(dropout)
    model.eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    _check_fused_matches_unfused(trl_patched, model, head, ids, labels, trl_drops_adapter=True)


def test_trl_fused_lora_head_under_bf16_autocast(trl_patched):
    """TRL's default bf16=True runs the head under autocast: rlkern's adapter GEMMs output bf16
    (logits_dtype); its loss is no further from the fp32 unfused loss than PEFT's own unfused
    bf16 forward is (with a floor of one bf16 rounding of the loss)."""
    model, head = _lora_lm(0.0)
    model.eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = model(input_ids=ids, labels=ids).loss.item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            peft_bf16 = model(input_ids=ids, labels=ids).loss.item()
    trl_patched.patch()
    before = trl_patched.calls["ChunkedLogProbFunction[lora]"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    ours.backward()
    assert trl_patched.calls["ChunkedLogProbFunction[lora]"] == before + 1
    assert head.lora_A["default"].weight.grad.abs().max() > 0
    print(f"bf16 loss error: rlkern {abs(ours.item() - exact):.2e}, PEFT unfused {abs(peft_bf16 - exact):.2e}")
    assert abs(ours.item() - exact) <= max(1.5 * abs(peft_bf16 - exact), 2 ** -8 * abs(exact))


class _ElementwiseDrop(torch.nn.Module):
    """A dropout stand-in whose mask is a function of each element (x > 0, scaled by 2): the
    unfused forward ([B, T, H]) and TRL's compact fused forward ([n_valid, H]) then see the same
    mask, which a random one cannot give."""

    def forward(self, x):
        return torch.where(x > 0, 2 * x, torch.zeros_like(x))


def test_trl_fused_head_lora_dropout_in_training(trl_patched):
    """In training mode the adapter's dropout module is applied to the A path's input only
    (PEFT's lora_B(lora_A(dropout(x)))), and its gradient reaches the backbone through it."""
    model, head = _lora_lm(0.3)
    head.lora_dropout["default"] = _ElementwiseDrop()
    model.train()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    _check_fused_matches_unfused(trl_patched, model, head, ids, ids)


def test_trl_sft_trainer_with_lora_head(trl_patched, tmp_path):
    """A tiny TRL SFTTrainer whose lm_head carries a LoRA adapter. TRL 1.16's trainers refuse
    such a model in __init__ (their fused head would drop the adapter), so the adapter is
    injected after __init__ (peft.inject_adapter_in_model). Patched, the trainer's own
    compute_loss (its fused head) equals the unfused forward's loss with the adapter, with the
    same gradients, and a training step runs on rlkern and moves the adapter."""
    from _tiny_models import prompts, tiny_qwen2, tiny_tokenizer

    trl = import_peer("trl")
    peft = import_peer("peft")
    datasets = import_peer("datasets")
    tokenizer = tiny_tokenizer(n_words=90)
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", max_steps=1,
                         per_device_train_batch_size=4, use_cpu=True, seed=0, optim="sgd", learning_rate=0.05,
                         disable_tqdm=True, dataloader_num_workers=0)
    data = datasets.Dataset.from_dict({"text": prompts(8, length=(6, 12))})
    trainer = trl.SFTTrainer(model=tiny_qwen2(tokenizer, hidden_size=32), args=args, train_dataset=data,
                             processing_class=tokenizer)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False)
    model = peft.inject_adapter_in_model(config, trainer.model)
    head = model.get_output_embeddings()
    assert isinstance(head, peft.tuners.lora.Linear)
    lora_b = head.lora_B["default"].weight
    with torch.no_grad():
        lora_b.normal_(0, 0.5)
    batch = next(iter(trainer.get_train_dataloader()))
    params = [p for p in model.parameters() if p.requires_grad]
    unfused = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    unfused.loss.backward()
    ref_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    trl_patched.patch()
    before = trl_patched.calls["ChunkedLogProbFunction[lora]"]
    loss = trainer.compute_loss(model, batch)
    assert trl_patched.calls["ChunkedLogProbFunction[lora]"] == before + 1
    loss.backward()
    torch.testing.assert_close(loss, unfused.loss, rtol=0, atol=2e-6)
    for p, r in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6 * max(r.abs().max().item(), 1.0))
    model.zero_grad()
    start = lora_b.detach().clone()
    trainer.train()
    assert trl_patched.calls["ChunkedLogProbFunction[lora]"] > before + 1
    assert (lora_b.detach() - start).abs().max() > 1e-4


def test_patch_causal_lm_applies_a_lora_head():
    """rlkern.integrations.transformers.patch_causal_lm reads model.get_output_embeddings().weight:
    under PEFT the frozen base weight, so the adapter must be passed along (it was dropped)."""
    from _tiny_models import tiny_qwen2, tiny_tokenizer

    peft = import_peer("peft")
    from rlkern.integrations.transformers import patch_causal_lm

    model = patch_causal_lm(tiny_qwen2(tiny_tokenizer(n_words=90), hidden_size=32))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(model, config).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(0, 0.5)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    logits = model(input_ids=ids).logits  # the unpatched path: PEFT's lora.Linear on full logits
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    expected.sum().backward()
    ref = head.lora_A["default"].weight.grad.clone()
    head.lora_A["default"].weight.grad = None
    ours = model(input_ids=ids, logprob_labels=ids).logprobs
    ours.sum().backward()
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(head.lora_A["default"].weight.grad, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_peft_lora_of_refuses_what_the_op_cannot_apply():
    peft = import_peer("peft")
    model, head = _peft_head(8, 31, 2, 4, 0.0, torch.float32)
    from rlkern.ops.linear_logprobs import peft_lora_of

    assert peft_lora_of(head.base_layer, "op") is None  # a plain nn.Linear
    assert peft_lora_of(head, "op")[2] == 2.0
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["lm_head"]))
    head.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match=r"^op: the LM head carries PEFT adapters \['default', 'second'\]"):
        peft_lora_of(head, "op")
    with model.disable_adapter():
        assert peft_lora_of(head, "op") is None


# ---------------------------------------------------------------------------------------------
# FSDP2 and DDP: 2 gloo CPU processes (tests/_dist_heads.py) vs the single-process run.


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    out = tmp_path_factory.mktemp("dist") / "runs.pt"
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(here), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(here, "_dist_heads.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = torch.load(out)
    assert "error" not in runs, runs["error"]
    sys.path.insert(0, here)
    import _dist_heads

    return (runs, _dist_heads.single_process_reference(), _dist_heads.single_process_reference(lora=True),
            _dist_heads.trl_single_process_reference())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp2_sharded_head_matches_single_process(dist_runs):
    """fully_shard'ed head: the op takes head.weight (a Shard(0) DTensor) and returns its
    gradient in that placement, averaged over the ranks as FSDP2 reduces the module's own
    gradients; after one SGD step every weight equals the unsharded run's, computed per shard
    (tokens gathered, the vocabulary-parallel path) and with W gathered."""
    runs, single, _, _ = dist_runs
    assert runs["fsdp2_grad_placements"] == ("Shard(dim=0)",)
    assert runs["per_shard_calls"] == 1
    assert single["head.weight"].shape == (37, 16)
    assert _max_diff(runs["fsdp2"], single) <= 1e-6
    assert _max_diff(runs["fsdp2_gather"], single) <= 1e-6
    # the trap the op avoids: full_tensor() differentiates to a local slice, no reduction
    assert _max_diff(runs["fsdp2_naive"], single) > 1e-3


def test_fsdp2_sharded_lora_head_matches_single_process(dist_runs):
    """FSDP2 + a LoRA adapter on the head: A and B are DTensors too (the mixed Tensor/DTensor
    error users report); the frozen W does not move, A and B match the unsharded step."""
    runs, _, single, _ = dist_runs
    assert runs["fsdp2_lora_grad_placements"] == ("Shard(dim=0)",)
    assert _max_diff(runs["fsdp2_lora"], single) <= 1e-6
    import _dist_heads

    assert torch.equal(runs["fsdp2_lora"]["head.weight"], _dist_heads.build(_dist_heads.TinyLora).head.weight)


def test_ddp_wrapped_op_matches_single_process(dist_runs):
    runs, single, _, _ = dist_runs
    assert _max_diff(runs["ddp"], single) <= 1e-6


def test_trl_fused_head_under_fsdp2_matches_single_process(dist_runs):
    """TRL's fused head on a fully_shard'ed lm_head (TRL turns the DTensor into
    ``weight.full_tensor()``, which keeps each rank's own gradient): patched, rlkern gathers
    the sharded parameter itself and averages its gradient as FSDP2 does, so one SGD step
    equals the unsharded, unfused run."""
    runs, _, _, single = dist_runs
    assert runs["trl_fsdp2_calls"] == 1
    assert _max_diff(runs["trl_fsdp2"], single) <= 2e-6
    assert _max_diff(runs["trl_fsdp2_unpatched"], single) > 1e-4  # TRL's own: lm_head off
