"""torch.compile(fullgraph=True) of every public op, and of a whole GRPO and DPO step built from
rlkern ops, equal to eager (values and gradients), with no graph break; the chunked LM-head losses
(``linear_policy_loss``, ``linear_preference_loss``) as one custom op each, over their options.
CUDA graph capture / replay of the ops with GPU kernels (marked ``gpu``).

Compiles use ``backend="aot_eager"`` (dynamo + AOTAutograd, the part that traces the custom ops'
fake and autograd registrations) at tiny shapes; the two whole steps also run under inductor.
"""

import inspect

import pytest
import torch
from torch._dynamo.utils import counters

import rlkern
from _op_cases import cases, flat as _flat

def _public_ops():
    return sorted(name for name in rlkern.__all__ if inspect.isfunction(getattr(rlkern, name)))


CASES = cases()


def _scalar(tensors):
    """A loss over every differentiable output, each element weighted differently (so a wrong
    gradient of any output, in any position, changes the inputs' gradients)."""
    total = 0.0
    for t in tensors:
        if t.requires_grad:
            w = 1 + torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape) / 7
            total = total + (t * w).sum()
    return total


def _run(fn, inputs, grad_of):
    leaves = [t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
    out = _flat(fn(*leaves))
    if grad_of:
        _scalar(out).backward()
    return [t.detach() for t in out], [leaves[i].grad for i in grad_of]


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_every_public_op_has_a_compile_case():
    assert set(_public_ops()) == set(CASES), set(_public_ops()) ^ set(CASES)


@pytest.mark.parametrize("backend", ["default", "triton"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_compiles_fullgraph_equal_to_eager(name, backend, monkeypatch):
    # "triton": the kernels a CUDA tensor runs (interpreted here): the backend is chosen inside
    # each custom op, never traced (Kernels.pick imports the Triton modules lazily)
    if backend == "triton":
        monkeypatch.setenv("RLKERN_BACKEND", "triton")
    fn, inputs, grad_of = CASES[name]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, grads = _run(compiled, inputs, grad_of)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo traced it (not skipped as a whole)
    want_out, want_grads = _run(fn, inputs, grad_of)
    _assert_same(out, want_out)
    _assert_same(grads, want_grads)
    assert all(g.abs().sum() > 0 for g in grads)  # the gradients flowed through the compiled graph


# The chunked LM-head losses are one custom op each under compile (rlkern::_linear_policy_loss,
# rlkern::_linear_preference_loss: the eager op forms the gradients in its forward); their options
# travel as a string made at trace time, so the variants below cover both passes of
# linear_policy_loss, bias, rounded logits, list loss types and the flags.
def _linear_variants():
    R = rlkern  # noqa: N806
    f32 = lambda *ts: [t.float() for t in ts]  # noqa: E731
    return {
        "policy_two_pass": ("linear_policy_loss", lambda h, w, y, o, a, m: R.linear_policy_loss(
            h, w, y, o, a, m, loss="gspo", sequence_metrics=True, clip_low=0.1, agg="seq-mean-token-mean")),
        "policy_bias_bf16": ("linear_policy_loss", lambda h, w, y, o, a, m: R.linear_policy_loss(
            *f32(h, w), y, *f32(o, a), m, bias=torch.full((w.shape[0],), 0.1), logits_dtype=torch.bfloat16,
            entropy_coef=0.01, kl_coef=0.1, ref_logprobs=o.float().detach(), global_tokens=10, deterministic=True)),
        "preference_orpo": ("linear_preference_loss", lambda h, w, y, m, r: R.linear_preference_loss(
            *f32(h, w), y, m, None, loss_type="orpo", beta=0.2)),
        "preference_list_sft": ("linear_preference_loss", lambda h, w, y, m, r: R.linear_preference_loss(
            *f32(h, w), y, m, r.float(), bias=torch.full((w.shape[0],), 0.1), loss_type=["sigmoid", "sft"],
            loss_weights=[1.0, 0.5], deterministic=True, ld_alpha=0.5)),
    }


@pytest.mark.parametrize("variant", sorted(_linear_variants()))
def test_linear_losses_compile_to_one_custom_op(variant):
    name, fn = _linear_variants()[variant]
    _, inputs, grad_of = CASES[name]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    out, grads = _run(torch.compile(fn, fullgraph=True, backend=backend), inputs, grad_of)
    assert sum(counters["graph_break"].values()) == 0
    assert any(f"rlkern._{name}" in g for g in graphs), graphs  # the op is in the graph, not run beside it
    want_out, want_grads = _run(fn, inputs, grad_of)
    _assert_same(out, want_out)
    _assert_same(grads, want_grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["linear_policy_loss", "linear_preference_loss"])
def test_linear_losses_compiled_under_no_grad_and_for_hidden_only(name):
    fn, inputs, _ = CASES[name]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        _assert_same(_flat(compiled(*inputs)), _flat(fn(*inputs)))
    out, grads = _run(compiled, inputs, (0,))
    want_out, want_grads = _run(fn, inputs, (0,))
    _assert_same(out + grads, want_out + want_grads)


@pytest.mark.parametrize("name", ["linear_policy_loss", "linear_preference_loss", "linear_kto_loss"])
def test_linear_loss_custom_ops_pass_opcheck(name, monkeypatch):
    # the arguments the traced path gives the custom op (recorded), then torch.library.opcheck:
    # schema, fake tensors against the implementation, autograd registration, AOT dispatch
    from rlkern.ops import linear_losses, linear_preference

    module, attr = {"linear_policy_loss": (linear_losses, "_linear_policy_loss_op"),
                    "linear_preference_loss": (linear_preference, "_linear_preference_loss_op"),
                    "linear_kto_loss": (linear_preference, "_linear_kto_loss_op")}[name]
    op = getattr(module, attr)
    recorded = []

    def record(*args):
        recorded.append(args)
        return op(*args)

    monkeypatch.setattr(module, attr, record)
    calls = iter([True])  # the public op takes the traced path once (run eagerly); the op's body not
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: next(calls, False))
    fn, inputs, grad_of = CASES[name]
    fn(*[t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)])
    monkeypatch.undo()
    (args,) = recorded
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["linear_policy_loss", "linear_preference_loss", "linear_kto_loss"])
def test_linear_losses_with_a_lora_head_run_between_graphs(name):
    # a LoRA head is not part of the custom ops' schema: the op runs eagerly between two graphs
    # (one graph break), with the numbers and gradients of eager
    fn, inputs, grad_of = CASES[name]
    g = torch.Generator().manual_seed(1)
    lora_a = torch.randn(2, inputs[0].shape[-1], generator=g, dtype=torch.float64)
    lora_b = torch.randn(inputs[1].shape[0], 2, generator=g, dtype=torch.float64)
    op = getattr(rlkern, name)

    def run(compiled):
        leaves = [t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
        la, lb = lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()
        desirable = (torch.tensor([False, False, True, True]),) if name == "linear_kto_loss" else ()
        call = lambda *a: op(*a[:5], *desirable, *a[5:], lora_A=la, lora_B=lb, lora_scaling=0.5)  # noqa: E731
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            call = torch.compile(call, backend="aot_eager")
        loss, _ = call(*leaves)
        loss.backward()
        return [loss.detach(), la.grad, lb.grad] + [leaves[i].grad for i in grad_of]

    eager, compiled = run(False), run(True)
    assert sum(counters["graph_break"].values()) >= 1
    _assert_same(compiled, eager)


# ---------------------------------------------------------------------------------------------
# Whole steps built from rlkern ops


def _grpo_inputs():
    g = torch.Generator().manual_seed(3)
    b, t, v = 6, 7, 13
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[1, 5:] = 0
    mask[4, 2:] = 0
    old = torch.log_softmax(logits + 0.2 * torch.randn(b, t, v, generator=g, dtype=torch.float64), -1)
    old = old.gather(-1, labels[..., None])[..., 0]
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    return logits, labels, old, scores, ids, mask


def _grpo_step(logits, labels, old, scores, ids, mask):
    logprobs, entropy = rlkern.token_logprobs(logits, labels, return_entropy=True)
    advantages = rlkern.grpo(scores, ids, mask)
    loss, metrics = rlkern.policy_loss(logprobs, old, advantages, mask, clip_high=0.28, entropy=entropy,
                                       entropy_coef=0.01, ref_logprobs=old.detach(), kl_coef=0.05)
    return loss, metrics["clipfrac"]


def _dpo_inputs():
    g = torch.Generator().manual_seed(4)
    pairs, t, v = 3, 6, 11
    logits = torch.randn(2 * pairs, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (2 * pairs, t), generator=g)
    mask = torch.ones(2 * pairs, t)
    mask[0, 4:] = 0
    mask[5, :2] = 0
    ref = -torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 10
    return logits, labels, mask, ref


def _dpo_step(logits, labels, mask, ref):
    logprobs = rlkern.token_logprobs(logits, labels)
    sums = (logprobs * mask).sum(-1)
    n = sums.shape[0] // 2
    loss, metrics = rlkern.preference_loss(sums[:n], sums[n:], ref[:n], ref[n:], beta=0.1, label_smoothing=0.1)
    return loss, metrics["rewards/margins"]


def _step_grads(step, inputs, compiled):
    logits = inputs[0].detach().clone().requires_grad_()
    fn = torch.compile(step, fullgraph=True, backend=compiled) if compiled else step
    loss, metric = fn(logits, *inputs[1:])
    loss.backward()
    return loss.detach(), metric, logits.grad


@pytest.mark.parametrize("step", ["grpo", "dpo"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_whole_step_compiles_fullgraph_equal_to_eager(step, compiler):
    fn, inputs = {"grpo": (_grpo_step, _grpo_inputs()), "dpo": (_dpo_step, _dpo_inputs())}[step]
    torch._dynamo.reset()
    counters.clear()
    ours = _step_grads(fn, inputs, compiler)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    want = _step_grads(fn, inputs, None)
    tol = 1e-12 if compiler == "aot_eager" else 1e-9  # inductor fuses the glue ops (other roundings)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert ours[2].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# CUDA graphs (skipped without a GPU): capture once with static inputs, replay with new data.

# The ops with GPU kernels whose CUDA path has no host sync (value checks are skipped on CUDA
# tensors unless RLKERN_VALIDATE=1), so the whole call can be captured.
CUDA_GRAPH_OPS = ("token_logprobs", "entropy_from_logits", "selective_log_softmax", "linear_token_logprobs",
                  "aggregate", "kl_penalty", "policy_loss", "value_loss", "preference_loss", "kto_loss",
                  "token_preference_loss", "dpo_token_rewards", "srpo_loss", "soft_bellman_loss",
                  "step_advantage_loss", "ensemble_rewards", "gae", "discounted_returns", "egae", "masked_whiten",
                  "remax", "reinforce_pp", "outcome_to_tokens", "grpo", "rloo", "gpg", "opo", "group_normalize")


@pytest.mark.gpu
@pytest.mark.parametrize("name", CUDA_GRAPH_OPS)
def test_cuda_graph_capture_and_replay(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fn, inputs, _ = CASES[name]
    floats = lambda t: t.float() if t.dtype == torch.float64 else t  # noqa: E731  (the GPU kernels' dtype)
    static = [floats(t).cuda() for t in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile the Triton kernels and warm up outside the capture
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _flat(fn(*static))
    g = torch.Generator().manual_seed(11)
    changed = False
    for t in static:  # new data in the float inputs (same shapes), then replay
        if t.is_floating_point():
            t.copy_(t + 0.25 * torch.randn(t.shape, generator=g).to(t))
            changed = True
    assert changed
    graph.replay()
    torch.cuda.synchronize()
    fresh = _flat(fn(*static))
    assert len(captured) == len(fresh)
    for a, b in zip(captured, fresh):
        torch.testing.assert_close(a, b, equal_nan=True)
