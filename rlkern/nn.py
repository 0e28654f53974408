"""Modules around rlkern ops, for code that composes ``nn.Module``s."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlkern.ops.linear_logprobs import linear_token_logprobs


class LinearLogprobs(nn.Module):
    """An LM head that returns token log-probs (and entropy) instead of logits.

    Wraps an existing ``nn.Linear`` (``model.lm_head``) without copying it: its weight and bias
    stay the parameters that train, tied embeddings included. ``forward(hidden, labels)`` runs
    :func:`rlkern.linear_token_logprobs`, so no ``[N, V]`` logits are ever held.

    Args:
        lm_head: ``nn.Linear(H, V)``; its weight ``[V, H]`` and optional bias ``[V]`` are used.
        temperature, logit_scale, logit_softcap, ignore_index, return_entropy, chunk_size,
        deterministic, logits_dtype: defaults for every call, as in :func:`rlkern.linear_token_logprobs`;
        a keyword given to ``forward`` overrides them for that call.

    Shapes: ``hidden [B, T, H]`` or ``[N, H]``, ``labels`` its leading shape; returns log-probs
    float32 of the labels' shape, and the entropy with ``return_entropy``.
    """

    def __init__(self, lm_head: nn.Linear, *, temperature: float = 1.0, logit_scale: float = 1.0,
                 logit_softcap: float | None = None, ignore_index: int = -100, return_entropy: bool = False,
                 chunk_size: int | None = None, deterministic: bool = False,
                 logits_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"lm_head must be an nn.Linear, got {type(lm_head).__name__}")
        self.lm_head = lm_head
        self.options = dict(temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap,
                            ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size,
                            deterministic=deterministic, logits_dtype=logits_dtype)

    def forward(self, hidden: Tensor, labels: Tensor, **overrides) -> Tensor | tuple[Tensor, Tensor]:
        unknown = set(overrides) - set(self.options)
        if unknown:
            raise TypeError(f"LinearLogprobs.forward got unknown options {sorted(unknown)}")
        options = {**self.options, **overrides}
        return linear_token_logprobs(hidden, self.lm_head.weight, labels, bias=self.lm_head.bias, **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())
