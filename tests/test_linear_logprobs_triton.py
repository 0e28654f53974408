"""The fused Triton kernels of kernels/linear_logprobs.py (matmul inside Triton) vs the float64
reference, called through their launchers.

On a CPU-only machine they run under TRITON_INTERPRET=1 (set by conftest) on CPU tensors, at
small sizes: the interpreter's block sizes (BLOCK_N 16, BLOCK_V 64, BLOCK_H 16, BLOCK_HO 32)
make these shapes run several token, vocab and H blocks, with tails in each. With CUDA they run
the compiled kernels on the GPU.

Tolerances (CONTRIBUTING.md, Tests): the error PyTorch itself makes at the input dtype against float64
(``F.linear`` in that dtype, softmax in fp32, autograd), measured in each test.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import assert_as_close_as_torch  # noqa: E402
from rlkern import _backend  # noqa: E402
from rlkern.reference import linear_logprobs as reference  # noqa: E402

if not (torch.cuda.is_available() or _backend.triton_interpreted()):
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from rlkern.kernels import linear_logprobs as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def _inputs(n, h, vocab, dtype, *, bias=True, seed=0, ignore_every=0, scale=1.0):
    """Logits of spread ~3 (scale multiplies it); labels drawn near the argmax for a third of the
    rows, where 1 - p needs every digit of the saved lse."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) * (3.0 * scale / math.sqrt(h))
    b = torch.randn(vocab, generator=g) * scale if bias else None
    labels = torch.randint(0, vocab, (n,), generator=g)
    logits = hidden @ weight.T + (b if bias else 0.0)
    labels[1::3] = logits[1::3].argmax(-1)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    cast = lambda x: None if x is None else x.to(dtype).to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(DEVICE)


def _grads_out(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)


def _model(hidden, weight, bias, labels, *, temperature, logit_scale, softcap, ignore_index, exact):
    """(logp, entropy, grads of sum(g_l logp + g_H entropy) fn) by autograd: float64 reference
    when ``exact``, else PyTorch at the inputs' dtype (logits from F.linear in that dtype)."""
    if exact:
        leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
        logp, entropy, _ = reference.linear_logprobs(
            *leaves, labels, temperature=temperature, logit_scale=logit_scale, logit_softcap=softcap,
            ignore_index=ignore_index)
    else:
        leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
        x = F.linear(*leaves).float() * logit_scale
        if softcap:
            x = softcap * torch.tanh(x / softcap)
        log_p = torch.log_softmax(x / temperature, dim=-1)
        ignored = labels == ignore_index
        logp = log_p.gather(1, torch.where(ignored, 0, labels)[:, None])[:, 0].masked_fill(ignored, 0.0)
        entropy = -(log_p.exp() * log_p).sum(-1)

    def grads(g_l, g_h):
        for leaf in leaves:
            if leaf is not None:
                leaf.grad = None
        loss = (logp * g_l.to(logp.dtype)).sum()
        if g_h is not None:
            loss = loss + (entropy * g_h.to(entropy.dtype)).sum()
        loss.backward(retain_graph=True)
        return [None if leaf is None else leaf.grad for leaf in leaves]

    return logp.detach(), entropy.detach(), grads


def _forward(hidden, weight, bias, labels, *, temperature=1.0, logit_scale=1.0, softcap=None,
             ignore_index=IGNORE, with_entropy=True):
    return kernels.linear_logprobs_forward(hidden, weight, bias, labels, logit_scale, softcap or 0.0,
                                           temperature, ignore_index, with_entropy)


def _backward(g_l, g_h, hidden, weight, bias, labels, lse, entropy, *, temperature=1.0, logit_scale=1.0,
              softcap=None, ignore_index=IGNORE, need=(True, True, True), deterministic=False):
    return kernels.linear_logprobs_backward(g_l, g_h, hidden, weight, bias, labels, lse, entropy, logit_scale,
                                            softcap or 0.0, temperature, ignore_index, *need, deterministic)


HYPER = [
    dict(temperature=1.0, logit_scale=1.0, softcap=None),
    dict(temperature=0.7, logit_scale=1.3, softcap=5.0),  # softcap 5 saturates logits of spread ~4
]


# (1, 16, 67): one token, H one K step, V one full vocab block plus a 3-column tail.
# (37, 48, 257): 3 token blocks (5-row tail), 3 K steps, 5 vocab blocks (1-column tail).
# (37, 40, 1001): H not a multiple of any block (masked K steps), 16 vocab blocks.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,vocab", [(1, 16, 67), (37, 48, 257), (37, 40, 1001)])
@pytest.mark.parametrize("hyper", HYPER, ids=["plain", "T-scale-softcap"])
def test_forward_matches_reference(dtype, n, h, vocab, hyper):
    hidden, weight, bias, labels = _inputs(n, h, vocab, dtype, ignore_every=4, bias=hyper["softcap"] is None)
    logp, entropy, lse = _forward(hidden, weight, bias, labels, **hyper)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32 and lse.dtype == torch.float64
    assert (logp <= 0).all()
    assert (logp[labels == IGNORE] == 0).all()
    ref_logp, ref_entropy, _ = _model(hidden, weight, bias, labels, exact=True, ignore_index=IGNORE, **hyper)
    # The kernels keep fp32 logits whatever the input dtype, so the bound is PyTorch's error at
    # fp32 on the same values (for bf16 inputs far tighter than PyTorch's error at bf16, whose
    # logits are rounded to bf16: ~3e-2 here).
    f32 = [None if x is None else x.float() for x in (hidden, weight, bias)]
    own_logp, own_entropy, _ = _model(*f32, labels, exact=False, ignore_index=IGNORE, **hyper)
    # Floor: a few fp32 ulps of the values (PyTorch can be exact by luck on a few rows).
    floor = 8 * torch.finfo(torch.float32).eps * max(1.0, ref_entropy.abs().max().item())
    assert_as_close_as_torch(logp.cpu(), ref_logp.cpu(), own_logp.cpu(), floor=floor, factor=2.0, name="logp")
    assert_as_close_as_torch(entropy.cpu(), ref_entropy.cpu(), own_entropy.cpu(), floor=floor, factor=2.0,
                             name="entropy")
    # lse is what the backward reads: it must be the float64 log-sum-exp to fp32 accuracy.
    x = reference.logits64(hidden, weight, bias, hyper["logit_scale"])
    if hyper["softcap"]:
        x = hyper["softcap"] * torch.tanh(x / hyper["softcap"])
    ref_lse = torch.logsumexp(x / hyper["temperature"], -1)
    torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), rtol=1e-5, atol=1e-5)


# Both gradients, with and without bias / softcap, both accumulation schemes, fp32 and bf16.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", [
    dict(hyper=HYPER[0], bias=False, entropy_grad=False),
    dict(hyper=HYPER[1], bias=True, entropy_grad=True),
], ids=["logp-grad", "entropy-grad-bias-softcap"])
def test_backward_matches_reference(dtype, deterministic, case):
    n, h, vocab = 37, 48, 257
    hyper = case["hyper"]
    hidden, weight, bias, labels = _inputs(n, h, vocab, dtype, bias=case["bias"], ignore_every=5)
    g_l, g_h = _grads_out(n)
    g_h = g_h if case["entropy_grad"] else None
    logp, entropy, lse = _forward(hidden, weight, bias, labels, **hyper)
    grads = _backward(g_l, g_h, hidden, weight, bias, labels, lse, entropy, deterministic=deterministic, **hyper)
    ref = _model(hidden, weight, bias, labels, exact=True, ignore_index=IGNORE, **hyper)[2](g_l, g_h)
    own = _model(hidden, weight, bias, labels, exact=False, ignore_index=IGNORE, **hyper)[2](g_l, g_h)
    for name, ours, r, t in zip(("hidden", "weight", "bias"), grads, ref, own):
        if r is None:
            assert ours is None, name
            continue
        assert ours.dtype == torch.float32 and ours.shape == r.shape
        # bf16: G enters the products rounded to bf16, as in PyTorch's bf16 backward: its bound.
        floor = 4 * torch.finfo(torch.float32).eps * r.abs().max().item()
        assert_as_close_as_torch(ours.cpu(), r.cpu(), t.cpu(), floor=floor, factor=1.5, name=f"d {name}")


def test_float16():
    # fp16 inputs: fp16 tensor-core tiles, G rounded to fp16 for the products.
    n, h, vocab = 37, 48, 257
    hidden, weight, bias, labels = _inputs(n, h, vocab, torch.float16, ignore_every=5)
    g_l, g_h = _grads_out(n)
    hyper = HYPER[1]
    logp, entropy, lse = _forward(hidden, weight, bias, labels, **hyper)
    ref_logp, ref_entropy, ref_grads = _model(hidden, weight, bias, labels, exact=True, ignore_index=IGNORE, **hyper)
    f32 = [x.float() for x in (hidden, weight, bias)]
    own_logp, own_entropy, _ = _model(*f32, labels, exact=False, ignore_index=IGNORE, **hyper)
    floor = 8 * torch.finfo(torch.float32).eps * max(1.0, ref_entropy.abs().max().item())
    assert_as_close_as_torch(logp.cpu(), ref_logp.cpu(), own_logp.cpu(), floor=floor, factor=2.0, name="logp")
    assert_as_close_as_torch(entropy.cpu(), ref_entropy.cpu(), own_entropy.cpu(), floor=floor, factor=2.0,
                             name="entropy")
    own_grads = _model(hidden, weight, bias, labels, exact=False, ignore_index=IGNORE, **hyper)[2]
    grads = _backward(g_l, g_h, hidden, weight, bias, labels, lse, entropy, **hyper)
    for name, ours, r, t in zip(("hidden", "weight", "bias"), grads, ref_grads(g_l, g_h), own_grads(g_l, g_h)):
        floor = 4 * torch.finfo(torch.float32).eps * r.abs().max().item()
        assert_as_close_as_torch(ours.cpu(), r.cpu(), t.cpu(), floor=floor, factor=1.5, name=f"d {name}")


def test_backward_need_flags():
    # Each gradient alone equals the same gradient computed together with the others.
    hidden, weight, bias, labels = _inputs(20, 16, 67, torch.float32, ignore_every=3)
    g_l, g_h = _grads_out(20)
    logp, entropy, lse = _forward(hidden, weight, bias, labels)
    for deterministic in (False, True):
        full = _backward(g_l, g_h, hidden, weight, bias, labels, lse, entropy, deterministic=deterministic)
        for i in range(3):
            need = tuple(j == i for j in range(3))
            alone = _backward(g_l, g_h, hidden, weight, bias, labels, lse, entropy, need=need,
                              deterministic=deterministic)
            for j in range(3):
                if j == i:
                    torch.testing.assert_close(alone[j], full[j], rtol=1e-6, atol=1e-7)
                else:
                    assert alone[j] is None
    # An fp32 lse (rlkern stores float64) is accepted: the same gradients to fp32 precision.
    from_fp32 = _backward(g_l, g_h, hidden, weight, bias, labels, lse.float(), entropy)
    for a, b in zip(from_fp32, full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    # No bias: no bias gradient, whatever need_bias says.
    _, _, lse = _forward(hidden, weight, None, labels)
    assert _backward(g_l, None, hidden, weight, None, labels, lse, None)[2] is None


def test_deterministic_bit_identical():
    # deterministic=True: two runs agree bit for bit, and with the atomic path within fp32 noise.
    hidden, weight, bias, labels = _inputs(37, 48, 257, torch.bfloat16, ignore_every=4)
    g_l, g_h = _grads_out(37)
    logp, entropy, lse = _forward(hidden, weight, bias, labels, softcap=30.0)
    runs = [_backward(g_l, g_h, hidden, weight, bias, labels, lse, entropy, softcap=30.0, deterministic=True)
            for _ in range(2)]
    atomic = _backward(g_l, g_h, hidden, weight, bias, labels, lse, entropy, softcap=30.0)
    for a, b, c in zip(*runs, atomic):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5 * c.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(dtype):
    # A token's forward outputs (and its deterministic d hidden) are the same bits whether it is
    # computed alone, in a slice that starts mid-block, or in the full batch. Compiled, that holds
    # bit for bit; under the interpreter tl.dot is numpy's matmul, whose BLAS (OpenBLAS's
    # DYNAMIC_ARCH kernels on some CPUs) may round a row differently by its place in the tile, so
    # there the check is to fp32 rounding.
    def same(x, y):
        if DEVICE == "cuda":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6, check_dtype=True)

    n = 37
    hidden, weight, bias, labels = _inputs(n, 40, 257, dtype, ignore_every=6)
    g_l, g_h = _grads_out(n)
    full = _forward(hidden, weight, bias, labels, softcap=20.0)
    full_dh = _backward(g_l, g_h, hidden, weight, bias, labels, full[2], full[1], softcap=20.0,
                        need=(True, False, False), deterministic=True)[0]
    for part in (slice(0, 1), slice(17, 18), slice(36, 37), slice(5, 29)):
        sub = _forward(hidden[part], weight, bias, labels[part], softcap=20.0)
        for ours, whole in zip(sub, full):
            same(ours, whole[part])
        sub_dh = _backward(g_l[part], g_h[part], hidden[part], weight, bias, labels[part], sub[2], sub[1],
                           softcap=20.0, need=(True, False, False), deterministic=True)[0]
        same(sub_dh, full_dh[part])


def test_ignore_and_out_of_range_labels():
    # ignore_index (here a valid-looking 0 and -1): logp 0 and no logp gradient; labels outside
    # [0, V) that are not ignore_index: NaN logp (no host sync) and no logp gradient either.
    n, vocab = 9, 67
    hidden, weight, bias, labels = _inputs(n, 16, vocab, torch.float32)
    g_l, g_h = _grads_out(n)
    for ignore_index in (0, -1):
        lab = labels.clone()
        lab[[1, 4]] = ignore_index
        lab[2], lab[6] = vocab, -5
        logp, entropy, lse = _forward(hidden, weight, bias, lab, ignore_index=ignore_index)
        assert (logp[[1, 4]] == 0).all()
        assert logp[[2, 6]].isnan().all()
        ok = torch.ones(n, dtype=torch.bool, device=DEVICE)
        ok[[2, 6]] = False
        assert (logp[ok] <= 0).all() and not logp[ok].isnan().any()
        ref_lab = torch.where(ok, lab, ignore_index)
        ref = _model(hidden, weight, bias, ref_lab, temperature=1.0, logit_scale=1.0, softcap=None,
                     ignore_index=ignore_index, exact=True)
        torch.testing.assert_close(logp[ok].double(), ref[0][ok], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy.double(), ref[1], rtol=1e-5, atol=1e-5)
        grads = _backward(g_l, g_h, hidden, weight, bias, lab, lse, entropy, ignore_index=ignore_index)
        for ours, r in zip(grads, ref[2](g_l, g_h)):
            torch.testing.assert_close(ours.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


def test_strided_inputs_and_skipped_blocks():
    # Row strides != H (slices of wider buffers), an int32 strided label vector, an expanded
    # scalar grad (stride 0): the same bits as the contiguous call.
    n, h, vocab = 21, 16, 67
    hidden, weight, bias, labels = _inputs(n, h, vocab, torch.bfloat16, ignore_every=4)
    wide_h = torch.zeros(n, h + 8, dtype=hidden.dtype, device=DEVICE)
    wide_h[:, 3:3 + h] = hidden
    wide_w = torch.zeros(2 * vocab, h, dtype=weight.dtype, device=DEVICE)
    wide_w[::2] = weight
    lab32 = torch.zeros(2 * n, dtype=torch.int32, device=DEVICE)
    lab32[::2] = labels.int()
    args = (wide_h[:, 3:3 + h], wide_w[::2], bias, lab32[::2])
    got = _forward(*args)
    want = _forward(hidden, weight, bias, labels)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    g_scalar = torch.full((), 0.5, device=DEVICE).expand(n)
    for deterministic in (False, True):
        a = _backward(g_scalar, None, *args, got[2], None, deterministic=deterministic)
        b = _backward(g_scalar.contiguous(), None, hidden, weight, bias, labels, want[2], None,
                      deterministic=deterministic)
        for x, y in zip(a, b):
            assert torch.equal(x, y)

    # The first token block (16 rows) all ignored: without an entropy grad its tiles are
    # skipped and its rows' d hidden must still be exact zeros; with one they are not skipped.
    lab = labels.clone()
    lab[:16] = IGNORE
    logp, entropy, lse = _forward(hidden, weight, bias, lab)
    g_l, g_h = _grads_out(n)
    model = _model(hidden, weight, bias, lab, temperature=1.0, logit_scale=1.0, softcap=None,
                   ignore_index=IGNORE, exact=True)
    for deterministic in (False, True):
        for grad_entropy in (None, g_h):
            dh, dw, db = _backward(g_l, grad_entropy, hidden, weight, bias, lab, lse, entropy,
                                   deterministic=deterministic)
            ref = model[2](g_l, grad_entropy)
            if grad_entropy is None:
                assert (dh[:16] == 0).all()
            for ours, r in zip((dh, dw, db), ref):
                # bf16 inputs: G enters the products rounded to bf16 (relative error 2^-9).
                torch.testing.assert_close(ours.double(), r, rtol=0, atol=4e-3 * r.abs().max().item())


def test_large_logits():
    # |logits| ~ 1e3 (logit_scale 300): logp and entropy computed relative to the row max keep
    # their digits; the saved float64 lse keeps p at the label exact enough for its gradient.
    hidden, weight, bias, labels = _inputs(5, 16, 257, torch.float32)
    logp, entropy, lse = _forward(hidden, weight, bias, labels, logit_scale=300.0)
    ref_logp, ref_entropy, grads = _model(hidden, weight, bias, labels, temperature=1.0, logit_scale=300.0,
                                          softcap=None, ignore_index=IGNORE, exact=True)
    own_logp, own_entropy, own_grads = _model(hidden, weight, bias, labels, temperature=1.0, logit_scale=300.0,
                                              softcap=None, ignore_index=IGNORE, exact=False)
    assert logp.isfinite().all() and entropy.isfinite().all()
    floor = 1e-4  # 1e-7 relative to the logits
    assert_as_close_as_torch(logp.cpu(), ref_logp.cpu(), own_logp.cpu(), floor=floor, factor=2.0, name="logp")
    assert_as_close_as_torch(entropy.cpu(), ref_entropy.cpu(), own_entropy.cpu(), floor=floor, factor=2.0,
                             name="entropy")
    g_l, _ = _grads_out(5)
    ours = _backward(g_l, None, hidden, weight, bias, labels, lse, None, logit_scale=300.0)
    for name, x, r, t in zip(("hidden", "weight", "bias"), ours, grads(g_l, None), own_grads(g_l, None)):
        floor = 4 * torch.finfo(torch.float32).eps * r.abs().max().item()
        assert_as_close_as_torch(x.cpu(), r.cpu(), t.cpu(), floor=floor, factor=2.0, name=f"d {name}")


def test_empty_shapes():
    hidden, weight, bias, labels = _inputs(4, 16, 67, torch.float32)
    logp, entropy, lse = _forward(hidden[:0], weight, bias, labels[:0])
    assert logp.shape == entropy.shape == lse.shape == (0,)
    grads = _backward(logp, None, hidden[:0], weight, bias, labels[:0], lse, None)
    assert grads[0].shape == (0, 16) and (grads[1] == 0).all() and (grads[2] == 0).all()
    # V = 0: every label is out of range (NaN) unless ignored; lse = -inf.
    lab = labels.clone()
    lab[0] = IGNORE
    logp, entropy, lse = _forward(hidden, weight[:0], None, lab)
    assert logp[0] == 0 and logp[1:].isnan().all() and (lse == -math.inf).all()


def test_bad_inputs():
    hidden, weight, bias, labels = _inputs(4, 16, 67, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        _forward(hidden, weight[:, :8], bias, labels)
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        _forward(hidden, weight.double(), bias, labels)
    with pytest.raises(ValueError, match="contiguous last dim"):
        _forward(hidden.t().contiguous().t(), weight, bias, labels)
    with pytest.raises(ValueError, match="labels must be"):
        _forward(hidden, weight, bias, labels.float())
    with pytest.raises(ValueError, match="bias must be"):
        _forward(hidden, weight, bias[:3], labels)


# Compiles every kernel for an H100 (sm_90a) without a GPU: the interpreter runs the kernels'
# math but not Triton's compiler (types, layouts, dot shapes, pipelining), so this is what keeps
# the GPU path building in CI. Run in a fresh interpreter without TRITON_INTERPRET, with the
# GPU launch configs of kernels/linear_logprobs.py, and the divisibility-by-16 hints a real
# launch would give for these sizes.
_SM90_SCRIPT = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlkern.kernels import linear_logprobs as K

target = GPUTarget("cuda", 90, 32)
backend = triton.compiler.make_backend(target)
FLOATS = {"logit_scale", "softcap", "inv_softcap", "inv_temp", "grad_scale", "log_vocab"}


def ptx(fn, dtype, consts):
    consts = dict(consts)
    warps, stages = consts.pop("num_warps", 4), consts.pop("num_stages", 3)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + {"hidden_ptr": dtype, "weight_ptr": dtype, "bias_ptr": dtype,
                               "labels_ptr": "i64", "lse_ptr": "fp64"}.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
            if name in ("H", "stride_h", "stride_w"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = backend.parse_options(dict(num_warps=warps, num_stages=stages, enable_fp_fusion=False))
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options.__dict__).asm["ptx"]


out = {}
for dtype, size, precision in (("bf16", 2, "ieee"), ("fp32", 4, "ieee"), ("fp32", 4, "tf32")):
    launch = K._LAUNCH[size]
    flags = dict(HAS_BIAS=True, HAS_SOFTCAP=True, INTERPRET=False, PRECISION=precision, ROUND_LOGITS=False,
                 ROUND_BF16=False)
    bwd = dict(flags, HAS_GRAD_ENTROPY=True, ROUND_BF16=False, EVEN_H=True, EVEN_HO=True)
    atomic = K._ATOMIC_CONFIGS[0] if dtype == "bf16" or precision == "tf32" else K._ATOMIC_FP32_IEEE[0]
    variants = {
        "fwd": (K._fwd_partials_kernel, dict(flags, WITH_ENTROPY=True, EVEN_H=True, **launch["fwd"])),
        "fwd_plain_odd_h": (K._fwd_partials_kernel, dict(flags, HAS_BIAS=False, HAS_SOFTCAP=False,
                                                         WITH_ENTROPY=False, EVEN_H=False, **launch["fwd"])),
        "atomic": (K._bwd_atomic_kernel, dict(bwd, NEED_DH=True, NEED_DW=True, NEED_DB=True,
                                               num_warps=atomic.num_warps, num_stages=atomic.num_stages,
                                               **atomic.kwargs, **launch["atomic"])),
        "dh": (K._bwd_dh_kernel, dict(bwd, **launch["dh"])),
        "dw": (K._bwd_dw_kernel, dict(bwd, NEED_DW=True, NEED_DB=True, **launch["dw"])),
        # logits_dtype: logits and d-logits tiles rounded to bf16 in the epilogues.
        "fwd_round": (K._fwd_partials_kernel, dict(flags, ROUND_LOGITS=True, WITH_ENTROPY=True, EVEN_H=True,
                                                   **launch["fwd"])),
        "atomic_round": (K._bwd_atomic_kernel, dict(bwd, ROUND_LOGITS=True, NEED_DH=True, NEED_DW=True,
                                                     NEED_DB=True, num_warps=atomic.num_warps,
                                                     num_stages=atomic.num_stages, **atomic.kwargs,
                                                     **launch["atomic"])),
        # N = V = 1 and unit strides: Triton turns ints equal to 1 into constants.
        "atomic_n1_v1": (K._bwd_atomic_kernel, dict(bwd, NEED_DH=True, NEED_DW=True, NEED_DB=True, N=1, V=1,
                                                     stride_label=1, stride_lse=1, **atomic.kwargs,
                                                     **launch["atomic"])),
    }
    if dtype == "fp32":  # the compile time of FMA tiles adds up: the main variants only
        keep = ("fwd",) if precision == "tf32" else ("fwd", "atomic", "dh", "dw")
        variants = {k: v for k, v in variants.items() if k in keep}
    for name, (fn, consts) in variants.items():
        code = ptx(fn, dtype, consts)
        out[f"{dtype}-{precision}-{name}"] = dict(
            wgmma=code.count("wgmma.mma_async"), red_v4=code.count("red.global.gpu.relaxed.add.v4.f32"))
for with_entropy in (False, True):
    ptx(K._fwd_finalize_kernel, "fp32", dict(WITH_ENTROPY=with_entropy, BLOCK_J=512, num_warps=4))
print(json.dumps(out))
"""


def test_kernels_compile_for_h100():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    kernels_ptx = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(kernels_ptx) == 13
    for name, found in kernels_ptx.items():
        # bf16 and TF32 tiles on tensor cores (wgmma); exact fp32 ("ieee") on FMA units.
        assert (found["wgmma"] > 0) == ("bf16" in name or "tf32" in name), (name, found)
        # The atomic backward adds its tiles with vectorized relaxed fp32 reductions.
        assert (found["red_v4"] > 0) == ("atomic" in name), (name, found)


def test_nan_rows_are_nan():
    """A row whose logits are all NaN (a NaN hidden state) was taken for an all -inf row
    (uniform: -log V and log V): the max drops NaN. Its lse, log-prob and entropy are NaN."""
    hidden, weight, bias, labels = _inputs(4, 16, 67, torch.float32)
    hidden = hidden.clone()
    hidden[1, 3] = math.nan
    logp, entropy, lse = _forward(hidden, weight, bias, labels)
    assert logp[1].isnan() and entropy[1].isnan() and lse[1].isnan()
    assert logp[[0, 2, 3]].isfinite().all() and entropy[[0, 2, 3]].isfinite().all()


# --- float64 -------------------------------------------------------------------------------------

def _float64_expected(hidden, weight, bias, labels, g_l, g_h, *, temperature, logit_scale, softcap, ignore_index):
    """(logp, entropy, lse, d hidden, d weight, d bias) from the float64 token reference on the
    float64 logits: its dL/dy times logit_scale, then the two products (exact formulas; defined
    for -inf logits and all -inf rows, where autograd through log_softmax is not)."""
    from rlkern.reference import logprobs as token_reference

    y = reference.logits64(hidden, weight, bias, logit_scale)
    logp, entropy, lse = token_reference.logprobs_fwd(y, labels, temperature, softcap or 0.0, ignore_index, True)
    g = token_reference.logprobs_bwd(g_l, g_h, y, labels, lse, entropy, temperature, softcap or 0.0,
                                     ignore_index) * logit_scale
    return logp, entropy, lse, g @ weight, g.T @ hidden, None if bias is None else g.sum(0)


def _float64_check(hidden, weight, bias, labels, *, deterministic, ignore_index=IGNORE, **hyper):
    g_l, g_h = (x.double() for x in _grads_out(hidden.shape[0]))
    logp, entropy, lse = _forward(hidden, weight, bias, labels, ignore_index=ignore_index, **hyper)
    grads = _backward(g_l, g_h, hidden, weight, bias, labels, lse, entropy, ignore_index=ignore_index,
                      deterministic=deterministic, **hyper)
    expected = _float64_expected(hidden.cpu(), weight.cpu(), None if bias is None else bias.cpu(), labels.cpu(),
                                 g_l.cpu(), g_h.cpu(), ignore_index=ignore_index, **hyper)
    for name, ours, ref in zip(("logp", "entropy", "lse", "d hidden", "d weight", "d bias"),
                               (logp, entropy, lse, *grads), expected):
        if ref is None:
            assert ours is None, name
            continue
        assert ours.dtype == torch.float64, name
        # Sums over H (logits) and over V or N (gradients): a few ulp of the largest term.
        scale = ref.nan_to_num(0, 0, 0).abs().max().item() if ref.numel() else 0.0
        torch.testing.assert_close(ours.cpu(), ref, rtol=1e-12, atol=1e-12 * max(scale, 1.0), equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    return logp, entropy, lse, grads


# (5, 16, 1): V = 1; (1, 16, 67) and (37, 40, 257): vocab tails, token tails, masked K steps.
@pytest.mark.parametrize("n,h,vocab", [(5, 16, 1), (1, 16, 67), (37, 40, 257)])
@pytest.mark.parametrize("hyper", HYPER, ids=["plain", "T-scale-softcap"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_float64_matches_reference(n, h, vocab, hyper, deterministic):
    """float64 hidden states and weight were rejected (TypeError): the kernels now compute in
    float64 (fp64 tl.dot tiles and accumulators, float64 softmax and tanh), outputs and
    gradients within 1e-12 of the float64 formula."""
    hidden, weight, bias, labels = _inputs(n, h, vocab, torch.float64, ignore_every=4)
    _float64_check(hidden, weight, bias, labels, deterministic=deterministic, **hyper)


def test_float64_ignore_index():
    # A valid-looking ignore_index (0): log-prob 0 and no log-prob gradient there.
    hidden, weight, bias, labels = _inputs(9, 16, 67, torch.float64)
    labels[[1, 4, 7]] = 0
    logp, *_ = _float64_check(hidden, weight, bias, labels, deterministic=False, ignore_index=0,
                              temperature=1.3, logit_scale=1.0, softcap=None)
    assert (logp[labels == 0] == 0).all() and (logp[labels != 0] < 0).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_float64_extreme_logits(deterministic):
    """Logits near DBL_MAX (logit_scale 1e306) with -inf columns (a -inf bias): the floor
    (-DBL_MAX) minus a row max of ~1e306 overflows to -inf, which must not reach 0 * -inf; a
    NaN hidden row gives a NaN row; V = 1 with a -inf bias makes every row all -inf (uniform:
    log-prob 0, entropy 0, lse -inf, zero gradient)."""
    hidden, weight, bias, labels = _inputs(21, 16, 67, torch.float64, ignore_every=5)
    bias = bias.clone()
    bias[::7] = -math.inf
    labels[3] = 7  # a label at a -inf column: log-prob -inf
    hyper = dict(temperature=0.7, logit_scale=1e306, softcap=None)
    logp, entropy, _, _ = _float64_check(hidden, weight, bias, labels, deterministic=deterministic, **hyper)
    assert logp[3] == -math.inf and entropy.isfinite().all()

    nan_hidden = hidden.clone()
    nan_hidden[2, 5] = math.nan
    logp, entropy, lse = _forward(nan_hidden, weight, bias, labels, **hyper)
    ref = _float64_expected(nan_hidden, weight, bias, labels, *(x.double() for x in _grads_out(21)), ignore_index=IGNORE,
                            **hyper)
    assert logp[2].isnan() and entropy[2].isnan() and lse[2].isnan()
    for ours, r in zip((logp, entropy, lse), ref):
        torch.testing.assert_close(ours, r, rtol=1e-12, atol=1e-12, equal_nan=True)

    dead_bias = torch.full((1,), -math.inf, dtype=torch.float64, device=DEVICE)
    logp, _, lse, grads = _float64_check(hidden, weight[:1], dead_bias, torch.zeros_like(labels),
                                         deterministic=deterministic, **hyper)
    assert (logp == 0).all() and (lse == -math.inf).all() and all((g == 0).all() for g in grads)


_SM90_FP64_SCRIPT = _SM90_SCRIPT.split("out = {}")[0] + r"""
FLOATS64 = FLOATS | {"grad_scale"}


def ptx64(fn, consts):
    consts = dict(consts)
    warps, stages = consts.pop("num_warps", 4), consts.pop("num_stages", 3)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):  # every float buffer is float64, labels int64
            sig[name] = "*i64" if name == "labels_ptr" else "*fp64"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp64" if name in FLOATS64 else "i32"
            if name in ("H", "stride_h", "stride_w"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = backend.parse_options(dict(num_warps=warps, num_stages=stages, enable_fp_fusion=False))
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options.__dict__).asm["ptx"]


launch = K._LAUNCH[8]
flags = dict(HAS_BIAS=True, HAS_SOFTCAP=True, INTERPRET=False, PRECISION="ieee", ROUND_LOGITS=False, ROUND_BF16=False)
bwd = dict(flags, HAS_GRAD_ENTROPY=True, ROUND_BF16=False, EVEN_H=True, EVEN_HO=True)
out = {}
for atomic in K._ATOMIC_FP64:
    out[f"atomic-{atomic.kwargs['BLOCK_N']}"] = ptx64(K._bwd_atomic_kernel, dict(
        bwd, NEED_DH=True, NEED_DW=True, NEED_DB=True, num_warps=atomic.num_warps, num_stages=atomic.num_stages,
        **atomic.kwargs, **launch["atomic"]))
out["fwd"] = ptx64(K._fwd_partials_kernel, dict(flags, WITH_ENTROPY=True, EVEN_H=True, **launch["fwd"]))
out["fwd_plain_odd_h"] = ptx64(K._fwd_partials_kernel, dict(flags, HAS_BIAS=False, HAS_SOFTCAP=False,
                                                            WITH_ENTROPY=False, EVEN_H=False, **launch["fwd"]))
out["dh"] = ptx64(K._bwd_dh_kernel, dict(bwd, **launch["dh"]))
out["dw"] = ptx64(K._bwd_dw_kernel, dict(bwd, NEED_DW=True, NEED_DB=True, **launch["dw"]))
for with_entropy in (False, True):
    ptx64(K._fwd_finalize_kernel, dict(WITH_ENTROPY=with_entropy, BLOCK_J=512, num_warps=4))
print(json.dumps({name: dict(dmma=code.count("mma.sync.aligned.m8n8k4.row.col.f64"),
                             red=code.count("red.global.gpu.relaxed.add.f64") + code.count("atom.global.gpu.relaxed.add.f64"))
                  for name, code in out.items()}))
"""


def test_float64_kernels_compile_for_h100():
    # The float64 variants through Triton's compiler to sm_90: the tiles on fp64 tensor cores
    # (DMMA, mma.sync m8n8k4), float64 atomics in the atomic backward.
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SM90_FP64_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) == 6, found
    for name, counts in found.items():
        assert counts["dmma"] > 0, (name, counts)
        assert (counts["red"] > 0) == name.startswith("atomic"), (name, counts)


# round_logits (linear_token_logprobs(logits_dtype=bf16/fp16)): the launchers on half inputs vs
# the float64 reference that rounds each logit and each d-logit to that dtype
# (reference.linear_logprobs(logits_dtype=...)). Where an fp32 accumulation order differs from
# the exact product a logit can round the other way (one ulp of the dtype): the bound is what
# the chunked op (torch GEMM per chunk, its own orders) achieves on the same inputs, times 2,
# with a floor of 2 fp32 ulps (forward) / 4e-6 (gradients) of the values' scale. Unrounded
# tiles (round_logits=False) must be much farther (mean error 20 times).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_round_logits_matches_rounded_reference(dtype, deterministic):
    import rlkern

    n, h, vocab = 37, 40, 257
    hyper = HYPER[1]
    hidden, weight, bias, labels = _inputs(n, h, vocab, dtype, bias=True, ignore_every=5)
    g_l, g_h = _grads_out(n)
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    r_logp, r_entropy, _ = reference.linear_logprobs(
        *leaves, labels, temperature=hyper["temperature"], logit_scale=hyper["logit_scale"],
        logit_softcap=hyper["softcap"], ignore_index=IGNORE, logits_dtype=dtype)
    (r_logp * g_l.double() + r_entropy * g_h.double()).sum().backward()
    ref = [r_logp, r_entropy] + [x.grad for x in leaves]

    def fused(round_logits):
        logp, entropy, lse = kernels.linear_logprobs_forward(
            hidden, weight, bias, labels, hyper["logit_scale"], hyper["softcap"], hyper["temperature"], IGNORE,
            True, round_logits=round_logits)
        grads = kernels.linear_logprobs_backward(
            g_l, g_h, hidden, weight, bias, labels, lse, entropy, hyper["logit_scale"], hyper["softcap"],
            hyper["temperature"], IGNORE, True, True, True, deterministic, round_logits=round_logits)
        return [logp, entropy, *grads]

    op_leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    logp, entropy = rlkern.linear_token_logprobs(
        op_leaves[0], op_leaves[1], labels, bias=op_leaves[2], return_entropy=True, kernel="chunked",
        temperature=hyper["temperature"], logit_scale=hyper["logit_scale"], logit_softcap=hyper["softcap"],
        logits_dtype=dtype)
    (logp * g_l + entropy * g_h).sum().backward()
    chunked = [logp.detach(), entropy.detach()] + [x.grad for x in op_leaves]
    ours, unrounded = fused(True), fused(False)
    for i, name in enumerate(("logp", "entropy", "hidden", "weight", "bias")):
        r = ref[i].cpu()
        diff = lambda x: (x.cpu().double() - r).abs()  # noqa: E731
        floor = (2.4e-7 if i < 2 else 4e-6) * r.abs().max().item()
        bound = 2 * max(diff(chunked[i]).max().item(), floor)
        assert diff(ours[i]).max().item() <= bound, (name, diff(ours[i]).max().item(), bound)
        assert diff(unrounded[i]).mean().item() > 20 * diff(ours[i]).mean().item(), name
    with pytest.raises(TypeError, match="round_logits"):
        kernels.linear_logprobs_forward(hidden.float(), weight.float(), None, labels, 1.0, 0.0, 1.0, IGNORE,
                                        False, round_logits=True)
