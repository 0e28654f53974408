"""Trainer-facing compositions of rlkern ops.

Two layers:

- drop-ins with a trainer's own signatures: ``rlkern.algos.advantages`` (verl's
  ``ADV_ESTIMATOR_REGISTRY``), ``rlkern.algos.policy_loss`` (verl's ``POLICY_LOSS_REGISTRY``,
  OpenRLHF's ``PolicyLoss``), ``rlkern.algos.openrlhf``;
- the algorithm registry, one module per family: ``ppo`` (PPO, T-PPO), ``grpo`` (the GRPO family
  and the outcome-baseline estimators), ``trees`` (SPO, TreeRL, TreePO), ``preference`` (DPO and
  its relatives), ``critics`` (OREO, Direct Advantage PO, PPO-max, CGPO), ``shaping`` (GRPO-lambda,
  unlikeliness, S-GRPO, OTC, HBPO, RM ensembles, MO-GRPO, TW-GRPO), ``agents`` (ARPO, Mobile-R1),
  ``recipes`` (URPO, Cooper, VerIPO: GRPO / DPO over model-computed rewards). ``get(name)`` returns an
  ``Algorithm`` (a frozen config with the paper's defaults and ``advantages(batch, cfg)`` /
  ``loss(batch, cfg)`` over a ``Batch``); ``available()`` lists the names. docs/algorithms.md maps
  every paper of the research list.
"""

from __future__ import annotations

import importlib

_FAMILIES = ("ppo", "grpo", "trees", "preference", "critics", "shaping", "agents", "recipes")


def _load():
    for family in _FAMILIES:
        importlib.import_module(f"rlkern.algos.{family}")
    from rlkern.algos import _registry
    return _registry


def get(name: str):
    """The registered algorithm ``name`` (an ``rlkern.algos._registry.Algorithm``)."""
    registry = _load().table()
    if name not in registry:
        raise KeyError(f"rlkern.algos.get: unknown algorithm {name!r}; available: {sorted(registry)}")
    return registry[name]


def available() -> list[str]:
    """The registered algorithm names, sorted."""
    return sorted(_load().table())


def __getattr__(name: str):  # Batch and Algorithm without importing the families at package import
    if name in ("Batch", "Algorithm"):
        from rlkern.algos import _registry
        return getattr(_registry, name)
    raise AttributeError(f"module 'rlkern.algos' has no attribute {name!r}")
