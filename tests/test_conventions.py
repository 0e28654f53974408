"""The API conventions of CONTRIBUTING.md, checked over every public op: keyword-only
hyper-parameters, one name per concept, NamedTuple results, error messages that start with the op
name, custom-op names, and float64 on the kernels."""

import collections
import importlib
import inspect
import re

import numpy as np
import pytest
import torch

import rlkern
from rlkern import _backend

# TRL's drop-ins keep TRL's signatures (CONTRIBUTING.md, API conventions 1).
TRAINER_SIGNATURES = {"selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy"}
# Arguments that are tensors (or group ids given as tensors / arrays / lists) and may be positional.
TENSOR_LIKE = {"group_ids", "anchor_keys", "num_tokens", "trees"}
RETIRED = {"mask": "response_mask", "old_log_probs": "old_logprobs", "ref_log_probs": "ref_logprobs",
           "epsilon": "eps", "estimator": "kl_estimator"}
# The trainer integrations share one API: patch(*, fp32=False, ...), unpatch(), is_patched(), calls.
INTEGRATIONS = ("trl", "verl", "openrlhf")
# Spellings the integrations and drop-ins used before they shared one (CHANGELOG.md).
RETIRED_INTEGRATION_NAMES = ("precision", "output_dtype", "call_count", "reset_calls", "PRECISIONS")


def _public_ops():
    return {name: getattr(rlkern, name) for name in rlkern.__all__
            if inspect.isfunction(getattr(rlkern, name)) and name not in TRAINER_SIGNATURES}


def _is_tensor(param: inspect.Parameter) -> bool:
    return "Tensor" in str(param.annotation) or param.name in TENSOR_LIKE


@pytest.mark.parametrize("name", sorted(_public_ops()))
def test_hyper_parameters_are_keyword_only_and_names_are_the_shared_ones(name):
    params = inspect.signature(_public_ops()[name]).parameters.values()
    for p in params:
        assert p.name not in RETIRED, f"{name}: {p.name} is spelled {RETIRED[p.name]} across rlkern"
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            assert _is_tensor(p), f"{name}: hyper-parameter {p.name} must be keyword-only"


def test_default_kl_estimator_is_spelled_once():
    defaults = {name: inspect.signature(fn).parameters["kl_estimator"].default
                for name, fn in _public_ops().items() if "kl_estimator" in inspect.signature(fn).parameters}
    assert set(defaults) >= {"policy_loss", "kl_penalty"} and len(set(defaults.values())) == 1, defaults


def test_several_outputs_are_named_tuples():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 11, generator=g), torch.randint(0, 11, (5,), generator=g)
    out = rlkern.token_logprobs(logits, labels, return_entropy=True)
    assert out._fields == ("logprobs", "entropy")
    h, w = torch.randn(5, 7, generator=g), torch.randn(11, 7, generator=g)
    assert rlkern.linear_token_logprobs(h, w, labels, return_entropy=True)._fields == ("logprobs", "entropy")
    assert rlkern.linear_token_logprobs(h, w, labels, extra_outputs=("is_top1",))._fields == ("logprobs", "extras")
    parent, reward = torch.tensor([-1, 0, 0]), torch.tensor([0.0, 1.0, 0.0])
    assert rlkern.tree_advantages(parent, reward)._fields == ("advantages", "keep")
    assert rlkern.tree_advantages(parent, reward, return_values=True)._fields == ("advantages", "keep", "values")
    lp = torch.randn(2, 5, generator=g)
    loss, metrics = rlkern.value_loss(lp, lp, lp, torch.ones(2, 5))
    assert loss.ndim == 0 and metrics["clipfrac"].dtype == torch.float32


def _bad_calls():
    x, m = torch.randn(3, 5), torch.ones(3, 5)
    s = torch.randn(4)
    ids = [0, 0, 1, 1]
    parent = torch.tensor([-1, 0, 0])
    cu = torch.tensor([0, 2, 5])
    return {
        "gae": lambda: rlkern.gae(x, x, m, gamma=float("nan")),
        "egae": lambda: rlkern.egae(x, x, m, torch.ones(2)),
        "discounted_returns": lambda: rlkern.discounted_returns(x, m[:, :2]),
        "reinforce_pp": lambda: rlkern.reinforce_pp(x.long(), m),
        "masked_whiten": lambda: rlkern.masked_whiten(x, m[:2]),
        "remax": lambda: rlkern.remax(x, torch.randn(2), m),
        "group_normalize": lambda: rlkern.group_normalize(s, ids, std="sample"),
        "grpo": lambda: rlkern.grpo(s, ids[:3]),
        "rloo": lambda: rlkern.rloo(s, ids, singleton="none"),
        "opo": lambda: rlkern.opo(s, ids, None),
        "gpg": lambda: rlkern.gpg(s, ids, f_norm=float("inf")),
        "reinforce_pp_baseline": lambda: rlkern.reinforce_pp_baseline(s, ids, None),
        "grpo_passk": lambda: rlkern.grpo_passk(s, [0, 1, 2, 3]),
        "bnpo": lambda: rlkern.bnpo(s, ids, min_value=1.0, max_value=0.0),
        "dynamic_sampling_mask": lambda: rlkern.dynamic_sampling_mask(s, ids[:3]),
        "gdpo": lambda: rlkern.gdpo(s, ids, torch.ones(4, 2), weights=[1.0, 2.0]),
        "gigpo_step_groups": lambda: rlkern.gigpo_step_groups(s, ids, ids, eps="x"),
        "ensemble_rewards": lambda: rlkern.ensemble_rewards(x, method="uwo"),
        "hbpo_advantages": lambda: rlkern.hbpo_advantages(s, ids, s, max_length=0),
        "token_weights": lambda: rlkern.token_weights(x, [0, 0, 1]),
        "overlong_rewards": lambda: rlkern.overlong_rewards(s, s, max_length=4, cache_length=8),
        "kl_rewards": lambda: rlkern.kl_rewards(s[:3], x, x, m, kl_coef=-1.0),
        "gigpo_advantages": lambda: rlkern.gigpo_advantages(s, s[:3]),
        "action_rewards": lambda: rlkern.action_rewards(torch.zeros(4, dtype=torch.long), torch.zeros(4), s, s),
        "shape_rewards": lambda: rlkern.shape_rewards(s, ids, method="otc", lengths=s),
        "outcome_to_tokens": lambda: rlkern.outcome_to_tokens(s, torch.ones(3, 2)),
        "group_index": lambda: rlkern.group_index(np.zeros((2, 2))),
        "optimal_token_baseline": lambda: rlkern.optimal_token_baseline(x, [0, 1], m, x, x),
        "token_logprobs": lambda: rlkern.token_logprobs(x, torch.tensor([0, 1, 9])),
        "linear_token_logprobs": lambda: rlkern.linear_token_logprobs(x, torch.randn(7, 4), torch.tensor([0, 1, 2])),
        "policy_loss": lambda: rlkern.policy_loss(x, x, x, m, loss="ppo2"),
        "linear_policy_loss": lambda: rlkern.linear_policy_loss(torch.randn(1, 3, 4), torch.randn(7, 4),
                                                                torch.tensor([[0, 1, 2]]), x[:1, :3], x[:1, :3], m[:1, :3],
                                                                loss="ppo2"),
        "preference_loss": lambda: rlkern.preference_loss(s, s, loss_type="dpo"),
        "kto_loss": lambda: rlkern.kto_loss(s, s, s > 0, loss_type="bco"),
        "bco_loss": lambda: rlkern.bco_loss(s, s, s > 0, torch.zeros(2)),
        "token_preference_loss": lambda: rlkern.token_preference_loss(x, m),
        "linear_preference_loss": lambda: rlkern.linear_preference_loss(torch.randn(3, 5, 4), torch.randn(7, 4),
                                                                        torch.zeros(3, 5, dtype=torch.long), m),
        "linear_kto_loss": lambda: rlkern.linear_kto_loss(torch.randn(2, 5, 4), torch.randn(7, 4),
                                                          torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5),
                                                          torch.zeros(2), torch.tensor([True, False]),
                                                          loss_type="bco"),
        "dpo_token_rewards": lambda: rlkern.dpo_token_rewards(x, x, m, beta=float("inf")),
        "group_preference_loss": lambda: rlkern.group_preference_loss(s, ids, s, loss_type="dpo"),
        "group_weights": lambda: rlkern.group_weights(s, ids, method="winrate"),
        "srpo_loss": lambda: rlkern.srpo_loss(s, s),
        "kl_penalty": lambda: rlkern.kl_penalty(x, x, kl_estimator="k4"),
        "aggregate": lambda: rlkern.aggregate(x, m, dp_size=2.5),
        "value_loss": lambda: rlkern.value_loss(x, x[:2], x, m),
        "tree_values": lambda: rlkern.tree_values(parent, torch.zeros(3), mode="mean"),
        "tree_advantages": lambda: rlkern.tree_advantages(parent, torch.zeros(3), eps=0.0),
        "spo_cutpoints": lambda: rlkern.spo_cutpoints(torch.randn(5), cu, interval=0),
        "segment_advantages": lambda: rlkern.segment_advantages(torch.zeros(5, dtype=torch.bool), torch.randn(5),
                                                                torch.randn(3), cu),
        "broadcast_to_tokens": lambda: rlkern.broadcast_to_tokens(torch.randn(2), torch.tensor([0, 3]),
                                                                  torch.tensor([4, 6]), 6),
        "soft_bellman_loss": lambda: rlkern.soft_bellman_loss(x, m, x, x, torch.randn(3), beta=0.1, kl_coef=-1.0),
        "running_reward_norm": lambda: rlkern.running_reward_norm(s, clip=0.0),
        "constrained_rewards": lambda: rlkern.constrained_rewards(s, ids, torch.ones(3, 2)),
        "step_advantage_loss": lambda: rlkern.step_advantage_loss(x, m, x, x, m, beta=float("nan")),
    }


def test_every_public_op_has_a_bad_call_here():
    assert set(_public_ops()) <= set(_bad_calls()), set(_public_ops()) - set(_bad_calls())


@pytest.mark.parametrize("name", sorted(_bad_calls()))
def test_error_messages_start_with_the_op_name(name):
    with pytest.raises((TypeError, ValueError)) as info:
        _bad_calls()[name]()
    assert str(info.value).startswith(f"{name}: "), str(info.value)


def test_custom_op_names_follow_the_scheme():
    public = set(rlkern.__all__) | {"group_baseline", "token_logprobs_backward_inplace"}
    names = [n.removeprefix("rlkern::") for n in torch._C._dispatch_get_all_op_names() if n.startswith("rlkern::")]
    assert names
    for name in names:
        base = re.sub(r"_backward(_inplace)?$", "", name.removeprefix("cpp_"))
        assert base in public or name.startswith("_") or name.startswith("cpp_"), name
        assert not re.search(r"_(fwd|bwd|kernel)$", name), name


def test_every_family_runs_float64_on_its_cpp_kernel():
    assert _backend.REGISTRY
    for name, kernels in _backend.REGISTRY.items():
        if "cpp" in kernels.kernels:
            assert "cpp" in kernels.fp64, f"{name}: float64 would run the PyTorch backend on CPU"


@pytest.mark.parametrize("name", INTEGRATIONS)
def test_trainer_integrations_share_one_api(name):
    module = importlib.import_module(f"rlkern.integrations.{name}")
    params = inspect.signature(module.patch).parameters
    assert all(p.kind is p.KEYWORD_ONLY for p in params.values()), f"{name}.patch: options are keyword-only"
    assert "fp32" in params and params["fp32"].default is False, f"{name}.patch: fp32=False"
    assert callable(module.unpatch) and callable(module.is_patched)
    assert isinstance(module.calls, collections.Counter), f"{name}.calls must be a collections.Counter"
    for old in RETIRED_INTEGRATION_NAMES:
        assert not hasattr(module, old) and old not in params, f"{name}: {old} is retired"
    was = module.is_patched()
    with pytest.raises((TypeError, ValueError)) as info:
        module.patch(fp32="x")
    assert str(info.value).startswith("patch: fp32"), str(info.value)
    assert module.is_patched() == was


def _drop_ins():
    from rlkern.algos import openrlhf

    found = {name: getattr(rlkern, name) for name in TRAINER_SIGNATURES}
    found.update({f"algos.openrlhf.{name}": getattr(openrlhf, name) for name in openrlhf.__all__})
    return found


@pytest.mark.parametrize("name", sorted(_drop_ins()))
def test_trainer_drop_ins_spell_their_dtype_option_out_dtype(name):
    # TRL's and OpenRLHF's drop-ins: the trainer's dtype by default, out_dtype=<float dtype> opts
    # into rlkern's unrounded result in that dtype (CONTRIBUTING.md, API conventions 6)
    obj = _drop_ins()[name]
    params = inspect.signature(obj.__init__ if isinstance(obj, type) else obj).parameters
    for old in ("fp32", "output_dtype", "precision", "dtype"):
        assert old not in params, f"{name}: {old} is spelled out_dtype across rlkern"
    if "out_dtype" in params:
        assert params["out_dtype"].kind is inspect.Parameter.KEYWORD_ONLY and params["out_dtype"].default is None
        logits, index = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
        args = {"entropy_from_logits": (logits,), "compute_entropy": (logits,), "PolicyLoss": (),
                "ValueLoss": (), "PairWiseLoss": (), "LogExpLoss": (),
                "KTOLoss": (0.1, 1.0, 1.0, 1, "cpu")}.get(name.rpartition(".")[2], (logits, index))
        with pytest.raises(TypeError, match=f"^{name.rpartition('.')[2]}: out_dtype must be None"):
            obj(*args, out_dtype="float32")
