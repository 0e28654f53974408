"""rlkern/integrations/_trl_loss.py against TRL 1.16's own GRPOTrainer._compute_loss and
RLOOTrainer._compute_loss, option by option: the loss, its gradient in the log-probs and the
entropies, and every entry each appends to ``self._metrics``.

The trainers are built without a model (``object.__new__``) with the attributes the losses read
set by hand (defaults from GRPOConfig's own fields) and ``_get_per_token_logps_and_entropies``
returning fixed log-probs / entropies that require grad; a single-process accelerator stub
(gather / reduce are the identity, as accelerate's for one process).
"""

import dataclasses
import math
import types
from collections import defaultdict

import pytest
import torch

from conftest import import_peer

B, T = 6, 13


def _accelerator():
    def identity(x, **_):
        return x

    return types.SimpleNamespace(gather=identity, gather_for_metrics=identity, reduce=identity,
                                 pad_across_processes=identity, num_processes=1, sync_gradients=True)


def _config_defaults(module, name):
    cls = getattr(import_peer(module), name)
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _bare_trainer(cls, config, options):
    """``cls`` built without its ``__init__``: ``args`` the defaults of ``config`` (the config
    dataclass's module and name) with ``options`` set on them, the one-process accelerator stub.
    Returns (trainer, args)."""
    args = types.SimpleNamespace(**_config_defaults(*config))
    for k, v in options.items():
        setattr(args, k, v)
    trainer = object.__new__(cls)
    trainer.args = args
    trainer.accelerator = _accelerator()
    return trainer, args


def _grpo_attributes(trainer, args):
    """What GRPOTrainer.__init__ derives from its args and _compute_loss reads (the callers set the
    model, use_vllm, max_completion_length, _last_world_entropy and aux_loss_enabled)."""
    trainer.loss_type = args.loss_type
    trainer.beta = args.beta
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    trainer.current_gradient_accumulation_steps = 2
    trainer.entropy_coef = args.entropy_coef
    trainer.use_adaptive_entropy = args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy
    trainer._entropy_window_stats = None
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}


def _batch(seed=0, dtype=torch.float32, empty_row=True, spread=0.35, ref_spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2.5
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = mask * (torch.arange(T)[None, :] < lengths[:, None]).long()
    mask[0, :3] = 1
    if empty_row:
        mask[3] = 0
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    sampling = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    ref = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * ref_spread
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(lp=cast(lp), old=cast(old), sampling=cast(sampling), ref=cast(ref), ent=cast(ent), adv=cast(adv),
                mask=mask, tool_mask=(torch.rand(B, T, generator=g) > 0.1).long())


def _grpo(options, b, training=True):
    grpo = import_peer("trl.trainer.grpo_trainer")
    trainer, args = _bare_trainer(grpo.GRPOTrainer, ("trl.trainer.grpo_config", "GRPOConfig"),
                                  {"steps_per_generation": 4, **options})
    _grpo_attributes(trainer, args)
    trainer.model = types.SimpleNamespace(training=training)
    trainer.use_vllm = options.get("use_vllm", False)
    trainer.max_completion_length = T + 3
    trainer._last_world_entropy = options.get("_last_world_entropy", float("inf"))
    trainer.aux_loss_enabled = options.get("aux", False)
    trainer.router_aux_loss_coef = 0.01
    lp = b["lp"].clone().requires_grad_()
    ent = b["ent"].clone().requires_grad_()
    aux = torch.tensor(0.7)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, aux)
    return trainer, lp, ent


def _inputs(b, options):
    n = b["mask"].shape[0]
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.zeros(n, T, dtype=torch.long), "completion_mask": b["mask"],
              "advantages": b["adv"], "num_items_in_batch": b["mask"].sum().float() * 3}
    if options.get("old", True):
        inputs["old_per_token_logps"] = b["old"]
    if options.get("beta", 0.0):
        inputs["ref_per_token_logps"] = b["ref"]
    if options.get("sampling"):
        inputs["sampling_per_token_logps"] = b["sampling"]
    if options.get("tool_mask"):
        inputs["tool_mask"] = b["tool_mask"]
    if options.get("per_token_adv"):
        inputs["advantages"] = b["adv"][:, None] * (1 + 0.1 * torch.arange(T, dtype=b["adv"].dtype))
    mode = options.get("vllm_importance_sampling_mode")
    if options.get("use_vllm"):  # the ratio as TRL's generation step forms it for each mode
        m = b["mask"] if "tool_mask" not in inputs else b["mask"] * inputs["tool_mask"]
        diff = (b["old"] - b["sampling"]) * m
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        lo = options.get("vllm_importance_sampling_clip_min")
        hi = options.get("vllm_importance_sampling_clip_max", 3.0)
        if mode.endswith("truncate"):
            ratio = ratio.clamp(min=lo, max=hi)
        else:
            ratio = ratio.masked_fill((ratio < (lo if lo is not None else -math.inf)) | (ratio > hi), 0.0)
        inputs["importance_sampling_ratio"] = ratio
    return inputs


def _run(compute, trainer, inputs):
    loss = compute(trainer, None, inputs)
    loss.backward()
    return loss.detach()


def _compare(options, seed=0, dtype=torch.float32, training=True, rtol=2e-5, atol=2e-6):
    trl_loss_mod = pytest.importorskip("rlkern.integrations._trl_loss")
    grpo = import_peer("trl.trainer.grpo_trainer")
    b = _batch(seed, dtype, empty_row=options.pop("empty_row", True), spread=options.pop("spread", 0.35),
               ref_spread=options.pop("ref_spread", 0.3))
    inputs = _inputs(b, options)
    theirs, lp_t, ent_t = _grpo(options, b, training)
    ours, lp_o, ent_o = _grpo(options, b, training)
    before = trl_loss_mod.CALLS
    ref_loss = _run(trl_loss_mod._original(grpo.GRPOTrainer), theirs, inputs)
    our_loss = _run(trl_loss_mod.grpo_compute_loss, ours, inputs)
    assert trl_loss_mod.CALLS == before + 1, "rlkern did not compute the loss"
    torch.testing.assert_close(our_loss.double(), ref_loss.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(lp_o.grad.double(), lp_t.grad.double(), rtol=rtol, atol=atol)
    # the entropies reach the graph exactly where TRL's do (the bonus), no zero gradient elsewhere
    assert (ent_o.grad is None) == (ent_t.grad is None)
    if ent_t.grad is not None:
        torch.testing.assert_close(ent_o.grad.double(), ent_t.grad.double(), rtol=rtol, atol=atol)
    mode = "train" if training else "eval"
    want, got = dict(theirs._metrics[mode]), dict(ours._metrics[mode])
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=atol, nan_ok=True), key
    assert ours.entropy_coef == pytest.approx(theirs.entropy_coef)
    return want


LOSS_TYPES = ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


def _loss_type_options(loss_type):
    return {"loss_type": loss_type, "epsilon_high": 5.0 if loss_type == "cispo" else 0.28}


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_types_and_levels(loss_type, level):
    if loss_type == "vespo" and level == "sequence":
        level = "token"  # VESPO ignores the level (no ratio of its own)
    # a wide spread of log-ratios, so that sequence means and CISPO's cap of 5 are clipped too
    options = {**_loss_type_options(loss_type), "importance_sampling_level": level, "spread": 1.3}
    if loss_type == "cispo":
        options["epsilon_high"] = 1.5
    logged = _compare(options, seed=18)  # a seed whose sequence ratios cross both clip bounds
    clipped = [v[-1] for k, v in logged.items() if k in ("clip_ratio/region_mean", "cispo_clip_ratio")]
    assert all(0 < c < 1 for c in clipped), logged


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias_kl", "plain_kl"])
def test_kl_term_with_and_without_bias_correction(loss_type, level, bias):
    if loss_type == "vespo" and level == "sequence" and bias:
        pytest.skip("runs TRL's own method (test_inexpressible_configurations_run_trl)")
    logged = _compare({**_loss_type_options(loss_type), "importance_sampling_level": level, "beta": 0.04,
                       "use_bias_correction_kl": bias}, seed=1)
    assert "kl" in logged


@pytest.mark.peer
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_large_kl(level):
    # reference log-probs far from the policy's: TRL's k3 has no bound (verl's clamps at 10)
    b = _batch(12, ref_spread=3.0)
    assert (torch.exp(b["ref"] - b["lp"]) - (b["ref"] - b["lp"]) - 1).max() > 10
    _compare({"loss_type": "grpo", "epsilon_high": 0.28, "beta": 0.04, "importance_sampling_level": level,
              "ref_spread": 3.0}, seed=12, rtol=1e-5, atol=1e-5)


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_two_sided_clip_delta(loss_type):
    _compare({**_loss_type_options(loss_type), "delta": 1.4}, seed=2, )


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "vespo"])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_top_entropy_quantile(loss_type, entropy_coef):
    _compare({**_loss_type_options(loss_type), "top_entropy_quantile": 0.4, "entropy_coef": entropy_coef}, seed=3)


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_entropy_bonus(loss_type, adaptive):
    options = {**_loss_type_options(loss_type), "entropy_coef": 0.02}
    if adaptive:
        options.update(use_adaptive_entropy=True, entropy_target=5.0, _last_world_entropy=0.1)
    _compare(options, seed=4)


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "vespo"])
@pytest.mark.parametrize("sampling", [False, True], ids=["old", "sampling"])
def test_off_policy_mask(loss_type, sampling):
    _compare({**_loss_type_options(loss_type), "off_policy_mask_threshold": 0.02, "sampling": sampling}, seed=5)


@pytest.mark.peer
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "vespo"])
def test_vllm_importance_sampling_modes(mode, loss_type):
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("TRL rejects VESPO with sequence-level vLLM correction")
    _compare({**_loss_type_options(loss_type), "use_vllm": True, "vllm_importance_sampling_correction": True,
              "vllm_importance_sampling_mode": mode, "vllm_importance_sampling_clip_min": 0.5,
              "vllm_importance_sampling_clip_max": 1.6, "sampling": True}, seed=6)


@pytest.mark.peer
@pytest.mark.parametrize("options", [
    {"loss_type": "grpo", "tool_mask": True, "beta": 0.02},
    {"loss_type": "dapo", "per_token_adv": True},
    {"loss_type": "grpo", "old": False},
    {"loss_type": "bnpo", "aux": True, "entropy_coef": 0.01},
    {"loss_type": "grpo", "empty_row": False, "importance_sampling_level": "sequence"},
], ids=["tool_mask", "per_token_adv", "no_old_logps", "aux_loss", "no_empty_row"])
def test_other_inputs(options):
    _compare(dict(options, epsilon_high=0.28), seed=7)


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_eval_mode(loss_type):
    _compare({**_loss_type_options(loss_type), "beta": 0.04, "entropy_coef": 0.01}, seed=8, training=False)


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_bf16_inputs(loss_type):
    # TRL computes in bfloat16 and rlkern in float32: the bound is bf16's own rounding
    _compare({**_loss_type_options(loss_type), "beta": 0.04}, seed=9, dtype=torch.bfloat16, rtol=2e-2, atol=2e-3)


@pytest.mark.peer
@pytest.mark.parametrize("options", [
    {"loss_type": "grpo", "delta": 1.1},  # below 1 + epsilon_high
    {"loss_type": "cispo", "epsilon_high": 0.28},  # a cap below 1
    {"loss_type": "vespo", "importance_sampling_level": "sequence", "beta": 0.04},
], ids=["delta_below_clip", "cispo_cap_below_1", "vespo_sequence_bias_kl"])
def test_inexpressible_configurations_run_trl(options):
    trl_loss_mod = pytest.importorskip("rlkern.integrations._trl_loss")
    grpo = import_peer("trl.trainer.grpo_trainer")
    b = _batch(10)
    inputs = _inputs(b, options)
    theirs, lp_t, _ = _grpo(dict(options), b)
    ours, lp_o, _ = _grpo(dict(options), b)
    ref = _run(trl_loss_mod._original(grpo.GRPOTrainer), theirs, inputs)
    before = trl_loss_mod.CALLS
    got = _run(trl_loss_mod.grpo_compute_loss, ours, inputs)
    assert trl_loss_mod.CALLS == before  # TRL's own method ran
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(lp_o.grad, lp_t.grad)


@pytest.mark.peer
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("options", [
    {"loss_type": "dapo", "beta": 0.04, "importance_sampling_level": "sequence"},
    {"loss_type": "grpo", "beta": 0.04, "ref_spread": 3.0, "off_policy_mask_threshold": 0.02},
    {"loss_type": "cispo", "epsilon_high": 1.5, "spread": 1.3, "beta": 0.04, "entropy_coef": 0.01},
], ids=["dapo-seq-kl", "grpo-large-kl-opsm", "cispo-entropy"])
def test_other_backends(monkeypatch, backend_name, options):
    # the Triton kernels (interpreted on CPU tensors) and the reference backend give TRL's numbers too
    from rlkern import _backend

    if backend_name == "triton" and not _backend.has_triton():
        pytest.fail("triton is not installed")
    if backend_name == "triton" and not _backend.triton_interpreted():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("RLKERN_BACKEND", backend_name)
    _compare(dict(options), seed=13, rtol=1e-5, atol=1e-5)


# --- RLOO ------------------------------------------------------------------------------------------

def _rloo(options, b):
    rloo = import_peer("trl.trainer.rloo_trainer")
    trainer = object.__new__(rloo.RLOOTrainer)
    trainer.accelerator = _accelerator()
    trainer.model = types.SimpleNamespace(training=True)
    trainer.epsilon_low = options.get("epsilon", 0.2)
    trainer.epsilon_high = options.get("epsilon_high", 0.2)
    trainer.aux_loss_enabled = options.get("aux", False)
    trainer.router_aux_loss_coef = 0.01
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    lp = b["lp"].clone().requires_grad_()
    ent = b["ent"].clone().requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, torch.tensor(0.3))
    return trainer, lp


@pytest.mark.peer
@pytest.mark.parametrize("options", [{}, {"epsilon_high": 0.28}, {"aux": True}], ids=["default", "eps_high", "aux"])
def test_rloo_loss(options):
    trl_loss_mod = pytest.importorskip("rlkern.integrations._trl_loss")
    rloo = import_peer("trl.trainer.rloo_trainer")
    b = _batch(11, spread=0.1)
    inputs = _inputs(b, {})
    inputs["old_logps"] = (b["old"] * b["mask"]).sum(1)
    theirs, lp_t = _rloo(options, b)
    ours, lp_o = _rloo(options, b)
    ref = _run(trl_loss_mod._original(rloo.RLOOTrainer), theirs, inputs)
    before = trl_loss_mod.CALLS
    got = _run(trl_loss_mod.rloo_compute_loss, ours, inputs)
    assert trl_loss_mod.CALLS == before + 1
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(lp_o.grad, lp_t.grad, rtol=2e-5, atol=2e-6)
    want, have = dict(theirs._metrics["train"]), dict(ours._metrics["train"])
    assert sorted(have) == sorted(want)
    for key in want:
        assert have[key] == pytest.approx(want[key], rel=2e-5, abs=2e-6), key
    assert 0 < want["clip_ratio/region_mean"][-1] < 1  # the clip is exercised


def test_loss_overrides_name_the_trainers(monkeypatch):
    trl_loss_mod = pytest.importorskip("rlkern.integrations._trl_loss")
    grpo = import_peer("trl.trainer.grpo_trainer")
    rloo = import_peer("trl.trainer.rloo_trainer")
    dpo = import_peer("trl.trainer.dpo_trainer")
    kto = import_peer("trl.trainer.kto_trainer")
    overrides = trl_loss_mod.loss_overrides()
    assert [(o, a) for o, a, _ in overrides] == [(grpo.GRPOTrainer, "_compute_loss"),
                                                 (rloo.RLOOTrainer, "_compute_loss"),
                                                 (dpo.DPOTrainer, "_compute_loss"),
                                                 (kto.KTOTrainer, "_compute_loss")]
    assert [r for _, _, r in overrides] == [trl_loss_mod.grpo_compute_loss, trl_loss_mod.rloo_compute_loss,
                                            trl_loss_mod.dpo_compute_loss, trl_loss_mod.kto_compute_loss]
    # the originals stay reachable for the configurations rlkern leaves to TRL
    assert trl_loss_mod._original(grpo.GRPOTrainer) is grpo.GRPOTrainer.__dict__["_compute_loss"]
    # patched as rlkern.integrations.trl.patch(loss=True) does: the fallback still reaches TRL's own
    for owner, name, fn in overrides:
        monkeypatch.setattr(owner, name, fn)
    assert trl_loss_mod._original(grpo.GRPOTrainer) is not trl_loss_mod.grpo_compute_loss
    options = {"loss_type": "grpo", "delta": 1.1}
    b = _batch(14)
    trainer, lp, _ = _grpo(dict(options), b)
    before = trl_loss_mod.CALLS
    grpo.GRPOTrainer._compute_loss(trainer, None, _inputs(b, options)).backward()
    assert trl_loss_mod.CALLS == before and lp.grad is not None
    options = {"loss_type": "grpo"}
    trainer, lp, _ = _grpo(dict(options), b)
    grpo.GRPOTrainer._compute_loss(trainer, None, _inputs(b, options)).backward()
    assert trl_loss_mod.CALLS == before + 1


# --- DPO -------------------------------------------------------------------------------------------
# DPOTrainer built without a model as GRPO's above: the policy and the reference are stubs that
# return the fused head's per-token outputs (log-probs 0 where the label is -100, as TRL's head).

P = 5  # pairs


def _preference_trainer(cls, config, options, training):
    """A DPO / KTO trainer (``_bare_trainer``) with the attributes both losses read; a Module for a
    model (accelerate's is_peft_model reads one). Returns (trainer, args)."""
    trainer, args = _bare_trainer(cls, config, options)
    trainer.accelerator.device = torch.device("cpu")
    trainer.model = torch.nn.Module().train(training)
    trainer.model.is_gradient_checkpointing = False
    trainer.beta = args.beta
    trainer.precompute_ref_logps = args.precompute_ref_log_probs
    trainer.aux_loss_enabled = options.get("aux", False)
    trainer.router_aux_loss_coef = 0.01
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    return trainer, args


def _dpo_batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n, width = 2 * P, T + 1
    start = torch.randint(0, 4, (n,), generator=g)
    start[1] = start[P + 3] = 0  # completions from position 0: the shifted mask has one token less
    end = start + torch.randint(3, T - 2, (n,), generator=g)
    pos = torch.arange(width)[None, :]
    completion_mask = ((pos >= start[:, None]) & (pos < end[:, None])).long()
    shift = completion_mask[:, 1:].to(dtype)
    lp = (-torch.rand(n, T, generator=g, dtype=torch.float64) * 2.0).to(dtype) * shift
    ref = (lp.double() + torch.randn(n, T, generator=g, dtype=torch.float64) * 0.3).to(dtype) * shift
    extra = dict(entropy=torch.rand(n, T, generator=g) * 3, mean_logits=torch.randn(n, T, generator=g),
                 is_top1=torch.rand(n, T, generator=g) > 0.5,
                 log_sum_sq_probs=(-torch.rand(n, T, generator=g, dtype=torch.float64) * 1.5).to(dtype))
    return dict(lp=lp, ref=ref, completion_mask=completion_mask, extra=extra,
                input_ids=torch.zeros(n, width, dtype=torch.long),
                attention_mask=torch.ones(n, width, dtype=torch.long))


def _dpo_attributes(trainer, args):
    """What DPOTrainer.__init__ derives from its args and _compute_loss reads (a single loss_type
    becomes a list, as DPOConfig.__post_init__ makes it)."""
    if isinstance(args.loss_type, str):
        args.loss_type = [args.loss_type]
    trainer.loss_types = args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(args.loss_type)
    trainer.ld_alpha = args.ld_alpha
    trainer.f_divergence_type = args.f_divergence_type
    trainer.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    trainer.label_smoothing = args.label_smoothing
    trainer.use_weighting = args.use_weighting


def _dpo(options, b, training=True):
    dpo = import_peer("trl.trainer.dpo_trainer")
    trainer, args = _preference_trainer(dpo.DPOTrainer, ("trl.trainer.dpo_config", "DPOConfig"), options, training)
    _dpo_attributes(trainer, args)
    lp = b["lp"].clone().requires_grad_()

    def policy(**kwargs):
        assert kwargs["fused_lm_head"] and kwargs["labels"].shape == b["input_ids"].shape
        assert ("output_router_logits" in kwargs) == trainer.aux_loss_enabled
        # the head's log-probs are 0, with no gradient, where the label is -100
        shift = (kwargs["labels"][:, 1:] != -100).to(lp.dtype)
        return types.SimpleNamespace(log_probs=lp * shift, aux_loss=torch.tensor(0.4), **b["extra"])

    def reference(**kwargs):
        assert not torch.is_grad_enabled() and "output_router_logits" not in kwargs
        return types.SimpleNamespace(log_probs=b["ref"])

    trainer.ref_model = reference
    return trainer, policy, lp


def _dpo_inputs(b, trainer):
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
              "completion_mask": b["completion_mask"]}
    if trainer.precompute_ref_logps:  # as TRL's precompute: the reference's sums (LD-weighted too)
        from rlkern.integrations._trl_loss import _sequence_logps

        sums, _ = _sequence_logps(trainer, b["ref"], b["completion_mask"][:, 1:])
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = sums.chunk(2)
    return inputs


def _preference_compare(trainer, ours_name, build, b, inputs_of, training, rtol, atol, fallback, nan_ok):
    """TRL's own ``trainer._compute_loss`` against rlkern's (``_trl_loss.<ours_name>``) on two
    trainers built alike by ``build`` from the batch ``b``: the loss, the log-probs' gradient and
    every metric (the same keys in the same order); rlkern ran unless ``fallback``. Returns (TRL's
    metrics, TRL's loss)."""
    trl_loss_mod = pytest.importorskip("rlkern.integrations._trl_loss")
    theirs, model_t, lp_t = build(b, training)
    ours, model_o, lp_o = build(b, training)
    inputs = inputs_of(b, theirs)
    ref_loss = trl_loss_mod._original(trainer)(theirs, model_t, inputs, False)
    ref_loss.backward()
    before = trl_loss_mod.CALLS
    our_loss = getattr(trl_loss_mod, ours_name)(ours, model_o, inputs, False)
    our_loss.backward()
    assert trl_loss_mod.CALLS == before + (0 if fallback else 1), "rlkern did not compute the loss"
    torch.testing.assert_close(our_loss.double(), ref_loss.double(), rtol=rtol, atol=atol, equal_nan=fallback)
    torch.testing.assert_close(lp_o.grad.double(), lp_t.grad.double(), rtol=rtol, atol=atol, equal_nan=fallback)
    mode = "train" if training else "eval"
    want, got = dict(theirs._metrics[mode]), dict(ours._metrics[mode])
    assert list(got) == list(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=atol, nan_ok=nan_ok), key
    return want, ref_loss


def _dpo_compare(options, seed=0, dtype=torch.float32, training=True, rtol=2e-5, atol=2e-6, fallback=False):
    dpo = import_peer("trl.trainer.dpo_trainer")
    want, ref_loss = _preference_compare(dpo.DPOTrainer, "dpo_compute_loss", lambda b, t: _dpo(options, b, t),
                                         _dpo_batch(seed, dtype), _dpo_inputs, training, rtol, atol, fallback,
                                         nan_ok=True)
    return want, float(ref_loss.detach())


DPO_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types(loss_type):
    options = {"loss_type": loss_type, "beta": 0.3}
    if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired"):
        options["label_smoothing"] = 0.15
    logged, _ = _dpo_compare(options, seed=20)
    assert 0 < logged["rewards/accuracies"][-1] < 1  # the pairs go both ways


@pytest.mark.peer
@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "discopop"])
def test_dpo_f_divergences(f_divergence, loss_type):
    _dpo_compare({"loss_type": loss_type, "f_divergence_type": f_divergence, "f_alpha_divergence_coef": 0.6,
                  "beta": 0.5}, seed=21)


@pytest.mark.peer
@pytest.mark.parametrize("options", [
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # MPO
    {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 0.5]},  # sft's shifted lengths, ipo's unshifted
    {"loss_type": ["sigmoid_norm", "sft", "sft"], "loss_weights": [1.0, 0.3, 0.2]},
    {"loss_type": "sigmoid", "ld_alpha": 0.5},
    {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.3},  # sft on the plain sums, sigmoid on LD's
    {"loss_type": ["ipo", "robust"], "ld_alpha": 0.7, "label_smoothing": 0.1},
    {"loss_type": "sigmoid", "use_weighting": True},
    {"loss_type": ["ipo", "sigmoid_norm"], "use_weighting": True},
    {"loss_type": ["aot", "apo_zero"], "label_smoothing": 0.3, "precompute_ref_log_probs": True},
    {"loss_type": "sigmoid", "precompute_ref_log_probs": True, "ld_alpha": 0.5},
    {"loss_type": ["sigmoid", "exo_pair"], "label_smoothing": 0.5, "aux": True},
], ids=["mpo", "ipo_sft", "sigmoid_norm_sft2", "ld_alpha", "ld_alpha_sft", "ld_alpha_ipo_robust", "wpo",
        "wpo_ipo_sigmoid_norm", "aot_precompute", "precompute_ld", "aux_loss"])
def test_dpo_options(options):
    _dpo_compare(dict(options), seed=22)


@pytest.mark.peer
def test_dpo_eval_mode_and_bf16():
    _dpo_compare({"loss_type": ["sigmoid", "sft"]}, seed=23, training=False)
    # TRL computes in bfloat16, rlkern in float32: the bound is bf16's rounding
    _dpo_compare({"loss_type": ["sigmoid", "ipo"]}, seed=24, dtype=torch.bfloat16, rtol=2e-2, atol=2e-2)


@pytest.mark.peer
@pytest.mark.parametrize("options", [
    {"loss_type": "robust", "label_smoothing": 0.6},  # TRL only warns; rlkern takes < 0.5
    {"loss_type": "aot", "label_smoothing": 0.7},
    {"loss_type": "sft", "ld_alpha": 0.5},  # logged sums LD-weighted, the loss of plain ones
], ids=["robust_ls_0.6", "aot_ls_0.7", "sft_only_ld_alpha"])
def test_dpo_inexpressible_configurations_run_trl(options):
    _dpo_compare(dict(options), seed=25, fallback=True)


@pytest.mark.peer
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_dpo_other_backends(monkeypatch, backend_name):
    from rlkern import _backend

    if backend_name == "triton" and not _backend.triton_interpreted():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("RLKERN_BACKEND", backend_name)
    _dpo_compare({"loss_type": ["sigmoid", "ipo", "sft"], "loss_weights": [1.0, 0.5, 0.2], "ld_alpha": 0.6},
                 seed=26, rtol=1e-5, atol=1e-5)
    _dpo_compare({"loss_type": ["discopop", "sigmoid_norm"], "use_weighting": True,
                  "f_divergence_type": "js_divergence"}, seed=27, rtol=1e-5, atol=1e-5)


@pytest.mark.peer
@pytest.mark.parametrize("loss_type", [["sigmoid", "sft"], ["hinge"]], ids=["sigmoid_sft", "hinge"])
def test_dpo_weighting_where_trl_raises(loss_type):
    # TRL 1.16 multiplies the per-pair loss in place by the WPO weights: sft's is an expanded
    # (stride-0) tensor, hinge's is relu's output, which its backward needs; TRL raises. rlkern
    # computes the weighted loss, checked here in float64 from the batch
    trl_loss_mod = pytest.importorskip("rlkern.integrations._trl_loss")
    dpo = import_peer("trl.trainer.dpo_trainer")
    b = _dpo_batch(28)
    options = {"loss_type": loss_type, "use_weighting": True, "beta": 0.2}
    theirs, model_t, _ = _dpo(options, b)
    ours, model_o, lp = _dpo(options, b)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor|modified by an inplace"):
        trl_loss_mod._original(dpo.DPOTrainer)(theirs, model_t, _dpo_inputs(b, theirs), False).backward()
    before = trl_loss_mod.CALLS
    loss = trl_loss_mod.dpo_compute_loss(ours, model_o, _dpo_inputs(b, ours), False)
    loss.backward()
    assert trl_loss_mod.CALLS == before + 1 and lp.grad is not None
    shift = b["completion_mask"][:, 1:].double()
    lp64, ref64 = b["lp"].double() * shift, b["ref"].double() * shift
    aligned = (lp64 - b["extra"]["log_sum_sq_probs"].double()) * shift
    w = torch.exp(aligned.sum(1) / shift.sum(1).clamp(min=1))
    pair_w = w[:P] * w[P:]
    ratio = lp64.sum(1) - ref64.sum(1)
    x = 0.2 * (ratio[:P] - ratio[P:])
    if loss_type == ["hinge"]:
        want = (torch.relu(1 - x) * pair_w).mean()
    else:
        nll = -lp64[:P].sum() / shift[:P].sum()
        want = (torch.nn.functional.softplus(-x) * pair_w).mean() + (nll * pair_w).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


# --- KTO -------------------------------------------------------------------------------------------

N_KTO = 8


def _kto_batch(seed=0, dtype=torch.float32, labels=None):
    g = torch.Generator().manual_seed(seed)
    width = T + 1
    pos = torch.arange(width)[None, :]

    def mask(n):
        start = torch.randint(1, 4, (n,), generator=g)
        end = start + torch.randint(2, T - 2, (n,), generator=g)
        return ((pos >= start[:, None]) & (pos < end[:, None])).long()

    completion_mask, kl_mask = mask(N_KTO), mask(N_KTO)

    def per_token(m, spread=None, base=None):
        noise = -torch.rand(N_KTO, T, generator=g, dtype=torch.float64) * 2.0 if base is None else \
            base.double() + torch.randn(N_KTO, T, generator=g, dtype=torch.float64) * spread
        return noise.to(dtype) * m[:, 1:].to(dtype)

    lp, kl_lp = per_token(completion_mask), per_token(kl_mask)
    ref, ref_kl = per_token(completion_mask, 0.3, lp), per_token(kl_mask, 0.3, kl_lp) - 0.05 * kl_mask[:, 1:]
    if labels is None:
        labels = torch.tensor([True, False, True, True, False, False, True, False])
    extra = dict(entropy=torch.rand(N_KTO, T, generator=g) * 3, mean_logits=torch.randn(N_KTO, T, generator=g))
    return dict(lp=lp, ref=ref, kl_lp=kl_lp, ref_kl=ref_kl, completion_mask=completion_mask, kl_mask=kl_mask,
                labels=labels, extra=extra, input_ids=torch.zeros(N_KTO, width, dtype=torch.long),
                kl_ids=torch.ones(N_KTO, width, dtype=torch.long))


def _kto(options, b, training=True):
    kto = import_peer("trl.trainer.kto_trainer")
    trainer, args = _preference_trainer(kto.KTOTrainer, ("trl.trainer.kto_config", "KTOConfig"), options, training)
    trainer.loss_type = args.loss_type
    trainer.desirable_weight = args.desirable_weight
    trainer.undesirable_weight = args.undesirable_weight
    trainer.calculate_KL = options.get("calculate_KL", args.loss_type == "kto")
    lp = b["lp"].clone().requires_grad_()

    def run(per_token, kl_per_token, **kwargs):
        shift = (kwargs["labels"][:, 1:] != -100).to(per_token.dtype)
        if kwargs["input_ids"] is b["kl_ids"]:
            return types.SimpleNamespace(log_probs=kl_per_token * shift)
        return types.SimpleNamespace(log_probs=per_token * shift, aux_loss=torch.tensor(0.3), **b["extra"])

    def reference(**kwargs):
        assert not torch.is_grad_enabled()
        return run(b["ref"], b["ref_kl"], **kwargs)

    trainer.ref_model = reference
    return trainer, (lambda **kwargs: run(lp, b["kl_lp"], **kwargs)), lp


def _kto_inputs(b, trainer):
    inputs = {"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"]),
              "completion_mask": b["completion_mask"], "label": b["labels"]}
    if trainer.calculate_KL:
        inputs.update(KL_input_ids=b["kl_ids"], KL_attention_mask=torch.ones_like(b["kl_ids"]),
                      KL_completion_mask=b["kl_mask"])
    if trainer.precompute_ref_logps:
        inputs["ref_logps"] = (b["ref"] * b["completion_mask"][:, 1:]).sum(-1)
        if trainer.calculate_KL:
            inputs["ref_KL_logps"] = (b["ref_kl"] * b["kl_mask"][:, 1:]).sum(-1)
    return inputs


def _kto_compare(options, seed=0, dtype=torch.float32, training=True, labels=None, rtol=2e-5, atol=2e-6):
    kto = import_peer("trl.trainer.kto_trainer")
    return _preference_compare(kto.KTOTrainer, "kto_compute_loss", lambda b, t: _kto(options, b, t),
                               _kto_batch(seed, dtype, labels), _kto_inputs, training, rtol, atol, fallback=False,
                               nan_ok=False)[0]


@pytest.mark.peer
@pytest.mark.parametrize("options", [
    {"loss_type": "kto"},
    {"loss_type": "kto", "desirable_weight": 1.33, "undesirable_weight": 0.7, "beta": 0.3},
    {"loss_type": "apo_zero_unpaired", "desirable_weight": 0.8},
    {"loss_type": "kto", "calculate_KL": False},
    {"loss_type": "kto", "precompute_ref_log_probs": True},
    {"loss_type": "apo_zero_unpaired", "precompute_ref_log_probs": True, "aux": True},
], ids=["kto", "kto_weights", "apo_zero_unpaired", "kto_no_kl", "kto_precompute", "apo_precompute_aux"])
def test_kto_loss(options):
    logged = _kto_compare(dict(options), seed=30)
    if options["loss_type"] == "kto" and options.get("calculate_KL", True):
        assert logged["kl"][-1] > 0  # the reference point is exercised


@pytest.mark.peer
def test_kto_one_group_eval_and_bf16():
    _kto_compare({"loss_type": "kto"}, seed=31, labels=torch.ones(N_KTO, dtype=torch.bool))
    _kto_compare({"loss_type": "kto", "undesirable_weight": 1.5}, seed=32, labels=torch.zeros(N_KTO, dtype=torch.bool),
                 training=False)
    _kto_compare({"loss_type": "kto"}, seed=33, dtype=torch.bfloat16, rtol=2e-2, atol=2e-2)
