"""token_logprobs and the TRL-compatible functions vs the float64 reference, on every backend.

Backends: "cpp" (the C++ kernel, the CPU default), "triton" (the Triton kernels under
TRITON_INTERPRET=1 on CPU tensors), "torch" (the reference itself, run through the op layer).
"""

import math

import pytest
import torch
import triton
import triton.language as tl

import rlkern
from rlkern import _backend
from rlkern.reference import logprobs as reference
from conftest import assert_as_close_as_torch, import_peer, compile_for_sm90
from rlkern.kernels._common import tanh_and_sech2



def _logits(n, vocab, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g) * scale).to(dtype)


def _labels(n, vocab, seed=1, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return labels


def _ref(logits, labels, temperature=1.0, softcap=0.0, ignore_index=-100):
    logp, entropy, lse = reference.logprobs_fwd(logits.double(), labels, temperature, softcap, ignore_index, True)
    return logp, entropy, lse


def _ref_grad(logits, labels, g_l, g_h, temperature=1.0, softcap=0.0, ignore_index=-100):
    logp, entropy, lse = _ref(logits, labels, temperature, softcap, ignore_index)
    return reference.logprobs_bwd(g_l.double(), None if g_h is None else g_h.double(), logits.double(),
                                  labels, lse, entropy, temperature, softcap, ignore_index)


def _fp32_close(ours, ref, rtol=2e-5, atol=2e-5, name="value"):
    # Outputs are fp32 accumulations of exactly-upcast inputs: fp32 rounding over V terms.
    torch.testing.assert_close(ours.double(), ref.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# V = 1000, 4099, 32003: not multiples of any block (vocab tails; 32003 spans several blocks,
# at N = 2 to keep the interpreter fast); 7 and 1: shorter than one block.
# N = 1, 5, 17: odd row counts, and a single row.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,vocab", [(1, 7), (5, 1000), (17, 4099), (3, 1), (2, 32003)])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
def test_forward_matches_reference(backend, dtype, n, vocab, temperature):
    logits = _logits(n, vocab, dtype)
    labels = _labels(n, vocab, ignore_every=4)
    logp, entropy = rlkern.token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    ref_logp, ref_entropy, _ = _ref(logits, labels, temperature)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert (logp <= 0).all()
    assert (logp[labels == -100] == 0).all()
    _fp32_close(logp, ref_logp, name="logp")
    _fp32_close(entropy, ref_entropy, name="entropy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy_grad", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_backward_matches_reference(backend, dtype, with_entropy_grad, softcap):
    n, vocab, temperature = 9, 1000, 0.7
    logits = _logits(n, vocab, dtype, scale=8.0).requires_grad_()
    labels = _labels(n, vocab, ignore_every=3)
    # Confident labels (the argmax, p near 1): where 1 - p needs every digit of the saved lse.
    labels[1::3] = logits.detach()[1::3].argmax(-1)
    g = torch.Generator().manual_seed(5)
    g_l = torch.randn(n, generator=g)
    g_h = torch.randn(n, generator=g) if with_entropy_grad else None
    logp, entropy = rlkern.token_logprobs(logits, labels, temperature=temperature, logit_softcap=softcap,
                                          return_entropy=True)
    loss = (logp * g_l).sum() + ((entropy * g_h).sum() if g_h is not None else 0.0)
    loss.backward()
    ref = _ref_grad(logits.detach(), labels, g_l, g_h, temperature, softcap or 0.0)
    assert logits.grad.dtype == dtype
    # PyTorch's own backward of the same formula at this dtype is the bound (CONTRIBUTING.md, Tests).
    z = logits.detach().clone().requires_grad_()
    u = (softcap * torch.tanh(z / softcap) if softcap else z) / temperature
    lp_t = torch.log_softmax(u, -1)
    t_logp = lp_t.gather(1, labels.clamp(min=0)[:, None])[:, 0] * (labels != -100)
    t_ent = -(lp_t.exp() * lp_t).sum(-1)
    t_loss = (t_logp.float() * g_l).sum() + ((t_ent.float() * g_h).sum() if g_h is not None else 0.0)
    t_loss.backward()
    # factor 2: the kernels' exp and accumulation order differ from PyTorch's; the saved lse is
    # float64, so no extra rounding of p (see rlkern/reference/logprobs.py).
    assert_as_close_as_torch(logits.grad, ref, z.grad, floor=torch.finfo(dtype).eps * ref.abs().max().item(),
                             factor=2.0, name="grad")


@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_softcap_forward(backend, softcap):
    logits = _logits(6, 1000, torch.float32, scale=20.0)
    labels = _labels(6, 1000)
    logp, entropy = rlkern.token_logprobs(logits, labels, logit_softcap=softcap, return_entropy=True)
    ref_logp, ref_entropy, _ = _ref(logits, labels, softcap=softcap)
    _fp32_close(logp, ref_logp)
    _fp32_close(entropy, ref_entropy)


def test_extreme_logits(backend):
    # +-1e4 logits: a naive sum of p*u cancels catastrophically against lse; -inf entries and
    # an all -inf row must give finite/-inf values, never NaN.
    vocab = 1000
    logits = _logits(6, vocab, torch.float32)
    logits[0, :] = -1e4
    logits[0, 3] = 1e4
    logits[1, ::2] = float("-inf")
    logits[2, :] = float("-inf")
    logits[3, :] = 1e4
    logits[4, 10] = float("-inf")
    labels = torch.tensor([3, 2, 5, 7, 10, 0])  # row 1: label 2 has -inf logit
    logp, entropy = rlkern.token_logprobs(logits, labels, return_entropy=True)
    assert not logp.isnan().any() and not entropy.isnan().any()
    assert -1e-6 <= logp[0] <= 0 and logp[1] == -math.inf and logp[4] == -math.inf
    assert logp[2] == pytest.approx(-math.log(vocab)) and entropy[2] == pytest.approx(math.log(vocab))
    assert logp[3] == pytest.approx(-math.log(vocab), abs=1e-5)
    ref_logp, ref_entropy, _ = _ref(logits, labels)
    finite = ref_logp.isfinite()
    _fp32_close(logp[finite], ref_logp[finite])
    _fp32_close(entropy, ref_entropy, atol=1e-4)

    logits.requires_grad_()
    logp, entropy = rlkern.token_logprobs(logits, labels.clamp(max=0) + torch.tensor([3, 1, 5, 7, 11, 0]),
                                          return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert not logits.grad.isnan().any()
    assert (logits.grad[2] == 0).all()


def test_empty_and_all_ignored(backend):
    empty = torch.zeros(0, 1000, requires_grad=True)
    logp, entropy = rlkern.token_logprobs(empty, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert logp.shape == (0,) and entropy.shape == (0,)
    logp.sum().backward()
    assert empty.grad.shape == (0, 1000)

    logits = _logits(4, 1000, torch.float32).requires_grad_()
    labels = torch.full((4,), -100)
    logp = rlkern.token_logprobs(logits, labels)
    assert (logp == 0).all()
    logp.sum().backward()
    assert (logits.grad == 0).all()


def test_batched_and_sliced_rows(backend):
    # TRL computes logits[:, :-1] of a [B, T, V] tensor: rows that cannot be flattened as a view.
    full = _logits(3 * 8, 1001, torch.float32).view(3, 8, 1001)
    logits = full[:, :-1].clone().requires_grad_()
    sliced_leaf = full.clone().requires_grad_()
    sliced = sliced_leaf[:, :-1]
    labels = torch.randint(0, 1001, (3, 7), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    a, ea = rlkern.token_logprobs(logits, labels, return_entropy=True)
    b, eb = rlkern.token_logprobs(sliced, labels, return_entropy=True)
    assert a.shape == (3, 7)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ea, eb)
    ref_logp, ref_entropy, _ = _ref(logits.detach().reshape(-1, 1001), labels.reshape(-1))
    _fp32_close(a.reshape(-1), ref_logp)
    (a.sum() + ea.sum()).backward()
    (b.sum() + eb.sum()).backward()
    torch.testing.assert_close(sliced_leaf.grad[:, :-1], logits.grad)
    assert (sliced_leaf.grad[:, -1] == 0).all()

    # A 2-D slice of a wider buffer: row stride != V.
    wide = _logits(5, 1500, torch.bfloat16)
    narrow = wide[:, :1000]
    labels2 = _labels(5, 1000)
    torch.testing.assert_close(rlkern.token_logprobs(narrow, labels2), rlkern.token_logprobs(narrow.contiguous(), labels2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_backward(backend, dtype):
    """float64: the AVX2 backward recomputed the label's column from the logits buffer after the
    vector loop had overwritten it with gradients (2e-2 off; linear_token_logprobs' tiles too)."""
    logits = _logits(7, 1000, dtype)
    labels = _labels(7, 1000)
    leaf = logits.clone().requires_grad_()
    logp, entropy = rlkern.token_logprobs(leaf, labels, return_entropy=True)
    (logp.sum() + 0.5 * entropy.sum()).backward()

    dead = logits.clone().requires_grad_()
    buffer = dead * 1.0  # a non-leaf activation whose memory the backward may reuse
    logp, entropy = rlkern.token_logprobs(buffer, labels, return_entropy=True, inplace_backward=True)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    torch.testing.assert_close(dead.grad, leaf.grad)
    torch.testing.assert_close(buffer.detach(), leaf.grad)  # the grad lives in the logits buffer now

    # A second consumer that saved the logits must not get silently wrong grads.
    shared = logits.clone().requires_grad_()
    act = shared * 1.0
    other = (act**2).sum()
    logp = rlkern.token_logprobs(act, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()


def test_gradcheck_float64():
    # float64 runs the C++ kernel in double on the CPU (the reference under RLKERN_BACKEND=torch),
    # through the same custom op + autograd formula.
    logits = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 12])

    def f(z):
        return rlkern.token_logprobs(z, labels, temperature=0.8, logit_softcap=4.0, return_entropy=True)

    assert torch.autograd.gradcheck(f, (logits,))


def test_bad_input():
    logits = torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"logits must be \[N, V\] or \[B, T, V\]"):
        rlkern.token_logprobs(logits[0], labels[0])
    with pytest.raises(ValueError, match="leading shape"):
        rlkern.token_logprobs(logits, labels[:3])
    with pytest.raises(TypeError, match="labels must be int32 or int64"):
        rlkern.token_logprobs(logits, labels.float())
    with pytest.raises(TypeError, match="logits must be float16/bfloat16/float32/float64"):
        rlkern.token_logprobs(logits.long(), labels)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        rlkern.token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="logit_softcap"):
        rlkern.token_logprobs(logits, labels, logit_softcap=-1.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*labels\[2\] = 10"):
        rlkern.token_logprobs(logits, torch.tensor([0, 1, 10, 3]))
    with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
        rlkern.token_logprobs(logits, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="is on meta but logits are on cpu"):
        rlkern.token_logprobs(logits, labels.to("meta"))


@pytest.mark.parametrize("backend_name", ["triton", "cpp"])
def test_kernel_writes_nan_for_out_of_range_label(backend_name):
    # What GPU users get without RLKERN_VALIDATE: NaN at the bad position, no host sync.
    logits = _logits(3, 1000, torch.float32)
    labels = torch.tensor([4, 1000, -7])
    if backend_name == "triton":
        from rlkern.kernels import logprobs as kernel
        logp, _, _ = kernel.logprobs_forward(logits, labels, 1.0, 0.0, -100, False)
    else:
        logp, _, _ = torch.ops.rlkern.cpp_token_logprobs(logits, labels, 1.0, 0.0, -100, False)
    assert logp[0].isfinite() and logp[1].isnan() and logp[2].isnan()


def test_opcheck():
    logits = torch.randn(5, 37)
    labels = torch.randint(0, 37, (5,))
    fwd = torch.ops.rlkern.token_logprobs.default
    for with_entropy in (False, True):
        torch.library.opcheck(fwd, (logits.clone().requires_grad_(), labels, 0.9, 0.0, -100, with_entropy, False))
    logp, entropy, lse = fwd(logits, labels, 0.9, 0.0, -100, True, False)
    args = (torch.randn(5), torch.randn(5), logits, labels, lse, entropy, 0.9, 0.0, -100)
    torch.library.opcheck(torch.ops.rlkern.token_logprobs_backward.default, args)
    torch.library.opcheck(torch.ops.rlkern.token_logprobs_backward_inplace.default, args[:2] + (logits.clone(),) + args[3:])
    torch.library.opcheck(torch.ops.rlkern.cpp_token_logprobs.default, (logits, labels, 0.9, 0.0, -100, True))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    def step(logits, labels):
        logp, entropy = rlkern.token_logprobs(logits, labels, temperature=0.7, return_entropy=True,
                                              inplace_backward=True)
        return (logp.sum() - 0.01 * entropy.sum()) * 2

    logits = torch.randn(6, 101, requires_grad=True)
    labels = torch.randint(0, 101, (6,))
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    loss = compiled(logits, labels)
    loss.backward()
    eager_logits = logits.detach().clone().requires_grad_()
    eager = step(eager_logits * 1.0, labels)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(logits.grad, eager_logits.grad)


# --- TRL 1.16 parity: its own functions, CPU path, on the same tensors ---------------------------

@pytest.mark.peer
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_selective_log_softmax_parity(temperature):
    trl_utils = import_peer("trl.trainer.utils")
    logits = torch.randn(2, 9, 1003, dtype=torch.float32) * 4
    index = torch.randint(0, 1003, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, -3:] = 0
    ours = rlkern.selective_log_softmax(logits, index, temperature=temperature, row_mask=mask)
    theirs = trl_utils.selective_log_softmax(logits, index, temperature=temperature, row_mask=mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    topk = torch.randint(0, 1003, (2, 9, 4))
    torch.testing.assert_close(rlkern.selective_log_softmax(logits, topk, temperature),
                               trl_utils.selective_log_softmax(logits, topk, temperature), rtol=1e-5, atol=1e-5)


@pytest.mark.peer
def test_trl_entropy_and_joint_parity():
    trl_utils = import_peer("trl.trainer.utils")
    logits = (torch.randn(3, 5, 777) * 3).requires_grad_()
    index = torch.randint(0, 777, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    torch.testing.assert_close(rlkern.entropy_from_logits(logits), trl_utils.entropy_from_logits(logits),
                               rtol=1e-5, atol=1e-5)

    ours_lp, ours_h = rlkern.selective_log_softmax_and_entropy(logits, index, temperature=0.9, row_mask=mask)
    (ours_lp.sum() + ours_h.sum()).backward()
    ours_grad, logits.grad = logits.grad, None
    their_lp, their_h = trl_utils.selective_log_softmax_and_entropy(logits, index, temperature=0.9, row_mask=mask)
    (their_lp.sum() + their_h.sum()).backward()
    torch.testing.assert_close(ours_lp, their_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_h, their_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grad, logits.grad, rtol=1e-4, atol=1e-6)

    _, detached = rlkern.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=False)
    assert not detached.requires_grad


_SM90_SCRIPT = """
from rlkern.kernels import logprobs as K

# (logits dtype, element size, labels, lse) x (softcap, entropy, shard) at the issue's vocab sizes
cases = [("*fp32", 4, "*i64", "*fp64", 32000), ("*bf16", 2, "*i64", "*fp64", 151936),
         ("*bf16", 2, "*i32", "*fp32", 262144), ("*fp16", 2, "*i64", "*fp64", 129280)]
flags = [(False, True, False), (True, True, False), (False, False, True), (True, True, True)]
for (lp, elt, lab, lse, vocab), (softcap, entropy, shard) in zip(cases, flags):
    chunks, vec, warps = K._config(vocab, elt)
    # the float hyper-parameters are float64 arguments (annotated), read in the compute dtype
    scalars = dict(V="i32", stride_row="i64", stride_label="i64", inv_temp="fp64", softcap="fp64",
                   inv_softcap="fp64", ignore_index="i64", vocab_start="i64")
    build(K._logprobs_fwd_kernel, dict(logits_ptr=lp, labels_ptr=lab, logp_ptr="*fp32", entropy_ptr="*fp32",
                                       lse_ptr=lse, log_vocab="fp64", **scalars),
          dict(HAS_SOFTCAP=softcap, WITH_ENTROPY=entropy, SHARD=shard, CHUNKS=chunks, VEC=vec),
          num_warps=warps, enable_fp_fusion=False)
    build(K._logprobs_bwd_kernel, dict(grad_logp_ptr="*fp32", grad_entropy_ptr="*fp32", logits_ptr=lp,
                                       labels_ptr=lab, lse_ptr=lse, entropy_ptr="*fp32", grad_logits_ptr=lp,
                                       stride_grad_row="i64", stride_gl="i64", stride_ge="i64", stride_lse="i64",
                                       stride_ent="i64", **{k: v for k, v in scalars.items()}),
          dict(HAS_SOFTCAP=softcap, HAS_GRAD_ENTROPY=entropy, SHARD=shard, ROUND_BF16=False, BLOCK=chunks * vec),
          num_warps=warps, enable_fp_fusion=False)
print("ok")
"""


def test_triton_kernels_compile_for_h100():
    # The interpreter runs the kernels' Python, not Triton's compiler, which is stricter: forward
    # and backward are compiled to sm_90 cubins for fp32 / bf16 / fp16 logits at V = 32000 ...
    # 262144 with each flag on somewhere (no GPU needed; a fresh interpreter without
    # TRITON_INTERPRET, so that the kernels are JITFunctions).
    compile_for_sm90(_SM90_SCRIPT)


# Regressions found by property-based testing against float64 formulas and TRL

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_nan_logit_gives_nan_entropy(backend, dtype):
    """A NaN logit makes its row's log-prob and entropy NaN, as in TRL and the float64 formula.
    float64 gave entropy -0. (the reference's p > 0 test dropped the NaN); a row of NaN logits
    only was taken for an all -inf row by the kernels (uniform: -log V and log V), the max
    dropping NaN. entropy_from_logits and linear_token_logprobs alike."""
    z = torch.randn(4, 2053, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z[1, 2] = math.nan
    z[2] = math.nan
    z[3, 1500:] = math.nan  # a finite first part, then NaN only
    labels = torch.tensor([0, 1, 2, 3])
    logp, entropy = rlkern.token_logprobs(z.to(dtype), labels, return_entropy=True)
    assert torch.isnan(entropy[1:]).all() and torch.isnan(logp[1:]).all(), (logp, entropy)
    assert torch.isfinite(entropy[0]) and torch.isfinite(logp[0])
    assert torch.isnan(rlkern.entropy_from_logits(z.to(dtype))[1:]).all()
    hidden = torch.randn(4, 8, dtype=torch.float64)
    hidden[1, 0] = math.nan
    weight = torch.randn(2053, 8, dtype=torch.float64)
    weight[1500:, 0] = 0.0  # rows 2, 3: NaN * 0 is NaN in every column
    hidden[2, 0] = hidden[3, 0] = math.nan
    logp, entropy = rlkern.linear_token_logprobs(hidden.to(dtype), weight.to(dtype), labels, return_entropy=True)
    assert torch.isnan(entropy[1:]).all() and torch.isnan(logp[1:]).all() and torch.isfinite(entropy[0])


def test_entropy_is_never_negative(backend):
    """Peaked rows: the kernels' entropy could round to -6e-8; it is clamped at 0 as log-probs are
    clamped at 0 (NaN stays NaN)."""
    g = torch.Generator().manual_seed(5)
    n, vocab = 257, 1001
    logits = torch.randn(n, vocab, generator=g) * 0.01
    logits[torch.arange(n), torch.randint(0, vocab, (n,), generator=g)] = torch.linspace(10, 40, n)
    _, entropy = rlkern.token_logprobs(logits, torch.zeros(n, dtype=torch.long), return_entropy=True)
    assert (entropy >= 0).all()
    _, ref, _ = reference.logprobs_fwd(logits.double(), torch.zeros(n, dtype=torch.long), 1.0, 0.0, -100, True)
    torch.testing.assert_close(entropy.double(), ref, rtol=0, atol=5e-6)


def test_hyper_parameter_and_label_checks():
    """ignore_index=1.5 was truncated, temperature=True accepted and np.float32(0.5) rejected;
    TRL drop-ins showed their internal sentinel label in errors; int32 labels with an ignore_index
    beyond int32 gave NaN instead of an error."""
    import numpy as np

    logits = torch.randn(3, 11)
    labels = torch.tensor([1, -100, 4])
    with pytest.raises(ValueError, match=r"token_logprobs: ignore_index must be an int, got 1.5"):
        rlkern.token_logprobs(logits, labels, ignore_index=1.5)
    with pytest.raises(ValueError, match=r"token_logprobs: temperature must be a finite number > 0, got True"):
        rlkern.token_logprobs(logits, labels, temperature=True)
    torch.testing.assert_close(rlkern.token_logprobs(logits, labels, temperature=np.float32(0.5)),
                               rlkern.token_logprobs(logits, labels, temperature=0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"token_logprobs: ignore_index must fit the int32 labels, got 1099511627776"):
        rlkern.token_logprobs(logits, labels.int(), ignore_index=2**40)
    with pytest.raises(ValueError, match=r"linear_token_logprobs: ignore_index must be an int, got 2.0"):
        rlkern.linear_token_logprobs(torch.randn(3, 4), torch.randn(11, 4), labels, ignore_index=2.0)
    with pytest.raises(ValueError) as error:
        rlkern.selective_log_softmax(logits, torch.tensor([1, 11, 4]))
    assert str(error.value).startswith("selective_log_softmax: index") and "index[1] = 11" in str(error.value)
    assert "ignore_index" not in str(error.value)
    assert str(-(2**62)) not in str(error.value)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_float64_runs_the_cpp_kernel(monkeypatch, softcap):
    """float64 logits (numpy's default) ran the reference, 44x slower than float32; the C++
    kernel now computes them in double: forward and backward to 1e-12 of the float64 formula."""
    if not _backend.has_cpp():
        pytest.fail("rlkern._C did not build")
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(9, 1001, generator=g, dtype=torch.float64) * 4
    logits[3] = -math.inf
    logits[4, :500] = -math.inf
    labels = torch.randint(0, 1001, (9,), generator=g)
    labels[2] = -100
    g_l, g_h = torch.randn(9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)

    def run(z):
        leaf = z.clone().requires_grad_()
        logp, entropy = rlkern.token_logprobs(leaf, labels, temperature=0.7, logit_softcap=softcap,
                                              return_entropy=True)
        ((logp * g_l).sum() + (entropy * g_h).sum()).backward()
        return logp.detach(), entropy.detach(), leaf.grad

    monkeypatch.setenv("RLKERN_BACKEND", "torch")
    expected = run(logits)
    monkeypatch.delenv("RLKERN_BACKEND")

    def boom(*args, **kwargs):
        raise AssertionError("float64 ran the reference")

    monkeypatch.setattr(reference, "logprobs_fwd", boom)
    monkeypatch.setattr(reference, "logprobs_bwd", boom)
    ours = run(logits)
    for name, x, ref in zip(("logp", "entropy", "grad"), ours, expected):
        assert x.dtype == torch.float64, name
        torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("vocab", [1, 8, 13, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_float64_extreme_logits_match_the_reference(monkeypatch, vocab, temperature):
    """float64 rows of huge logits (|z| ~ 1e300, -1e308), +inf, NaN and -inf, with a vocabulary
    tail and temperatures != 1. The C++ kernel formed d = z / T - max with an FMA, which kept the
    rounding residual of the max (up to 1e292 here, e^d = inf): lse came out inf and entropy NaN
    or log V. A +inf logit makes the row NaN, as in the formula."""
    if not _backend.has_cpp():
        pytest.fail("rlkern._C did not build")
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=g, dtype=torch.float64) * 1e300
    logits[1] = -1e308
    logits[2, ::2] = -math.inf
    logits[3, 0] = 1.7e308
    logits[4, -1] = math.nan
    logits[5, vocab // 2] = math.inf
    logits[6] = torch.randn(vocab, generator=g, dtype=torch.float64) * 1e4
    logits[7] = -math.inf
    labels = torch.randint(0, vocab, (8,), generator=g)
    labels[0] = -100
    g_l, g_h = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)

    def run(z):
        leaf = z.clone().requires_grad_()
        logp, entropy = rlkern.token_logprobs(leaf, labels, temperature=temperature, return_entropy=True)
        ((logp * g_l).sum() + (entropy * g_h).sum()).backward()
        return logp.detach(), entropy.detach(), leaf.grad

    monkeypatch.setenv("RLKERN_BACKEND", "torch")
    expected = run(logits)
    monkeypatch.setenv("RLKERN_BACKEND", "cpp")
    ours = run(logits)
    for name, x, ref in zip(("logp", "entropy", "grad"), ours, expected):
        torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)


# --- float64 through the Triton kernels -----------------------------------------------------------

def _float64_run(logits, labels, *, temperature, softcap=None, ignore_index=-100, with_entropy=True, seed=0):
    """(logp, entropy or None, d logits) of token_logprobs on float64 logits, the gradient of
    sum(g_l logp + g_H entropy) for fixed float64 upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    g_l = torch.randn(logits.shape[0], generator=g, dtype=torch.float64)
    g_h = torch.randn(logits.shape[0], generator=g, dtype=torch.float64)
    leaf = logits.clone().requires_grad_()
    out = rlkern.token_logprobs(leaf, labels, temperature=temperature, logit_softcap=softcap,
                                ignore_index=ignore_index, return_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    loss = (logp * g_l).sum() + ((entropy * g_h).sum() if with_entropy else 0.0)
    loss.backward()
    return logp.detach(), None if entropy is None else entropy.detach(), leaf.grad


def _float64_triton_vs_reference(monkeypatch, logits, labels, **kwargs):
    """The float64 reference (RLKERN_BACKEND=torch through the same op), then the Triton kernels
    with the reference disabled: float64 outputs within 1e-12 of it, NaN where it is NaN."""
    monkeypatch.setenv("RLKERN_BACKEND", "torch")
    expected = _float64_run(logits, labels, **kwargs)
    monkeypatch.setenv("RLKERN_BACKEND", "triton")

    def boom(*args, **kw):
        raise AssertionError("float64 ran the reference")

    with monkeypatch.context() as patch:
        patch.setattr(reference, "logprobs_fwd", boom)
        patch.setattr(reference, "logprobs_bwd", boom)
        ours = _float64_run(logits, labels, **kwargs)
    for name, x, ref in zip(("logp", "entropy", "grad"), ours, expected):
        if ref is None:
            assert x is None, name
            continue
        assert x.dtype == torch.float64, name
        torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def triton_interpreted():
    if not _backend.has_triton():
        pytest.fail("triton is not installed (it is in the test extra)")
    if not _backend.triton_interpreted():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")


# V = 1 and 13: one block, 2053: one full float64 block (2048) plus a 5-column tail; N odd.
@pytest.mark.parametrize("n,vocab", [(3, 1), (5, 13), (3, 2053)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_float64_triton_matches_reference(monkeypatch, triton_interpreted, n, vocab, temperature, softcap,
                                          with_entropy):
    """float64 logits ran the reference on the GPU: the Triton kernels now compute in float64,
    forward (log-prob, entropy) and backward within 1e-12 of the float64 formula."""
    g = torch.Generator().manual_seed(vocab + n)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[1] = -100
    labels[-1] = logits[-1].argmax()  # a confident label: 1 - p needs every digit of lse
    _float64_triton_vs_reference(monkeypatch, logits, labels, temperature=temperature, softcap=softcap,
                                 with_entropy=with_entropy)


def test_float64_triton_ignore_index(monkeypatch, triton_interpreted):
    # A valid-looking ignore_index (3): log-prob 0 and no log-prob gradient at those rows only.
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(7, 37, generator=g, dtype=torch.float64) * 3
    labels = torch.tensor([3, 0, 36, 3, 5, 3, 1])
    _float64_triton_vs_reference(monkeypatch, logits, labels, temperature=1.3, ignore_index=3)
    monkeypatch.setenv("RLKERN_BACKEND", "triton")
    logp = rlkern.token_logprobs(logits, labels, ignore_index=3)
    assert logp.dtype == torch.float64 and (logp[labels == 3] == 0).all() and (logp[labels != 3] < 0).all()


@pytest.mark.parametrize("vocab", [1, 13, 2053])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_float64_triton_extreme_logits(monkeypatch, triton_interpreted, vocab, temperature, softcap):
    """float64 rows of huge logits (|z| ~ 1e300, -1e308), +inf, NaN, -inf entries and an all
    -inf row: float32's floor (-1e30) and its exp(-200) clamp would have changed these rows, and
    differences of maxima overflow to -inf at this range (0 * -inf = NaN in the entropy)."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=g, dtype=torch.float64) * 1e300
    logits[1] = -1e308
    logits[2, ::2] = -math.inf
    logits[3, 0] = 1.7e308
    logits[4, -1] = math.nan
    logits[5, vocab // 2] = math.inf
    logits[6] = torch.randn(vocab, generator=g, dtype=torch.float64) * 1e4
    logits[7] = -math.inf
    logits[8, ::3] = -1e300
    logits[8, -1] = 1e300
    labels = torch.randint(0, vocab, (9,), generator=g)
    labels[0] = -100
    for with_entropy in (True, False):
        _float64_triton_vs_reference(monkeypatch, logits, labels, temperature=temperature, softcap=softcap,
                                     with_entropy=with_entropy)


@triton.jit
def _tanh_probe(x_ptr, tanh_ptr, sech2_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    th, sech2 = tanh_and_sech2(x)
    tl.store(tanh_ptr + offs, th, mask=offs < n)
    tl.store(sech2_ptr + offs, sech2, mask=offs < n)


def test_float64_tanh_matches_torch(triton_interpreted):
    """The softcap's tanh in float64 (kernels/_common.py, tanh_and_sech2_f64): within a few
    ulp of torch.tanh on both branches, at the branch point, near 0 (where 1 - 2 / (e^2x + 1)
    would cancel) and where it saturates; sech^2 within a few ulp of 1 / cosh^2."""
    x = torch.cat([
        torch.linspace(-3, 3, 1201, dtype=torch.float64),
        torch.logspace(-300, 2.8, 1501, dtype=torch.float64),
        -torch.logspace(-17, 0, 301, dtype=torch.float64),
        torch.tensor([0.55, math.nextafter(0.55, 0), 0.0, 20.0, 400.0, math.inf, -math.inf, math.nan],
                     dtype=torch.float64),
    ])
    th, sech2 = torch.empty_like(x), torch.empty_like(x)
    _tanh_probe[(1,)](x, th, sech2, x.numel(), BLOCK=4096)
    ref = torch.tanh(x)
    torch.testing.assert_close(th, ref, rtol=1.5e-15, atol=0, equal_nan=True)
    ref_sech2 = torch.cosh(x).reciprocal() ** 2
    torch.testing.assert_close(sech2, ref_sech2, rtol=2e-15, atol=1e-300, equal_nan=True)


_SM90_FP64_SCRIPT = """
from rlkern.kernels import logprobs as K

# float64 logits (float64 compute), each flag on somewhere, at a Llama-3 vocabulary
chunks, vec, warps = K._config(128256, 8)
scalars = dict(V="i32", stride_row="i64", stride_label="i64", inv_temp="fp64", softcap="fp64",
               inv_softcap="fp64", ignore_index="i64", vocab_start="i64")
for softcap, entropy, shard in [(False, True, False), (True, True, False), (True, False, True)]:
    build(K._logprobs_fwd_kernel, dict(logits_ptr="*fp64", labels_ptr="*i64", logp_ptr="*fp64",
                                       entropy_ptr="*fp64", lse_ptr="*fp64", log_vocab="fp64", **scalars),
          dict(HAS_SOFTCAP=softcap, WITH_ENTROPY=entropy, SHARD=shard, CHUNKS=chunks, VEC=vec),
          num_warps=warps, enable_fp_fusion=False)
    build(K._logprobs_bwd_kernel, dict(grad_logp_ptr="*fp64", grad_entropy_ptr="*fp64", logits_ptr="*fp64",
                                       labels_ptr="*i64", lse_ptr="*fp64", entropy_ptr="*fp64",
                                       grad_logits_ptr="*fp64", stride_grad_row="i64", stride_gl="i64",
                                       stride_ge="i64", stride_lse="i64", stride_ent="i64", **scalars),
          dict(HAS_SOFTCAP=softcap, HAS_GRAD_ENTROPY=entropy, SHARD=shard, ROUND_BF16=False,
               BLOCK=chunks * vec),
          num_warps=warps, enable_fp_fusion=False)
print("ok")
"""


def test_triton_float64_kernels_compile_for_h100():
    # The float64 variants (double tanh, tl.exp, -DBL_MAX floor) through Triton's compiler to sm_90.
    compile_for_sm90(_SM90_FP64_SCRIPT)
