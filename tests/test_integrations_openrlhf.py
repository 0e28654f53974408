"""rlkern.integrations.openrlhf: OpenRLHF 0.11.2 running rlkern.

Every patched object against OpenRLHF's own (numbers, gradients and dtypes), the patch / unpatch
walk over OpenRLHF's modules (imported before and after ``patch()``), and OpenRLHF's
``Actor.forward`` on a tiny Qwen2 patched vs unpatched.

OpenRLHF imports deepspeed, flash-attn, vllm, pylatexenc, aiohttp and pynvml at import; none is
installed here (the wheel goes in with --no-deps). While OpenRLHF's modules import, MagicMock
modules stand in for the missing ones (never for an installed one); the code under test (losses,
log-probs, KL, the actor forward) calls none of them. Both are removed from sys.modules after
this file's tests.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import math
import os
import pickle
import sys
from unittest.mock import MagicMock

import pytest
import torch

import rlkern
import rlkern.integrations.openrlhf as ro
from conftest import REQUIRE_PEERS, assert_as_close_as_torch

_STUBBED = ("deepspeed", "vllm", "pylatexenc", "aiohttp", "pynvml")  # and their submodules
# flash-attn: only the modules OpenRLHF imports at import time; its models/utils.py uses
# flash_attn.ops.triton.cross_entropy when importable (GPU), else its PyTorch path
_STUBBED_MODULES = ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed")
# OpenRLHF's modules that import a patched object by name (and the two that define them)
_BY_NAME = {
    "openrlhf.models.utils": ("log_probs_from_logits", "compute_entropy", "compute_approx_kl"),
    "openrlhf.models.loss": ("PolicyLoss", "ValueLoss", "DPOLoss", "PairWiseLoss", "LogExpLoss"),
    "openrlhf.models": ("PolicyLoss", "ValueLoss", "DPOLoss", "PairWiseLoss", "LogExpLoss"),
    "openrlhf.models.actor": ("log_probs_from_logits", "compute_entropy"),
    "openrlhf.trainer.ray.ppo_actor": ("PolicyLoss", "compute_approx_kl"),
    "openrlhf.trainer.ray.ppo_critic": ("ValueLoss",),
    "openrlhf.trainer.ppo_utils.experience_maker": ("compute_approx_kl",),
    "openrlhf.trainer.dpo_trainer": ("DPOLoss",),
    "openrlhf.trainer.rm_trainer": ("PairWiseLoss", "LogExpLoss"),
}


class _Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """MagicMock modules for the given top-level names (OpenRLHF's uninstalled GPU dependencies)."""

    def __init__(self, names, modules):
        self.names, self.modules = set(names), set(modules)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names or name in self.modules:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = MagicMock()
        module.__name__, module.__spec__, module.__path__ = spec.name, spec, []
        return module

    def exec_module(self, module):
        pass


def _openrlhf_names():
    return [n for n in sys.modules if n == "openrlhf" or n.startswith("openrlhf.")]


def _import_openrlhf():
    return {name: importlib.import_module(name) for name in _BY_NAME}


@pytest.fixture(scope="module")
def orl():
    """OpenRLHF's modules (real package, stubs for its missing dependencies) and the originals."""
    if importlib.util.find_spec("openrlhf") is None:
        if REQUIRE_PEERS:
            pytest.fail("openrlhf is not installed (requirements/peers-nodeps.txt)")
        pytest.skip("openrlhf is an optional peer (pip install --no-deps -r requirements/peers-nodeps.txt)")
    assert not ro.is_patched()
    stubs = _Stubs([n for n in _STUBBED if importlib.util.find_spec(n) is None],
                   _STUBBED_MODULES if importlib.util.find_spec("flash_attn") is None else ())
    sys.meta_path.insert(0, stubs)
    before = set(sys.modules)
    try:
        modules = _import_openrlhf()
        originals = {name: getattr(modules["openrlhf.models.utils"], name) for name in _BY_NAME["openrlhf.models.utils"]}
        originals.update({name: getattr(modules["openrlhf.models.loss"], name)
                          for name in _BY_NAME["openrlhf.models.loss"]})
        yield modules, originals
    finally:
        ro.unpatch()
        sys.meta_path.remove(stubs)
        for name in set(sys.modules) - before:
            stub = name.partition(".")[0] in stubs.names or name in stubs.modules
            if stub or name == "openrlhf" or name.startswith("openrlhf."):
                sys.modules.pop(name)


@pytest.fixture
def patched(orl):
    ro.patch()
    try:
        yield orl
    finally:
        ro.unpatch()


def _replaced(orl, name):
    modules, originals = orl
    owner = modules["openrlhf.models.utils" if name in _BY_NAME["openrlhf.models.utils"] else "openrlhf.models.loss"]
    new = getattr(owner, name)
    assert new is not originals[name] and new._rlkern_original is originals[name]
    return new, originals[name]


def _close_or_as_close_as_torch(ours, theirs, reference, name, rtol=1e-5, atol=1e-6):
    """OpenRLHF's dtype; then float32 / float64 inputs (``reference`` None): OpenRLHF's numbers;
    bfloat16 / float16 inputs: rlkern (float32 inside, rounded to OpenRLHF's dtype) at most as far
    from OpenRLHF's float64 result (``reference``) as OpenRLHF's own low-precision result."""
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype}, OpenRLHF {theirs.dtype}"
    if reference is None:
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, equal_nan=True, msg=name)
    else:
        ulp = torch.finfo(ours.dtype).eps
        floor = ulp * float(reference.double().abs().max().clamp_min(1e-3))
        assert_as_close_as_torch(ours, reference, theirs, floor=floor, name=name)


def _low(dtype):
    return dtype in (torch.float16, torch.bfloat16)


# --- PolicyLoss ----------------------------------------------------------------------------------

_POLICY_CONFIGS = [
    dict(),
    dict(dual_clip=3.0, clip_eps_high=0.28),
    dict(token_level_loss=False),
    dict(policy_loss_type="gspo"),
    dict(policy_loss_type="gspo", is_correction_level="token"),
    dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.7, 1.4)),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.0, 1.2)),
    dict(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.02),
         token_level_loss=False),
    dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.0, 0.05)),
]


def _policy_batch(dtype, B=6, T=10, seed=0, mask_dtype=torch.bool):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4
    old[0, 1] = lp[0, 1] + 30.0  # |log-ratio| > 20: OpenRLHF's ppo_kl does not clamp it
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    rollout[3] = old[3] + 0.01  # a row every correction band keeps
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 1] = mask[3] = True
    mask[2] = False  # an empty row
    return dict(lp=lp.to(dtype), old=old.to(dtype), adv=adv.to(dtype), rollout=rollout.to(dtype),
                mask=mask.to(mask_dtype))


def _run_policy(loss_cls, kw, b, norms, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    lp = cast(b["lp"]).clone().requires_grad_()
    out = loss_cls(**kw)(lp, cast(b["old"]), cast(b["adv"]), action_mask=b["mask"],
                         rollout_log_probs=cast(b["rollout"]), **norms)
    out[0].backward()
    return out, lp.grad


@pytest.mark.peer
@pytest.mark.parametrize("config", _POLICY_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "ppo")
@pytest.mark.parametrize("norms", [False, True], ids=["local", "global-norms"])
def test_policy_loss_parity(patched, config, norms):
    new, orig = _replaced(patched, "PolicyLoss")
    b = _policy_batch(torch.float32)
    # as OpenRLHF's get_loss_batch_info hands them over: float32 0-dim tensors
    kw_norms = dict(dp_size=4, batch_num_tokens=torch.tensor(40.0), global_batch_size=torch.tensor(9.0)) if norms else {}
    calls = ro.calls["PolicyLoss"]
    ours, g_ours = _run_policy(new, config, b, kw_norms)
    theirs, g_theirs = _run_policy(orig, config, b, kw_norms)
    assert ro.calls["PolicyLoss"] == calls + 1
    names = ("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio")
    for name, x, y in zip(names, ours, theirs):
        if y is None:
            assert x is None, name
        else:
            _close_or_as_close_as_torch(x.detach(), y.detach(), None, name)
    _close_or_as_close_as_torch(g_ours, g_theirs, None, "grad")
    clamped = ((b["old"] - b["lp"]).clamp(-20, 20) * b["mask"]).sum() / b["mask"].sum()
    assert (theirs[2] - clamped).abs() > 0.1  # the unclamped outlier moves ppo_kl


@pytest.mark.peer
@pytest.mark.parametrize("config", [dict(), dict(token_level_loss=False), dict(policy_loss_type="gspo"),
                                    dict(is_correction_level="token", is_correction_mode="clip",
                                         is_correction_threshold=(0.0, 1.2))],
                         ids=["ppo", "sample-mean", "gspo", "tis"])
@pytest.mark.parametrize("dtype,mask_dtype", [(torch.bfloat16, torch.bool), (torch.float64, torch.bool),
                                              (torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_policy_loss_dtypes(patched, config, dtype, mask_dtype):
    # OpenRLHF's dtypes follow its type promotion (a float64 mask promotes float32 inputs, its
    # per-sample mean is float32 for bfloat16 inputs); low-precision results at least as close to
    # OpenRLHF's float64 result as its own.
    new, orig = _replaced(patched, "PolicyLoss")
    b = _policy_batch(dtype, mask_dtype=mask_dtype, seed=1)
    ours, g_ours = _run_policy(new, config, b, {})
    theirs, g_theirs = _run_policy(orig, config, b, {})
    reference, g_ref = _run_policy(orig, config, b, {}, dtype=torch.float64) if _low(dtype) else ([None] * 5, None)
    for name, x, y, r in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours, theirs, reference):
        if y is None:
            assert x is None, name
            continue
        _close_or_as_close_as_torch(x.detach(), y.detach(), None if r is None else r.detach(), name)
    _close_or_as_close_as_torch(g_ours, g_theirs, g_ref, "grad")


@pytest.mark.peer
def test_policy_loss_ppo_kl_is_not_clamped(orl):
    # rlkern's approx_kl metric clamps the log-ratio to [-20, 20] (verl's ppo_kl); OpenRLHF's
    # ppo_kl does not. Failed before the drop-in computed OpenRLHF's metric.
    from rlkern.algos.policy_loss import PolicyLoss

    _, originals = orl
    lp = torch.tensor([[-100.0, -1.0, -2.0]])
    old = torch.tensor([[-1.0, -1.5, -2.5]])
    adv, mask = torch.ones(1, 3), torch.ones(1, 3)
    theirs = originals["PolicyLoss"]()(lp, old, adv, action_mask=mask)[2]
    ours = PolicyLoss()(lp, old, adv, action_mask=mask)[2]
    assert theirs.item() > 20
    torch.testing.assert_close(ours, theirs)


# --- ValueLoss -----------------------------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("norms", [False, True], ids=["local", "global-norms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_value_loss_parity(patched, clip_eps, token_level, norms, dtype):
    new, orig = _replaced(patched, "ValueLoss")
    g = torch.Generator().manual_seed(2)
    # the float64 reference runs on the same (rounded) inputs
    values, old, returns = (torch.randn(5, 9, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    mask = torch.rand(5, 9, generator=g) > 0.3
    mask[1] = False
    kw = dict(dp_size=2, batch_num_tokens=torch.tensor(30.0), global_batch_size=torch.tensor(7.0)) if norms else {}

    def run(cls, d):
        v = values.to(d, copy=True).requires_grad_()
        loss = cls(clip_eps, token_level)(v, old.to(d), returns.to(d), action_mask=mask, **kw)
        loss.backward()
        return loss.detach(), v.grad

    calls = ro.calls["ValueLoss"]
    ours, theirs = run(new, dtype), run(orig, dtype)
    reference = run(orig, torch.float64) if _low(dtype) else (None, None)
    assert ro.calls["ValueLoss"] == calls + 1
    # OpenRLHF clips as old + clamp(v - old), rlkern as clamp(v, old - c, old + c): one rounding apart
    _close_or_as_close_as_torch(ours[0], theirs[0], reference[0], "loss")
    _close_or_as_close_as_torch(ours[1], theirs[1], reference[1], "grad")


# --- DPOLoss, PairWiseLoss, LogExpLoss (preference losses) ------------------------------------------

_DPO_CONFIGS = [dict(beta=0.1), dict(beta=0.3, label_smoothing=0.2), dict(beta=0.1, label_smoothing=0.7),
                dict(beta=0.1, label_smoothing=1.0), dict(beta=0.2, label_smoothing=0.5), dict(beta=0.1, ipo=True),
                dict(beta=0.5, label_smoothing=0.3, ipo=True)]


def _dpo_batch(dtype, B=9, seed=20):
    # summed log-probs of ~20-token completions; log-ratio margins spread across the sigmoid
    g = torch.Generator().manual_seed(seed)
    rc = -torch.rand(B, generator=g, dtype=torch.float64) * 40 - 5
    rr = -torch.rand(B, generator=g, dtype=torch.float64) * 40 - 5
    pc = rc + torch.randn(B, generator=g, dtype=torch.float64) * 8
    pr = rr + torch.randn(B, generator=g, dtype=torch.float64) * 8
    return [t.to(dtype) for t in (pc, pr, rc, rr)]


def _run_dpo(cls, kw, batch, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    pc, pr, rc, rr = (cast(t) for t in batch)
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    out = cls(**kw)(pc, pr, rc, rr)
    out[0].backward()
    return out, pc.grad, pr.grad


@pytest.mark.peer
@pytest.mark.parametrize("config", _DPO_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dpo_loss_parity(patched, config, dtype):
    new, orig = _replaced(patched, "DPOLoss")
    batch = _dpo_batch(dtype)
    calls = ro.calls["DPOLoss"]
    ours, g_c, g_r = _run_dpo(new, config, batch)
    theirs, t_c, t_r = _run_dpo(orig, config, batch)
    assert ro.calls["DPOLoss"] == calls + 1
    reference = _run_dpo(orig, config, batch, torch.float64) if _low(dtype) else ([None] * 3, None, None)
    for name, x, y, r in zip(("loss", "chosen_rewards", "rejected_rewards"), ours, theirs, reference[0]):
        assert x.shape == y.shape and x.requires_grad == y.requires_grad == (name == "loss"), name
        _close_or_as_close_as_torch(x.detach(), y.detach(), None if r is None else r.detach(), name)
    _close_or_as_close_as_torch(g_c, t_c, reference[1], "grad chosen")
    _close_or_as_close_as_torch(g_r, t_r, reference[2], "grad rejected")
    assert 0.05 < float(theirs[0].detach()) and t_c.abs().max() > 1e-3  # neither saturated nor flat


@pytest.mark.peer
@pytest.mark.parametrize("config", [dict(beta=1.0), dict(beta=1.0, label_smoothing=0.1), dict(beta=0.1, ipo=True)],
                         ids=["dpo", "cdpo", "ipo"])
def test_dpo_loss_edge_cases(orl, config):
    from rlkern.algos.openrlhf import DPOLoss

    _, originals = orl
    # saturated pairs (|beta x| = 300 both ways), ties, a single pair: OpenRLHF's numbers in float32
    pc = torch.tensor([-10.0, -400.0, -5.0, -7.0])
    pr = torch.tensor([-310.0, -100.0, -5.0, -7.0])
    rc, rr = torch.zeros(4), torch.zeros(4)
    for sl in (slice(None), slice(0, 1)):
        batch = [t[sl] for t in (pc, pr, rc, rr)]
        ours, g_c, g_r = _run_dpo(DPOLoss, config, batch)
        theirs, t_c, t_r = _run_dpo(originals["DPOLoss"], config, batch)
        for x, y in zip(ours + (g_c, g_r), theirs + (t_c, t_r)):
            torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-6)
    # no pairs: rlkern's preference losses give 0 (OpenRLHF's mean of nothing is NaN)
    empty = torch.zeros(0, requires_grad=True)
    loss, chosen, rejected = DPOLoss(**config)(empty, empty, torch.zeros(0), torch.zeros(0))
    assert float(loss) == 0.0 and chosen.shape == rejected.shape == (0,)
    assert originals["DPOLoss"](**config)(empty, empty, torch.zeros(0), torch.zeros(0))[0].isnan()


def test_dpo_loss_bad_calls():
    from rlkern.algos.openrlhf import DPOLoss

    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"^DPOLoss: label_smoothing must be in \[0, 1\]"):
        DPOLoss(0.1, label_smoothing=1.5)(x, x, x, x)
    DPOLoss(0.1, label_smoothing=1.5, ipo=True)(x, x, x, x)  # IPO ignores label_smoothing, as OpenRLHF
    with pytest.raises(ValueError, match="^DPOLoss: reference_rejected_logps requires grad"):
        DPOLoss(0.1)(x, x, x, x.clone().requires_grad_())
    with pytest.raises(TypeError, match=r"^DPOLoss: out_dtype must be None \(OpenRLHF's dtype\)"):
        DPOLoss(0.1, out_dtype="fp32")


@pytest.mark.peer
@pytest.mark.parametrize("name", ["PairWiseLoss", "LogExpLoss"])
@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reward_model_losses_parity(patched, name, margin, dtype):
    new, orig = _replaced(patched, name)
    g = torch.Generator().manual_seed(21)
    # rounded to dtype first: the float64 reference runs on the same inputs
    chosen, rejected = ((torch.randn(11, generator=g, dtype=torch.float64) * 3).to(dtype) for _ in range(2))
    # as OpenRLHF's RewardModelTrainer passes it: torch.tensor(list of floats), float32
    m = (torch.rand(11, generator=g) * 2).float() if margin else None

    def run(cls, d):
        c, r = chosen.to(d).requires_grad_(), rejected.to(d).requires_grad_()
        loss = cls()(c, r, m)
        loss.backward()
        return loss.detach(), c.grad, r.grad

    calls = ro.calls[name]
    ours, theirs = run(new, dtype), run(orig, dtype)
    assert ro.calls[name] == calls + 1
    reference = run(orig, torch.float64) if _low(dtype) else (None, None, None)
    for label, x, y, r in zip(("loss", "grad chosen", "grad rejected"), ours, theirs, reference):
        _close_or_as_close_as_torch(x, y, r, label)


def test_log_exp_loss_does_not_overflow(orl):
    from rlkern.algos.openrlhf import LogExpLoss, PairWiseLoss

    _, originals = orl
    chosen, rejected = torch.tensor([0.0, 1.0]), torch.tensor([120.0, 0.5])
    assert originals["LogExpLoss"]()(chosen, rejected).isinf()  # log(1 + exp(120)) in float32
    exact = originals["PairWiseLoss"]()(chosen.double(), rejected.double())
    torch.testing.assert_close(LogExpLoss()(chosen, rejected).double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(PairWiseLoss()(chosen, rejected).double(), exact, rtol=1e-6, atol=0)


@pytest.mark.peer
def test_preference_twins_out_dtype_and_patched_trainer_modules(orl):
    from rlkern.algos import openrlhf as twins

    modules, originals = orl
    batch = _dpo_batch(torch.bfloat16, seed=22)
    exact = originals["DPOLoss"](0.1, 0.2)(*(t.double() for t in batch))
    ours = twins.DPOLoss(0.1, 0.2, out_dtype=torch.float32)(*batch)
    assert all(x.dtype == torch.float32 for x in ours)
    for x, y in zip(ours, exact):
        torch.testing.assert_close(x.double(), y, rtol=1e-6, atol=1e-6)
    ro.patch(fp32=True)
    try:
        dpo = modules["openrlhf.trainer.dpo_trainer"].DPOLoss(0.1, 0.0, True)
        rm = modules["openrlhf.trainer.rm_trainer"].PairWiseLoss()
        assert isinstance(dpo, twins.DPOLoss) and isinstance(rm, twins.PairWiseLoss)
        calls = dict(ro.calls)
        assert all(x.dtype == torch.float32 for x in dpo(*batch))
        assert rm(batch[0], batch[1]).dtype == torch.float32
        assert modules["openrlhf.trainer.rm_trainer"].LogExpLoss()(batch[0], batch[1]).dtype == torch.float32
        for name in ("DPOLoss", "PairWiseLoss", "LogExpLoss"):
            assert ro.calls[name] == calls.get(name, 0) + 1, name
    finally:
        ro.unpatch()
    assert modules["openrlhf.trainer.dpo_trainer"].DPOLoss is originals["DPOLoss"]


@pytest.mark.peer
@pytest.mark.parametrize("trainer_name,margin", [("dpo", False), ("rm", False), ("rm", True)])
def test_openrlhf_preference_evaluate_patched_equals_unpatched(orl, trainer_name, margin):
    """OpenRLHF's own DPOTrainer.evaluate / RewardModelTrainer.evaluate with the loss its module
    builds: patched, the loss runs on rlkern (counted) and logs OpenRLHF's numbers. (OpenRLHF's
    packaged test_preference_eval compiles the class from its source, which no patch reaches.)"""
    import types

    modules, _ = orl
    module = importlib.import_module(f"openrlhf.trainer.{trainer_name}_trainer")
    cls = module.DPOTrainer if trainer_name == "dpo" else module.RewardModelTrainer
    g = torch.Generator().manual_seed(25)
    chosen, rejected = torch.randn(7, 1, generator=g) * 3, torch.randn(7, 1, generator=g) * 3
    margins = torch.rand(7, generator=g)
    last = torch.zeros(7) if trainer_name == "dpo" else margins
    data = torch.utils.data.TensorDataset(chosen[:, None], torch.ones(7, 1, 1), rejected[:, None],
                                          torch.ones(7, 1, 1), last)
    model, reference = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    model.config = types.SimpleNamespace()

    def forward(current, chosen_ids, c_mask, reject_ids, r_mask, *args):
        c, r = chosen_ids[:, 0].float(), reject_ids[:, 0].float()
        if current is reference:
            c, r = 0.3 * c, -0.2 * r
        return (c, r, None) if trainer_name == "rm" else (c, r, None, None)

    def evaluate():
        logged = []
        strategy = types.SimpleNamespace(is_rank_0=lambda: True, all_reduce=lambda v: v, all_gather=lambda v: v,
                                         _unwrap_model=lambda v: v, print=lambda *a: None)
        loss_fn = module.DPOLoss(0.5, 0.1) if trainer_name == "dpo" else module.PairWiseLoss()
        trainer = types.SimpleNamespace(model=model, ref_model=reference, strategy=strategy, margin_loss=margin,
                                        loss_fn=loss_fn, concatenated_forward=forward, _wandb=types.SimpleNamespace(
                                            log=logged.append), _tensorboard=None)
        cls.evaluate(trainer, torch.utils.data.DataLoader(data, batch_size=3), steps=1)
        return logged[0], loss_fn

    theirs, their_fn = evaluate()
    name = "DPOLoss" if trainer_name == "dpo" else "PairWiseLoss"
    calls = ro.calls[name]
    ro.patch()
    try:
        ours, our_fn = evaluate()
    finally:
        ro.unpatch()
    assert hasattr(type(our_fn), "_rlkern_original") and not hasattr(type(their_fn), "_rlkern_original")
    assert ro.calls[name] == calls + 3  # three batches
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), key


# --- KTOLoss (OpenRLHF 0.1.10 to 0.9.5) ---------------------------------------------------------


def _kto_batch(dtype, seed=23):
    g = torch.Generator().manual_seed(seed)
    n_c, n_r, n_kl = 5, 4, 9
    rc = -torch.rand(n_c, generator=g, dtype=torch.float64) * 30 - 2
    rr = -torch.rand(n_r, generator=g, dtype=torch.float64) * 30 - 2
    pc = rc + torch.randn(n_c, generator=g, dtype=torch.float64) * 6
    pr = rr + torch.randn(n_r, generator=g, dtype=torch.float64) * 6
    rkl = -torch.rand(n_kl, generator=g, dtype=torch.float64) * 30 - 2
    pkl = rkl + torch.randn(n_kl, generator=g, dtype=torch.float64) + 1.0  # a positive reference point
    return [t.to(dtype) for t in (pc, pr, pkl, rc, rr, rkl)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_loss_twin_matches_the_float64_reference(dtype, weights):
    from rlkern.algos.openrlhf import KTOLoss
    from rlkern.reference import preference as reference

    pc, pr, pkl, rc, rr, rkl = _kto_batch(dtype)
    leaf_c, leaf_r = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    loss, chosen, rejected, kl = KTOLoss(0.2, *weights, 1, torch.device("cpu"))(leaf_c, leaf_r, pkl, rc, rr, rkl)
    loss.backward()
    assert loss.dtype == chosen.dtype == rejected.dtype == kl.dtype == dtype
    # the float64 reference on the same (rounded) inputs: rlkern.reference.preference.kto_loss
    # over the chosen then rejected completions, the KL completions' mean as the reference point
    x = torch.cat([pc, pr]).double().requires_grad_()
    labels = torch.cat([torch.ones(5, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)])
    want, metrics = reference.kto_loss(x, torch.cat([rc, rr]).double(), labels, pkl.double(), rkl.double(),
                                       beta=0.2, desirable_weight=weights[0], undesirable_weight=weights[1])
    want.backward()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss.double(), want, **tol)
    torch.testing.assert_close(torch.cat([leaf_c.grad, leaf_r.grad]).double(), x.grad, **tol)
    torch.testing.assert_close(kl.double(), metrics["kl"], **tol)
    assert metrics["kl"] > 0
    torch.testing.assert_close(chosen.double(), 0.2 * (pc.double() - rc.double()), **tol)
    torch.testing.assert_close(rejected.double(), 0.2 * (pr.double() - rr.double()), **tol)
    # out_dtype: float32 outputs of bfloat16 inputs, computed unrounded
    if dtype == torch.bfloat16:
        wide = KTOLoss(0.2, *weights, 1, "cpu", out_dtype=torch.float32)(pc, pr, pkl, rc, rr, rkl)
        assert all(t.dtype == torch.float32 for t in wide)
        torch.testing.assert_close(wide[0].double(), want, rtol=1e-6, atol=1e-6)


def test_kto_loss_twin_edges():
    from rlkern.algos.openrlhf import KTOLoss

    pc, pr, pkl, rc, rr, rkl = _kto_batch(torch.float32)
    loss_fn = KTOLoss(0.1, 1.0, 1.0, 1, "cpu")
    # a negative KL mean is clamped to 0: the loss is that of reference point 0
    low = loss_fn(pc, pr, rkl - 1.0, rc, rr, rkl)
    zero = loss_fn(pc, pr, rkl, rc, rr, rkl)
    assert float(low[3]) == 0.0 and float(zero[3]) == 0.0
    torch.testing.assert_close(low[0], zero[0])
    only_chosen = loss_fn(pc, pr[:0], pkl, rc, rr[:0], rkl)
    assert only_chosen[2].shape == (0,) and torch.isfinite(only_chosen[0])
    assert float(loss_fn(pc[:0], pr[:0], pkl, rc[:0], rr[:0], rkl)[0]) == 0.0
    with pytest.raises(ValueError, match="^KTOLoss: world_size=2 needs torch.distributed initialized"):
        KTOLoss(0.1, 1.0, 1.0, 2, "cpu")(pc, pr, pkl, rc, rr, rkl)


@pytest.mark.peer
def test_kto_loss_twin_matches_trl_kto():
    """The old OpenRLHF KTOLoss on one process is TRL 1.16's KTO loss (same reference point, same
    weighted mean): the twin against TRL's own KTOTrainer._compute_loss."""
    import types
    from collections import defaultdict

    from conftest import import_peer
    from rlkern.algos.openrlhf import KTOLoss

    kto = import_peer("trl.trainer.kto_trainer")
    g = torch.Generator().manual_seed(24)
    n, width = 8, 6
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    per_token = -torch.rand(n, width, generator=g) * 3
    mask = (torch.rand(n, width, generator=g) > 0.3).float()
    kl_per_token = -torch.rand(n, width, generator=g) * 3
    kl_mask = (torch.rand(n, width, generator=g) > 0.3).float()
    sums, kl_sums = (per_token * mask).sum(1), (kl_per_token * kl_mask).sum(1)
    ref, ref_kl = sums + torch.randn(n, generator=g), kl_sums - torch.rand(n, generator=g) - 0.2

    trainer = object.__new__(kto.KTOTrainer)
    identity = lambda x, **_: x  # noqa: E731  (one process: accelerate's gathers are the identity)
    trainer.__dict__.update(
        model=types.SimpleNamespace(training=True), aux_loss_enabled=False, beta=0.2, loss_type="kto",
        desirable_weight=1.3, undesirable_weight=0.8, calculate_KL=True, precompute_ref_logps=True,
        _total_train_tokens=0, _tp_size=1, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=types.SimpleNamespace(gather_for_metrics=identity, device=torch.device("cpu")))
    leaf = per_token.clone().requires_grad_()
    ids, kl_ids = torch.zeros(n, width + 1, dtype=torch.long), torch.ones(n, width + 1, dtype=torch.long)
    zeros = torch.zeros(n, width)

    def model(input_ids=None, **_):
        if input_ids is kl_ids:
            return types.SimpleNamespace(log_probs=kl_per_token * kl_mask)
        return types.SimpleNamespace(log_probs=leaf * mask, entropy=zeros, mean_logits=zeros)

    pad = torch.zeros(n, 1, dtype=torch.long)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=torch.cat([pad, mask.long()], 1),
                  label=labels, ref_logps=ref, KL_input_ids=kl_ids, KL_attention_mask=torch.ones_like(kl_ids),
                  KL_completion_mask=torch.cat([pad, kl_mask.long()], 1), ref_KL_logps=ref_kl)
    trl_loss = trainer._compute_loss(model, inputs, False)
    trl_grad = torch.autograd.grad(trl_loss, leaf)[0]
    trl_kl = trainer._metrics["train"]["kl"][-1]

    x = sums.clone().requires_grad_()
    loss, _, _, kl = KTOLoss(0.2, 1.3, 0.8, 1, "cpu")(x[labels], x[~labels], kl_sums, ref[labels], ref[~labels],
                                                      ref_kl)
    loss.backward()
    assert trl_kl > 0
    torch.testing.assert_close(loss, trl_loss, rtol=2e-5, atol=2e-6)
    assert math.isclose(float(kl), trl_kl, rel_tol=2e-5)
    # d loss / d token = d loss / d sum on every unmasked token
    torch.testing.assert_close(x.grad[:, None].expand_as(trl_grad) * mask, trl_grad, rtol=2e-5, atol=2e-7)


# --- compute_approx_kl ---------------------------------------------------------------------------


def _kl_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    base = -torch.rand(4, 16, generator=g, dtype=torch.float64) * 4
    lr = torch.randn(4, 16, generator=g, dtype=torch.float64) * 0.5
    lr[0] = torch.linspace(-25, 25, 16, dtype=torch.float64)  # past the +-10 and +-20 bounds
    lr[1, :4] = torch.tensor([1e-4, -3e-3, 0.02, -0.3])  # small ratios: k3's cancellation range
    old = base + lr + torch.randn(4, 16, generator=g, dtype=torch.float64) * 0.7
    return (base + lr).to(dtype), base.to(dtype), old.to(dtype)


@pytest.mark.peer
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased,with_old", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compute_approx_kl_parity(patched, estimator, unbiased, with_old, dtype):
    new, orig = _replaced(patched, "compute_approx_kl")
    lp, base, old = _kl_inputs(dtype)

    def run(fn, **kw):
        x = lp.clone().requires_grad_()
        out = fn(x, base, log_probs_old=old if with_old else None, kl_estimator=estimator, **kw)
        out.sum().backward()
        return out.detach(), x.grad

    calls = ro.calls["compute_approx_kl"]
    (ours, g_ours), (theirs, g_theirs) = run(new, unbiased_gradient=unbiased), run(orig, unbiased_gradient=unbiased)
    assert ro.calls["compute_approx_kl"] == calls + 1
    assert ours.dtype == theirs.dtype == torch.float32 and g_ours.dtype == g_theirs.dtype == dtype
    plain = run(orig, unbiased_gradient=False)[0]
    # the value is the estimator's (OpenRLHF's straight-through v + g - g rounds at the scale of g)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    if unbiased:
        g = (lp.float() - base.float()).square() / 2 * 10
        assert ((ours - theirs).abs() <= 4 * torch.finfo(torch.float32).eps * (g + ours.abs()) + 1e-6).all()
    low = dtype == torch.bfloat16
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-2 if low else 1e-5, atol=1e-2 if low else 1e-6)


@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
@pytest.mark.parametrize("kl_estimator", ["k3", "k3_unclamped"])
def test_k3_is_accurate_for_small_log_ratios(backend_name, kl_estimator, monkeypatch):
    # e^x - x - 1 in float32 cancels for small |x| (OpenRLHF's and verl's formula: relative error
    # ~1e-7 / (x^2 / 2)); the kernels switch to its Taylor series below |x| = 0.5.
    from rlkern import _backend

    if backend_name == "triton" and not (_backend.has_triton() and _backend.triton_interpreted()):
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("RLKERN_BACKEND", backend_name)
    x = torch.cat([torch.logspace(-4, 0.3, 300), -torch.logspace(-4, 0.3, 300)])  # values below the clamp at 10
    ref_lp = torch.zeros_like(x)
    ours = rlkern.kl_penalty(-x, ref_lp, kl_estimator=kl_estimator).double()  # x = ref - logprobs
    xd = x.double()
    exact = torch.expm1(xd) - xd
    rel = ((ours - exact).abs() / exact).max().item()
    assert rel < 2e-6, rel


# --- log_probs_from_logits, compute_entropy -------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_log_probs_from_logits_parity(patched, temperature, dtype):
    new, orig = _replaced(patched, "log_probs_from_logits")
    g = torch.Generator().manual_seed(4)
    master = (torch.randn(3, 7, 41, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, 41, (3, 7), generator=g)

    def run(fn, d):
        leaf = master.to(d, copy=True).requires_grad_()
        logits = leaf * 1.0  # OpenRLHF divides in place: not a leaf
        out = fn(logits, labels, temperature)
        out.float().sum().backward()
        return out.detach(), logits.detach(), leaf.grad

    calls = ro.calls["log_probs_from_logits"]
    ours, theirs = run(new, dtype), run(orig, dtype)
    reference = run(orig, torch.float64) if _low(dtype) else (None, None, None)
    assert ro.calls["log_probs_from_logits"] == calls + 1
    _close_or_as_close_as_torch(ours[0], theirs[0], reference[0], "logprobs")
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)  # the logits, scaled in place as OpenRLHF
    _close_or_as_close_as_torch(ours[2], theirs[2], reference[2], "grad")


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compute_entropy_parity(patched, dtype):
    new, orig = _replaced(patched, "compute_entropy")
    eager = inspect.unwrap(orig)  # OpenRLHF's function under its torch.compile wrapper
    g = torch.Generator().manual_seed(5)
    master = (torch.randn(2, 9, 53, generator=g, dtype=torch.float64) * 2).to(dtype)

    def run(fn, d):
        leaf = master.to(d, copy=True).requires_grad_()
        out = fn(leaf)
        out.float().sum().backward()
        return out.detach(), leaf.grad

    calls = ro.calls["compute_entropy"]
    ours, theirs = run(new, dtype), run(eager, dtype)
    reference = run(eager, torch.float64) if _low(dtype) else (None, None)
    assert ro.calls["compute_entropy"] == calls + 1
    _close_or_as_close_as_torch(ours[0], theirs[0], reference[0], "entropy")
    _close_or_as_close_as_torch(ours[1], theirs[1], reference[1], "grad")


@pytest.mark.peer
def test_fp32_option(orl):
    modules, originals = orl
    ro.patch(fp32=True)
    try:
        ro.patch(fp32=True)  # the same options: nothing happens
        with pytest.raises(ValueError, match=r"^patch: already patched with fp32=True; call unpatch\(\) first"):
            ro.patch()
        logits = torch.randn(2, 5, 17, dtype=torch.bfloat16)
        labels = torch.randint(0, 17, (2, 5))
        out = modules["openrlhf.models.actor"].log_probs_from_logits(logits, labels)
        assert out.dtype == torch.float32
        exact = originals["log_probs_from_logits"](logits.double(), labels)
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
        assert modules["openrlhf.models.utils"].compute_entropy(logits).dtype == torch.float32
        # float64 inputs stay float64 (rlkern's unrounded dtype, per call)
        assert modules["openrlhf.models.actor"].log_probs_from_logits(logits.double(), labels).dtype == torch.float64
        policy_loss = modules["openrlhf.trainer.ray.ppo_actor"].PolicyLoss()
        b = _policy_batch(torch.bfloat16)
        assert all(x.dtype == torch.float32 for x in policy_loss(b["lp"], b["old"], b["adv"], action_mask=b["mask"])[:3])
        b = _policy_batch(torch.float64)
        assert all(x.dtype == torch.float64 for x in policy_loss(b["lp"], b["old"], b["adv"], action_mask=b["mask"])[:3])
        value_loss = modules["openrlhf.trainer.ray.ppo_critic"].ValueLoss(0.2)
        values = torch.randn(3, 4, dtype=torch.bfloat16)
        assert value_loss(values, values, values, torch.ones(3, 4)).dtype == torch.float32
    finally:
        ro.unpatch()
    with pytest.raises(TypeError, match="^patch: fp32 must be a bool, got 'x'"):
        ro.patch(fp32="x")
    assert not ro.is_patched()


@pytest.mark.peer
def test_twins_out_dtype_matches_trls_drop_ins(orl):
    """``out_dtype`` as in rlkern.selective_log_softmax: None is OpenRLHF's dtype, a float dtype
    is rlkern's unrounded result rounded once to it."""
    from rlkern.algos import openrlhf as twins

    _, originals = orl
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 6, 33, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 33, (2, 6), generator=g)
    exact_lp = originals["log_probs_from_logits"](logits.double(), labels)
    exact_ent = originals["compute_entropy"](logits.double())
    assert twins.log_probs_from_logits(logits, labels).dtype == torch.bfloat16
    for dtype in (torch.float32, torch.float64, torch.float16):
        lp = twins.log_probs_from_logits(logits, labels, out_dtype=dtype)
        ent = twins.compute_entropy(logits, out_dtype=dtype)
        assert lp.dtype == ent.dtype == dtype
        # computed in float32, rounded once to dtype
        tol = 2e-5 + torch.finfo(dtype).eps * float(exact_lp.abs().max()) if dtype == torch.float16 else 2e-5
        torch.testing.assert_close(lp.double(), exact_lp, rtol=0, atol=tol)
        torch.testing.assert_close(ent.double(), exact_ent, rtol=0, atol=tol * 2)
    b = _policy_batch(torch.bfloat16)
    kw = dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.0, 1.2))
    ours = twins.PolicyLoss(**kw, out_dtype=torch.float32)(b["lp"], b["old"], b["adv"], action_mask=b["mask"],
                                                           rollout_log_probs=b["rollout"])
    assert all(x.dtype == torch.float32 for x in ours)
    # OpenRLHF's float32 numbers of the same (exactly widened) inputs: the clip fractions are
    # counts whose boundary tokens follow the compute dtype
    wide = originals["PolicyLoss"](**kw)(b["lp"].float(), b["old"].float(), b["adv"].float(),
                                         action_mask=b["mask"], rollout_log_probs=b["rollout"].float())
    for name, x, y in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours, wide):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    values, returns = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    vloss = twins.ValueLoss(0.2, out_dtype=torch.float32)(values, values + 0.1, returns, torch.ones(3, 4))
    assert vloss.dtype == torch.float32
    torch.testing.assert_close(vloss.double(), originals["ValueLoss"](0.2)(values, values + 0.1, returns,
                                                                          torch.ones(3, 4)), rtol=1e-6, atol=0)
    before = logits.clone()
    for name, call in {"log_probs_from_logits": lambda: twins.log_probs_from_logits(logits, labels, 0.5, out_dtype="fp32"),
                       "compute_entropy": lambda: twins.compute_entropy(logits, out_dtype=torch.int64),
                       "PolicyLoss": lambda: twins.PolicyLoss(out_dtype=True),
                       "ValueLoss": lambda: twins.ValueLoss(out_dtype="float32")}.items():
        with pytest.raises(TypeError, match=f"^{name}: out_dtype must be None \\(OpenRLHF's dtype\\) or a float dtype"):
            call()
    assert torch.equal(logits, before)  # checked before the in-place temperature division


# --- patch / unpatch ---------------------------------------------------------------------------


def _attrs(modules):
    return {(m, name): getattr(modules[m], name) for m, names in _BY_NAME.items() for name in names}


@pytest.mark.peer
def test_signatures_are_openrlhfs(patched):
    def params(obj):
        return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]

    for name in ro.NAMES:
        new, orig = _replaced(patched, name)
        assert params(new) == params(orig), name
        if isinstance(orig, type):
            assert params(new.forward) == params(orig.forward), name


@pytest.mark.peer
def test_patch_walks_loaded_modules_and_unpatch_restores(orl):
    modules, _ = orl
    before = _attrs(modules)
    originals = {id(v) for v in before.values()}
    ro.patch()
    try:
        for key, value in _attrs(modules).items():
            assert value._rlkern_original is before[key], key
        # no original is reachable from any loaded OpenRLHF module, under any name
        for mod in [sys.modules[n] for n in _openrlhf_names()]:
            for attr, value in vars(mod).items():
                assert id(value) not in originals, (mod.__name__, attr)
        # objects built after patch() are rlkern's
        assert isinstance(modules["openrlhf.trainer.ray.ppo_actor"].PolicyLoss(), rlkern.algos.openrlhf.PolicyLoss)
    finally:
        ro.unpatch()
    for key, value in _attrs(modules).items():
        assert value is before[key], key


@pytest.mark.peer
def test_patch_before_import_and_direct_file_loads(orl):
    # patch() first, then import OpenRLHF (the import hook), then load a file the way OpenRLHF's
    # own tests do (spec_from_file_location bypasses every hook: wrap_spec / patch_module).
    saved = {n: sys.modules.pop(n) for n in _openrlhf_names()}
    try:
        ro.patch()
        fresh = _import_openrlhf()
        for (m, name), value in _attrs(fresh).items():
            assert hasattr(value, "_rlkern_original"), (m, name)
        root = os.path.dirname(fresh["openrlhf.models.utils"].__file__)
        direct = []
        for i, wrap in enumerate((True, False)):
            spec = importlib.util.spec_from_file_location(f"_rlkern_direct_{i}", os.path.join(root, "utils.py"))
            spec = ro.wrap_spec(spec) if wrap else spec
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            if not wrap:
                assert not hasattr(module.compute_approx_kl, "_rlkern_original")
                assert ro.patch_module(module) == 3
            assert hasattr(module.compute_approx_kl, "_rlkern_original")
            direct.append(module)
        copy = pickle.loads(pickle.dumps(direct[0].__spec__.loader))  # dill / multiprocessing pickle loaders
        assert copy.get_filename() == direct[0].__file__
        ro.unpatch()
        utils, loss = fresh["openrlhf.models.utils"], fresh["openrlhf.models.loss"]
        for (m, name), value in _attrs(fresh).items():
            assert not hasattr(value, "_rlkern_original"), (m, name)
            assert value is getattr(utils if name in _BY_NAME["openrlhf.models.utils"] else loss, name), (m, name)
        for module in direct:
            assert not hasattr(module.compute_approx_kl, "_rlkern_original")
            assert module.compute_approx_kl.__module__ == module.__name__
    finally:
        ro.unpatch()
        for n in _openrlhf_names() + [n for n in sys.modules if n.startswith("_rlkern_direct_")]:
            sys.modules.pop(n)
        sys.modules.update(saved)


# --- OpenRLHF's Actor.forward on a tiny Qwen2 -----------------------------------------------------


@pytest.mark.peer
def test_actor_forward_patched_equals_unpatched(orl, monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    modules, originals = orl
    actor_mod = modules["openrlhf.models.actor"]
    # OpenRLHF wraps compute_entropy in torch.compile; its eager function gives the same numbers
    # without an inductor build on the CPU (OpenRLHF's own actor test does the same).
    monkeypatch.setattr(actor_mod, "compute_entropy", inspect.unwrap(originals["compute_entropy"]))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config).float()
    actor = actor_mod.Actor(model, temperature=0.7)
    actor.packing_samples = False  # set only when Actor loads a checkpoint by name
    sequences = torch.randint(0, 300, (3, 14))
    attention_mask = torch.ones_like(sequences)
    attention_mask[1, :4] = 0  # left padding
    action_mask = (torch.rand(3, 6) > 0.2).float()

    def run():
        model.zero_grad(set_to_none=True)
        logprobs, output = actor(sequences, action_mask, attention_mask=attention_mask, return_output=True,
                                 return_entropy=True)
        (logprobs.sum() - 0.1 * output.entropy.sum()).backward()
        return logprobs.detach(), output.entropy.detach(), [p.grad for p in model.parameters()]

    theirs = run()
    calls = dict(ro.calls)
    ro.patch()
    try:
        ours = run()
    finally:
        ro.unpatch()
    assert ro.calls["log_probs_from_logits"] == calls.get("log_probs_from_logits", 0) + 1
    assert ro.calls["compute_entropy"] == calls.get("compute_entropy", 0) + 1
    assert actor_mod.log_probs_from_logits is originals["log_probs_from_logits"]
    assert ours[0].dtype == theirs[0].dtype and ours[1].dtype == theirs[1].dtype
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert sum(x is not None for x in ours[2]) > 10
    for x, y in zip(ours[2], theirs[2]):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


# --- the pytest plugin (.ci/peer-tests-openrlhf runs OpenRLHF's own tests with it) --------------

_PLUGIN_TEST = '''
import importlib.machinery, importlib.util, os, sys, types
import torch

def test_kl():
    # as OpenRLHF's tests load models/utils.py: straight from the file, under another name
    if importlib.util.find_spec("deepspeed") is None:
        stub = types.ModuleType("deepspeed")
        stub.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
        sys.modules["deepspeed"] = stub
    root = os.path.dirname(importlib.util.find_spec("openrlhf").origin)
    spec = importlib.util.spec_from_file_location("_plugin_utils", os.path.join(root, "models", "utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if os.environ.get("CALL_KL") == "1":
        x = torch.randn(3)
        assert module.compute_approx_kl(x, x).abs().max() == 0
'''


@pytest.mark.peer
@pytest.mark.parametrize("call,expect,ok", [("1", "compute_approx_kl", True), ("0", "", False)])
def test_pytest_plugin_fails_when_rlkern_never_ran(orl, tmp_path, call, expect, ok):
    import subprocess

    (tmp_path / "test_plugin_case.py").write_text(_PLUGIN_TEST)
    env = dict(os.environ, CALL_KL=call, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "rlkern.integrations._pytest_openrlhf",
           "--rlkern-expect", expect, str(tmp_path / "test_plugin_case.py")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout
    assert f"compute_approx_kl={call}" in result.stdout
