"""Vocabulary-parallel token_logprobs (``process_group=``) vs the unsharded op and the float64
reference, and the kernels' shard mode (``vocab_start``) on every backend.

Multi-process tests: 2 and 3 CPU processes with the gloo backend (torch.multiprocessing.spawn).
A spawn costs seconds (each process imports torch and rlkern), so one spawned job runs every
case on every backend (cpp, triton under TRITON_INTERPRET=1, the reference) and a failed check
raises in the child, which fails the test with the child's traceback.
"""

import math
import os
import sys
import tempfile
import types
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlkern
from rlkern import _backend
from rlkern.ops import logprobs as ops_logprobs
from rlkern.ops import vocab_parallel
from rlkern.reference import logprobs as reference
from conftest import import_peer

BACKENDS = ("cpp", "triton", "torch")


def _spawn(worker, world_size, *args):
    # The children inherit os.environ: TRITON_INTERPRET=1 from conftest on a CPU-only machine.
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world_size, os.path.join(tmp, "rendezvous"), *args), nprocs=world_size)


def _init(rank, world_size, rendezvous):
    torch.set_num_threads(1)  # the ranks share the test machine's cores
    # A rank that fails makes spawn stop the others; the timeout is a backstop against a hang.
    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))


def _finish():
    # Every check has passed once both ranks reach the barrier. Tearing gloo down then (or at
    # interpreter exit) can still abort a rank in gloo's own threads ("terminate called without
    # an active exception", seen in CI), which is not what these tests check: the ranks leave
    # without the teardown.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ref(logits, labels, temperature, softcap, ignore_index):
    return reference.logprobs_fwd(logits.double().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                  temperature, softcap, ignore_index, True)


def _ref_grad(logits, labels, g_l, g_h, temperature, softcap, ignore_index):
    flat = logits.double().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    _, entropy, lse = reference.logprobs_fwd(flat, labels, temperature, softcap, ignore_index, True)
    grad = reference.logprobs_bwd(g_l.double().reshape(-1), None if g_h is None else g_h.double().reshape(-1),
                                  flat, labels, lse, entropy, temperature, softcap, ignore_index)
    return grad.reshape(logits.shape)


# --- multi-process: token_logprobs(process_group=...) == the unsharded op ------------------------

VOCAB = 1001  # odd, not a multiple of any kernel block; split unevenly below

CASES = [
    # fp32, temperature and softcap together, 2-D rows, int64 labels, entropy.
    dict(name="fp32-T0.7-softcap", dtype=torch.float32, temperature=0.7, softcap=30.0, ignore_index=-100,
         entropy=True, sliced=False, inplace=False, scale=4.0, label_dtype=torch.int64),
    # bf16 [B, T, V_r] sliced rows, no entropy (the 2-row combine), int32 labels, an ignore_index
    # that is a real token id (it lands in one shard).
    dict(name="bf16-sliced-ignore7", dtype=torch.bfloat16, temperature=1.0, softcap=None, ignore_index=7,
         entropy=False, sliced=True, inplace=False, scale=3.0, label_dtype=torch.int32),
    # the backward writes into the logits buffer; entropy grads; large logits.
    dict(name="fp32-inplace-T1.3", dtype=torch.float32, temperature=1.3, softcap=None, ignore_index=-100,
         entropy=True, sliced=False, inplace=True, scale=8.0, label_dtype=torch.int64),
    # float64 logits run the reference kernels whatever the backend (shard mode of the
    # reference wrappers in rlkern/ops/logprobs.py).
    dict(name="fp64-softcap", dtype=torch.float64, temperature=0.8, softcap=5.0, ignore_index=-100,
         entropy=True, sliced=False, inplace=False, scale=3.0, label_dtype=torch.int64),
]


def _case_inputs(case):
    """Full logits / labels / upstream grads, identical on every rank and in the parent."""
    g = torch.Generator().manual_seed(0)
    n = 11
    full = torch.randn(n + 1 if case["sliced"] else n, VOCAB, generator=g) * case["scale"]
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    labels[2::5] = case["ignore_index"]
    labels[1] = full[1].argmax()  # confident label: 1 - p needs every digit of the global lse
    # Without softcap (softcap(-inf) = -c is finite): row 3 is -inf in every shard (uniform by
    # convention, zero gradient); row 4 -inf in the first shard(s), whose label has logp -inf;
    # row 5 -inf in the last shard(s), its label in the finite part.
    full[3] = -math.inf
    full[4, : (VOCAB + 1) // 2] = -math.inf
    labels[4] = 0
    full[5, VOCAB // 2:] = -math.inf
    labels[5] = 1
    full[6, 7] = 1e4  # |logits| ~ 1e4: lse and H must not cancel
    labels[6] = 7
    if case["sliced"]:
        # TRL's logits[:, :-1] of a [B, T, V] tensor: rows that cannot be flattened as a view.
        full = full.view(2, (n + 1) // 2, VOCAB)
        labels = torch.cat([labels, labels[:1]]).view(2, (n + 1) // 2)[:, :-1]
    labels = labels.to(case["label_dtype"])
    g_l = torch.randn(labels.shape, generator=g)
    g_h = torch.randn(labels.shape, generator=g)
    return full.to(case["dtype"]), labels, g_l, g_h


def _cols(full, case, start, size):
    cols = full[..., start:start + size]
    return cols[:, :-1] if case["sliced"] else cols


def _loss(out, case, g_l, g_h):
    logp, entropy = out if case["entropy"] else (out, None)
    return logp, entropy, (logp * g_l).sum() + ((entropy * g_h).sum() if case["entropy"] else 0.0)


def _expected(backends, monkeypatch):
    """In the parent (where torch._dynamo, which the custom op imports on first use, is loaded
    already): the unsharded op's outputs and gradient per backend, and the float64 reference."""
    expected = {}
    for case in CASES:
        full, labels, g_l, g_h = _case_inputs(case)
        args = (case["temperature"], case["softcap"] or 0.0, case["ignore_index"])
        f64_logp, f64_entropy, _ = _ref(_cols(full, case, 0, VOCAB), labels, *args)
        f64_grad = _ref_grad(_cols(full, case, 0, VOCAB), labels, g_l, g_h if case["entropy"] else None, *args)
        for backend in backends:
            monkeypatch.setenv("RLKERN_BACKEND", backend)
            leaf = full.clone().requires_grad_()
            logp, entropy, loss = _loss(
                rlkern.token_logprobs(_cols(leaf, case, 0, VOCAB), labels, temperature=case["temperature"],
                                      logit_softcap=case["softcap"], ignore_index=case["ignore_index"],
                                      return_entropy=case["entropy"]), case, g_l, g_h)
            loss.backward()
            expected[backend, case["name"]] = dict(
                logp=logp.detach(), entropy=None if entropy is None else entropy.detach(),
                grad=_cols(leaf.grad, case, 0, VOCAB), f64_logp=f64_logp, f64_entropy=f64_entropy, f64_grad=f64_grad)
    return expected


def _grad_error_bound(unsharded, ref, dtype):
    """Allowed error of a shard's gradient vs the float64 reference: twice the unsharded op's
    error over the whole rows, plus one rounding of the output dtype (a global lse a few ulp away
    can move a bf16 gradient by one ulp)."""
    scale = ref.abs().max().item()
    return 2 * (unsharded.double() - ref).abs().max().item() + torch.finfo(dtype).eps * scale


def _check_case(case, exp, shard_sizes, group, backend):
    os.environ["RLKERN_BACKEND"] = backend
    rank = dist.get_rank(group)
    start, size = sum(shard_sizes[:rank]), shard_sizes[rank]
    what = f"{backend} {case['name']} shards {shard_sizes} group rank {rank}"
    full, labels, g_l, g_h = _case_inputs(case)
    leaf = full.clone().requires_grad_()
    logp, entropy, loss = _loss(
        rlkern.token_logprobs(_cols(leaf, case, start, size), labels, temperature=case["temperature"],
                              logit_softcap=case["softcap"], ignore_index=case["ignore_index"],
                              return_entropy=case["entropy"], inplace_backward=case["inplace"],
                              process_group=group), case, g_l, g_h)

    assert logp.shape == labels.shape and logp.dtype == exp["logp"].dtype, what
    # Same per-shard arithmetic as the unsharded kernel, float64 combine: its accuracy.
    torch.testing.assert_close(logp, exp["logp"], rtol=2e-6, atol=4e-6, msg=lambda m: f"{what} logp: {m}")
    torch.testing.assert_close(logp.double().reshape(-1), exp["f64_logp"], rtol=2e-5, atol=2e-5,
                               msg=lambda m: f"{what} logp vs float64: {m}")
    flat = logp.detach().reshape(-1)
    if case["softcap"] is None:
        assert flat[4] == -math.inf and flat[3] == pytest.approx(-math.log(VOCAB)), what
    if case["entropy"]:
        torch.testing.assert_close(entropy, exp["entropy"], rtol=2e-6, atol=4e-6, msg=lambda m: f"{what} H: {m}")
        torch.testing.assert_close(entropy.double().reshape(-1), exp["f64_entropy"], rtol=2e-5, atol=2e-5,
                                   msg=lambda m: f"{what} H vs float64: {m}")
    # Every rank of the group returns the same numbers.
    gathered = [torch.empty_like(flat) for _ in shard_sizes]
    dist.all_gather(gathered, flat.contiguous(), group=group)
    assert all(torch.equal(x, flat) for x in gathered), what

    loss.backward()
    ours = _cols(leaf.grad, case, start, size)
    assert ours.dtype == case["dtype"] and not ours.isnan().any(), what
    if case["softcap"] is None:
        assert (ours.flatten(0, -2)[3] == 0).all(), what  # -inf everywhere: zero gradient
    if case["sliced"]:
        assert (leaf.grad[:, -1] == 0).all(), what
    allowed = _grad_error_bound(exp["grad"], exp["f64_grad"], case["dtype"])
    worst = (ours.double() - exp["f64_grad"][..., start:start + size]).abs().max().item() if size else 0.0
    assert worst <= allowed, f"{what} grad: max error {worst:.3g} > {allowed:.3g}"


def _check_layout(shard_sizes, group, backends, expected):
    rank = dist.get_rank(group)
    layout = vocab_parallel.shard_layout(shard_sizes[rank], group, torch.device("cpu"))
    assert layout == (sum(shard_sizes[:rank]), shard_sizes[rank], VOCAB), (layout, shard_sizes)
    for backend in backends:
        for case in CASES:
            _check_case(case, expected[backend, case["name"]], shard_sizes, group, backend)
    os.environ.pop("RLKERN_BACKEND")


def _inplace_guard(shard_sizes, group):
    # Another consumer saved the logits: the in-place backward must make it raise, not read grads.
    rank = dist.get_rank(group)
    start, size = sum(shard_sizes[:rank]), shard_sizes[rank]
    act = (torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(9))[:, start:start + size]
           .clone().requires_grad_() * 1.0)
    other = (act**2).sum()
    logp = rlkern.token_logprobs(act, torch.arange(5) * 3, process_group=group, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + other).backward()


def _bad_input(shard_sizes, group):
    local = torch.randn(3, shard_sizes[dist.get_rank(group)])
    # Label checks use the whole vocabulary, on every rank (each raises before any collective).
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {VOCAB}\).*labels\[1\] = {VOCAB}"):
        rlkern.token_logprobs(local, torch.tensor([0, VOCAB, 2]), process_group=group)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        rlkern.token_logprobs(local, torch.tensor([0, 1, 2]), process_group="tp")
    # A label of another shard is not an error (labels are global).
    rlkern.token_logprobs(local, torch.tensor([0, VOCAB - 1, 2]), process_group=group)


def _changing_splits(group):
    """The split may change between calls: the layout was cached by (group, local size) and a
    later call under another split reused a stale start ([4, 6], [6, 4], [4, 4] gave wrong
    log-probs), or left one rank alone in the all_gather ([4, 4] then [4, 6]: a hang)."""
    rank = dist.get_rank(group)
    g = torch.Generator().manual_seed(11)
    full = torch.randn(5, 10, generator=g) * 2
    labels = torch.tensor([0, 3, 5, 7, 9])
    for split in ([4, 6], [6, 4], [4, 4], [4, 6], [2, 8]):
        total = sum(split)
        logits = full[:, :total]
        used = torch.where(labels < total, labels, 0)
        start = sum(split[:rank])
        ours = rlkern.token_logprobs(logits[:, start:start + split[rank]], used, process_group=group)
        torch.testing.assert_close(ours, rlkern.token_logprobs(logits, used), rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"split {split}: {m}")


def _linear_empty_shard(group):
    """linear_token_logprobs on a rank that owns no vocabulary rows raised "weight must have at
    least one row" while the other rank waited in the collective."""
    rank = dist.get_rank(group)
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(37, 8, generator=g)
    labels = torch.tensor([0, 5, 36, -100, 12, 30])
    for split in ([37, 0], [0, 37]):
        start = sum(split[:rank])
        h = hidden.clone().requires_grad_()
        w = weight[start:start + split[rank]].clone().requires_grad_()
        logp, entropy = rlkern.linear_token_logprobs(h, w, labels, return_entropy=True, process_group=group)
        (logp.sum() + 0.1 * entropy.sum()).backward()
        h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref_logp, ref_entropy = rlkern.linear_token_logprobs(h_ref, w_ref, labels, return_entropy=True)
        (ref_logp.sum() + 0.1 * ref_entropy.sum()).backward()
        torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad, w_ref.grad[start:start + split[rank]], rtol=1e-5, atol=1e-5)


def _worker(rank, world_size, rendezvous, backends, expected):
    _init(rank, world_size, rendezvous)
    world = dist.group.WORLD
    if world_size == 2:
        _check_layout([501, 500], world, backends, expected)
        _inplace_guard([501, 500], world)
        _bad_input([501, 500], world)
        _changing_splits(world)
        _linear_empty_shard(world)
    else:
        _check_layout([334, 334, 333], world, backends, expected)
        # a rank with no columns at all
        _check_layout([600, 0, 401], world, [b for b in backends if b != "triton"], expected)
        # A tensor-parallel group that is not WORLD, whose ranks are not the global ranks.
        tp_group = dist.new_group([1, 2])
        if rank > 0:
            _check_layout([501, 500], tp_group, [b for b in backends if b != "triton"], expected)
    _finish()


# 2 processes: shards [501, 500]. 3 processes: [334, 334, 333], [600, 0, 401] (a rank with no
# columns) and a 2-rank group [1, 2] inside the 3 (group ranks differ from global ranks).
@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_matches_unsharded(world_size, monkeypatch):
    if not _backend.has_cpp():
        pytest.fail("rlkern._C did not build")
    backends = [b for b in BACKENDS if b != "triton" or (_backend.has_triton() and _backend.triton_interpreted())]
    expected = _expected(backends, monkeypatch)
    monkeypatch.delenv("RLKERN_BACKEND")
    _spawn(_worker, world_size, backends, expected)


# --- peer: verl's own vocab-parallel entropy (Megatron backend) ---------------------------------

def _stub_megatron_tp_group():
    # verl.utils.megatron.tensor_parallel reads the TP group from Megatron's parallel_state; CI
    # has no Megatron, so the lookup (only that) is answered with the WORLD group.
    parallel_state = types.ModuleType("megatron.core.parallel_state")
    parallel_state.get_tensor_model_parallel_group = lambda: dist.group.WORLD
    core = types.ModuleType("megatron.core")
    core.parallel_state = parallel_state
    megatron = types.ModuleType("megatron")
    megatron.core = core
    sys.modules.update({"megatron": megatron, "megatron.core": core, "megatron.core.parallel_state": parallel_state})


def _verl_worker(rank, world_size, rendezvous, shard_sizes):
    _init(rank, world_size, rendezvous)
    if "megatron" not in sys.modules:
        _stub_megatron_tp_group()
    # verl wraps one product in torch.compile(dynamic=True); run it eagerly (same numbers) and
    # spare the child torch._dynamo's import and compile.
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)
    verl_tp = import_peer("verl.utils.megatron.tensor_parallel")
    start, size = sum(shard_sizes[:rank]), shard_sizes[rank]
    full = torch.randn(13, sum(shard_sizes), generator=torch.Generator().manual_seed(4)) * 4
    labels = torch.zeros(13, dtype=torch.long)
    g_h = torch.randn(13, generator=torch.Generator().manual_seed(5))
    ours_in = full[:, start:start + size].clone().requires_grad_()
    _, ours = rlkern.token_logprobs(ours_in, labels, return_entropy=True, process_group=dist.group.WORLD)
    (ours * g_h).sum().backward()
    theirs_in = full[:, start:start + size].clone().requires_grad_()
    theirs = verl_tp.vocab_parallel_entropy(theirs_in)
    (theirs * g_h).sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-4, atol=1e-6)
    _finish()


@pytest.mark.peer
def test_verl_vocab_parallel_entropy_parity():
    import_peer("verl")  # skip (fail in CI) here, not inside the children
    _spawn(_verl_worker, 2, [501, 500])


# --- single process: the kernels' shard mode, combined by hand --------------------------------

def _by_hand(parts, labels, splits, ignore_index):
    """The whole-row (logp, H, lse) from per-shard kernel outputs by logsumexp over shards
    (a different formula from vocab_parallel.combine_forward's, as an independent check)."""
    lse_r = torch.stack([p[2] for p in parts])  # (R, N)
    lse = torch.logsumexp(lse_r, 0)
    share = torch.exp(lse_r - lse)  # probability mass of each shard
    h_r = torch.stack([p[1].double() for p in parts])
    entropy = (torch.where(share > 0, share * (h_r - torch.log(share)), 0.0)).sum(0)
    logp = torch.zeros_like(lse)
    for (s0, s1), p, l_r in zip(zip(splits[:-1], splits[1:]), parts, lse_r):
        here = (labels >= s0) & (labels < s1) & (labels != ignore_index)
        logp = torch.where(here, p[0].double() + l_r - lse, logp)
    return logp, entropy, lse


# V = 1001 in 3 uneven shards; 4100 = one 4096 chunk of the C++ kernel plus a 4-column shard.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,splits", [(1001, [0, 334, 668, 1001]), (4100, [0, 4096, 4100])])
@pytest.mark.parametrize("temperature,softcap", [(1.0, 0.0), (0.7, 30.0)])
def test_kernel_shard_mode(backend, dtype, vocab, splits, temperature, softcap):
    forward, backward = ops_logprobs.kernel_fns(backend)
    g = torch.Generator().manual_seed(0)
    n = 6
    logits = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[1] = -100
    logits[0, : splits[1]] = -math.inf  # the first shard is all -inf in row 0, and holds its label
    labels[0] = 1
    labels[2] = logits[2].float().argmax()
    g_l, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ref_logp, ref_entropy, ref_lse = reference.logprobs_fwd(logits.double(), labels, temperature, softcap, -100, True)

    parts = []
    for s0, s1 in zip(splits[:-1], splits[1:]):
        logp, entropy, lse = forward(logits[:, s0:s1], labels, temperature, softcap, -100, True, vocab_start=s0)
        here = (labels >= s0) & (labels < s1)
        assert (logp[~here] == 0).all()  # labels of other shards: 0, not NaN
        if softcap == 0 and s0 == 0:  # (softcap(-inf) = -c: no shard is all -inf then)
            assert torch.isneginf(lse).tolist() == [True] + [False] * (n - 1)
            assert logp[0] == -math.inf  # its label is in the all -inf shard: probability 0
        parts.append((logp, entropy, lse))
    logp, entropy, lse = _by_hand(parts, labels, splits, -100)
    torch.testing.assert_close(logp, ref_logp.double(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(entropy, ref_entropy.double(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)

    # Backward with the whole row's lse and entropy: each shard's gradient is the matching
    # columns of the unsharded gradient (bit for bit: same per-element arithmetic).
    full_grad = torch.empty_like(logits)
    backward(g_l, g_h, logits, labels, ref_lse, ref_entropy.float(), temperature, softcap, -100, full_grad)
    no_h_grad = torch.empty_like(logits)
    backward(g_l, None, logits, labels, ref_lse, None, temperature, softcap, -100, no_h_grad)
    for s0, s1 in zip(splits[:-1], splits[1:]):
        grad = torch.empty_like(logits[:, s0:s1])
        backward(g_l, g_h, logits[:, s0:s1], labels, ref_lse, ref_entropy.float(), temperature, softcap, -100,
                 grad, vocab_start=s0)
        assert torch.equal(grad, full_grad[:, s0:s1]), (s0, s1)
        in_place = logits[:, s0:s1].clone()
        backward(g_l, g_h, in_place, labels, ref_lse, ref_entropy.float(), temperature, softcap, -100, in_place,
                 vocab_start=s0)
        assert torch.equal(in_place, grad)
        backward(g_l, None, logits[:, s0:s1], labels, ref_lse, None, temperature, softcap, -100, grad, vocab_start=s0)
        assert torch.equal(grad, no_h_grad[:, s0:s1])


def test_kernel_vocab_start_default_unchanged(backend):
    # vocab_start=-1 is today's behaviour: NaN for labels outside [0, V), bit-identical outputs.
    forward, _ = ops_logprobs.kernel_fns(backend)
    logits = torch.randn(4, 301)
    labels = torch.tensor([3, 301, -5, -100])
    plain = forward(logits, labels, 0.9, 0.0, -100, True)
    explicit = forward(logits, labels, 0.9, 0.0, -100, True, vocab_start=-1)
    for a, b in zip(plain, explicit):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert plain[0][1].isnan() and plain[0][2].isnan() and plain[0][3] == 0
    shard = forward(logits, labels, 0.9, 0.0, -100, True, vocab_start=0)[0]
    assert shard[1] == 0 and shard[2] == 0 and shard[0] == plain[0][0]


def test_kernel_empty_shard(backend):
    # A rank may hold no columns (uneven layouts): every label is another shard's.
    forward, backward = ops_logprobs.kernel_fns(backend)
    logits, labels = torch.zeros(3, 0), torch.tensor([4, -100, 0])
    logp, entropy, lse = forward(logits, labels, 1.0, 0.0, -100, True, vocab_start=5)
    assert logp.tolist() == [0.0, 0.0, 0.0] and torch.isneginf(lse).all()
    grad = torch.empty(3, 0)
    backward(torch.ones(3), torch.ones(3), logits, labels, torch.zeros(3, dtype=torch.float64), torch.ones(3), 1.0,
             0.0, -100, grad, vocab_start=5)


def test_opcheck_shard_mode():
    # The C++ schema's trailing vocab_start, through the dispatcher's fake/meta checks.
    logits, labels = torch.randn(5, 37), torch.tensor([3, 40, -100, 36, 100])
    args = (logits, labels, 0.9, 0.0, -100, True, 30)
    torch.library.opcheck(torch.ops.rlkern.cpp_token_logprobs.default, args)
    _, entropy, lse = torch.ops.rlkern.cpp_token_logprobs(*args)
    grad = torch.empty_like(logits)
    torch.library.opcheck(torch.ops.rlkern.cpp_token_logprobs_backward.default,
                          (torch.randn(5), torch.randn(5), logits, labels, lse, entropy, 0.9, 0.0, -100, grad, 30))


def test_kernel_rejects_bad_vocab_start():
    logits, labels = torch.randn(2, 10), torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="vocab_start must be -1"):
        torch.ops.rlkern.cpp_token_logprobs(logits, labels, 1.0, 0.0, -100, False, -2)
    from rlkern.kernels import logprobs as triton_logprobs
    with pytest.raises(ValueError, match="vocab_start must be -1"):
        triton_logprobs.logprobs_forward(logits, labels, 1.0, 0.0, -100, False, vocab_start=-2)


def test_process_group_needs_initialized_distributed():
    if dist.is_initialized():
        pytest.skip("this process already has a default group")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        rlkern.token_logprobs(torch.randn(2, 10), torch.tensor([1, 2]), process_group=object())
