"""Hugging Face transformers glue: causal LMs that return token log-probs, never full logits.

``patch_causal_lm(model)`` wraps ``model.forward``: a call with ``logprob_labels=`` (labels
aligned with ``input_ids``, shifted inside like HF's ``labels``) or ``shift_labels=``
(already shifted) runs the backbone, then :func:`rlkern.linear_token_logprobs` on the last
hidden states and the output embeddings (the LM head), and returns a
:class:`CausalLMLogprobsOutput`. Any other call goes to the original forward unchanged
(generation keeps working), except TRL's ``fused_lm_head=``, which raises: this patch is for
hand-written loops; TRL trainers use ``rlkern.integrations.trl.patch()``.

The LM head's logit transform is read from the model's text config, so the log-probs are the
model's own: ``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere, multiplies),
``logits_scaling`` (Granite, divides), ``lm_head_multiplier`` (Falcon-H1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from rlkern.ops.linear_logprobs import linear_token_logprobs, peft_lora_of


@dataclass
class CausalLMLogprobsOutput(ModelOutput):
    """``logprobs`` float32 ``[B, T-1]`` for ``logprob_labels`` (``[B, T]`` for
    ``shift_labels``), 0 where the label is ``ignore_index``; ``entropy`` the same shape when
    requested, else None."""

    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def head_transform(config) -> dict:
    """``logit_scale`` and ``logit_softcap`` of a model's LM head, from its (text) config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:
        scale = float(text.logit_scale)
    elif getattr(text, "logits_scaling", None) is not None:
        scale = 1.0 / float(text.logits_scaling)
    elif getattr(text, "lm_head_multiplier", None) is not None:
        scale = float(text.lm_head_multiplier)
    softcap = getattr(text, "final_logit_softcapping", None)
    return {"logit_scale": scale, "logit_softcap": float(softcap) if softcap else None}


def patch_causal_lm(model, *, temperature: float = 1.0, return_entropy: bool = False,
                    chunk_size: int | None = None, deterministic: bool = False,
                    logits_dtype: torch.dtype | None = None):
    """Make ``model(..., logprob_labels=labels)`` return token log-probs without full logits.

    Args:
        model: a transformers causal LM (``*ForCausalLM``): ``model.base_model`` gives the last
            hidden states, ``model.get_output_embeddings()`` the LM head.
        temperature, return_entropy, chunk_size, deterministic, logits_dtype: defaults of every patched call,
            as in :func:`rlkern.linear_token_logprobs`; each can be overridden per call by the
            keyword of the same name.

    Returns:
        The same model, patched in place (``unpatch_causal_lm`` restores it). A patched call
        ``model(input_ids, attention_mask=..., logprob_labels=labels [B, T])`` returns
        ``CausalLMLogprobsOutput(logprobs [B, T-1], entropy [B, T-1] or None)``; with
        ``shift_labels=[B, T]`` instead, both are ``[B, T]``. Gradients reach the backbone and
        the LM head (tied embeddings included).
    """
    if hasattr(model, "_rlkern_original_forward"):
        raise ValueError("patch_causal_lm: model is already patched by rlkern.integrations.transformers.patch_causal_lm")
    if model.get_output_embeddings() is None:
        raise ValueError(f"patch_causal_lm: {type(model).__name__} has no output embeddings (not a causal LM head model)")
    original = model.forward
    defaults = dict(temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size,
                    deterministic=deterministic, logits_dtype=logits_dtype)

    @functools.wraps(original)
    def forward(*args, logprob_labels=None, shift_labels=None, **kwargs):
        if "fused_lm_head" in kwargs:
            # TRL's protocol (trl.trainer.utils.add_fused_lm_head): passing it on would run TRL's
            # own head, or the plain forward, while the caller believes rlkern runs.
            raise ValueError(
                "patch_causal_lm: got fused_lm_head=, TRL's fused-head protocol; this patch serves "
                "hand-written loops (logprob_labels= / shift_labels=). In TRL trainers call "
                "rlkern.integrations.trl.patch() instead, which runs TRL's fused head on rlkern, and "
                "leave the model unpatched")
        if _wrapped_by_trl(model, forward):
            raise ValueError(
                "patch_causal_lm: TRL's add_fused_lm_head wrapped this patched model; its fused calls "
                "bypass this patch and run TRL's head. In TRL trainers call rlkern.integrations.trl.patch() "
                "instead and leave the model unpatched (unpatch_causal_lm)")
        if logprob_labels is None and shift_labels is None:
            return original(*args, **kwargs)
        if logprob_labels is not None and shift_labels is not None:
            raise ValueError("patch_causal_lm: pass logprob_labels (unshifted) or shift_labels (shifted), not both")
        options = {**defaults, **{k: kwargs.pop(k) for k in list(kwargs) if k in defaults}}
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state
        if logprob_labels is not None:
            hidden, labels = hidden[:, :-1], logprob_labels[:, 1:]
        else:
            labels = shift_labels
        head = model.get_output_embeddings()
        hidden = hidden.to(head.weight.device)
        # A PEFT LoRA adapter on the head: head.weight is then the frozen base weight alone.
        lora = peft_lora_of(head, "patch_causal_lm")
        if lora is not None:
            options.update(lora_A=lora[0], lora_B=lora[1], lora_scaling=lora[2],
                           lora_hidden=None if lora[3] is None else lora[3](hidden))
        out = linear_token_logprobs(hidden, head.weight, labels.to(head.weight.device),
                                    bias=head.bias, **head_transform(model.config), **options)
        if options["return_entropy"]:
            return CausalLMLogprobsOutput(logprobs=out[0], entropy=out[1])
        return CausalLMLogprobsOutput(logprobs=out)

    model._rlkern_original_forward = original
    model.forward = forward
    return model


def _wrapped_by_trl(model, ours) -> bool:
    """Whether ``model.forward`` is now a wrapper defined in a ``trl`` module (TRL's
    ``add_fused_lm_head`` replaces it, keeping the wrapped function's name through functools.wraps,
    but not its module globals)."""
    current = model.__dict__.get("forward")
    if current is None or current is ours:
        return False
    func = getattr(current, "__func__", current)
    return str(getattr(func, "__globals__", {}).get("__name__", "")).split(".")[0] == "trl"


def unpatch_causal_lm(model):
    """Undo :func:`patch_causal_lm`; returns the model."""
    if not hasattr(model, "_rlkern_original_forward"):
        raise ValueError("unpatch_causal_lm: model is not patched by rlkern.integrations.transformers.patch_causal_lm")
    model.forward = model._rlkern_original_forward
    del model._rlkern_original_forward
    return model
