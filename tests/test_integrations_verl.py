"""rlkern.integrations.verl: patch() reaches every verl 0.9.1 object on the log-prob / entropy /
fused-kernel / loss / advantage path, unpatch() restores them, and verl's own code, run patched,
computes with rlkern (call counter) and returns verl's numbers (compared with the same verl code
run unpatched).

The deepest verl path run here is the FSDP engine's ``forward_backward_batch`` (verl 0.9.1 has
no ``dp_actor``: the actor's compute_log_prob and update_policy are this function with
``forward_only`` True / False) on a tiny Qwen2 built in-process, through verl's
``prepare_model_inputs`` / ``prepare_model_outputs``, its ``ppo_loss`` (policy loss from the
registry, entropy bonus, KL loss) and backward, with and without ``use_remove_padding`` and
``use_fused_kernels``. The engine is built without FSDP wrapping (``FSDPEngine.__init__`` with a
one-process gloo group; the module is the plain HF model): FSDP itself, flash-attention and CUDA
autocast need a GPU.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import sys
import tempfile
import types
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import assert_as_close_as_torch, import_peer

pytestmark = pytest.mark.peer

verl_F = import_peer("verl.utils.torch_functional")
core_algos = import_peer("verl.trainer.ppo.core_algos")
verl_exp = import_peer("verl.utils.experimental.torch_functional")
verl_lce = import_peer("verl.utils.kernel.linear_cross_entropy")

from rlkern.integrations import verl as rv  # noqa: E402

# Where verl 0.9.1 defines what patch() replaces (the test's own list, independent of the
# module's table): log-probs, entropy, fused kernels, loss reductions.
HOT = {
    "verl.utils.torch_functional": ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking"),
    "verl.utils.experimental.torch_functional": ("FusedLinearForPPO",),
    "verl.utils.kernel.linear_cross_entropy": ("linear_cross_entropy",),
    "verl.trainer.ppo.core_algos": ("agg_loss", "kl_penalty", "compute_value_loss", "compute_gae_advantage_return",
                                    "compute_grpo_outcome_advantage"),
    "verl.utils.megatron.tensor_parallel": ("vocab_parallel_log_probs_from_logits", "vocab_parallel_entropy",
                                            "vocab_parallel_entropy_with_chunking"),
}
# verl modules that use them; those that need missing packages (megatron, torchtitan, ...) are
# imported where they can be.
USERS = (
    "verl.workers.engine.fsdp.transformer_impl", "verl.workers.engine.automodel.transformer_impl",
    "verl.workers.engine.torchtitan.transformer_impl", "verl.workers.engine.veomni.transformer_impl",
    "verl.workers.engine.megatron.transformer_impl", "verl.workers.rollout.naive.naive_rollout",
    "verl.trainer.ppo.prefix_grouper_utils", "verl.workers.utils.losses", "verl.trainer.ppo.ray_trainer",
    "verl.models.transformers.dense_common", "verl.models.transformers.qwen2_vl", "verl.models.transformers.qwen3_vl",
    "verl.models.transformers.glm4v", "verl.models.transformers.qwen3_5", "verl.trainer.distillation.losses",
    "verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap",
    "verl.workers.engine_workers",
)


def _import_users():
    loaded = []
    for name in USERS:
        try:
            __import__(name)
            loaded.append(name)
        except Exception:  # noqa: BLE001  (optional engines: megatron, torchtitan, veomni, ...)
            pass
    return loaded


@pytest.fixture
def patched():
    rv.unpatch()
    rv.patch()
    rv.calls.clear()
    yield rv
    rv.unpatch()


def _originals() -> dict[int, object]:
    """verl's hot-path objects and registry values, read from their defining modules."""
    found = {}
    for module_name, attrs in HOT.items():
        module = sys.modules.get(module_name)
        for attr in attrs if module is not None else ():
            found[id(getattr(module, attr))] = getattr(module, attr)
    for registry in (core_algos.POLICY_LOSS_REGISTRY, core_algos.ADV_ESTIMATOR_REGISTRY):
        for fn in registry.values():
            found[id(fn)] = fn
    return found


def _verl_globals():
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "verl" or name.startswith("verl.")):
            for key, value in list(vars(module).items()):
                yield module, key, value


def test_register_adds_rlkern_names_and_unpatch_removes_them():
    rv.unpatch()
    builtin_losses = dict(core_algos.POLICY_LOSS_REGISTRY)
    builtin_estimators = dict(core_algos.ADV_ESTIMATOR_REGISTRY)
    try:
        added = rv.register()
        assert sorted(added) == sorted([f"rlkern_{n}" for n in builtin_losses] + [f"rlkern_{n}" for n in builtin_estimators])
        assert "rlkern_vanilla" in core_algos.POLICY_LOSS_REGISTRY and "rlkern_grpo" in core_algos.ADV_ESTIMATOR_REGISTRY
        for name, fn in builtin_losses.items():  # override=False leaves verl's own entries
            assert core_algos.POLICY_LOSS_REGISTRY[name] is fn
        rv.calls.clear()
        config = import_peer("verl.workers.config").ActorConfig(strategy="fsdp", rollout_n=1,
                                                                ppo_micro_batch_size_per_gpu=1)
        old, logp, adv = -torch.rand(3, 7), -torch.rand(3, 7), torch.randn(3, 7)
        mask = torch.ones(3, 7, dtype=torch.bool)
        ours, ours_m = core_algos.get_policy_loss_fn("rlkern_vanilla")(old, logp, adv, mask, "token-mean", config)
        theirs, theirs_m = core_algos.get_policy_loss_fn("vanilla")(old, logp, adv, mask, "token-mean", config)
        assert rv.calls == {"policy_loss:vanilla": 1}
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        assert ours_m.keys() == theirs_m.keys()
        rlkern_grpo = core_algos.get_adv_estimator_fn("rlkern_grpo")
        uid = np.array(["a", "a", "b", "b"], dtype=object)
        rewards = torch.randn(4, 5)
        torch.testing.assert_close(rlkern_grpo(rewards, torch.ones(4, 5), uid)[0],
                                   builtin_estimators["grpo"](rewards, torch.ones(4, 5), uid)[0], rtol=1e-5, atol=1e-5)
    finally:
        rv.unpatch()
    assert core_algos.POLICY_LOSS_REGISTRY == builtin_losses
    assert core_algos.ADV_ESTIMATOR_REGISTRY == builtin_estimators


def test_patch_reaches_every_module_global_and_unpatch_restores_each():
    rv.unpatch()
    _import_users()
    originals = _originals()
    holders = [(m, k, v) for m, k, v in _verl_globals() if id(v) in originals and originals[id(v)] is v]
    registries = {(id(r), k): v for r in (core_algos.POLICY_LOSS_REGISTRY, core_algos.ADV_ESTIMATOR_REGISTRY)
                  for k, v in r.items()}
    # the by-name imports verl's engines make, which a patch of verl.utils.torch_functional misses
    fsdp = sys.modules["verl.workers.engine.fsdp.transformer_impl"]
    assert fsdp.logprobs_from_logits is verl_F.logprobs_from_logits
    assert len(holders) > len(originals)  # by-name copies exist
    naive = sys.modules.pop("verl.workers.rollout.naive.naive_rollout", None)
    rv.patch()
    try:
        # a module imported after patch() (the import hook)
        fresh = __import__("verl.workers.rollout.naive.naive_rollout", fromlist=["_"])
        assert fresh.logprobs_from_logits is rv._WRAPPED["logprobs_from_logits"]
        for module, key, value in _verl_globals():
            assert not (id(value) in originals and originals[id(value)] is value), f"{module.__name__}.{key} is verl's"
            if isinstance(value, types.FunctionType) and value.__module__.startswith("verl.") and key in {
                    a for attrs in HOT.values() for a in attrs}:
                pytest.fail(f"{module.__name__}.{key}: a verl definition of a patched name")
        for registry in (core_algos.POLICY_LOSS_REGISTRY, core_algos.ADV_ESTIMATOR_REGISTRY):
            for name, fn in registry.items():
                assert id(fn) not in originals, name
                assert getattr(fn, "__rlkern_verl__", "").endswith(name.removeprefix("rlkern_")), name
        assert fsdp.logprobs_from_logits is verl_F.logprobs_from_logits is rv._WRAPPED["logprobs_from_logits"]
        assert verl_exp.FusedLinearForPPO is rv.FusedLinearForPPO
    finally:
        rv.unpatch()
        if naive is not None:  # the module object other tests imported, in both places
            sys.modules["verl.workers.rollout.naive.naive_rollout"] = naive
            sys.modules["verl.workers.rollout.naive"].naive_rollout = naive
    for module, key, value in holders:
        assert getattr(module, key) is value, f"{module.__name__}.{key} not restored"
    assert fresh.logprobs_from_logits is originals[id(verl_F.logprobs_from_logits)]
    for registry in (core_algos.POLICY_LOSS_REGISTRY, core_algos.ADV_ESTIMATOR_REGISTRY):
        assert all(registries[(id(registry), k)] is v for k, v in registry.items())
        assert {k for (r, k) in registries if r == id(registry)} == set(registry)
    assert not any(isinstance(f, rv._ImportHook) for f in sys.meta_path)


# --- log-probs, entropy, fused kernels: drop-ins against verl's own functions ------------------

def _logits(dtype, shape=(3, 5, 257), seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5, 257), (11, 130)])
def test_logprobs_and_entropy_match_verl(dtype, shape):
    rv.unpatch()
    logits = _logits(dtype, shape)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(1))
    lp_verl, ent_verl = verl_F.logprobs_from_logits, verl_F.entropy_from_logits
    ent_chunk_verl = verl_F.entropy_from_logits_with_chunking
    theirs = (lp_verl(logits, labels), ent_verl(logits), ent_chunk_verl(logits.reshape(-1, shape[-1]), chunk_size=4))
    rv.patch()
    try:
        rv.calls.clear()
        ours = (verl_F.logprobs_from_logits(logits, labels), verl_F.entropy_from_logits(logits),
                verl_F.entropy_from_logits_with_chunking(logits.reshape(-1, shape[-1]), chunk_size=4))
        assert rv.calls == {"logprobs_from_logits": 1, "entropy_from_logits": 1,
                              "entropy_from_logits_with_chunking": 1}
    finally:
        rv.unpatch()
    ref = (verl_F.logprobs_from_logits_v2(logits.double(), labels), verl_F.entropy_from_logits(logits.double()),
           verl_F.entropy_from_logits(logits.double()).reshape(-1))
    for name, o, t, r in zip(("logprobs", "entropy", "chunked entropy"), ours, theirs, ref):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert_as_close_as_torch(o, r, t, floor=1e-5, name=name)


def test_fp32_keeps_rlkern_precision(patched):
    with pytest.raises(ValueError, match=r"^patch: already patched with fp32=False; call unpatch\(\) first"):
        rv.patch(fp32=True)
    rv.patch()  # the same options: nothing happens
    rv.unpatch()
    rv.patch(fp32=True)
    logits = _logits(torch.bfloat16)
    labels = torch.randint(0, 257, (3, 5))
    lp, ent = verl_F.logprobs_from_logits(logits, labels), verl_F.entropy_from_logits(logits)
    assert lp.dtype == ent.dtype == torch.float32
    assert rv.calls["logprobs_from_logits"] == rv.calls["entropy_from_logits"] == 1
    # rlkern's float32 result, unrounded: within fp32 accumulation error of the float64 reference
    # of the same bf16 logits (verl's bf16 output is a bf16 rounding away from it)
    ref_logp = logits.double().log_softmax(-1)
    ref_lp = ref_logp.gather(-1, labels[..., None]).squeeze(-1)
    ref_ent = -(ref_logp.exp() * ref_logp).sum(-1)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="^patch: already patched with fp32=True"):
        rv.patch()
    # verl_autopatch (imported by `import verl` in workers) keeps a patch already in force
    importlib.reload(importlib.import_module("rlkern.integrations.verl_autopatch"))
    assert verl_F.logprobs_from_logits(logits, labels).dtype == torch.float32
    with pytest.raises(TypeError, match="^patch: fp32 must be a bool, got 'bf16'"):
        rv.patch(fp32="bf16")


@pytest.mark.parametrize("inplace_backward", [True, False])
def test_logprobs_gradients_match_verl(inplace_backward):
    rv.unpatch()
    base = _logits(torch.float32, (13, 301))
    labels = torch.randint(0, 301, (13,))
    g = torch.randn(13)
    theirs = base.clone().requires_grad_()
    (verl_F.logprobs_from_logits(theirs * 1.0, labels) * g).sum().backward()
    rv.patch()
    try:
        ours = base.clone().requires_grad_()
        scaled = ours * 1.0  # a non-leaf, as verl's temperature-scaled logits
        (verl_F.logprobs_from_logits(scaled, labels, inplace_backward=inplace_backward) * g).sum().backward()
    finally:
        rv.unpatch()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ndim", [2, 3])
def test_fused_linear_for_ppo_matches_verl(dtype, ndim):
    rv.unpatch()
    gen = torch.Generator().manual_seed(2)
    hidden0 = torch.randn(2, 7, 32, generator=gen).to(dtype)
    hidden0 = hidden0 if ndim == 3 else hidden0.reshape(14, 32)
    weight0 = (torch.randn(301, 32, generator=gen) / 4).to(dtype)
    ids = torch.randint(0, 301, hidden0.shape[:-1], generator=gen)
    g_lp, g_ent = torch.randn(ids.shape, generator=gen), torch.randn(ids.shape, generator=gen)

    def run(cls):
        h, w = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        lp, ent = cls(impl_backend="torch").forward(hidden_states=h, vocab_weights=w, input_ids=ids, temperature=0.8)
        ((lp * g_lp).sum() + (ent.float() * g_ent).sum()).backward()
        return lp, ent, h.grad, w.grad

    theirs = run(verl_exp.FusedLinearForPPO)
    rv.patch()
    try:
        rv.calls.clear()
        ours = run(verl_exp.FusedLinearForPPO)
        assert rv.calls == {"FusedLinearForPPO": 1}
    finally:
        rv.unpatch()
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for name, o, t in zip(("log_probs", "entropy", "d hidden", "d weight"), ours, theirs):
        assert o.dtype == t.dtype and o.shape == t.shape, name
        torch.testing.assert_close(o.float(), t.float(), **tol, msg=name)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_has_verl_layout(patched, reduction):
    # verl's Triton kernel needs CUDA: its semantics (float32 outputs over flattened tokens, log-probs
    # reduced by "sum"/"mean") are checked against verl's own torch implementation of the same op.
    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 6, 32, generator=gen), torch.randn(301, 32, generator=gen) / 4
    labels = torch.randint(0, 301, (2, 6), generator=gen)
    logp, ent = verl_lce.linear_cross_entropy(hidden, weight, labels, 0.9, reduction)
    assert rv.calls == {"linear_cross_entropy": 1}
    ref_lp, ref_ent = core_fused(hidden, weight, labels, 0.9)
    assert logp.dtype == ent.dtype == torch.float32 and ent.shape == (12,)
    expected = {"none": ref_lp.reshape(-1), "sum": ref_lp.sum(), "mean": ref_lp.mean()}[reduction]
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent.reshape(-1), rtol=1e-5, atol=1e-5)


def core_fused(hidden, weight, labels, temperature):
    """verl's own FusedLinearForPPO (torch backend), whatever is patched."""
    cls = next((o for o in rv.originals() if getattr(o, "__name__", "") == "FusedLinearForPPO"),
               verl_exp.FusedLinearForPPO)
    assert cls is not rv.FusedLinearForPPO
    return cls(impl_backend="torch")(hidden, weight, labels, temperature)


# --- loss reductions, advantages, policy losses through verl's entry points ------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_reductions_match_verl(dtype):
    rv.unpatch()
    gen = torch.Generator().manual_seed(4)
    lp, ref = (-torch.rand(4, 9, generator=gen)).to(dtype), (-torch.rand(4, 9, generator=gen)).to(dtype)
    mask = torch.rand(4, 9, generator=gen) > 0.3
    v, r, old = (torch.randn(4, 9, generator=gen).to(dtype) for _ in range(3))
    modes = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
    kls = ("k1", "abs", "k2", "k3", "low_var_kl", "k3+", "mse")

    def run():
        out = [core_algos.agg_loss(lp, mask, m) for m in modes]
        out += [core_algos.agg_loss(lp, mask, m, dp_size=2, batch_num_tokens=30, global_batch_size=6) for m in modes]
        out += [core_algos.kl_penalty(lp, ref, k) for k in kls]
        out += list(core_algos.compute_value_loss(v, r, old, mask, 0.3, "seq-mean-token-mean"))
        return out

    theirs = run()
    rv.patch()
    try:
        rv.calls.clear()
        ours = run()
        assert rv.calls == {"agg_loss": 10, "kl_penalty": len(kls), "compute_value_loss": 1}
        with pytest.raises(NotImplementedError):
            core_algos.kl_penalty(lp, ref, "full")
    finally:
        rv.unpatch()
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype and o.shape == t.shape
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(o, t, **tol)


def _data_proto(seed=5):
    verl = import_peer("verl")
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(8, 6)
    mask[1, 4:] = 0
    mask[5, 2:] = 0
    tensors = {"token_level_rewards": torch.randn(8, 6, generator=gen) * mask, "values": torch.randn(8, 6, generator=gen),
               "response_mask": mask}
    uid = np.array(["a", "a", "b", "b", "b", "c", "c", "c"], dtype=object)
    return verl.DataProto.from_dict(tensors=tensors, non_tensors={"uid": uid})


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo", "reinforce_plus_plus"])
def test_compute_advantage_runs_rlkern_with_verls_numbers(estimator):
    ray_trainer = import_peer("verl.trainer.ppo.ray_trainer")
    config = import_peer("verl.trainer.config").AlgoConfig(gamma=0.95, lam=0.9)
    rv.unpatch()
    kw = dict(adv_estimator=core_algos.AdvantageEstimator(estimator), gamma=0.95, lam=0.9, config=config)
    theirs = ray_trainer.compute_advantage(_data_proto(), **kw)
    rv.patch()
    try:
        rv.calls.clear()
        ours = ray_trainer.compute_advantage(_data_proto(), **kw)
        assert rv.calls == {f"adv_estimator:{estimator}": 1}
    finally:
        rv.unpatch()
    mask = theirs.batch["response_mask"].bool()
    for key in ("advantages", "returns"):
        torch.testing.assert_close(ours.batch[key][mask], theirs.batch[key][mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo", "dppo_tv", "clip_cov"])
def test_get_policy_loss_fn_runs_rlkern_with_verls_numbers(loss_mode):
    ActorConfig = import_peer("verl.workers.config").ActorConfig
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_high=0.28)
    gen = torch.Generator().manual_seed(6)
    old, base, adv = -torch.rand(4, 10, generator=gen), -torch.rand(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    mask = torch.rand(4, 10, generator=gen) > 0.2

    def run():
        logp = base.clone().requires_grad_()
        loss, metrics = core_algos.get_policy_loss_fn(loss_mode)(old, logp, adv, mask, "seq-mean-token-mean", config)
        loss.backward()
        return loss, metrics, logp.grad

    rv.unpatch()
    theirs = run()
    rv.patch()
    try:
        rv.calls.clear()
        ours = run()
        assert rv.calls == {f"policy_loss:{loss_mode}": 1}
    finally:
        rv.unpatch()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == theirs[1].keys()
    for key in theirs[1]:
        assert ours[1][key] == pytest.approx(float(theirs[1][key]), rel=1e-5, abs=1e-6), key


# --- the FSDP engine's micro-batch forward / backward on a tiny Qwen2 -----------------------

VOCAB = 300


@pytest.fixture(scope="module")
def one_process_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized")
    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "rdv"), rank=0,
                                             world_size=1)
        try:
            yield torch.distributed.group.WORLD
        finally:
            torch.distributed.destroy_process_group()


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).float()


def _engine(model, group, use_remove_padding, autocast):
    fsdp_impl = import_peer("verl.workers.engine.fsdp.transformer_impl")
    FSDPEngineConfig = import_peer("verl.workers.config").FSDPEngineConfig

    def no_mesh(self):  # one process, no sequence parallelism: what _init_device_mesh sets
        self.use_ulysses_sp, self.ulysses_sequence_parallel_size = False, 1

    model_config = types.SimpleNamespace(use_remove_padding=use_remove_padding, lora_rank=0, get=lambda k, d=None: d)
    with mock.patch.object(fsdp_impl.FSDPEngine, "_init_device_mesh", no_mesh):
        engine = fsdp_impl.FSDPEngineWithLMHead(model_config, FSDPEngineConfig(use_torch_compile=False), None, None)
    engine.module = model
    engine._autocast_dtype = autocast  # forward_step's autocast, on the CPU here
    engine.get_data_parallel_group = lambda: group
    engine.get_data_parallel_size = lambda: 1
    return engine


def _micro_batches(use_remove_padding, use_fused_kernels):
    tu = import_peer("verl.utils.tensordict_utils")
    padding = import_peer("verl.workers.utils.padding")
    from tensordict import TensorDict

    gen = torch.Generator().manual_seed(7)
    prompt, response = 4, 5
    prompt_lens, response_lens = [4, 2, 3, 1], [5, 3, 4, 2]
    ids = torch.randint(0, VOCAB, (4, prompt + response), generator=gen)
    attention = torch.zeros(4, prompt + response, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        attention[i, prompt - p:prompt + r] = 1
    response_mask = attention[:, prompt:].clone()
    data = TensorDict({
        "input_ids": ids, "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "response_mask": response_mask, "prompts": ids[:, :prompt], "responses": ids[:, prompt:],
        "old_log_probs": -torch.rand(4, response, generator=gen), "advantages": torch.randn(4, response, generator=gen),
        "ref_log_prob": -torch.rand(4, response, generator=gen)}, batch_size=[4])
    data = padding.left_right_2_no_padding(data)
    tu.assign_non_tensor(data, temperature=0.7, calculate_entropy=True, use_remove_padding=use_remove_padding,
                         use_fused_kernels=use_fused_kernels, global_batch_size=4, micro_batch_size_per_gpu=2,
                         use_dynamic_bsz=False)
    return data


def _run_engine(use_remove_padding, fused_backend, group, autocast=torch.float32):
    """verl's compute_log_prob (forward only) and update step (forward + backward over two
    micro-batches), as the actor worker runs them; returns the outputs and the gradients."""
    fsdp_impl = import_peer("verl.workers.engine.fsdp.transformer_impl")
    monkey_patch = import_peer("verl.models.transformers.monkey_patch")
    losses = import_peer("verl.workers.utils.losses")
    config = import_peer("verl.workers.config").ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, entropy_coeff=0.01, use_kl_loss=True,
        kl_loss_type="low_var_kl", kl_loss_coef=0.1, loss_agg_mode="token-mean")
    model = _tiny_qwen2()
    original_forward = type(model).forward
    try:
        if fused_backend is not None:
            monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=fused_backend)
        engine = _engine(model, group, use_remove_padding, autocast)
        with mock.patch.object(fsdp_impl, "get_device_id", lambda: "cpu"), \
                mock.patch.object(fsdp_impl, "get_device_name", lambda: "cpu"):
            infer = engine.forward_backward_batch(_micro_batches(use_remove_padding, fused_backend is not None),
                                                  loss_function=None, forward_only=True)
            train = engine.forward_backward_batch(_micro_batches(use_remove_padding, fused_backend is not None),
                                                  loss_function=functools.partial(losses.ppo_loss, config))
    finally:
        type(model).forward = original_forward
    out = {"log_probs": infer["model_output"]["log_probs"].values(), "entropy": infer["model_output"]["entropy"].values()}
    out["loss"] = _numbers(train["loss"])
    out.update({f"metric {k}": _numbers(v) for k, v in train["metrics"].items()})
    out.update({f"grad {n}": p.grad for n, p in model.named_parameters()})
    return engine, out


def _numbers(value) -> torch.Tensor:
    """A loss or metric as forward_backward_batch returns it (a number, a verl Metric, a list)."""
    if isinstance(value, (list, tuple)):
        return torch.cat([_numbers(v) for v in value]) if value else torch.zeros(0, dtype=torch.float64)
    if hasattr(value, "aggregate"):
        value = value.aggregate()
    return torch.tensor([float(value)], dtype=torch.float64)


@pytest.mark.parametrize("use_remove_padding, fused", [(True, None), (False, None), (True, "torch"), (False, "torch"),
                                                        (True, "triton")])
def test_fsdp_engine_micro_batches_run_rlkern_with_verls_numbers(one_process_group, use_remove_padding, fused):
    rv.unpatch()
    # verl's "triton" fused backend needs CUDA: its reference is verl's "torch" fused backend
    before, theirs = _run_engine(use_remove_padding, "torch" if fused == "triton" else fused, one_process_group)
    rv.patch()
    try:
        rv.calls.clear()
        _, ours = _run_engine(use_remove_padding, fused, one_process_group)
        counts = dict(rv.calls)
        # an engine built before patch() keeps verl's entropy function (the order rule)
        assert before.compute_entropy_from_logits is not rv._WRAPPED["entropy_from_logits"]
    finally:
        rv.unpatch()
    expected = {"agg_loss", "kl_penalty", "policy_loss:vanilla"}
    expected |= {None: {"logprobs_from_logits", "entropy_from_logits"}, "torch": {"FusedLinearForPPO"},
                 "triton": {"linear_cross_entropy"}}[fused]
    assert set(counts) == expected and all(n > 0 for n in counts.values()), counts
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key].double(), theirs[key].double(), rtol=1e-4, atol=2e-6, msg=key)


@pytest.mark.parametrize("fused", [None, "torch"])
def test_fsdp_engine_bf16_autocast_keeps_verls_dtypes(one_process_group, fused):
    """Under bf16 autocast verl's unfused path returns bf16 log-probs and entropy (no flash-attn:
    ``logprobs_from_logits_v2`` on bf16 logits) and its fused path float32 log-probs and entropy
    in the hidden states' dtype (float32: Qwen2's residual stream stays float32 under autocast);
    rlkern computes in float32 and rounds to those dtypes. Tolerance: bf16 (verl itself
    computes the log-softmax in bf16; rlkern is the more exact of the two)."""
    rv.unpatch()
    _, theirs = _run_engine(True, fused, one_process_group, autocast=torch.bfloat16)
    rv.patch()
    try:
        rv.calls.clear()
        _, ours = _run_engine(True, fused, one_process_group, autocast=torch.bfloat16)
        assert rv.calls.get("FusedLinearForPPO" if fused else "logprobs_from_logits", 0) > 0
    finally:
        rv.unpatch()
    expected = {None: (torch.bfloat16, torch.bfloat16), "torch": (torch.float32, torch.float32)}[fused]
    assert (theirs["log_probs"].dtype, theirs["entropy"].dtype) == expected
    for key in ("log_probs", "entropy", "loss"):
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key].double(), theirs[key].double(), rtol=3e-2, atol=3e-2, msg=key)


# --- Megatron (vocabulary-parallel logits): a module imported after patch() ------------------

def _megatron_worker(rank, world_size, rendezvous, shard_sizes):
    import torch.distributed as dist
    from datetime import timedelta

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    # verl.utils.megatron.tensor_parallel reads the TP group from Megatron's parallel_state; there
    # is no megatron-core here, so that lookup (only it) answers the WORLD group.
    parallel_state = types.ModuleType("megatron.core.parallel_state")
    parallel_state.get_tensor_model_parallel_group = lambda: dist.group.WORLD
    core = types.ModuleType("megatron.core")
    core.parallel_state = parallel_state
    sys.modules.update({"megatron": types.ModuleType("megatron"), "megatron.core": core,
                        "megatron.core.parallel_state": parallel_state})
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)  # verl's mul_reduce, eagerly
    from rlkern.integrations import verl as rv_child
    import verl.utils.torch_functional as verl_F_child

    rv_child.patch()
    tp = __import__("verl.utils.megatron.tensor_parallel", fromlist=["_"])  # imported after patch(): the hook
    verl_fns = {getattr(o, "__name__", ""): o for o in rv_child.originals()}
    assert tp.vocab_parallel_entropy is rv_child._WRAPPED["vocab_parallel_entropy"]
    assert verl_fns["vocab_parallel_entropy"] is not tp.vocab_parallel_entropy
    start, size = sum(shard_sizes[:rank]), shard_sizes[rank]
    gen = torch.Generator().manual_seed(8)
    full = torch.randn(2, 7, sum(shard_sizes), generator=gen) * 3
    labels = torch.randint(0, sum(shard_sizes), (2, 7), generator=gen)
    g = torch.randn(2, 7, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        shard = full[..., start:start + size].to(dtype)
        ours_in, theirs_in = shard.clone().requires_grad_(), shard.clone().requires_grad_()
        ours = tp.vocab_parallel_entropy(ours_in)
        theirs = verl_fns["vocab_parallel_entropy"](theirs_in)
        (ours.float() * g).sum().backward()
        (theirs.float() * g).sum().backward()
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
        assert ours.dtype == theirs.dtype == dtype
        torch.testing.assert_close(ours.float(), theirs.float(), **tol)
        torch.testing.assert_close(ours_in.grad.float(), theirs_in.grad.float(), **tol)
        chunked = tp.vocab_parallel_entropy_with_chunking(shard, chunk_size=3)
        assert chunked.dtype == verl_fns["vocab_parallel_entropy_with_chunking"](shard.clone(), chunk_size=3).dtype
        torch.testing.assert_close(chunked.float(), theirs.float(), **tol)
        # megatron-core's cross-entropy is not here: the log-probs are checked against verl's
        # unsharded PyTorch log-probs of the whole logits (float32 as megatron-core's)
        logp = tp.vocab_parallel_log_probs_from_logits(shard, labels)
        assert logp.dtype == torch.float32
        torch.testing.assert_close(logp, verl_F_child.logprobs_from_logits_v2(full.to(dtype).float(), labels),
                                   rtol=1e-5, atol=1e-5)
    # the Megatron fused forward: verl's Triton kernel (CUDA) is checked by what Megatron reads,
    # the outputs and the sum over ranks of d hidden, against verl's unsharded FusedLinearForPPO
    hidden0 = torch.randn(2, 5, 16, generator=gen)
    weight0 = torch.randn(sum(shard_sizes), 16, generator=gen) / 4
    ids = torch.randint(0, sum(shard_sizes), (2, 5), generator=gen)
    g_lp, g_ent = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    h, w = hidden0.clone().requires_grad_(), weight0[start:start + size].clone().requires_grad_()
    mcore_lce = __import__("verl.utils.kernel.linear_cross_entropy", fromlist=["_"]).linear_cross_entropy
    logp, ent = mcore_lce(h, w, ids, 0.9, "none", dist.group.WORLD)
    ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    h_ref, w_ref = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    fused_cls = verl_fns["FusedLinearForPPO"]
    ref_lp, ref_ent = fused_cls()(h_ref.reshape(10, 16), w_ref, ids.reshape(10), 0.9)
    ((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()
    torch.testing.assert_close(logp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    d_hidden = h.grad.clone()
    dist.all_reduce(d_hidden)
    torch.testing.assert_close(d_hidden, h_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad[start:start + size], rtol=1e-4, atol=1e-5)
    assert rv_child.calls["vocab_parallel_entropy"] == 2
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's teardown can abort a finished rank (tests/test_vocab_parallel.py)


def test_megatron_vocab_parallel_functions_are_patched_on_import():
    import torch.multiprocessing as mp

    import_peer("verl")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_megatron_worker, args=(2, os.path.join(tmp, "rdv"), [151, 150]), nprocs=2)


def test_verl_use_external_modules_patches_at_import_verl():
    """The route for Ray workers: verl imports VERL_USE_EXTERNAL_MODULES during ``import verl``."""
    import subprocess

    import_peer("verl")
    code = ("import verl, verl.utils.torch_functional as F, verl.trainer.ppo.core_algos as c\n"
            "import verl.workers.engine.fsdp.transformer_impl as fsdp\n"
            "from rlkern.integrations import verl as rv\n"
            "assert rv.is_patched()\n"
            "assert fsdp.logprobs_from_logits is F.logprobs_from_logits is rv._WRAPPED['logprobs_from_logits']\n"
            "assert c.POLICY_LOSS_REGISTRY['vanilla'].__rlkern_verl__ == 'policy_loss:vanilla'\n")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rlkern.integrations.verl_autopatch",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
