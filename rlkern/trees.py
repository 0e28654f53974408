"""``rlkern.trees``: tree and segment advantages (SPO-tree, SPO-chain, TreeRL, TreePO, ARPO).

The public names of rlkern.ops.trees and rlkern.ops.segments, importable as
``rlkern.trees.from_nested`` etc.
"""

from rlkern.ops.segments import broadcast_to_tokens, segment_advantages, spo_cutpoints
from rlkern.ops.trees import (
    Forest,
    TreeAdvantages,
    TreeAdvantagesAndValues,
    from_nested,
    tree_advantages,
    tree_values,
)

__all__ = [
    "Forest",
    "TreeAdvantages",
    "TreeAdvantagesAndValues",
    "broadcast_to_tokens",
    "from_nested",
    "segment_advantages",
    "spo_cutpoints",
    "tree_advantages",
    "tree_values",
]
