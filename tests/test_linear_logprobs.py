"""linear_token_logprobs (chunked kernel) vs the float64 reference, TRL's ChunkedLogProbFunction,
its memory bound, batch invariance and the custom-op contract. The fused Triton kernel has its
own file (test_linear_logprobs_triton.py)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_as_close_as_torch, import_peer

import rlkern
from rlkern.benches.common import CPU_PROBE_ENV
from rlkern.reference.linear_logprobs import EXTRA_OUTPUTS
from rlkern.reference.linear_logprobs import linear_logprobs as reference

ALL_EXTRAS = EXTRA_OUTPUTS


def _inputs(n, width, vocab, dtype, *, bias=False, seed=0, ignore=()):
    gen = torch.Generator().manual_seed(seed)
    # Logit spread ~ N(0, 3^2): peaked enough that log-probs span 0 .. -20.
    hidden = torch.randn(n, width, generator=gen).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen) * 3 / width**0.5).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (n,), generator=gen)
    for i in ignore:
        labels[i] = -100
    return hidden, weight, b, labels


def _ours_and_grads(hidden, weight, bias, labels, grad_seed=1, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    b = leaves[2] if bias is not None else None
    logp, entropy, extras = rlkern.linear_token_logprobs(
        leaves[0], leaves[1], labels, bias=b, return_entropy=True, extra_outputs=ALL_EXTRAS, **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    g_l, g_h = torch.randn(logp.shape, generator=gen), torch.randn(logp.shape, generator=gen)
    (logp * g_l + entropy * g_h).sum().backward()
    return logp, entropy, extras, [t.grad for t in leaves], (g_l, g_h)


def _reference_and_grads(hidden, weight, bias, labels, grads, **kwargs):
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    b = leaves[2] if bias is not None else None
    logp, entropy, extras = reference(leaves[0], leaves[1], b, labels, extra_outputs=ALL_EXTRAS, **kwargs)
    (logp * grads[0].double() + entropy * grads[1].double()).sum().backward()
    return logp, entropy, extras, [t.grad for t in leaves]


def _torch_at(dtype, hidden, weight, bias, labels, grads, **kwargs):
    """PyTorch's own result at the input dtype (materialized logits): the error yardstick."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logits = leaves[0] @ leaves[1].T
    if bias is not None:
        logits = logits + leaves[2]
    logits = logits * kwargs.get("logit_scale", 1.0)
    cap = kwargs.get("logit_softcap")
    if cap:
        logits = cap * torch.tanh(logits / cap)
    log_p = torch.log_softmax(logits.float() / kwargs.get("temperature", 1.0), -1)
    ignored = labels == -100
    logp = log_p.gather(1, labels.clamp(min=0)[:, None])[:, 0].masked_fill(ignored, 0)
    entropy = -(log_p.exp() * log_p).sum(-1)
    (logp * grads[0] + entropy * grads[1]).sum().backward()
    return logp, entropy, [t.grad for t in leaves]


# Odd H and V (no multiple of any block), N = 1, a bias, ignored labels, every transform.
CASES = [
    dict(n=37, width=24, vocab=1001, bias=True, ignore=(3, 30)),
    dict(n=1, width=7, vocab=67, bias=False, ignore=()),
    dict(n=19, width=33, vocab=513, bias=False, ignore=(0,), temperature=0.7, logit_softcap=5.0, logit_scale=1.3),
    dict(n=25, width=16, vocab=300, bias=True, ignore=(), chunk_size=4, temperature=1.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(backend, dtype, case):
    spec = dict(CASES[case])
    n, width, vocab, bias, ignore = (spec.pop(k) for k in ("n", "width", "vocab", "bias", "ignore"))
    hidden, weight, b, labels = _inputs(n, width, vocab, dtype, bias=bias, ignore=ignore)
    logp, entropy, extras, grads, upstream = _ours_and_grads(hidden, weight, b, labels, **spec)
    spec.pop("chunk_size", None)
    r_logp, r_entropy, r_extras, r_grads = _reference_and_grads(hidden, weight, b, labels, upstream, **spec)
    assert logp.dtype == entropy.dtype == torch.float32
    assert (logp <= 0).all() and (logp[list(ignore)] == 0).all()
    # Products accumulate in fp32 for every input dtype: errors are fp32-sized, bf16 included.
    torch.testing.assert_close(logp.double(), r_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), r_entropy, rtol=0, atol=2e-5)
    torch.testing.assert_close(extras["log_sum_sq_probs"].double(), r_extras["log_sum_sq_probs"], rtol=0, atol=2e-5)
    torch.testing.assert_close(extras["mean_logits"].double(), r_extras["mean_logits"], rtol=0, atol=2e-5)
    assert torch.equal(extras["is_top1"], r_extras["is_top1"])
    if dtype == torch.float32:
        for name, g, r in zip(("hidden", "weight", "bias"), grads, r_grads):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item(), msg=name)
    else:  # the grads are rounded to bf16 like the inputs: compare with PyTorch's own bf16 error
        _, _, t_grads = _torch_at(dtype, hidden, weight, b, labels, upstream, **spec)
        for name, g, r, t in zip(("hidden", "weight", "bias"), grads, r_grads, t_grads):
            assert g.dtype == dtype
            assert_as_close_as_torch(g, r, t, floor=1e-2 * r.abs().max().item(), factor=1.5, name=name)


def test_bf16_log_probs_within_1e_2_where_trl_is_not():
    """The issue's bf16 bound: accumulate in fp32, stay within 1e-2 of float64 (TRL's CPU path
    rounds each logit to bf16; measured here at a realistic logit scale)."""
    trl_kernels = import_peer("trl.kernels")
    gen = torch.Generator().manual_seed(0)
    n, width, vocab = 64, 256, 4099
    hidden = torch.randn(n, width, generator=gen).bfloat16()
    weight = (torch.randn(vocab, width, generator=gen) * 12 / width**0.5).bfloat16()  # logits ~ N(0, 12^2)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    r_logp, r_entropy, _ = reference(hidden, weight, None, labels)
    logp, entropy = rlkern.linear_token_logprobs(hidden, weight, labels, return_entropy=True)
    trl_logp = trl_kernels.ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 1024, None, 1.0, ())[0]
    ours, trl = (logp.double() - r_logp).abs().max().item(), (trl_logp.double() - r_logp).abs().max().item()
    assert ours < 1e-2, ours
    assert (entropy.double() - r_entropy).abs().max().item() < 1e-2
    assert ours < trl / 10, (ours, trl)


def test_batched_layout_and_sliced_hidden():
    """[B, T, H] input, sliced the way TRL shifts it (hidden[:, :-1]): same as the flat call."""
    hidden, weight, _, labels = _inputs(3 * 9, 20, 211, torch.float32)
    hidden3 = hidden.view(3, 9, 20)[:, :-1]
    labels3 = labels.view(3, 9)[:, 1:]
    logp, entropy = rlkern.linear_token_logprobs(hidden3, weight, labels3, return_entropy=True)
    assert logp.shape == (3, 8)
    flat_logp, flat_entropy = rlkern.linear_token_logprobs(hidden3.reshape(-1, 20), weight, labels3.reshape(-1),
                                                           return_entropy=True)
    assert torch.equal(logp.reshape(-1), flat_logp) and torch.equal(entropy.reshape(-1), flat_entropy)


def test_gradcheck_float64():
    hidden, weight, bias, labels = _inputs(6, 5, 13, torch.float64, bias=True, ignore=(2,))
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]

    def fn(h, w, b):
        logp, entropy = rlkern.linear_token_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=4,
                                                     temperature=0.8, logit_softcap=4.0, logit_scale=1.2)
        return logp, entropy

    assert torch.autograd.gradcheck(fn, leaves)


def test_grad_of_entropy_only_and_of_logp_only():
    hidden, weight, _, labels = _inputs(11, 12, 97, torch.float32)
    for which in (0, 1):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = rlkern.linear_token_logprobs(h, w, labels, return_entropy=True)
        out[which].sum().backward()
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        ref = reference(h64, w64, None, labels)
        ref[which].sum().backward()
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_weight_grad_accumulates_like_a_parameter():
    hidden, weight, _, labels = _inputs(9, 8, 50, torch.float32)
    head = torch.nn.Linear(8, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    for _ in range(2):
        rlkern.linear_token_logprobs(hidden, head.weight, labels).sum().backward()
    w64 = weight.double().requires_grad_()
    reference(hidden, w64, None, labels)[0].sum().backward()
    torch.testing.assert_close(head.weight.grad.double(), 2 * w64.grad, rtol=1e-4, atol=1e-6)


def test_extreme_logits_and_all_ignored():
    hidden, weight, _, labels = _inputs(5, 8, 40, torch.float32)
    logp, entropy = rlkern.linear_token_logprobs(hidden * 1e3, weight, labels, return_entropy=True)
    r_logp, r_entropy, _ = reference(hidden * 1e3, weight, None, labels)
    assert torch.isfinite(logp).all() and (logp <= 0).all() and torch.isfinite(entropy).all()
    torch.testing.assert_close(logp.double(), r_logp, rtol=1e-5, atol=1e-2)
    h = hidden.clone().requires_grad_()
    out = rlkern.linear_token_logprobs(h, weight, torch.full_like(labels, -100))
    out.sum().backward()
    assert (out == 0).all() and (h.grad == 0).all()


def test_deterministic_is_batch_invariant():
    """A token's outputs are bit-identical alone, inside a batch, at any position and chunking."""
    hidden, weight, _, labels = _inputs(300, 48, 1003, torch.float32)
    kw = dict(return_entropy=True, extra_outputs=ALL_EXTRAS, deterministic=True)
    full = rlkern.linear_token_logprobs(hidden, weight, labels, **kw)
    for idx in (torch.tensor([0]), torch.tensor([299, 5, 140]), torch.arange(131, 300)):
        part = rlkern.linear_token_logprobs(hidden[idx], weight, labels[idx], chunk_size=7, **kw)
        assert torch.equal(part[0], full[0][idx]) and torch.equal(part[1], full[1][idx])
        for name in ALL_EXTRAS:
            assert torch.equal(part[2][name], full[2][name][idx])
    grads = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, entropy, _ = rlkern.linear_token_logprobs(h, w, labels, **kw)
        (logp + 0.1 * entropy).sum().backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    r_logp = reference(hidden, weight, None, labels)[0]
    torch.testing.assert_close(full[0].double(), r_logp, rtol=0, atol=2e-5)


@pytest.mark.peer
@pytest.mark.parametrize("bias", [False, True])
def test_parity_with_trl_chunked_logprob(bias):
    """Every output and gradient of trl.kernels.ChunkedLogProbFunction (TRL >= 1.15), fp32 CPU."""
    trl_kernels = import_peer("trl.kernels")
    hidden, weight, b, labels = _inputs(45, 40, 1531, torch.float32, bias=bias, seed=3)
    opts = dict(temperature=0.9, logit_softcap=6.0, logit_scale=1.1)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    trl_out = trl_kernels.ChunkedLogProbFunction.apply(
        leaves[0], leaves[1], leaves[2] if bias else None, labels, opts["temperature"], 512, opts["logit_softcap"],
        opts["logit_scale"], ("entropy",) + ALL_EXTRAS)
    g_l, g_h = torch.randn(45), torch.randn(45)
    (trl_out[0] * g_l + trl_out[1] * g_h).sum().backward()
    ours_leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    logp, entropy, extras = rlkern.linear_token_logprobs(
        ours_leaves[0], ours_leaves[1], labels, bias=ours_leaves[2] if bias else None, return_entropy=True,
        extra_outputs=ALL_EXTRAS, **opts)
    (logp * g_l + entropy * g_h).sum().backward()
    torch.testing.assert_close(logp, trl_out[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, trl_out[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(extras["log_sum_sq_probs"], trl_out[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(extras["mean_logits"], trl_out[3], rtol=0, atol=1e-5)
    assert torch.equal(extras["is_top1"], trl_out[4])
    for ours, theirs in zip(ours_leaves, leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5 * theirs.grad.abs().max().item())


# Memory is measured in a fresh process: CPU tensors bypass tracemalloc, but the peak resident
# size (reset before the step) sees every page the allocator touched. N x V fp32 logits here are 4096 x 32000 x 4 B =
# 500 MiB, far above the chunked path's tile (16 MiB) and grads (8.5 MiB): unmistakable.
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch, rlkern
    from rlkern.benches.common import cpu_peak_rss_growth_mib
    torch.manual_seed(0)
    n, width, vocab = 4096, 64, 32000
    hidden = torch.randn(n, width, requires_grad=True)
    weight = (torch.randn(vocab, width) / 8).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    def step(materialize):
        if materialize:
            logp, entropy = rlkern.token_logprobs(hidden @ weight.T, labels, return_entropy=True)
        else:
            logp, entropy = rlkern.linear_token_logprobs(hidden, weight, labels, return_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    small = (hidden[:8].detach().requires_grad_(), labels[:8])
    rlkern.linear_token_logprobs(small[0], weight, small[1]).sum().backward()  # warm up code paths
    hidden.grad = weight.grad = None
    print(json.dumps({"extra_mib": cpu_peak_rss_growth_mib(lambda: step(sys.argv[1] == "materialize"))}))
""")


def _peak_extra_mib(mode: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="2", **CPU_PROBE_ENV)
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, mode], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def test_no_n_by_v_tensor_is_allocated():
    chunked = _peak_extra_mib("chunked")
    materialized = _peak_extra_mib("materialize")
    assert materialized > 500, f"the probe must see materialized logits, saw only {materialized:.0f} MiB"
    assert chunked < 100, f"chunked fwd+bwd peaked {chunked:.0f} MiB above its inputs"


def test_opcheck_and_compile():
    hidden, weight, bias, labels = _inputs(9, 16, 70, torch.float32, bias=True)
    fwd = torch.ops.rlkern.linear_token_logprobs.default
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels, 1.2, 3.0, 0.9, -100,
            True, [True, True, True], 4, False, "chunked", None)
    torch.library.opcheck(fwd, args)
    torch.library.opcheck(fwd, args[:-1] + (torch.bfloat16,))

    def step(h, w, b):
        logp, entropy = rlkern.linear_token_logprobs(h, w, labels, bias=b, return_entropy=True, temperature=0.9)
        return (logp + 0.5 * entropy).sum()

    def rounded_step(h, w, b):
        logp = rlkern.linear_token_logprobs(h, w, labels, bias=b, logits_dtype=torch.bfloat16)
        return logp.sum()

    for fn in (step, rounded_step):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        compiled(*leaves).backward()
        eager = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        fn(*eager).backward()
        for a, b in zip(leaves, eager):
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(weight=torch.zeros(10, 5)), ValueError, "weight must be"),
        (dict(labels=torch.zeros(4, dtype=torch.int64)), ValueError, "labels must have"),
        (dict(labels=torch.zeros(3)), TypeError, "labels must be int32"),
        (dict(labels=torch.tensor([0, 1, 70])), ValueError, r"labels must be in \[0, 70\)"),
        (dict(bias=torch.zeros(69)), ValueError, "bias must be"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(logit_softcap=-1.0), ValueError, "logit_softcap"),
        (dict(extra_outputs=("entropy",)), ValueError, "extra_outputs"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(kernel="cublas"), ValueError, "kernel"),
    ],
)
def test_bad_input(change, error, match):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(70, 4), labels=torch.tensor([0, 1, 2]))
    args.update(change)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(error, match=match):
        rlkern.linear_token_logprobs(hidden, weight, labels, **args)


def test_benchmark_runs_at_a_tiny_shape():
    """The benchmark's implementations agree with each other (so the table compares like with
    like) and its run produces a row per implementation (memory: test_no_n_by_v_tensor_is_allocated
    uses the same probe)."""
    from rlkern.benches import bench_linear_logprobs as bench

    hidden, weight, labels = bench._inputs(torch.device("cpu"), 33, 16, 2003, torch.float32)
    impls, missing = bench.implementations(torch.device("cpu"))
    outputs = {name: fn(hidden, weight, labels) for name, fn in impls.items()}
    assert {"rlkern", "eager", "trl"} <= set(outputs)
    assert set(missing) == {"liger", "cut-cross-entropy"}  # CUDA-only peers: a row with the reason
    for name, (logp, entropy) in outputs.items():
        torch.testing.assert_close(logp, outputs["eager"][0], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(entropy, outputs["eager"][1], rtol=0, atol=1e-5, msg=name)
    rows = bench.run(torch.device("cpu"), 64, 16, 2003, torch.float32, rounds=1, memory=False)
    step_rows = {r.impl: r for r in rows if r.bench == "linear logprobs fwd+bwd"}
    assert set(step_rows) == set(outputs) | {"bare GEMMs"} | set(missing)
    timed = [r for r in rows if r.impl not in missing]
    assert all(r.tflops > 0 and r.median_ms > 0 for r in timed)
    assert all(r.median_ms is None and r.extra["not run"] == missing[r.impl] for r in rows if r.impl in missing)


# Vocabulary-parallel LM head: each gloo rank holds consecutive rows of W (uneven shards) and
# must reproduce the unsharded op, forward and backward. One spawned job per world size checks
# every case (a spawn costs seconds); the parent computes the expectations once.
_TP_CASES = [
    dict(dtype=torch.float32, kw=dict(temperature=0.7, logit_softcap=5.0, logit_scale=1.2)),
    dict(dtype=torch.float32, kw=dict(deterministic=True, chunk_size=3)),
    dict(dtype=torch.bfloat16, kw=dict(chunk_size=8)),
    dict(dtype=torch.float32, kw=dict(logits_dtype=torch.bfloat16, logit_scale=1.2, chunk_size=5)),
]


def _tp_expected():
    out = []
    for case in _TP_CASES:
        hidden, weight, bias, labels = _inputs(21, 24, 1001, case["dtype"], bias=True, ignore=(4,), seed=7)
        logp, entropy, _, grads, upstream = _ours_and_grads(hidden, weight, bias, labels, **case["kw"])
        out.append(dict(inputs=(hidden, weight, bias, labels), upstream=upstream, logp=logp.detach(),
                        entropy=entropy.detach(), grads=grads))
    return out


def _tp_worker(rank, world_size, rendezvous, sizes, expected):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=world_size)
    try:
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        for case, exp in zip(_TP_CASES, expected):
            hidden, weight, bias, labels = exp["inputs"]
            leaves = [hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_(),
                      bias[rows].clone().requires_grad_()]
            logp, entropy = rlkern.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2],
                                                         return_entropy=True, process_group=dist.group.WORLD,
                                                         **case["kw"])
            g_l, g_h = exp["upstream"]
            (logp * g_l + entropy * g_h).sum().backward()
            torch.testing.assert_close(logp, exp["logp"], rtol=0, atol=2e-5)
            torch.testing.assert_close(entropy, exp["entropy"], rtol=0, atol=2e-5)
            bf16 = case["dtype"] == torch.bfloat16
            for ours, full in zip((leaves[0].grad, leaves[1].grad, leaves[2].grad),
                                  (exp["grads"][0], exp["grads"][1][rows], exp["grads"][2][rows])):
                scale = full.abs().max().item()
                torch.testing.assert_close(ours.float(), full.float(), rtol=1e-2 if bf16 else 1e-4,
                                           atol=(1e-2 if bf16 else 1e-5) * scale)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[501, 500], [334, 334, 333]])
def test_vocab_parallel_matches_unsharded(sizes, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_tp_worker, args=(len(sizes), str(tmp_path / "rendezvous"), sizes, _tp_expected()), nprocs=len(sizes))


@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_kernel_through_the_op(deterministic):
    """kernel='fused' (the Triton tl.dot kernels; interpreted here) behind the public op and its
    autograd: the same numbers as the reference. Kernel-level cases: test_linear_logprobs_triton.py."""
    if not rlkern._backend.has_triton() or not (torch.cuda.is_available() or rlkern._backend.triton_interpreted()):
        pytest.skip("needs triton on CUDA or TRITON_INTERPRET=1")
    hidden, weight, bias, labels = _inputs(13, 20, 203, torch.float32, bias=True, ignore=(2,))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy = rlkern.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True,
                                                 kernel="fused", deterministic=deterministic, temperature=0.8)
    g_l, g_h = torch.randn(13), torch.randn(13)
    (logp * g_l + entropy * g_h).sum().backward()
    r_logp, r_entropy, _, r_grads = _reference_and_grads(hidden, weight, bias, labels, (g_l, g_h), temperature=0.8)
    torch.testing.assert_close(logp.double(), r_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), r_entropy, rtol=0, atol=2e-5)
    for leaf, r in zip(leaves, r_grads):
        torch.testing.assert_close(leaf.grad.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


# logits_dtype: TRL's fused head under autocast (or with half inputs) rounds every logit and every
# logits-gradient element to the compute dtype. With logits_dtype set, rlkern must land as close
# to TRL as TRL is to itself at another chunk_size (the same roundings, other accumulation
# orders; max error, times 4), and with None much farther: a mean error 20 times ours (so the
# test fails if the option does nothing). Floors: 2 fp32 ulps of the output's scale for the
# forward outputs; for gradients, fp32-level differences in p (TRL's fp32 lse vs rlkern's
# float64 one) flip the rounding of a few d-logits elements, each by one ulp of the compute
# dtype: 4e-6 of the gradient's scale; and one ulp of a half-precision gradient's own dtype.
_PRECISION_OUTPUTS = ("logprobs", "entropy", "log_sum_sq_probs", "mean_logits", "hidden", "weight", "bias")


def _trl_run(hidden, weight, bias, labels, upstream, chunk_size, autocast_dtype, **opts):
    trl_kernels = import_peer("trl.kernels")
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = trl_kernels.ChunkedLogProbFunction.apply(
            leaves[0], leaves[1], leaves[2], labels, opts.get("temperature", 1.0), chunk_size,
            opts.get("logit_softcap"), opts.get("logit_scale", 1.0), ("entropy",) + ALL_EXTRAS)
    logp = out[0].masked_fill(labels == -100, 0.0)  # TRL has no ignore_index
    (logp * upstream[0] + out[1] * upstream[1]).sum().backward()
    return [logp.detach(), out[1].detach(), out[2], out[3]] + [t.grad for t in leaves], out[4]


def _rlkern_run(hidden, weight, bias, labels, upstream, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logp, entropy, extras = rlkern.linear_token_logprobs(
        leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, extra_outputs=ALL_EXTRAS, **kwargs)
    (logp * upstream[0] + entropy * upstream[1]).sum().backward()
    outs = [logp.detach(), entropy.detach(), extras["log_sum_sq_probs"], extras["mean_logits"]]
    return outs + [t.grad for t in leaves], extras["is_top1"]


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _mean_diff(a, b):
    return (a.double() - b.double()).abs().mean().item()


def _floor(name, t):
    mag = t.double().abs().max().item()
    floor = (4e-6 if name in ("hidden", "weight", "bias") else 2.4e-7) * mag
    if t.dtype in (torch.float16, torch.bfloat16) and mag > 0:
        floor = max(floor, 2.0 ** math.floor(math.log2(mag)) * torch.finfo(t.dtype).eps)
    return floor


def _assert_matches_trl_rounding(ours, ours_exact, trl, trl_other):
    for name, o, e, t, t2 in zip(_PRECISION_OUTPUTS, ours, ours_exact, trl, trl_other):
        tol = 4 * max(_max_diff(t, t2), _floor(name, t))
        assert o.dtype == t.dtype, name
        assert _max_diff(o, t) <= tol, f"{name}: {_max_diff(o, t):.3g} > {tol:.3g}"
        assert _mean_diff(e, t) > 20 * _mean_diff(o, t), f"{name}: logits_dtype=None is about as close"


_PRECISION_CASES = [
    dict(),
    dict(temperature=0.9, logit_softcap=6.0, logit_scale=1.3),
]


@pytest.mark.peer
@pytest.mark.parametrize("mode", ["autocast", "half inputs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(_PRECISION_CASES)))
def test_logits_dtype_matches_trl(backend, mode, dtype, case):
    """logits_dtype=bf16/fp16 reproduces trl.kernels.ChunkedLogProbFunction under
    torch.autocast (fp32 inputs) and with inputs of that dtype (no autocast): log-probs, entropy,
    extras and the three gradients; logits_dtype=None does not."""
    opts = _PRECISION_CASES[case]
    hidden, weight, bias, labels = _inputs(37, 40, 1531, torch.float32, bias=True, ignore=(3,), seed=11)
    if mode == "half inputs":
        hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    autocast = dtype if mode == "autocast" else None
    gen = torch.Generator().manual_seed(2)
    upstream = torch.randn(37, generator=gen), torch.randn(37, generator=gen)
    trl, trl_top1 = _trl_run(hidden, weight, bias, labels, upstream, 512, autocast, **opts)
    trl_other, _ = _trl_run(hidden, weight, bias, labels, upstream, 256, autocast, **opts)
    ours, top1 = _rlkern_run(hidden, weight, bias, labels, upstream, logits_dtype=dtype, chunk_size=8, **opts)
    exact, _ = _rlkern_run(hidden, weight, bias, labels, upstream, **opts)
    _assert_matches_trl_rounding(ours, exact, trl, trl_other)
    assert torch.equal(top1, trl_top1)


@pytest.mark.peer
def test_logits_dtype_mixed_input_dtypes_and_deterministic():
    """bf16 hidden with an fp32 head: TRL (no autocast) computes in hidden's dtype and casts W to
    it; logits_dtype=bf16 does the same, in the deterministic mode too. Gradients keep each
    input's dtype."""
    hidden, weight, bias, labels = _inputs(37, 40, 1531, torch.float32, bias=True, ignore=(3,), seed=12)
    hidden = hidden.bfloat16()
    gen = torch.Generator().manual_seed(3)
    upstream = torch.randn(37, generator=gen), torch.randn(37, generator=gen)
    trl, trl_top1 = _trl_run(hidden, weight, bias, labels, upstream, 512, None, logit_scale=0.8)
    trl_other, _ = _trl_run(hidden, weight, bias, labels, upstream, 128, None, logit_scale=0.8)
    exact, _ = _rlkern_run(hidden, weight, bias, labels, upstream, logit_scale=0.8)
    for deterministic in (False, True):
        ours, top1 = _rlkern_run(hidden, weight, bias, labels, upstream, logits_dtype=torch.bfloat16,
                                 logit_scale=0.8, deterministic=deterministic)
        assert ours[4].dtype == torch.bfloat16 and ours[5].dtype == ours[6].dtype == torch.float32
        _assert_matches_trl_rounding(ours, exact, trl, trl_other)
        assert torch.equal(top1, trl_top1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_dtype_matches_rounded_reference(backend, dtype):
    """Against the float64 reference with the same roundings (reference/linear_logprobs.py): as
    close as TRL itself is to it (float32 accumulation order flips an occasional rounding), and
    closer than logits_dtype=None."""
    trl_kernels = import_peer("trl.kernels")
    opts = dict(temperature=0.8, logit_softcap=5.0, logit_scale=1.2)
    hidden, weight, bias, labels = _inputs(29, 33, 777, torch.float32, bias=True, ignore=(0,), seed=13)
    gen = torch.Generator().manual_seed(4)
    upstream = torch.randn(29, generator=gen), torch.randn(29, generator=gen)
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    r_logp, r_entropy, r_extras = reference(*leaves[:2], leaves[2], labels, extra_outputs=ALL_EXTRAS,
                                            logits_dtype=dtype, **opts)
    (r_logp * upstream[0].double() + r_entropy * upstream[1].double()).sum().backward()
    ref = [r_logp, r_entropy, r_extras["log_sum_sq_probs"], r_extras["mean_logits"]] + [t.grad for t in leaves]
    ours, top1 = _rlkern_run(hidden, weight, bias, labels, upstream, logits_dtype=dtype, chunk_size=7, **opts)
    exact, _ = _rlkern_run(hidden, weight, bias, labels, upstream, **opts)
    trl, _ = _trl_run(hidden, weight, bias, labels, upstream, 256, dtype, **opts)
    assert torch.equal(top1, r_extras["is_top1"])
    for name, o, e, t, r in zip(_PRECISION_OUTPUTS, ours, exact, trl, ref):
        tol = 2 * max(_max_diff(t, r), _floor(name, t))
        assert _max_diff(o, r) <= tol, f"{name}: {_max_diff(o, r):.3g} > {tol:.3g}"
        assert _mean_diff(e, r) > 20 * _mean_diff(o, r), f"{name}: logits_dtype=None is about as close"


@pytest.mark.parametrize("value", [torch.int32, "bfloat16", torch.float64, torch.complex64])
def test_logits_dtype_bad_values(value):
    hidden, weight, _, labels = _inputs(3, 4, 9, torch.float32)
    with pytest.raises(ValueError, match="linear_token_logprobs: logits_dtype must be"):
        rlkern.linear_token_logprobs(hidden, weight, labels, logits_dtype=value)
    with pytest.raises(ValueError, match="linear_token_logprobs: logits_dtype must be"):
        rlkern.linear_token_logprobs(hidden.double(), weight, labels, logits_dtype=torch.bfloat16)


def test_logits_dtype_float32_is_the_default():
    hidden, weight, bias, labels = _inputs(9, 8, 101, torch.bfloat16, bias=True)
    base = rlkern.linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    same = rlkern.linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                        logits_dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(base, same))
    h64, w64 = hidden.double(), weight.double()
    assert torch.equal(rlkern.linear_token_logprobs(h64, w64, labels),
                       rlkern.linear_token_logprobs(h64, w64, labels, logits_dtype=torch.float64))
