"""rlkern.integrations.trl and the TRL drop-ins, against TRL 1.16's OWN functions.

- The drop-ins (``rlkern.selective_log_softmax`` & co.) return what TRL returns: dtype, shape,
  in-place writes on outputs that require grad, gradients; their numbers are at least as close
  to the float64 reference as TRL's.
- The fused-head adapter (``rt.ChunkedLogProbFunction``) against ``trl.kernels.ChunkedLogProbFunction``
  in every precision TRL offers (fp32, bf16 autocast, bf16 hidden with an fp32 weight, bf16
  everything, GRPO's cast_lm_head_to_fp32), every ``outputs`` subset, bias / softcap /
  logit_scale / temperature: outputs and gradients within 4x TRL-vs-TRL noise (TRL itself with
  another ``chunk_size``) plus a few fp32 ulps (plus, for gradients under a bf16 compute dtype,
  one bf16 rounding of the d-logits tile). Measured: both ~5e-7 on log-probs, ~1e-6 on
  gradients, in bf16 compute too (rounded tiles through ``logits_dtype``).
- patch() / unpatch(): every name TRL binds, whatever the import order, restored with ``is``;
  patch() again: a no-op with the same options, an error with others.
"""

import contextlib
import importlib
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import rlkern
from conftest import import_peer
from rlkern.reference import linear_logprobs as linear_reference

trl_utils = import_peer("trl.trainer.utils")
trl_kernels = import_peer("trl.kernels")
import rlkern.integrations.trl as rt  # noqa: E402

TRL_FUSED = trl_kernels.chunked_logprob.ChunkedLogProbFunction  # TRL's class, whatever patch() did
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True)
def _unpatched():
    rt.unpatch()
    yield
    rt.unpatch()


def _trl_fn(name):
    """TRL's own function, also while patched (unpatch() restores it in the module)."""
    return getattr(trl_utils, name)


def _ulp(dtype, ref):
    return 4 * torch.finfo(dtype).eps * (1.0 + ref.abs().max().item()) if ref.numel() else 0.0


def _check_closer(ours, theirs, ref, name):
    """ours and theirs have the same dtype and shape, and ours is no further from the float64
    reference than TRL's result (a few ulps of the output dtype of slack: the final rounding, summation order)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (name, ours.dtype, theirs.dtype)
    ours_err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    their_err = (theirs.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = max(their_err, _ulp(ours.dtype, ref))
    assert ours_err <= bound, f"{name}: error {ours_err:.3g} > TRL's {their_err:.3g} (bound {bound:.3g})"


def _logits(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)


# --- drop-ins -----------------------------------------------------------------------------------

SHAPES = [(7, 33), (2, 5, 41), (2, 3, 2, 17)]


@pytest.mark.peer
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_selective_log_softmax_is_trls(dtype, shape):
    logits = _logits(shape, dtype).requires_grad_()
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, shape[-1], shape[:-1], generator=g)
    mask = (torch.rand(shape[:-1], generator=g) > 0.3).long()
    upstream = torch.randn(shape[:-1], generator=g, dtype=torch.float64)
    ref_logits = logits.detach().double().requires_grad_()
    ref = (torch.log_softmax(ref_logits / 0.7, -1).gather(-1, index[..., None])[..., 0]).masked_fill(mask == 0, 0)
    ref.backward(upstream)
    results = {}
    for who, fn in (("ours", rlkern.selective_log_softmax), ("trl", _trl_fn("selective_log_softmax"))):
        logits.grad = None
        out = fn(logits, index, 0.7, mask)
        (out.double() * upstream).sum().backward()
        results[who] = (out.detach(), logits.grad.clone())
    _check_closer(results["ours"][0], results["trl"][0], ref.detach(), "logprobs")
    _check_closer(results["ours"][1], results["trl"][1], ref_logits.grad, "grad")
    # Top-K indices: TRL's PyTorch path, the same dtype.
    topk = torch.randint(0, shape[-1], (*shape[:-1], 3), generator=g)
    ref_k = torch.log_softmax(logits.detach().double(), -1).gather(-1, topk)
    _check_closer(rlkern.selective_log_softmax(logits.detach(), topk),
                  _trl_fn("selective_log_softmax")(logits.detach(), topk), ref_k, "top-k")
    # out_dtype=float32: rlkern's float32 result (float64 stays float64 only if asked).
    f32 = rlkern.selective_log_softmax(logits.detach(), index, 0.7, mask, out_dtype=torch.float32)
    assert f32.dtype == torch.float32
    assert (f32.double() - ref.detach()).abs().max() <= 1e-5 * (1 + ref.detach().abs().max())


@pytest.mark.peer
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_entropy_from_logits_is_trls(dtype, shape):
    logits = _logits(shape, dtype, seed=2).requires_grad_()
    upstream = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref_logits = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(ref_logits, -1)
    ref = -(logp.exp() * logp).sum(-1)
    ref.backward(upstream)
    results = {}
    for who, fn in (("ours", rlkern.entropy_from_logits), ("trl", _trl_fn("entropy_from_logits"))):
        logits.grad = None
        out = fn(logits)
        (out.double() * upstream).sum().backward()
        results[who] = (out.detach(), logits.grad.clone())
    _check_closer(results["ours"][0], results["trl"][0], ref.detach(), "entropy")
    _check_closer(results["ours"][1], results["trl"][1], ref_logits.grad, "grad")


@pytest.mark.peer
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_is_trls(dtype, entropy_requires_grad):
    shape = (3, 4, 29)
    logits = _logits(shape, dtype, seed=4).requires_grad_()
    g = torch.Generator().manual_seed(5)
    index = torch.randint(0, 29, shape[:-1], generator=g)
    mask = torch.rand(shape[:-1], generator=g) > 0.25
    ups = [torch.randn(shape[:-1], generator=g, dtype=torch.float64) for _ in range(2)]
    ref_logits = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(ref_logits / 1.3, -1)
    ref_lp = logp.gather(-1, index[..., None])[..., 0].masked_fill(~mask, 0)
    ref_h = (-(logp.exp() * logp).sum(-1)).masked_fill(~mask, 0)
    (ref_lp * ups[0] + (ref_h * ups[1] if entropy_requires_grad else 0)).sum().backward()
    results = {}
    for who, fn in (("ours", rlkern.selective_log_softmax_and_entropy),
                    ("trl", _trl_fn("selective_log_softmax_and_entropy"))):
        logits.grad = None
        lp, h = fn(logits, index, entropy_requires_grad, 1.3, mask)
        assert h.requires_grad == entropy_requires_grad, who
        loss = (lp.double() * ups[0]).sum() + ((h.double() * ups[1]).sum() if entropy_requires_grad else 0)
        loss.backward()
        results[who] = (lp.detach(), h.detach(), logits.grad.clone())
    _check_closer(results["ours"][0], results["trl"][0], ref_lp.detach(), "logprobs")
    _check_closer(results["ours"][1], results["trl"][1], ref_h.detach(), "entropy")
    _check_closer(results["ours"][2], results["trl"][2], ref_logits.grad, "grad")


@pytest.mark.peer
@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_take_in_place_writes_like_trls(dtype):
    """TRL's callers write into returned log-probs / entropies that require grad; the gradient
    then skips the overwritten entries. Ours must allow it and give TRL's gradient."""
    logits = _logits((2, 6, 23), dtype, seed=6).requires_grad_()
    index = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(7))
    grads = {}
    for who, mod in (("ours", rlkern), ("trl", trl_utils)):
        logits.grad = None
        lp = mod.selective_log_softmax(logits, index)
        lp[0, 2] = 0.0
        lp.masked_fill_(index > 18, 0.0)
        lp2, h = mod.selective_log_softmax_and_entropy(logits, index)
        h.masked_fill_(index < 4, 0.0)
        lp2[1, 1] = 0.0
        e = mod.entropy_from_logits(logits)
        e[..., 0] = 0.0
        (lp.double().sum() + lp2.double().sum() + h.double().sum() + e.double().sum()).backward()
        grads[who] = logits.grad.clone()
    ref = grads["trl"].double()
    slack = max(_ulp(dtype, ref) * 8, (grads["trl"].double() - ref).abs().max().item())
    assert (grads["ours"].double() - ref).abs().max().item() <= max(slack, 4 * torch.finfo(dtype).eps * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.peer
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropins_take_trls_dtype_on_cuda(dtype):
    """On CUDA TRL runs its Triton kernel for fp16/bf16/fp32 (float32 outputs) and its PyTorch
    path for float64 and top-K: the drop-ins return the same dtypes and numbers as close."""
    logits = _logits((2, 5, 64), dtype).cuda()
    index = torch.randint(0, 64, (2, 5), device="cuda")
    ref = torch.log_softmax(logits.double(), -1)
    for name, args, expected in (
        ("selective_log_softmax", (index,), ref.gather(-1, index[..., None])[..., 0]),
        ("selective_log_softmax", (index[..., None].repeat(1, 1, 3),), ref.gather(-1, index[..., None].repeat(1, 1, 3))),
        ("entropy_from_logits", (), -(ref.exp() * ref).sum(-1)),
    ):
        _check_closer(getattr(rlkern, name)(logits, *args), _trl_fn(name)(logits, *args), expected, name)


def test_token_logprobs_outputs_are_writable():
    """In-place writes on rlkern's own outputs give the gradient of the same out-of-place edit."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 4, 19, generator=g, requires_grad=True)
    labels = torch.randint(0, 19, (3, 4), generator=g)
    hidden, weight = torch.randn(3, 4, 8, generator=g, requires_grad=True), torch.randn(19, 8, generator=g, requires_grad=True)
    cases = [lambda: rlkern.token_logprobs(logits, labels, return_entropy=True),
             lambda: rlkern.token_logprobs(logits[:, :-1], labels[:, :-1], return_entropy=True),
             lambda: rlkern.token_logprobs(logits.view(12, 19), labels.view(12), return_entropy=True),
             lambda: rlkern.linear_token_logprobs(hidden, weight, labels, return_entropy=True)]
    for make in cases:
        grads = []
        for inplace in (True, False):
            logits.grad = hidden.grad = weight.grad = None
            lp, h = make()
            drop = torch.zeros_like(lp, dtype=torch.bool)
            drop.view(-1)[::3] = True
            if inplace:
                lp.view(-1)[0] = 0.0
                h.masked_fill_(drop, 0.0)
            else:
                first = torch.zeros_like(lp, dtype=torch.bool)
                first.view(-1)[0] = True
                lp, h = lp.masked_fill(first, 0.0), h.masked_fill(drop, 0.0)
            (lp.sum() + 0.5 * h.sum()).backward()
            grads.append([t.grad.clone() for t in (logits, hidden, weight) if t.grad is not None])
        assert len(grads[0]) == len(grads[1]) > 0
        for ours, theirs in zip(*grads):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_out_dtype_is_checked():
    with pytest.raises(TypeError, match="^selective_log_softmax: out_dtype"):
        rlkern.selective_log_softmax(torch.randn(2, 5), torch.tensor([0, 1]), out_dtype=torch.int32)


# --- the fused-head adapter ----------------------------------------------------------------------


def _head_inputs(h_dtype, w_dtype, bias, seed=0, n=45, width=24, vocab=301):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=g).to(h_dtype).requires_grad_()
    weight = (torch.randn(vocab, width, generator=g) * 0.4).to(w_dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.5).to(w_dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, targets, [torch.randn(n, generator=g) for _ in range(2)]


def _run_head(fn, inputs, *, autocast, temperature, chunk, softcap, scale, outputs):
    hidden, weight, bias, targets, ups = inputs
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        out = fn.apply(hidden, weight, bias, targets, temperature, chunk, softcap, scale, outputs)
    loss = (out[0] * ups[0]).sum() + ((out[1] * ups[1]).sum() if out[1] is not None else 0)
    loss.backward()
    return list(out), [t.grad.clone() if t is not None else None for t in (hidden, weight, bias)]


def _max_diff(a, b):
    if a is None:
        return 0.0
    if a.dtype == torch.bool:
        return float((a != b).float().mean())
    return (a.double() - b.double()).abs().max().item()


HEAD_CASES = {
    "fp32": dict(h=torch.float32, w=torch.float32, autocast=None),
    "bf16-autocast": dict(h=torch.float32, w=torch.float32, autocast=torch.bfloat16),
    "bf16-hidden-fp32-weight": dict(h=torch.bfloat16, w=torch.float32, autocast=None),
    "bf16-everything": dict(h=torch.bfloat16, w=torch.bfloat16, autocast=None),
    "cast-lm-head-to-fp32": dict(h=torch.float32, w=torch.float32, autocast=None),  # GRPO: fp32, autocast off
    "fp16-autocast": dict(h=torch.float32, w=torch.float32, autocast=torch.float16),
    "fp64": dict(h=torch.float64, w=torch.float64, autocast=None),
}
OUTPUT_SUBSETS = [("entropy",), (), ("is_top1",), ("log_sum_sq_probs", "mean_logits"), rt.OPTIONAL_OUTPUTS]


@pytest.mark.peer
@pytest.mark.parametrize("case", sorted(HEAD_CASES))
@pytest.mark.parametrize("transform", ["plain", "bias-softcap-scale-temperature"])
def test_fused_head_adapter_matches_trls_function(case, transform):
    spec = HEAD_CASES[case]
    bias = transform != "plain"
    options = dict(temperature=0.8, softcap=4.0, scale=0.7) if bias else dict(temperature=1.0, softcap=None, scale=1.0)
    for outputs in OUTPUT_SUBSETS:
        inputs = _head_inputs(spec["h"], spec["w"], bias)
        trl_out, trl_grads = _run_head(TRL_FUSED, inputs, autocast=spec["autocast"], chunk=64, outputs=outputs, **options)
        trl2_out, trl2_grads = _run_head(TRL_FUSED, inputs, autocast=spec["autocast"], chunk=97, outputs=outputs, **options)
        calls = rt.calls["ChunkedLogProbFunction"]
        our_out, our_grads = _run_head(rt.ChunkedLogProbFunction, inputs, autocast=spec["autocast"], chunk=64,
                                       outputs=outputs, **options)
        assert rt.calls["ChunkedLogProbFunction"] == calls + 1
        # TRL's 5-tuple: None exactly where TRL has None, TRL's dtypes; gradients in the inputs' dtypes.
        assert [o is None for o in our_out] == [o is None for o in trl_out], outputs
        assert [o.dtype for o in our_out if o is not None] == [o.dtype for o in trl_out if o is not None]
        assert [g is None or g.dtype for g in our_grads] == [g is None or g.dtype for g in trl_grads]
        names = ("logprobs", *rt.OPTIONAL_OUTPUTS)
        half = spec["autocast"] is not None or spec["h"] == torch.bfloat16
        half_eps = torch.finfo(spec["autocast"] or torch.bfloat16).eps
        if spec["h"] == torch.float64:
            # TRL folds float64 tiles in float32; rlkern computes in float64: no further from the
            # float64 reference than TRL (float32 outputs, float64 gradients, as TRL's).
            hidden, weight, b, targets, ups = inputs
            refs_in = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
            extras = tuple(n for n in rt.OPTIONAL_OUTPUTS[1:] if n in outputs)
            logp, entropy, ext = linear_reference.linear_logprobs(
                *refs_in, targets, temperature=options["temperature"], logit_scale=options["scale"],
                logit_softcap=options["softcap"], extra_outputs=extras)
            ((logp * ups[0]).sum() + ((entropy * ups[1]).sum() if "entropy" in outputs else 0)).backward()
            refs = [logp, entropy if "entropy" in outputs else None, *(ext.get(n) for n in rt.OPTIONAL_OUTPUTS[1:])]
            for name, ours, theirs, ref in zip(names, our_out, trl_out, refs):
                if ours is not None and ours.dtype != torch.bool:
                    assert _max_diff(ours, ref) <= max(_max_diff(theirs, ref), 1e-6), (name, outputs)
            for name, ours, theirs, ref in zip(("hidden", "weight", "bias"), our_grads, trl_grads, refs_in):
                if ours is not None:
                    assert _max_diff(ours, ref.grad) <= max(_max_diff(theirs, ref.grad), 1e-12), (name, outputs)
            continue
        for name, ours, theirs, again in zip(names, our_out, trl_out, trl2_out):
            if ours is not None and ours.dtype == torch.bool:
                assert _max_diff(ours, theirs) <= 0.05, (name, outputs)  # near-ties of the top logit
                continue
            noise = _max_diff(theirs, again)
            tol = 4 * noise + 8 * torch.finfo(torch.float32).eps * (1 + (theirs.abs().max().item() if theirs is not None else 0))
            assert _max_diff(ours, theirs) <= tol, (name, outputs, _max_diff(ours, theirs), noise)
        for name, ours, theirs, again in zip(("hidden", "weight", "bias"), our_grads, trl_grads, trl2_grads):
            if ours is None:
                continue
            noise = _max_diff(theirs, again)
            tol = 4 * noise + 16 * torch.finfo(ours.dtype).eps * (1 + theirs.abs().max().item())
            if half:
                # The d-logits tile is rounded to bf16 from fp32 values whose last bits depend on
                # the GEMM shapes: one element may round the other way (one bf16 ulp of it).
                tol += half_eps * theirs.abs().max().item()
            assert _max_diff(ours, theirs) <= tol, (name, outputs, _max_diff(ours, theirs), noise)
    # fp32=False is TRL's numbers, roundings included: under a bf16 compute dtype the
    # rounded tiles put both runs at the same distance from the float64 reference of the
    # bf16-rounded inputs, far above the noise between them (checked in the half cases).
    if half:
        hidden, weight, b, targets, _ = inputs
        half_dtype = spec["autocast"] or torch.bfloat16
        logp, _, _ = linear_reference.linear_logprobs(
            hidden.detach().to(half_dtype).double(), weight.detach().to(half_dtype).double(),
            None if b is None else b.detach().to(half_dtype).double(), targets, temperature=options["temperature"],
            logit_scale=options["scale"], logit_softcap=options["softcap"])
        assert _max_diff(trl_out[0], logp) > 10 * _max_diff(our_out[0], trl_out[0])


@pytest.mark.peer
def test_fused_head_fp32_is_more_accurate_than_trl_under_autocast():
    inputs = _head_inputs(torch.float32, torch.float32, False, seed=3)
    options = dict(temperature=1.0, chunk=64, softcap=None, scale=1.0, outputs=("entropy",))
    trl_out, _ = _run_head(TRL_FUSED, inputs, autocast=torch.bfloat16, **options)
    rt.patch(fp32=True)
    our_out, our_grads = _run_head(rt.ChunkedLogProbFunction, inputs, autocast=torch.bfloat16, **options)
    hidden, weight, _, targets, ups = inputs
    logp, entropy, _ = linear_reference.linear_logprobs(hidden.detach(), weight.detach(), None, targets)
    assert _max_diff(our_out[0], logp) <= 1e-5 < _max_diff(trl_out[0], logp)
    assert _max_diff(our_out[1], entropy) <= 1e-5
    assert our_grads[0].dtype == torch.float32


@pytest.mark.peer
def test_fused_head_backward_runs_in_trls_gather_context(monkeypatch):
    """ZeRO-3 re-gathers the head in the backward through trl.trainer.utils.maybe_gather_lm_head_ctx."""
    entered = []

    @contextlib.contextmanager
    def gather(*params):
        entered.append(params)
        yield

    monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", gather)
    hidden, weight, bias, targets, _ = _head_inputs(torch.float32, torch.float32, True)
    out = rt.ChunkedLogProbFunction.apply(hidden, weight, bias, targets, 1.0, 4096, None, 1.0, ("entropy",))
    assert not entered
    out[1].sum().backward()  # entropy only: grad_logprobs is None, as when TRL logs the entropy
    assert len(entered) == 1 and entered[0][0] is weight and entered[0][1] is bias
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None


@pytest.mark.peer
def test_fused_head_checks():
    hidden, weight, _, targets, _ = _head_inputs(torch.float32, torch.float32, False)
    with pytest.raises(ValueError, match="^ChunkedLogProbFunction: targets must be in"):
        rt.ChunkedLogProbFunction.apply(hidden, weight, None, targets - 400, 1.0, 64)
    with pytest.raises(ValueError, match="^ChunkedLogProbFunction: chunk_size"):
        rt.ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 0)
    with pytest.raises(TypeError, match="^patch: fp32 must be a bool, got 'bf16'"):
        rt.patch(fp32="bf16")
    with pytest.raises(TypeError, match="^patch: loss must be a bool or 'fused', got 1"):
        rt.patch(loss=1)
    assert not rt.is_patched()


@pytest.mark.peer
def test_patch_again_is_a_no_op_with_the_same_options_and_raises_with_others():
    rt.patch(fp32=True)
    replaced = trl_utils.selective_log_softmax
    rt.patch(fp32=True)
    assert rt.is_patched() and trl_utils.selective_log_softmax is replaced
    with pytest.raises(ValueError, match=r"^patch: already patched with fp32=True, loss=False; call unpatch\(\) first"):
        rt.patch()
    with pytest.raises(ValueError, match="^patch: already patched with fp32=True"):
        rt.patch(fp32=True, loss=True)
    rt.unpatch()
    assert not rt.is_patched() and trl_utils.selective_log_softmax is not replaced
    rt.patch()  # after unpatch() any options go
    with pytest.raises(ValueError, match="^patch: already patched with fp32=False, loss=False;"):
        rt.patch(fp32=True)


# --- patch / unpatch -------------------------------------------------------------------------------

_EXPERIMENTAL = {  # module: the names it imports from trl.trainer.utils
    "trl.experimental.a2po.a2po_trainer": ["selective_log_softmax"],
    "trl.experimental.cpo.cpo_trainer": ["selective_log_softmax"],
    "trl.experimental.orpo.orpo_trainer": ["selective_log_softmax"],
    "trl.experimental.sdft.sdft_trainer": ["selective_log_softmax"],
    "trl.experimental.sdft.loss_utils": ["selective_log_softmax"],
    "trl.experimental.sdpo.sdpo_trainer": ["selective_log_softmax"],
    "trl.experimental.sdpo.loss_utils": ["selective_log_softmax"],
    "trl.experimental.tpo.tpo_trainer": ["selective_log_softmax_and_entropy"],
}

_IMPORT_ORDER_SCRIPT = """
import importlib, sys
EXPERIMENTAL = {experimental!r}
names = sorted(EXPERIMENTAL)
before, after = names[: len(names) // 2], names[len(names) // 2:]
for m in before:  # imported before the patch
    importlib.import_module(m)
import trl.trainer.utils as u, trl.kernels as k, trl.kernels.chunked_logprob as kc
originals = {{n: getattr(u, n) for n in ("selective_log_softmax", "entropy_from_logits",
                                          "selective_log_softmax_and_entropy", "_ChunkedLogProbFunction")}}
import rlkern  # RLKERN_PATCH_TRL=1: patches here
import rlkern.integrations.trl as rt
assert rt.is_patched()
for m in after:  # imported after the patch
    importlib.import_module(m)
for n in originals:
    assert getattr(u, n) is not originals[n] and getattr(u, n).__module__.startswith("rlkern"), n
assert u._ChunkedLogProbFunction is rt.ChunkedLogProbFunction is k.ChunkedLogProbFunction is kc.ChunkedLogProbFunction
for m, ns in EXPERIMENTAL.items():
    for n in ns:
        assert getattr(sys.modules[m], n) is getattr(u, n), (m, n)
rt.unpatch()
for n, f in originals.items():
    assert getattr(u, n) is f, n
assert k.ChunkedLogProbFunction is kc.ChunkedLogProbFunction is originals["_ChunkedLogProbFunction"]
for m, ns in EXPERIMENTAL.items():
    for n in ns:
        assert getattr(sys.modules[m], n) is originals[n], (m, n)
print("ok")
"""


@pytest.mark.peer
def test_patch_binds_every_trl_name_whatever_the_import_order_and_unpatch_restores():
    env = dict(os.environ, RLKERN_PATCH_TRL="1")
    script = _IMPORT_ORDER_SCRIPT.format(experimental=_EXPERIMENTAL)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.peer
def test_patched_trl_functions_run_on_rlkern():
    original = trl_utils.selective_log_softmax
    rt.patch()
    logits, index = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    before = dict(rt.calls)
    lp, h = trl_utils.selective_log_softmax_and_entropy(logits, index)
    trl_utils.entropy_from_logits(logits)
    trl_utils.selective_log_softmax(logits, index)
    for name in ("selective_log_softmax_and_entropy", "entropy_from_logits", "selective_log_softmax"):
        assert rt.calls[name] == before.get(name, 0) + 1, name
    torch.testing.assert_close(lp, original(logits, index))
    rt.unpatch()
    assert trl_utils.selective_log_softmax is original


@pytest.mark.peer
def test_patch_loss_installs_and_restores_the_overrides(monkeypatch):
    """The wiring of patch(loss=True) against the interface of rlkern.integrations._trl_loss
    (a stand-in module here; the real one is tested below when it is installed)."""

    class Owner:
        def inherited(self):
            return "base"

    class Child(Owner):
        def own(self):
            return "own"

    original_own = Child.__dict__["own"]
    fake = types.ModuleType("rlkern.integrations._trl_loss")
    fake.loss_overrides = lambda: [(Child, "own", lambda self: "rl-own"), (Child, "inherited", lambda self: "rl-inh")]
    monkeypatch.setitem(sys.modules, "rlkern.integrations._trl_loss", fake)
    rt.patch(loss=True)
    assert Child().own() == "rl-own" and Child().inherited() == "rl-inh"
    rt.unpatch()
    assert Child.__dict__["own"] is original_own and "inherited" not in Child.__dict__ and Child().inherited() == "base"


@pytest.mark.peer
def test_patch_that_fails_half_way_leaves_trl_unpatched(monkeypatch):
    original = trl_utils.selective_log_softmax
    monkeypatch.setitem(sys.modules, "rlkern.integrations._trl_loss", None)  # its import fails
    with pytest.raises(ImportError, match="^patch: loss=True needs rlkern.integrations._trl_loss"):
        rt.patch(loss=True)
    assert not rt.is_patched() and trl_utils.selective_log_softmax is original
    rt.patch()  # then any options go


@pytest.mark.peer
def test_patch_loss_with_the_real_overrides():
    try:
        _trl_loss = importlib.import_module("rlkern.integrations._trl_loss")
    except ModuleNotFoundError as error:
        if error.name != "rlkern.integrations._trl_loss":
            raise
        pytest.skip("rlkern.integrations._trl_loss is not in this tree yet")
    overrides = _trl_loss.loss_overrides()
    originals = [vars(owner).get(attr) for owner, attr, _ in overrides]
    rt.patch(loss=True)
    for (owner, attr, _), original in zip(overrides, originals):
        assert vars(owner).get(attr) is not original, (owner, attr)
    rt.unpatch()
    for (owner, attr, _), original in zip(overrides, originals):
        assert vars(owner).get(attr) is original, (owner, attr)



@pytest.mark.peer
def test_patch_after_trl_wrapped_the_model():
    """A trainer wraps its model in __init__; patch() afterwards still reaches the fused head
    (TRL looks the function up at call time), and the outputs are TRL's."""
    from _tiny_models import tiny_qwen2, tiny_tokenizer

    model = tiny_qwen2(tiny_tokenizer(n_words=90), hidden_size=32)
    trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    theirs = model(input_ids=ids, labels=labels, fused_lm_head=True)
    rt.patch()
    before = rt.calls["ChunkedLogProbFunction"]
    ours = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert rt.calls["ChunkedLogProbFunction"] == before + 1
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours.entropy, theirs.entropy, rtol=0, atol=2e-6)
    assert torch.equal(ours.label_mask, theirs.label_mask) and torch.equal(ours.is_top1, theirs.is_top1)
    assert (ours.log_probs[0, :2] == 0).all()  # TRL zeroes the -100 positions


@pytest.mark.peer
def test_patch_fp32_gives_trls_functions_rlkerns_unrounded_results():
    """patch(fp32=True): TRL's logits functions, reached through trl.trainer.utils, return
    float32 (float64 for float64 logits) as the verl and OpenRLHF patches do; without it, TRL's
    dtype."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 5, 67, generator=gen).bfloat16()
    index = torch.randint(0, 67, (3, 5), generator=gen)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, index[..., None])[..., 0]
    rt.patch()
    assert trl_utils.selective_log_softmax(logits, index).dtype == torch.bfloat16
    rt.unpatch()
    rt.patch(fp32=True)
    try:
        logp = trl_utils.selective_log_softmax(logits, index)
        entropy = trl_utils.entropy_from_logits(logits)
        assert logp.dtype == entropy.dtype == torch.float32
        assert _max_diff(logp, exact) <= 1e-5
        assert trl_utils.entropy_from_logits(logits.double()).dtype == torch.float64
        assert trl_utils.selective_log_softmax(logits, index, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    finally:
        rt.unpatch()
