"""Determinism, per op: two runs give bit-identical outputs and gradients (every public op, every
CPU backend: cpp, triton under TRITON_INTERPRET=1, torch); two batchings of the same rows (rows
split into two calls, or the groups given in another order) give bit-identical per-row outputs
for the ops whose math is per row; ``RLKERN_DETERMINISTIC=1`` turns on ``deterministic=True`` in
every op that takes it.

What holds for reductions (losses that are a mean over the batch, the gradient of a weight shared
by all rows): two runs are bit-identical; two batchings are not (another summation order), and
are not asserted. On the GPU the atomics-based kernels need ``deterministic=True`` (the table in
docs/reliability.md); on the CPU every kernel runs a fixed order (the interpreter's atomics are
sequential), which the first test checks op by op.
"""

import pytest
import torch

import rlkern
from _op_cases import cases, flat as _flat
from rlkern import _backend
from rlkern.ops import linear_logprobs, linear_preference

CASES = cases()
# The ops with a ``deterministic`` argument.
FLAGGED = ("linear_token_logprobs", "linear_policy_loss", "linear_preference_loss")


def _f32(t):
    return t.float() if t.dtype == torch.float64 else t


def _run(fn, inputs, grad_of):
    leaves = [t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
    out = _flat(fn(*leaves))
    if grad_of:
        total = sum((t * (1 + torch.arange(t.numel(), dtype=t.dtype, device=t.device).view(t.shape) / 7)).sum()
                    for t in out if t.requires_grad)
        total.backward()
    return [t.detach() for t in out] + [leaves[i].grad for i in grad_of]


def _bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        # equal bits (NaN == NaN where both are NaN at the same place)
        assert torch.equal(x.contiguous().view(-1).view(torch.uint8) if x.dtype.is_floating_point else x,
                           y.contiguous().view(-1).view(torch.uint8) if y.dtype.is_floating_point else y)


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_runs_are_bit_identical(name, backend):
    fn, inputs, grad_of = CASES[name]
    inputs = [_f32(t) for t in inputs]  # the kernels' dtype (float64 runs the reference on some families)
    _bitwise(_run(fn, inputs, grad_of), _run(fn, inputs, grad_of))


@pytest.mark.parametrize("name", FLAGGED)
def test_two_runs_are_bit_identical_with_the_flag(name, backend, monkeypatch):
    monkeypatch.setenv("RLKERN_DETERMINISTIC", "1")  # the fixed-block path of the three LM-head ops
    fn, inputs, grad_of = CASES[name]
    inputs = [_f32(t) for t in inputs]
    _bitwise(_run(fn, inputs, grad_of), _run(fn, inputs, grad_of))


# ---------------------------------------------------------------------------------------------
# Two batchings of the same rows

def _rows(seed, b=6, t=9, v=17):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t)
    mask[1, 6:] = 0
    mask[4, 3:] = 0
    logits, labels = torch.randn(b, t, v, generator=g), torch.randint(0, v, (b, t), generator=g)
    return g, logits, labels, torch.randn(b, t, generator=g), torch.randn(b, t, generator=g), mask


# op -> fn(logits, labels, x, y, mask) returning [B, ...] per-row tensors
PER_ROW = {
    "token_logprobs": lambda logits, labels, x, y, m: rlkern.token_logprobs(logits, labels, return_entropy=True),
    "entropy_from_logits": lambda logits, labels, x, y, m: (rlkern.entropy_from_logits(logits),),
    "kl_penalty": lambda logits, labels, x, y, m: (rlkern.kl_penalty(-x.abs(), -y.abs(), kl_estimator="k3"),),
    "gae": lambda logits, labels, x, y, m: rlkern.gae(x, y, m, gamma=0.99, lam=0.9),
    "discounted_returns": lambda logits, labels, x, y, m: (rlkern.discounted_returns(x, m, gamma=0.9),),
    "dpo_token_rewards": lambda logits, labels, x, y, m: (rlkern.dpo_token_rewards(-x.abs(), -y.abs(), m),),
    "outcome_to_tokens": lambda logits, labels, x, y, m: (rlkern.outcome_to_tokens(x[:, 0], m),),
}


@pytest.mark.parametrize("name", sorted(PER_ROW))
def test_per_row_ops_are_batch_invariant(name, backend):
    _, logits, labels, x, y, mask = _rows(1)
    fn = PER_ROW[name]
    whole = fn(logits, labels, x, y, mask)
    first = fn(logits[:2], labels[:2], x[:2], y[:2], mask[:2])
    rest = fn(logits[2:], labels[2:], x[2:], y[2:], mask[2:])
    _bitwise([torch.cat(p) for p in zip(first, rest)], list(whole))


GROUPED = {
    "grpo": lambda s, ids, m: rlkern.grpo(s, ids, m),
    "rloo": lambda s, ids, m: rlkern.rloo(s, ids, m),
    "opo": lambda s, ids, m: rlkern.opo(s, ids, m),
    "gpg": lambda s, ids, m: rlkern.gpg(s, ids, m),
    "group_normalize": lambda s, ids, m: rlkern.group_normalize(s, ids),
    "dynamic_sampling_mask": lambda s, ids, m: rlkern.dynamic_sampling_mask(s.round(), ids, m),
    # whitened over the whole batch after the group baseline: the group order, not the split
    "reinforce_pp_baseline": lambda s, ids, m: rlkern.reinforce_pp_baseline(s, ids, m),
}
BATCH_WIDE = {"reinforce_pp_baseline"}


@pytest.mark.parametrize("name", sorted(GROUPED))
def test_group_ops_do_not_depend_on_group_order(name, backend):
    g, _, _, x, _, mask = _rows(2)
    scores = x[:, 0] * 3
    ids = torch.tensor([4, 4, 9, 9, 9, 1])
    fn = GROUPED[name]
    whole = fn(scores, ids, mask)
    # the same rows, the groups permuted (group 1 first, then 9, then 4) and rows shuffled in each
    order = torch.tensor([5, 4, 2, 3, 1, 0])
    permuted = fn(scores[order], ids[order], mask[order])
    inverse = torch.argsort(order)
    _bitwise([permuted[inverse]], [whole])
    if name in BATCH_WIDE:
        return
    # and each group in its own call
    for group in (4, 9, 1):
        rows = (ids == group).nonzero().flatten()
        _bitwise([fn(scores[rows], ids[rows], mask[rows])], [whole[rows]])


# The ops whose GPU path adds floats with atomics (Kernels(atomics=True)): under the flag they run
# the C++ kernel on CPU copies (fixed order) instead of the Triton kernel / PyTorch-on-CUDA path.
ATOMIC_GROUP_OPS = ("grpo", "group_normalize", "rloo", "opo", "gpg", "reinforce_pp_baseline", "gdpo",
                    "gigpo_step_groups", "grpo_passk", "bnpo", "optimal_token_baseline")
TORCH_ON_CUDA = ("grpo_passk", "bnpo", "optimal_token_baseline")


@pytest.mark.parametrize("name", ATOMIC_GROUP_OPS)
def test_the_flag_takes_group_sums_off_the_atomic_kernels(name, monkeypatch):
    from rlkern.ops.advantages import outcome, token_baseline

    kernels = (outcome._NORMALIZE, outcome._BASELINE, outcome._PASSK, outcome._BNPO, token_baseline._OTB)
    fn, inputs, grad_of = CASES[name]
    monkeypatch.delenv("RLKERN_BACKEND", raising=False)
    want = _run(fn, inputs, grad_of)  # the C++ kernels (CPU tensors)
    monkeypatch.setenv("RLKERN_BACKEND", "triton")
    for k in kernels:  # the run-order-dependent paths must not run
        def refuse(*args, op=k.op):
            raise AssertionError(f"{op}: the atomic path ran under RLKERN_DETERMINISTIC=1")
        monkeypatch.setitem(k._resolved, "triton", refuse)
        monkeypatch.setitem(k._resolved, "torch", refuse)
    monkeypatch.setenv("RLKERN_DETERMINISTIC", "1")
    _bitwise(_run(fn, inputs, grad_of), want)
    if name in TORCH_ON_CUDA:  # no Triton kernel: their atomic path is PyTorch on CUDA tensors (gpu tests)
        return
    monkeypatch.setenv("RLKERN_DETERMINISTIC", "0")
    with pytest.raises(AssertionError, match="the atomic path ran"):  # without the flag they do
        _run(fn, inputs, grad_of)


def _head(seed, n=150, h=8, v=19):  # n > one deterministic block (_DET_ROWS = 128)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 3, torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("kernel", ["chunked", "fused"])
def test_linear_token_logprobs_deterministic_is_batch_invariant(kernel, backend):
    if kernel == "fused" and backend != "triton":
        pytest.skip("kernel='fused' is the Triton kernel")
    hidden, weight, labels = _head(3)

    def run(rows, chunk_size):
        h = hidden[rows].clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logp, entropy = rlkern.linear_token_logprobs(h, w, labels[rows], return_entropy=True, deterministic=True,
                                                     chunk_size=chunk_size, kernel=kernel)
        (logp * 1.5 + entropy).sum().backward()
        return logp.detach(), entropy.detach(), h.grad, w.grad

    whole = run(slice(None), 16)
    _bitwise(whole, run(slice(None), None))  # chunk_size is ignored: the same blocks, the same bits
    # A token's log-prob, entropy and d hidden do not depend on the rows around it; d weight is a
    # sum over all rows (another batching, another sum: not asserted).
    first, rest = run(slice(0, 70), 16), run(slice(70, None), 16)
    _bitwise([torch.cat(p) for p in zip(first[:3], rest[:3])], list(whole[:3]))


# ---------------------------------------------------------------------------------------------
# RLKERN_DETERMINISTIC

def test_deterministic_helper_reads_the_environment(monkeypatch):
    monkeypatch.delenv("RLKERN_DETERMINISTIC", raising=False)
    assert _backend.deterministic(False) is False and _backend.deterministic(True) is True
    monkeypatch.setenv("RLKERN_DETERMINISTIC", "0")
    assert _backend.deterministic(False) is False and _backend.deterministic(True) is True
    monkeypatch.setenv("RLKERN_DETERMINISTIC", "1")
    assert _backend.deterministic(False) is True and _backend.deterministic(True) is True


def _flagged_call(name, hidden, weight, labels, deterministic):
    b, t = 3, 50
    h, y = hidden.reshape(b, t, -1), labels.reshape(b, t)
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(b, t)
    mask[2, 30:] = 0
    if name == "linear_token_logprobs":
        return rlkern.linear_token_logprobs(h, weight, y, return_entropy=True, deterministic=deterministic,
                                            chunk_size=16)
    if name == "linear_policy_loss":
        old, adv = -torch.rand(b, t, generator=g), torch.randn(b, t, generator=g)
        return rlkern.linear_policy_loss(h, weight, y, old, adv, mask, deterministic=deterministic, chunk_size=16)
    ref = -torch.rand(2, t, generator=g) * 3
    return rlkern.linear_preference_loss(h[:2], weight, y[:2], mask[:2], ref, deterministic=deterministic,
                                         chunk_size=16)


@pytest.mark.parametrize("name", FLAGGED)
def test_environment_turns_the_flag_on(name, monkeypatch):
    hidden, weight, labels = _head(4)
    seen = []
    blocks, head_init = linear_logprobs._blocks, linear_preference._Head.__init__

    def spy_blocks(n, vocab, device, chunk_size, deterministic):
        seen.append(deterministic)
        return blocks(n, vocab, device, chunk_size, deterministic)

    def spy_init(self, *args, **kwargs):
        head_init(self, *args, **kwargs)
        seen.append(self.deterministic)

    monkeypatch.setattr(linear_logprobs, "_blocks", spy_blocks)
    monkeypatch.setattr(linear_preference._Head, "__init__", spy_init)

    def grads(det):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = _flat(_flagged_call(name, h, w, labels, det))
        out[0].sum().backward()
        return [t.detach() for t in out] + [h.grad, w.grad]

    monkeypatch.delenv("RLKERN_DETERMINISTIC", raising=False)
    flagged = grads(True)
    assert seen and all(seen)
    seen.clear()
    grads(False)
    assert seen and not any(seen)  # without the flag or the variable: the default blocks
    seen.clear()
    monkeypatch.setenv("RLKERN_DETERMINISTIC", "1")
    from_env = grads(False)
    assert seen and all(seen)
    _bitwise(from_env, flagged)


def test_environment_reaches_the_fused_triton_backward(monkeypatch):
    # kernel="fused": the flag picks the Triton backward without atomics (kernels/linear_logprobs.py)
    monkeypatch.setenv("RLKERN_BACKEND", "triton")
    if not _backend.triton_interpreted():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    from rlkern.kernels import linear_logprobs as fused

    seen = []
    backward = fused.linear_logprobs_backward

    def spy(*args, **kwargs):
        seen.append(args[15])  # (..., need_hidden, need_weight, need_bias, deterministic)
        return backward(*args, **kwargs)

    monkeypatch.setattr(fused, "linear_logprobs_backward", spy)
    hidden, weight, labels = _head(6, n=9)

    def grads():
        h = hidden.clone().requires_grad_()
        rlkern.linear_token_logprobs(h, weight, labels, kernel="fused").sum().backward()
        return h.grad

    monkeypatch.delenv("RLKERN_DETERMINISTIC", raising=False)
    grads()
    monkeypatch.setenv("RLKERN_DETERMINISTIC", "1")
    grads()
    assert seen == [False, True]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["chunked", "fused"])
def test_cuda_deterministic_head_is_bit_identical_and_batch_invariant(kernel):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(7)
    n, h, v = 1000, 256, 5003  # many tiles, so the atomic backward would race
    hidden = torch.randn(n, h, generator=g).cuda().bfloat16()
    weight = (torch.randn(v, h, generator=g) / 16).cuda().bfloat16()
    labels = torch.randint(0, v, (n,), generator=g).cuda()

    def run(rows):
        hh = hidden[rows].clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logp, entropy = rlkern.linear_token_logprobs(hh, w, labels[rows], return_entropy=True, deterministic=True,
                                                     kernel=kernel)
        (logp + 0.1 * entropy).sum().backward()
        return logp.detach(), entropy.detach(), hh.grad, w.grad

    whole = run(slice(None))
    _bitwise(run(slice(None)), whole)
    first, rest = run(slice(0, 333)), run(slice(333, None))
    _bitwise([torch.cat(p) for p in zip(first[:3], rest[:3])], list(whole[:3]))


# Ops whose GPU path accumulates float sums with atomics and has no deterministic flag yet (the
# table in docs/reliability.md): the float64 group sums of kernels/advantages.py, and float
# index_add_ on CUDA in the PyTorch path of grpo_passk / bnpo / optimal_token_baseline.
GPU_ATOMIC_SUMS = {"grpo", "group_normalize", "rloo", "opo", "gpg", "reinforce_pp_baseline", "gdpo",
                   "gigpo_step_groups", "grpo_passk", "bnpo", "optimal_token_baseline"}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(set(CASES) - GPU_ATOMIC_SUMS))
def test_cuda_two_runs_are_bit_identical(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fn, inputs, grad_of = CASES[name]
    inputs = [_f32(t).cuda() for t in inputs]
    _bitwise(_run(fn, inputs, grad_of), _run(fn, inputs, grad_of))
