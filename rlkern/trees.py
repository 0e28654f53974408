"""``rlkern.trees``: tree and segment advantages (SPO-tree, SPO-chain, TreeRL, TreePO).

The public names of rlkern.ops.trees, importable as ``rlkern.trees.from_nested`` etc.
"""

from rlkern.ops.trees import (
    Forest,
    broadcast_to_tokens,
    from_nested,
    segment_advantages,
    spo_cutpoints,
    tree_advantages,
    tree_values,
)

__all__ = [
    "Forest",
    "broadcast_to_tokens",
    "from_nested",
    "segment_advantages",
    "spo_cutpoints",
    "tree_advantages",
    "tree_values",
]
