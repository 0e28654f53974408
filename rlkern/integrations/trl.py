"""TRL 1.16 on rlkern's kernels: ``import rlkern.integrations.trl as rt; rt.patch()``.

What ``patch()`` replaces, before the first forward and whatever the import order:

- the fused LM head every TRL trainer scores tokens with (GRPO, RLOO, DPO, KTO, SFT, ...:
  ``trl.trainer.utils.add_fused_lm_head`` calls the module global ``_ChunkedLogProbFunction``,
  i.e. ``trl.kernels.ChunkedLogProbFunction``) by :data:`ChunkedLogProbFunction`, an adapter with
  TRL's ``.apply`` signature on :func:`rlkern.linear_token_logprobs`' chunked kernel;
- ``selective_log_softmax``, ``entropy_from_logits`` and ``selective_log_softmax_and_entropy``
  of ``trl.trainer.utils`` by rlkern's drop-ins (``rlkern.ops.logprobs``), wherever a TRL module
  holds them under any name (the experimental a2po, cpo, orpo, sdft, sdpo and tpo trainers import
  them by name).

How: the originals are read from ``trl.trainer.utils`` (imported here), then every loaded
``trl.*`` module attribute that IS one of them (identity, not name) is replaced. Modules imported
later bind the replacement, because ``from ...trainer.utils import selective_log_softmax`` reads
the already patched module. ``unpatch()`` restores every replaced attribute, including those of
modules imported after ``patch()`` (found again by identity), so no import hook is needed.

Precision (``patch(fp32=...)``):

- ``fp32=False`` (default): what TRL computes under each precision it offers. TRL's compute
  dtype is the autocast dtype when autocast is on (TRL's default ``bf16=True``), else
  ``hidden.dtype``;
  ``cast_lm_head_to_fp32`` (GRPO) turns autocast off and hands fp32 hidden states. Inputs wider
  than the compute dtype are rounded to it, as TRL does. A bf16/fp16 compute dtype runs
  ``linear_token_logprobs(logits_dtype=...)``: each logits tile is a GEMM output rounded to that
  dtype (bias added in it), folded in fp32, and its gradient tile is rounded to it, as in TRL;
  the gradient GEMMs accumulate in fp32. Outputs are float32; gradients come back in the
  inputs' dtypes. (float64 inputs: TRL folds its float64 tiles in float32, rlkern computes in
  float64 and returns float32 outputs as TRL does.)
- ``fp32=True``: rlkern's explicit opt-in, more accurate than TRL: autocast is ignored and the
  tiles are float32 products of the inputs as they are (float64 for float64 inputs).

LoRA on the head: TRL's fused forward reads ``lm_head.weight``, which under PEFT is the frozen
base weight, so TRL's own fused head silently drops an adapter on ``lm_head`` (its trainers
refuse such a model in ``__init__``). Patched, when the head TRL projects through is a PEFT
``lora.Linear`` with one active plain LoRA adapter, the adapter is applied tile by tile without
the merged weight (``linear_token_logprobs(lora_A=, lora_B=)``), its dropout on the A path's
input as PEFT applies it, and A and B get their gradients (``calls["ChunkedLogProbFunction[lora]"]``
counts those calls). Under bf16 autocast the adapter's GEMMs output bf16 (xa rounded, the tile's
sum rounded once: PEFT rounds three times). DoRA and other variants, ``lora_bias`` and several
active adapters raise.

FSDP2: when the head is a ``fully_shard``ed DTensor outside its module's forward, TRL's fused
forward hands ``weight.full_tensor()``, whose gradient is each rank's own, unreduced (one SGD step
of a 2-rank tiny Qwen2 was off by 7e-2). Patched, the adapter gathers the sharded parameter
itself and its gradient is averaged over the mesh as FSDP2 reduces the module's own
(``rlkern.ops.linear_logprobs._GatheredParameter``); LoRA A and B DTensors likewise.

Not covered: TRL's ``chunk_size`` counts vocabulary columns per tile; the adapter accepts it and
sizes its own token tiles (``rlkern.ops.linear_logprobs``: 16 MiB of fp32 logits on CPU, 256 MiB
on GPU). Targets must be in ``[0, V)`` (TRL clamps its labels before the call); another value
raises. ``patch(loss=True)`` also installs rlkern's trainer losses
(``rlkern.integrations._trl_loss.loss_overrides()``): ``GRPOTrainer`` and ``RLOOTrainer`` on
``rlkern.policy_loss``, ``DPOTrainer`` on ``rlkern.preference_loss``, ``KTOTrainer`` on ``rlkern.kto_loss``.
``patch(loss="fused")`` installs them with GRPOTrainer's, DPOTrainer's and KTOTrainer's on the
fused LM-head losses: TRL's own forward runs, and this adapter, inside ``capture()``, records the
hidden states and head it is handed (returning zeros, or for DPO / KTO its outputs computed
outside the graph for the logged metrics); the loss then calls ``rlkern.linear_policy_loss`` /
``rlkern.linear_preference_loss`` / ``rlkern.linear_kto_loss`` on them
(``calls["GRPOTrainer._compute_loss[fused]"]``, ``calls["DPOTrainer._compute_loss[fused]"]``,
``calls["KTOTrainer._compute_loss[fused]"]``); under a bf16 / fp16 compute dtype they round
their logits tiles as TRL's (``logits_dtype``), and a PEFT LoRA adapter on the head goes to the
losses' ``lora_A`` / ``lora_B`` / ``lora_hidden`` (its dropout drawn once); an FSDP2 head goes
as its sharded DTensor parameters (the losses gather them, gradients averaged over the mesh). A
DeepSpeed ZeRO-3 head and the configurations listed in ``_trl_loss._fusable`` /
``_dpo_fusable`` run the ``loss=True`` path.

``RLKERN_PATCH_TRL=1`` in the environment makes importing this module (and ``import rlkern``)
call ``patch()`` (default options). ``patch()`` again with the same options does nothing; with
other options it raises (``unpatch()`` first). :data:`calls` (a ``collections.Counter``) counts
the calls that ran on rlkern, per replaced name; ``calls.clear()`` resets it. The same API as
``rlkern.integrations.verl`` and ``rlkern.integrations.openrlhf``.
"""

from __future__ import annotations

import collections
import functools
import importlib
import os
import sys

import torch

from rlkern.ops import _checks
from rlkern.ops import linear_logprobs as _linear
from rlkern.ops import logprobs as _token

# TRL's per-token outputs besides the log-probs (trl/kernels/chunked_logprob.py OPTIONAL_OUTPUTS).
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_HALF = (torch.float16, torch.bfloat16)
_WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
# Targets never equal it, so no row is ignored (TRL has no ignore_index: it clamps its labels).
_NO_IGNORE = -(2**62)

calls: collections.Counter = collections.Counter()
"""Calls that ran on rlkern, per replaced name (``ChunkedLogProbFunction``, ``selective_log_softmax``, ...)."""

# options: the patch() options in force (None while unpatched)
_state = {"options": None, "fp32": False, "patched": [], "loss": [], "replacements": {}, "capture": None}


# ---------------------------------------------------------------------------------------------
# The fused-head adapter.


def _compute_dtype(hidden: torch.Tensor, fp32: bool) -> torch.dtype:
    """TRL's compute dtype (``trl.kernels.ChunkedLogProbFunction.forward``), or fp32 / fp64."""
    if fp32:
        return torch.float64 if hidden.dtype == torch.float64 else torch.float32
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _logits_dtype(compute_dtype: torch.dtype) -> torch.dtype | None:
    """A half-precision compute dtype rounds every logits tile (and its gradient) to it, as TRL's
    GEMM in that dtype does: ``linear_token_logprobs(logits_dtype=)``, which also casts hidden,
    weight and bias to it."""
    return compute_dtype if compute_dtype in _HALF else None


def _operands(hidden, weight, bias, compute_dtype):
    """hidden, weight, bias as the kernel takes them. TRL casts them to the compute dtype. With a
    half compute dtype ``logits_dtype`` does it; otherwise widening is exact (the kernels widen
    themselves), so only a narrowing cast (an fp64 weight under fp32 compute) is done here."""
    if compute_dtype in _HALF:
        return hidden, weight, bias
    return tuple(t if t is None or _WIDTH[t.dtype] <= _WIDTH[compute_dtype] else t.to(compute_dtype)
                 for t in (hidden, weight, bias))


def _trl_head():
    """The LM head module TRL's fused forward is projecting through, or None.

    TRL 1.16's ``add_fused_lm_head`` forward (``_fused_forward`` in ``trl/trainer/utils.py``)
    hands ``lm_head.weight`` to ``ChunkedLogProbFunction.apply``; the module itself is a local of
    that frame (``lm_head``), looked up there whatever order TRL, PEFT, FSDP and ``patch()`` were
    applied in."""
    frame = sys._getframe(2)  # _trl_head <- ChunkedLogProbFunction.apply <- TRL's caller
    if frame.f_code.co_name != "_fused_forward" or frame.f_globals.get("__name__") != "trl.trainer.utils":
        return None
    return frame.f_locals.get("lm_head")


def _fsdp2_head(head, weight, bias):
    """W and b as rlkern reduces them under FSDP2. TRL's fused forward replaces a DTensor head
    by ``weight.full_tensor()``, whose gradient is this rank's own (no reduction over the ranks:
    rlkern.ops.linear_logprobs._GatheredParameter); the sharded parameter is gathered here
    instead, its gradient averaged over the mesh as FSDP2 does."""
    base = getattr(head, "base_layer", head)  # a PEFT lora.Linear's base layer holds W and b
    params = getattr(base, "weight", None), getattr(base, "bias", None)
    if not _linear._is_dtensor(params[0]) or weight is params[0]:
        return weight, bias
    gathered = [_linear._GatheredParameter.apply(p) if _linear._is_dtensor(p) else t
                for p, t in zip(params, (weight, bias))]
    return gathered[0], gathered[1] if bias is not None else None


def _lora_of_head(head):
    """The LoRA adapter on ``head`` (TRL's fused forward's ``lm_head``), or None:
    ``rlkern.ops.linear_logprobs.peft_lora_of``, A and B gathered if they are FSDP2 DTensors."""
    lora = _linear.peft_lora_of(head, "ChunkedLogProbFunction")
    if lora is None:
        return None
    a, b = (_linear._GatheredParameter.apply(p) if _linear._is_dtensor(p) else p for p in lora[:2])
    return a, b, lora[2], lora[3]


class _FusedHead(torch.autograd.Function):
    """rlkern's chunked linear log-prob kernel with TRL's outputs, saved state and backward
    context (``maybe_gather_lm_head_ctx``: ZeRO-3 gathers the head again for the recompute).
    With a LoRA adapter on the head (``lora_a`` ...), the adapter's term is added tile by tile
    (``rlkern.ops.linear_logprobs._lora_operands``) and A, B (and the dropout's input) get
    gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, logit_scale, want, compute_dtype,
                out_dtype, lora_a=None, lora_b=None, lora_x=None, lora_scaling=1.0):
        ctx.set_materialize_grads(False)
        device = hidden.device.type
        with torch.autocast(device, enabled=False):  # rlkern's GEMMs pick their own dtypes
            h, w, b = _operands(hidden, weight, bias, compute_dtype)
            _token.check_label_range(targets, weight.shape[0], _NO_IGNORE, name="targets",
                                     op="ChunkedLogProbFunction")
            lora = _head_lora(h, w, lora_a, lora_b, lora_x, lora_scaling, compute_dtype)
            logp, entropy, lse, *extras = _linear._chunked_forward(
                h, w, b, targets, float(logit_scale), softcap, float(temperature), _NO_IGNORE, want["entropy"],
                (want["log_sum_sq_probs"], want["mean_logits"], want["is_top1"]), 0, False,
                logits_dtype=_logits_dtype(compute_dtype), lora=lora)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if want["entropy"] else None,
                              lora_a, lora_b, lora_x)
        ctx.lora_scaling = lora_scaling
        ctx.hyper = (float(temperature), softcap, float(logit_scale), compute_dtype)
        outs = [logp.to(out_dtype)]
        outs.append(entropy.to(out_dtype) if want["entropy"] else None)
        for name, value in zip(OPTIONAL_OUTPUTS[1:], extras):
            outs.append((value if value.dtype == torch.bool else value.to(out_dtype)) if want[name] else None)
        ctx.mark_non_differentiable(*(x for x in outs[2:] if x is not None))
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        from trl.trainer import utils as trl_utils  # looked up at call time, as TRL's own backward does

        hidden, weight, bias, targets, lse, entropy, lora_a, lora_b, lora_x = ctx.saved_tensors
        temperature, softcap, logit_scale, compute_dtype = ctx.hyper
        need = ctx.needs_input_grad
        needs = [bool(need[0]), bool(need[1]), bias is not None and bool(need[2])]
        lora_needs = [lora_a is not None and bool(need[10]), lora_b is not None and bool(need[11]),
                      lora_x is not None and bool(need[12])]
        if entropy is None:
            grad_entropy = None
        if not any(needs + lora_needs) or (grad_logp is None and grad_entropy is None):
            return (None,) * 14
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse, dtype=torch.float32)
        with trl_utils.maybe_gather_lm_head_ctx(weight, bias), torch.autocast(hidden.device.type, enabled=False):
            h, w, b = _operands(hidden, weight, bias, compute_dtype)
            lora = _head_lora(h, w, lora_a, lora_b, lora_x, ctx.lora_scaling, compute_dtype)
            # d xa feeds d A, and d x (the dropout's output, or hidden itself without dropout).
            need_xa = lora is not None and (lora_needs[0] or lora_needs[2] or (lora_x is None and needs[0]))
            grads = _linear._chunked_backward(
                grad_logp, grad_entropy, h, w, b, targets, lse, entropy, logit_scale, softcap, temperature,
                _NO_IGNORE, 0, False, *needs, logits_dtype=_logits_dtype(compute_dtype),
                lora=lora, lora_needs=(need_xa, lora_needs[1]))
        # float32 (float64) accumulators, returned in the inputs' dtypes as TRL does.
        grads = list(grads)
        lora_out = [None, None, None]
        if lora is not None:
            g_xa, g_b = grads[3], grads[4]
            x = _lora_input(h, w, lora_x, compute_dtype)
            op_dtype = lora[0].dtype
            a_wide = lora_a.to(op_dtype).to(g_xa.dtype) if need_xa else None
            if lora_needs[0]:
                lora_out[0] = torch.mm(g_xa.T, x.to(op_dtype).to(g_xa.dtype)).to(lora_a.dtype)
            if lora_needs[1]:
                lora_out[1] = g_b.to(lora_b.dtype)
            if lora_needs[2]:
                lora_out[2] = torch.mm(g_xa, a_wide).to(lora_x.dtype)
            elif lora_x is None and needs[0]:
                grads[0].addmm_(g_xa, a_wide)
        out = [g.to(x.dtype) if g is not None and need else None
               for g, x, need in zip(grads[:3], (hidden, weight, bias), needs)]
        return (*out, *(None,) * 7, *lora_out, None)


def _lora_input(h, w, lora_x, compute_dtype):
    """The A path's input as the kernel reads it (TRL's casts, as for hidden)."""
    if lora_x is None:
        return h
    return _operands(lora_x, w, None, compute_dtype)[0]


def _head_lora(h, w, lora_a, lora_b, lora_x, scaling, compute_dtype):
    """``(xa, B, scaling)`` for the tiles, or None without an adapter."""
    if lora_a is None:
        return None
    acc = torch.float64 if torch.float64 in (h.dtype, w.dtype) else torch.float32
    a, b = _operands(lora_a, lora_b, None, compute_dtype)[:2]
    return _linear._lora_operands(_lora_input(h, w, lora_x, compute_dtype), a, b, scaling, acc,
                                  _logits_dtype(compute_dtype))


def _capturable(head, weight) -> bool:
    """The fused losses take a plain head, one PEFT LoRA adapter on it (their ``lora_A`` ...
    arguments) and an FSDP2 DTensor head (recorded as the sharded parameters, which the losses
    gather with FSDP2's gradient reduction: ``_captured_params``); no adapter ``peft_lora_of``
    refuses (the fallback raises its error), no DeepSpeed ZeRO-3 (the head is gathered only
    inside TRL's ``maybe_gather_lm_head_ctx``, and its gradient reduction needs the loss inside
    the model's forward)."""
    if head is None:
        return False
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return False
    try:
        _linear.peft_lora_of(head, "ChunkedLogProbFunction")
    except ValueError:
        return False
    return True


def _captured_params(head, weight, bias):
    """W and b as the fused losses take them: TRL's own, or under FSDP2 (TRL hands
    ``weight.full_tensor()``, whose gradient would stay this rank's own) the sharded DTensor
    parameters themselves (the losses gather them, their gradients averaged over the mesh)."""
    base = getattr(head, "base_layer", head)
    params = getattr(base, "weight", None), getattr(base, "bias", None)
    if not _linear._is_dtensor(params[0]) or weight is params[0]:
        return weight, bias
    return params[0], (params[1] if bias is not None else None)


class _Capture:
    """``with capture() as heads:`` TRL's fused-head calls inside record their operands in
    ``heads`` (a list of dicts) and return zeros (``compute=True``: their outputs, detached); a
    call the fused losses cannot take (``_capturable``; with ``half=False`` a bf16 / fp16 compute
    dtype, whose rounded tiles the loss lacks) computes as usual and records nothing."""

    def __init__(self, compute: bool, half: bool):
        self.compute, self.half = compute, half

    def __enter__(self):
        if _state["capture"] is not None:
            raise RuntimeError("capture: already capturing")
        _state["capture"] = ([], self.compute, self.half)
        return _state["capture"][0]

    def __exit__(self, *exc):
        _state["capture"] = None
        return False


def capture(*, compute: bool = False, half: bool = True) -> _Capture:
    return _Capture(compute, half)


class ChunkedLogProbFunction:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` (TRL 1.16) on rlkern's kernel.

    ``ChunkedLogProbFunction.apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N],
    temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=(...))``
    returns TRL's 5-tuple ``(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, None in
    the slots ``outputs`` does not request; float32, ``is_top1`` bool. ``logprobs`` and
    ``entropy`` are differentiable wrt hidden, weight and bias (gradients in their dtypes). TRL's
    ``chunk_size`` (vocabulary columns per tile) is accepted; rlkern sizes its own token tiles.
    The precision follows ``patch(fp32=...)`` (module docstring).
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        op = "ChunkedLogProbFunction"
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"{op}: chunk_size must be an int > 0 (TRL's vocabulary columns per tile), "
                             f"got {chunk_size!r}")
        if isinstance(outputs, str):
            raise ValueError(f"{op}: outputs must be a tuple of names among {OPTIONAL_OUTPUTS}, got {outputs!r}")
        calls["ChunkedLogProbFunction"] += 1
        fp32 = _state["fp32"]
        compute_dtype = _compute_dtype(hidden, fp32)
        # TRL returns float32 whatever the compute dtype; rlkern's fp32 mode keeps float64 exact.
        out_dtype = torch.float64 if fp32 and compute_dtype == torch.float64 else torch.float32
        softcap = float(final_logit_softcapping) if final_logit_softcapping is not None else 0.0
        if softcap < 0 or softcap != softcap:
            raise ValueError(f"{op}: final_logit_softcapping must be None or > 0, got {final_logit_softcapping!r}")
        want = {name: name in outputs for name in OPTIONAL_OUTPUTS}
        head = _trl_head()
        capture = _state["capture"]
        if capture is not None and _capturable(head, weight) and (capture[2] or _logits_dtype(compute_dtype) is None):
            # patch(loss="fused"): the trainer's loss projects these hidden states itself
            # (rlkern.linear_policy_loss / linear_preference_loss). TRL's fused forward gets zeros
            # of its outputs' shapes, or (compute=True: the metrics read them) its outputs
            # computed outside the graph.
            heads, compute, _ = capture
            h, w, b = _operands(hidden, *_captured_params(head, weight, bias), compute_dtype)
            lora = _lora_of_head(head)
            record = dict(hidden=h, weight=w, bias=b, targets=targets, temperature=float(temperature),
                          softcap=softcap, logit_scale=float(logit_scale), logits_dtype=_logits_dtype(compute_dtype))
            lora_args = ()
            if lora is not None:  # the loss adds the adapter tile by tile (lora_A / lora_B / lora_hidden)
                calls["ChunkedLogProbFunction[lora]"] += 1
                lora_a, lora_b, scaling, dropout = lora
                # PEFT's dropout on the A path's input, drawn once for the loss and the metrics
                lora_x = None if dropout is None else dropout(hidden)
                lora_a, lora_b = _operands(lora_a, lora_b, None, compute_dtype)[:2]
                record.update(lora_A=lora_a, lora_B=lora_b, lora_scaling=float(scaling),
                              lora_hidden=None if lora_x is None else _operands(lora_x, w, None, compute_dtype)[0])
                lora_args = (lora[0], lora[1], lora_x, scaling)
            heads.append(record)
            if compute:
                with torch.no_grad():
                    return _FusedHead.apply(hidden, weight, bias, targets, temperature, softcap, logit_scale, want,
                                            compute_dtype, out_dtype, *lora_args)
            zeros = hidden.new_zeros(hidden.shape[0], dtype=out_dtype)
            return (zeros, zeros if want["entropy"] else None, *(None,) * (len(OPTIONAL_OUTPUTS) - 1))
        weight, bias = _fsdp2_head(head, weight, bias)
        lora = _lora_of_head(head)
        if lora is None:
            return _FusedHead.apply(hidden, weight, bias, targets, temperature, softcap, logit_scale, want,
                                    compute_dtype, out_dtype)
        calls["ChunkedLogProbFunction[lora]"] += 1
        lora_a, lora_b, scaling, dropout = lora
        # PEFT applies the adapter's dropout to the A path's input only (lora_B(lora_A(dropout(x)))).
        lora_x = None if dropout is None else dropout(hidden)
        return _FusedHead.apply(hidden, weight, bias, targets, temperature, softcap, logit_scale, want,
                                compute_dtype, out_dtype, lora_a, lora_b, lora_x, scaling)


# ---------------------------------------------------------------------------------------------
# Patching.


def _counted(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[name] += 1
        if _state["fp32"] and kwargs.get("out_dtype") is None:
            # patch(fp32=True): rlkern's unrounded result, as the verl and OpenRLHF patches give
            # (float64 for float64 logits: nothing is narrowed)
            logits = args[0] if args else kwargs["logits"]
            kwargs["out_dtype"] = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return fn(*args, **kwargs)

    return wrapper


_REPLACEMENTS = {
    "selective_log_softmax": _counted("selective_log_softmax", _token.selective_log_softmax),
    "entropy_from_logits": _counted("entropy_from_logits", _token.entropy_from_logits),
    "selective_log_softmax_and_entropy": _counted("selective_log_softmax_and_entropy",
                                                  _token.selective_log_softmax_and_entropy),
    "_ChunkedLogProbFunction": ChunkedLogProbFunction,
}


def _trl_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "trl" or name.startswith("trl."))]


def _module_vars(module) -> dict:
    try:
        return dict(vars(module))
    except TypeError:
        return {}


def patch(*, fp32: bool = False, loss: bool | str = False) -> None:
    """Run TRL's token scoring (and with ``loss=True`` its losses) on rlkern. Call it before the
    first forward.

    Args:
        fp32: False (default): TRL's numbers and dtypes under each precision it offers; True:
            fp32 tiles whatever the autocast (module docstring), and TRL's logits functions
            return rlkern's unrounded float32 (float64 for float64 logits).
        loss: True: also install rlkern's trainer losses (``rlkern.integrations._trl_loss``);
            ``"fused"``: those losses, and GRPOTrainer's / DPOTrainer's / KTOTrainer's project the
            policy's last hidden states through the LM head inside ``rlkern.linear_policy_loss`` /
            ``rlkern.linear_preference_loss`` / ``rlkern.linear_kto_loss``
            (``calls["<Trainer>._compute_loss[fused]"]`` count those steps; a configuration
            they cannot take runs the ``loss=True`` path).

    Calling it again with the same options does nothing; with other options it raises
    ValueError (``unpatch()`` first).
    """
    if not isinstance(loss, bool) and not (isinstance(loss, str) and loss == "fused"):
        raise TypeError(f"patch: loss must be a bool or 'fused', got {loss!r}")
    options = {"fp32": _checks.flag("patch", "fp32", fp32), "loss": loss}
    if _state["options"] is not None:
        if _state["options"] != options:
            done = ", ".join(f"{k}={v}" for k, v in _state["options"].items())
            raise ValueError(f"patch: already patched with {done}; call unpatch() first")
        return
    from trl.trainer import utils as trl_utils

    _state["fp32"] = fp32
    _state["options"] = options
    try:
        by_id = {id(getattr(trl_utils, name)): (getattr(trl_utils, name), repl) for name, repl in _REPLACEMENTS.items()}
        _state["replacements"] = {id(repl): original for original, repl in by_id.values()}
        for module in _trl_modules():
            for attr, value in _module_vars(module).items():
                hit = by_id.get(id(value))
                if hit is not None and hit[0] is value:
                    setattr(module, attr, hit[1])
                    _state["patched"].append((module, attr, value))
        if loss:
            _patch_losses(fused=loss == "fused")
    except BaseException:
        unpatch()  # no half-patched TRL
        raise


def _patch_losses(fused: bool = False) -> None:
    try:
        _trl_loss = importlib.import_module("rlkern.integrations._trl_loss")
    except ModuleNotFoundError as error:
        if error.name != "rlkern.integrations._trl_loss":
            raise
        raise ImportError("patch: loss=True needs rlkern.integrations._trl_loss, which this install lacks") from None
    # loss_overrides() with no argument is the loss=True interface (tests/test_integrations_trl.py)
    for owner, attr, replacement in (_trl_loss.loss_overrides(fused=True) if fused else _trl_loss.loss_overrides()):
        had = attr in _module_vars(owner)
        _state["loss"].append((owner, attr, _module_vars(owner).get(attr), had))
        setattr(owner, attr, replacement)


def unpatch() -> None:
    """Restore every object ``patch()`` replaced (the same objects: ``is`` holds)."""
    originals = _state["replacements"]
    for module, attr, original in reversed(_state["patched"]):
        setattr(module, attr, original)
    # Modules imported after patch() bound the replacements: find them by identity.
    for module in _trl_modules():
        for attr, value in _module_vars(module).items():
            if id(value) in originals and any(value is r for r in _REPLACEMENTS.values()):
                setattr(module, attr, originals[id(value)])
    for owner, attr, original, had in reversed(_state["loss"]):
        if had:
            setattr(owner, attr, original)
        else:
            delattr(owner, attr)
    _state.update(options=None, fp32=False, patched=[], loss=[], replacements={}, capture=None)


def is_patched() -> bool:
    return _state["options"] is not None


if os.environ.get("RLKERN_PATCH_TRL") == "1":
    patch()
