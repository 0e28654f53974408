"""Plain-Python reference of DAPO's dynamic-sampling filter (the oracle of
``rlkern.ops.advantages.dynamic_sampling``): a dict over group labels, one loop over samples."""

from __future__ import annotations

import math

import torch


def dynamic_sampling_mask(scores: torch.Tensor, group_ids) -> torch.Tensor:
    """keep[i] = False iff sample i's group has more than one sample, no NaN score and all of its
    scores are equal (verl: ``len(values) > 1 and np.std(values) == 0``, with exact equality).

    Args:
        scores: ``[N]`` float.
        group_ids: ``[N]`` hashable labels (a list, or a 1-D tensor read with ``.tolist()``).

    Returns:
        ``[N]`` bool.
    """
    labels = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    values = [float(v) for v in scores.to(torch.float64).tolist()]
    groups: dict = {}
    for label, v in zip(labels, values):
        groups.setdefault(label, []).append(v)
    keep = []
    for label in labels:
        vs = groups[label]
        all_equal = all(not math.isnan(v) for v in vs) and len(set(vs)) == 1
        keep.append(not (len(vs) > 1 and all_equal))
    return torch.tensor(keep, dtype=torch.bool)
