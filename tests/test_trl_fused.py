"""``rlkern.integrations.trl.patch(loss="fused")``: GRPOTrainer._compute_loss through
``rlkern.linear_policy_loss`` and DPOTrainer._compute_loss through
``rlkern.linear_preference_loss`` (the policy's hidden states and LM head), against TRL 1.16's
own ``_compute_loss`` unpatched.

Trainers without their ``__init__`` (as tests/test_trl_loss.py builds them) holding real tiny
Qwen2 models with TRL's fused head (``add_fused_lm_head``) and TRL's own forwards; the same
weights in both runs. Compared: the loss, the gradient of every model parameter and every
``_metrics`` entry, in float32 and under bf16 autocast (and GRPO's ``cast_lm_head_to_fp32``),
and which path ran (the call counters). Then TRL's real GRPOTrainer / DPOTrainer, two SGD steps
each, patched against unpatched (tests/test_trl_trainers.py's ``_train``).
"""

from collections import defaultdict

import pytest
import torch

from _tiny_models import tiny_qwen2, tiny_tokenizer
from conftest import import_peer
from test_trl_loss import _bare_trainer, _dpo_attributes, _grpo_attributes

trl_utils = import_peer("trl.trainer.utils")
grpo_mod = import_peer("trl.trainer.grpo_trainer")
import rlkern.integrations.trl as rt  # noqa: E402
from rlkern.integrations import _trl_loss  # noqa: E402

B, P, K = 4, 3, 7


def _model(cast_fp32=False):
    model = tiny_qwen2(tiny_tokenizer(), seed=0)
    trl_utils.add_fused_lm_head(model, temperature=0.9, cast_lm_head_to_fp32=cast_fp32,
                                outputs=("log_probs", "entropy"))
    return model


def _trainer(model, options, precision):
    t, args = _bare_trainer(grpo_mod.GRPOTrainer, ("trl.trainer.grpo_config", "GRPOConfig"),
                            {"steps_per_generation": 4, **options})
    _grpo_attributes(t, args)
    t.accelerator.is_main_process = True
    t.accelerator.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else \
        (lambda: torch.autocast("cpu", enabled=False))
    t.model = model
    t.use_vllm = False
    t.max_completion_length = K + 2
    t._last_world_entropy = float("inf")
    t.aux_loss_enabled = False
    return t


def _inputs(model, options, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(5, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, 0] = 0  # left padding
    completion_ids = torch.randint(5, vocab, (B, K), generator=g)
    lengths = torch.tensor([K, 4, 1, 6])
    completion_mask = (torch.arange(K)[None] < lengths[:, None]).long()
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                  num_items_in_batch=completion_mask.sum().float() * 3)
    if options.pop("old", True):  # off-policy: the log-probs of an older policy
        inputs["old_per_token_logps"] = -torch.rand(B, K, generator=g) * 4 - 1
    if options.get("beta", 0.0):
        inputs["ref_per_token_logps"] = -torch.rand(B, K, generator=g) * 4 - 1
    return inputs


def _backward(loss, model):
    """Runs the backward of ``loss``: (the loss, every parameter's gradient), in float64."""
    loss.backward()
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().double(), grads


def _step(compute, options, precision, cast_fp32):
    model = _model(cast_fp32)
    trainer = _trainer(model, options, precision)
    return *_backward(compute(trainer, model, _inputs(model, dict(options))), model), dict(trainer._metrics["train"])


def _assert_step_close(ours, ref, rtol, atol, grad_rtol, metrics_in_order):
    """(loss, gradients, metrics) of two steps: the loss and the metrics within rtol / atol, every
    gradient within grad_rtol of the parameter's largest; the same metric keys, in the same order
    where ``metrics_in_order``."""
    torch.testing.assert_close(ours[0], ref[0], rtol=rtol, atol=atol)
    assert sorted(ours[1]) == sorted(ref[1])
    for name in ref[1]:
        scale = ref[1][name].abs().max().item()
        gap = (ours[1][name] - ref[1][name]).abs().max().item()
        assert gap <= grad_rtol * scale + 1e-9, (name, gap, scale)
    if metrics_in_order:
        assert list(ours[2]) == list(ref[2])
    else:
        assert sorted(ours[2]) == sorted(ref[2])
    for key in ref[2]:
        assert ours[2][key] == pytest.approx(ref[2][key], rel=rtol, abs=atol, nan_ok=True), key


def _fallback_step(cls, step, options):
    """``step`` with patch(loss="fused") on a configuration the fused loss does not take: the
    loss=True path (rlkern's loss on TRL's log-probs) runs instead, once."""
    rt.patch(loss="fused")
    try:
        fused, plain = rt.calls[f"{cls.__name__}._compute_loss[fused]"], rt.calls[f"{cls.__name__}._compute_loss"]
        ours = step(cls._compute_loss, dict(options), "fp32")
        assert rt.calls[f"{cls.__name__}._compute_loss[fused]"] == fused
        assert rt.calls[f"{cls.__name__}._compute_loss"] == plain + 1
    finally:
        rt.unpatch()
    return ours


CASES = [
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="dapo", old=False),  # on-policy: old log-probs are the new ones
    dict(loss_type="dr_grpo", entropy_coef=0.01),
    dict(loss_type="bnpo", importance_sampling_level="sequence"),
    dict(loss_type="cispo", epsilon_high=4.0),
    dict(loss_type="sapo"),
    dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.04),
]


@pytest.mark.peer
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-lm-head-fp32"])
@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_grpo_fused_loss_matches_trl(options, precision):
    cast_fp32 = precision == "bf16-lm-head-fp32"
    autocast = "fp32" if precision == "fp32" else "bf16"
    rt.unpatch()
    ref = _step(_trl_loss._original(grpo_mod.GRPOTrainer), dict(options), autocast, cast_fp32)
    rt.patch(loss="fused")
    try:
        before = rt.calls["GRPOTrainer._compute_loss[fused]"]
        ours = _step(grpo_mod.GRPOTrainer._compute_loss, dict(options), autocast, cast_fp32)
        assert rt.calls["GRPOTrainer._compute_loss[fused]"] == before + 1, "the fused loss did not run"
    finally:
        rt.unpatch()
    # Measured (TRL 1.16, torch 2.13 CPU): losses and metrics within 1.7e-6 relative in every
    # precision; gradients within 8e-7 of each parameter's largest in fp32, and under bf16 up to
    # 3.7e-3: a 1e-7 difference of the head's fp32 gradient that rounds the other way into the
    # bf16 backbone moves an element by one bf16 ulp (2**-8 relative)
    _assert_step_close(ours, ref, 2e-5, 2e-6, 2e-5 if autocast == "fp32" else 1e-2, metrics_in_order=False)


@pytest.mark.peer
@pytest.mark.parametrize("options", [dict(loss_type="vespo"), dict(top_entropy_quantile=0.5, entropy_coef=0.01)],
                         ids=["vespo", "entropy-quantile"])
def test_grpo_fused_falls_back_to_loss_true(options):
    # configurations that read the per-token log-probs / entropies outside the loss run the
    # loss=True path (policy_loss on TRL's log-probs), still on rlkern
    ours = _fallback_step(grpo_mod.GRPOTrainer, lambda f, o, precision: _step(f, o, precision, False), options)
    ref = _step(_trl_loss._original(grpo_mod.GRPOTrainer), dict(options), "fp32", False)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=2e-6)


@pytest.mark.peer
def test_grpo_fused_falls_back_under_zero3(monkeypatch):
    # ZeRO-3 partitions the head outside TRL's gather context: the adapter scores the tokens
    # itself and the loss=True path runs (ZeRO-3 faked: the flag on, TRL's gather a no-op)
    import contextlib

    deepspeed_utils = import_peer("transformers.integrations.deepspeed")
    options = dict(loss_type="grpo", beta=0.04)
    ref = _step(_trl_loss._original(grpo_mod.GRPOTrainer), dict(options), "fp32", False)
    monkeypatch.setattr(deepspeed_utils, "is_deepspeed_zero3_enabled", lambda: True)
    monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", lambda *params: contextlib.nullcontext())
    ours = _fallback_step(grpo_mod.GRPOTrainer, lambda f, o, precision: _step(f, o, precision, False), options)
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=2e-6)
    for name in ref[1]:
        torch.testing.assert_close(ours[1][name], ref[1][name], rtol=2e-5, atol=2e-5 * ref[1][name].abs().max().item())


# --- DPO ---------------------------------------------------------------------------------------

dpo_mod = import_peer("trl.trainer.dpo_trainer")
NP, L = 3, 11  # pairs, sequence length


def _dpo_models(use_weighting):
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if use_weighting else ())
    policy, ref = tiny_qwen2(tiny_tokenizer(), seed=0), tiny_qwen2(tiny_tokenizer(), seed=1)
    trl_utils.add_fused_lm_head(policy, outputs=outputs)
    trl_utils.add_fused_lm_head(ref)
    return policy, ref


def _preference_trainer(cls, config, policy, ref, options):
    """A DPO / KTO trainer (test_trl_loss's ``_bare_trainer``) holding the two models, with the
    attributes both losses read. Returns (trainer, args)."""
    t, args = _bare_trainer(cls, config, options)
    t.accelerator.device = torch.device("cpu")
    t.accelerator.unwrap_model = lambda m: m
    t.model, t.ref_model = policy, ref
    t.beta = args.beta
    t.precompute_ref_logps = False
    t.aux_loss_enabled = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens = 0
    t._tp_size = 1
    return t, args


def _dpo_trainer(policy, ref, options):
    t, args = _preference_trainer(dpo_mod.DPOTrainer, ("trl.trainer.dpo_config", "DPOConfig"), policy, ref, options)
    _dpo_attributes(t, args)
    return t


def _dpo_inputs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 2 * NP
    input_ids = torch.randint(5, vocab, (n, L), generator=g)
    start = torch.tensor([3, 4, 2, 3, 5, 4])
    end = torch.tensor([L, 8, 9, 6, L, 10])
    pos = torch.arange(L)[None]
    completion_mask = ((pos >= start[:, None]) & (pos < end[:, None])).long()
    attention_mask = (pos < end[:, None]).long()
    return dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)


def _dpo_step(compute, options, precision):
    policy, ref = _dpo_models(options.get("use_weighting", False))
    trainer = _dpo_trainer(policy, ref, options)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = compute(trainer, policy, _dpo_inputs(policy.config.vocab_size), False)
    return *_backward(loss, policy), dict(trainer._metrics["train"])


DPO_CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="ipo"),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[0.7, 0.3]),
    dict(loss_type="aot"),  # a batch-wide loss type: linear_preference_loss's global chunking
    dict(loss_type="hinge", ld_alpha=0.5),
    dict(loss_type="sigmoid", use_weighting=True),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.4),
]


@pytest.mark.peer
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("options", DPO_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_dpo_fused_loss_matches_trl(options, precision):
    # Under bf16 autocast TRL rounds every logits tile to bf16: linear_preference_loss(logits_dtype=
    # torch.bfloat16) rounds its tiles as TRL's, so that step runs fused as well.
    rt.unpatch()
    ref = _dpo_step(_trl_loss._original(dpo_mod.DPOTrainer), dict(options), precision)
    rt.patch(loss="fused")
    try:
        before = rt.calls["DPOTrainer._compute_loss[fused]"], rt.calls["DPOTrainer._compute_loss"]
        ours = _dpo_step(dpo_mod.DPOTrainer._compute_loss, dict(options), precision)
        assert rt.calls["DPOTrainer._compute_loss[fused]"] == before[0] + 1
        assert rt.calls["DPOTrainer._compute_loss"] == before[1] + 1, "rlkern did not compute the loss"
    finally:
        rt.unpatch()
    # Measured (TRL 1.16, torch 2.13 CPU), fp32: losses within 4.5e-7 relative, gradients 2.2e-6
    # of each parameter's largest (TRL against itself with chunk_size 97: 3e-6). bf16: gradients
    # within 1e-2 (one bf16 ulp of the backbone flipped; TRL against its chunk 97: 4.8e-3)
    _assert_step_close(ours, ref, 2e-5, 2e-6, 2e-5 if precision == "fp32" else 1e-2, metrics_in_order=True)


@pytest.mark.peer
def test_dpo_fused_falls_back_to_loss_true_for_sft():
    options = dict(loss_type=["sigmoid", "sft"])
    ours = _fallback_step(dpo_mod.DPOTrainer, _dpo_step, options)
    ref = _dpo_step(_trl_loss._original(dpo_mod.DPOTrainer), dict(options), "fp32")
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=2e-6)


@pytest.mark.peer
@pytest.mark.parametrize("trainer", ["grpo", "dpo"])
def test_fused_losses_on_the_compact_layout(trainer, monkeypatch):
    # On CUDA / XPU TRL's fused head hands only the scored rows (hidden_states[mask]); the loss
    # scatters them back to [rows, T - 1, H]. That layout, forced on the CPU (TRL's own tiles
    # stay its torch ones: trl/kernels/chunked_logprob.py has its own _use_triton).
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    if trainer == "grpo":
        options, step, cls = dict(loss_type="dr_grpo", beta=0.04), lambda f, o: _step(f, o, "fp32", False), \
            grpo_mod.GRPOTrainer
    else:
        options, step, cls = dict(loss_type="sigmoid"), lambda f, o: _dpo_step(f, o, "fp32"), dpo_mod.DPOTrainer
    key = f"{cls.__name__}._compute_loss[fused]"
    captured = []  # the heads lists capture() hands the losses
    enter = rt._Capture.__enter__
    monkeypatch.setattr(rt._Capture, "__enter__", lambda self: captured.append(enter(self)) or captured[-1])
    rt.unpatch()
    ref = step(_trl_loss._original(cls), dict(options))
    rt.patch(loss="fused")
    try:
        before = rt.calls[key]
        ours = step(cls._compute_loss, dict(options))
        assert rt.calls[key] == before + 1
    finally:
        rt.unpatch()
    rows = captured[-1][0]["hidden"].shape[0]
    assert rows < {"grpo": B * (P + K - 1), "dpo": 2 * NP * (L - 1)}[trainer], rows  # only the scored rows
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=2e-6)
    for name in ref[1]:
        gap = (ours[1][name] - ref[1][name]).abs().max().item()
        assert gap <= 2e-5 * ref[1][name].abs().max().item() + 1e-9, (name, gap)
    for k in ref[2]:
        assert ours[2][k] == pytest.approx(ref[2][k], rel=2e-5, abs=2e-6), k


@pytest.mark.peer
@pytest.mark.parametrize("trainer", ["grpo", "dpo"])
def test_fused_losses_under_fp32_tiles(trainer):
    # patch(fp32=True): fp32 tiles whatever the autocast, so under bf16 autocast DPO runs fused
    # too; the fused step equals the loss=True step of the same fp32 mode (rlkern's own path)
    if trainer == "grpo":
        options, step, cls = dict(loss_type="grpo", beta=0.04), lambda f, o: _step(f, o, "bf16", False), \
            grpo_mod.GRPOTrainer
    else:
        options, step, cls = dict(loss_type="sigmoid"), lambda f, o: _dpo_step(f, o, "bf16"), dpo_mod.DPOTrainer
    runs = {}
    for loss in (True, "fused"):
        rt.unpatch()
        rt.patch(fp32=True, loss=loss)
        try:
            before = rt.calls[f"{cls.__name__}._compute_loss[fused]"]
            runs[loss] = step(cls._compute_loss, dict(options))
            assert rt.calls[f"{cls.__name__}._compute_loss[fused]"] == before + (loss == "fused")
        finally:
            rt.unpatch()
    ours, ref = runs["fused"], runs[True]
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=2e-6)
    for name in ref[1]:  # the backbone's backward runs in bf16: one ulp flipped, as above
        gap = (ours[1][name] - ref[1][name]).abs().max().item()
        assert gap <= 1e-2 * ref[1][name].abs().max().item() + 1e-9, (name, gap)
    for k in ref[2]:
        assert ours[2][k] == pytest.approx(ref[2][k], rel=2e-5, abs=2e-6), k


# --- KTO ---------------------------------------------------------------------------------------

kto_mod = import_peer("trl.trainer.kto_trainer")
NK = 5  # completions (unpaired)


def _kto_models():
    policy, ref = tiny_qwen2(tiny_tokenizer(), seed=0), tiny_qwen2(tiny_tokenizer(), seed=1)
    trl_utils.add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits"))  # as KTOTrainer does
    trl_utils.add_fused_lm_head(ref)
    return policy, ref


def _kto_trainer(policy, ref, options):
    t, args = _preference_trainer(kto_mod.KTOTrainer, ("trl.trainer.kto_config", "KTOConfig"), policy, ref, options)
    t.loss_type = args.loss_type
    t.desirable_weight, t.undesirable_weight = args.desirable_weight, args.undesirable_weight
    t.calculate_KL = args.loss_type == "kto"
    return t


def _kto_inputs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(L)[None]

    def batch(start, end):
        ids = torch.randint(5, vocab, (NK, L), generator=g)
        return ids, ((pos >= start[:, None]) & (pos < end[:, None])).long(), (pos < end[:, None]).long()

    ids, completion_mask, attention_mask = batch(torch.tensor([3, 4, 2, 3, 5]), torch.tensor([L, 8, 9, 6, L]))
    kl_ids, kl_mask, kl_attention = batch(torch.tensor([2, 3, 4, 3, 2]), torch.tensor([9, L, 7, L, 8]))
    return dict(input_ids=ids, attention_mask=attention_mask, completion_mask=completion_mask,
                label=torch.tensor([True, False, True, False, False]), KL_input_ids=kl_ids,
                KL_attention_mask=kl_attention, KL_completion_mask=kl_mask)


def _kto_step(compute, options, precision):
    policy, ref = _kto_models()
    trainer = _kto_trainer(policy, ref, options)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = compute(trainer, policy, _kto_inputs(policy.config.vocab_size), False)
    return *_backward(loss, policy), dict(trainer._metrics["train"])


@pytest.mark.peer
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("options", [
    dict(loss_type="kto", beta=0.3),
    dict(loss_type="kto", desirable_weight=1.4, undesirable_weight=0.7),
    dict(loss_type="apo_zero_unpaired", beta=0.2),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_kto_fused_loss_matches_trl(options, precision):
    rt.unpatch()
    ref = _kto_step(_trl_loss._original(kto_mod.KTOTrainer), dict(options), precision)
    rt.patch(loss="fused")
    try:
        assert kto_mod.KTOTrainer._compute_loss is _trl_loss.kto_fused_compute_loss
        before = rt.calls["KTOTrainer._compute_loss[fused]"], rt.calls["KTOTrainer._compute_loss"]
        ours = _kto_step(kto_mod.KTOTrainer._compute_loss, dict(options), precision)
        assert rt.calls["KTOTrainer._compute_loss[fused]"] == before[0] + 1, "linear_kto_loss did not run"
        assert rt.calls["KTOTrainer._compute_loss"] == before[1] + 1
    finally:
        rt.unpatch()
    # as DPO: fp32 within TRL's own chunking noise; bf16 (TRL's bf16 tiles through logits_dtype)
    # within one bf16 ulp of the backbone's backward
    _assert_step_close(ours, ref, 2e-5, 2e-6, 2e-5 if precision == "fp32" else 1e-2, metrics_in_order=True)


# --- a PEFT LoRA adapter on the head ------------------------------------------------------------


def _peft(model, dropout):
    peft = import_peer("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["lm_head", "q_proj"],
                             init_lora_weights=False)
    torch.manual_seed(3)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():  # B is zero-initialized by default elsewhere: make the adapter count
        model.get_output_embeddings().lora_B["default"].weight.normal_(0, 0.5)
    return model


def _lora_step(trainer_name, compute, options, dropout):
    if trainer_name == "grpo":
        model = _peft(_model(), dropout)
        trainer = _trainer(model, options, "fp32")
        args = (trainer, model, _inputs(model, dict(options)))
    elif trainer_name == "dpo":
        policy, ref = _dpo_models(False)
        model = _peft(policy, dropout)
        trainer = _dpo_trainer(model, ref, options)
        args = (trainer, model, _dpo_inputs(policy.config.vocab_size), False)
    else:
        policy, ref = _kto_models()
        model = _peft(policy, dropout)
        trainer = _kto_trainer(model, ref, options)
        args = (trainer, model, _kto_inputs(policy.config.vocab_size), False)
    model.train(dropout > 0)
    torch.manual_seed(11)  # the same dropout masks in both runs
    loss, grads = _backward(compute(*args), model)
    assert any("lm_head.lora_A" in n for n in grads) and not any("lm_head.base_layer" in n for n in grads)
    return loss, grads


@pytest.mark.peer
@pytest.mark.parametrize("trainer_name,options,dropout", [
    ("grpo", dict(loss_type="grpo", beta=0.04), 0.0),
    ("dpo", dict(loss_type="sigmoid"), 0.2),
    ("kto", dict(loss_type="kto"), 0.0),
])
def test_fused_losses_take_a_lora_head(trainer_name, options, dropout):
    """A PEFT LoRA adapter on lm_head (and q_proj): the fused losses add it tile by tile
    (lora_A / lora_B / lora_hidden, its dropout drawn once) and equal the loss=True step, in
    which rlkern's fused head applies the adapter (TRL's own drops it: no TRL baseline)."""
    cls = {"grpo": grpo_mod.GRPOTrainer, "dpo": dpo_mod.DPOTrainer, "kto": kto_mod.KTOTrainer}[trainer_name]
    runs = {}
    for loss in (True, "fused"):
        rt.unpatch()
        rt.patch(loss=loss)
        try:
            fused, lora = rt.calls[f"{cls.__name__}._compute_loss[fused]"], rt.calls["ChunkedLogProbFunction[lora]"]
            runs[loss] = _lora_step(trainer_name, cls._compute_loss, dict(options), dropout)
            assert rt.calls[f"{cls.__name__}._compute_loss[fused]"] == fused + (loss == "fused")
            assert rt.calls["ChunkedLogProbFunction[lora]"] > lora
        finally:
            rt.unpatch()
    ours, ref = runs["fused"], runs[True]
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-5, atol=2e-6)
    assert sorted(ours[1]) == sorted(ref[1])
    for name in ref[1]:
        gap = (ours[1][name] - ref[1][name]).abs().max().item()
        assert gap <= 2e-5 * ref[1][name].abs().max().item() + 1e-9, (name, gap)


def test_patch_loss_option():
    with pytest.raises(TypeError, match="^patch: loss"):
        rt.patch(loss="yes")
    assert not rt.is_patched()
    rt.patch(loss="fused")
    try:
        assert grpo_mod.GRPOTrainer._compute_loss is _trl_loss.grpo_fused_compute_loss
        assert dpo_mod.DPOTrainer._compute_loss is _trl_loss.dpo_fused_compute_loss
        assert kto_mod.KTOTrainer._compute_loss is _trl_loss.kto_fused_compute_loss
        with pytest.raises(ValueError, match="^patch: already patched"):
            rt.patch(loss=True)
    finally:
        rt.unpatch()
    assert grpo_mod.GRPOTrainer._compute_loss is _trl_loss._original(grpo_mod.GRPOTrainer)
    assert dpo_mod.DPOTrainer._compute_loss is _trl_loss._original(dpo_mod.DPOTrainer)


def _steps_through_the_fused_loss(algo, trainer, precision, root):
    """TRL's own ``trainer`` (``algo``), two SGD steps (tests/test_trl_trainers.py's ``_train``),
    with patch(loss="fused") against TRL unpatched: every optimizer step ran the fused loss, and
    the run is within 20 times TRL's own chunking noise of TRL's."""
    from test_trl_trainers import _assert_within_trl_noise, _train

    fused_before = rt.calls[f"{trainer}._compute_loss[fused]"]
    trl_run = _train(algo, precision, "trl", root)
    ours = _train(algo, precision, "rlkern-fused", root)
    fused = rt.calls[f"{trainer}._compute_loss[fused]"] - fused_before
    assert fused >= 2, fused  # one per optimizer step at least
    assert ours[4] > 0 and trl_run[4] == 0
    _assert_within_trl_noise(algo, precision, trl_run, ours, root, label=f"{precision} loss=fused")


@pytest.mark.peer
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grpo_trainer_steps_through_the_fused_loss(precision, tmp_path):
    # TRL's own GRPOTrainer, two SGD steps (tests/test_trl_trainers.py's setup), with
    # patch(loss="fused") against TRL unpatched: every step's loss ran linear_policy_loss
    _steps_through_the_fused_loss("grpo", "GRPOTrainer", precision, str(tmp_path))


@pytest.mark.peer
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dpo_trainer_steps_through_the_fused_loss(precision, tmp_path):
    # TRL's own DPOTrainer, two SGD steps (tests/test_trl_trainers.py's setup), with
    # patch(loss="fused") against TRL unpatched: fp32 and bf16 steps (TRL's bf16 tiles through
    # logits_dtype) run linear_preference_loss
    _steps_through_the_fused_loss("dpo", "DPOTrainer", precision, str(tmp_path))
