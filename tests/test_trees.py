"""Tree / segment advantages vs the float64 reference, hand-computed paper examples, verl parity.

Backends: "cpp" (the C++ kernels, the CPU default), "triton" (Triton kernels under
TRITON_INTERPRET=1 on CPU tensors; small forests only, the interpreter is slow), "torch" (the
reference through the op layer).
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlkern.trees as trees
from rlkern import _backend
from rlkern.reference import trees as reference
from conftest import import_peer, compile_for_sm90

METHODS = ["spo_rloo", "spo_grpo", "treerl", "treepo", "arpo"]


def random_forest(num_trees, max_depth, max_branching, seed, *, shuffle=True, single_nodes=0, chains=0):
    """parent [M] int64 of random trees (each node 0..max_branching children up to its tree's
    depth cap), plus single-node trees and chains; node order shuffled."""
    g = torch.Generator().manual_seed(seed)
    parent = []

    def rand(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for _ in range(num_trees):
        cap = rand(1, max_depth)
        branching = rand(1, max_branching)
        parent.append(-1)
        frontier = [(len(parent) - 1, 0)]
        while frontier:
            node, depth = frontier.pop()
            if depth == cap:
                continue
            # the root always branches so that every tree has depth >= 1
            for _ in range(rand(1 if depth == 0 else 0, branching)):
                parent.append(node)
                frontier.append((len(parent) - 1, depth + 1))
    for _ in range(single_nodes):
        parent.append(-1)
    for _ in range(chains):
        parent.append(-1)
        for _ in range(rand(1, 12)):
            parent.append(len(parent) - 1)
    p = torch.tensor(parent, dtype=torch.int64)
    if not shuffle:
        return p
    perm = torch.randperm(len(p), generator=g)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    moved = p[perm]
    return torch.where(moved >= 0, inverse[moved.clamp(min=0)], moved)


def random_rewards(m, seed, kind="binary", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":  # the verifiable rewards of the papers: many equal siblings, exact zeros
        return torch.randint(0, 2, (m,), generator=g).to(dtype)
    return torch.randn(m, generator=g).to(dtype)


def _is_leaf(parent):
    has_child = torch.zeros(len(parent), dtype=torch.bool)
    has_child[parent[parent >= 0]] = True
    return ~has_child


def _forests(backend):
    """(parent, description): small for the interpreter, larger for the others."""
    if backend == "triton":
        return [(random_forest(4, 4, 3, seed=1, single_nodes=2, chains=1), "small"),
                (random_forest(2, 7, 2, seed=2, chains=2), "deep")]
    return [
        (random_forest(12, 3, 8, seed=3, single_nodes=3), "wide"),
        (random_forest(8, 12, 2, seed=4, chains=3), "deep"),
        (random_forest(30, 6, 4, seed=5, single_nodes=2, chains=2), "mixed"),
        (random_forest(5, 5, 3, seed=6, shuffle=False), "ordered"),
    ]


# ---------------------------------------------------------------------------------------------
# Values and advantages vs the reference

@pytest.mark.parametrize("mode", ["mean_children", "mean_leaves"])
@pytest.mark.parametrize("kind", ["binary", "normal"])
def test_values_match_reference(backend, mode, kind):
    for parent, what in _forests(backend):
        reward = random_rewards(len(parent), seed=len(parent), kind=kind)
        reward[~_is_leaf(parent)] = float("nan")  # internal entries are never read
        values = trees.tree_values(parent, reward, mode=mode)
        expected = reference.tree_values(parent, reward, mode)
        assert values.dtype == torch.float32 and values.shape == parent.shape
        # float64 accumulation, one rounding to float32 at the end
        torch.testing.assert_close(values.double(), expected, rtol=1e-7, atol=1e-7, msg=lambda m: f"{what}: {m}")


def _assert_advantages(adv, keep, expected, expected_keep, what):
    torch.testing.assert_close(adv.double(), expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")
    # keep is A != 0: a difference is only allowed where the exact value is within rounding of 0
    differ = keep != expected_keep
    assert (expected[differ].abs() < 1e-12).all(), f"{what}: keep differs at {differ.nonzero().flatten().tolist()}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["binary", "normal"])
def test_advantages_match_reference(backend, method, kind):
    for parent, what in _forests(backend):
        reward = random_rewards(len(parent), seed=7 + len(parent), kind=kind)
        options = [{}]
        if method == "treerl":
            options.append({"leaf_rloo": True})
        if method == "treepo":
            weights = torch.randint(1, 50, (len(parent),), generator=torch.Generator().manual_seed(1)).float()
            options += [{"subgroup_weighting": "group_size"}, {"whiten": False}, {"leaf_weights": weights}]
        if method in ("spo_grpo", "arpo"):
            options.append({"eps": 1e-6})  # GRPO's, which get("arpo") passes
        for opts in options:
            adv, keep = trees.tree_advantages(parent, reward, method=method, **opts)
            ref_opts = {"epsilon" if k == "eps" else k: v for k, v in opts.items()}
            expected, expected_keep = reference.tree_advantages(parent, reward, method, **ref_opts)
            assert adv.dtype == torch.float32 and keep.dtype == torch.bool
            _assert_advantages(adv, keep, expected, expected_keep, f"{what} {opts}")
            assert not keep[parent == -1].any()
        adv2, keep2, values = trees.tree_advantages(parent, reward, method=method, return_values=True)
        mode = "mean_children" if method.startswith("spo") else "mean_leaves"
        torch.testing.assert_close(values, trees.tree_values(parent, reward, mode=mode))
        torch.testing.assert_close(adv2, trees.tree_advantages(parent, reward, method=method)[0])


def test_float64_and_half_rewards(backend):
    parent = random_forest(6, 5, 4, seed=11)
    reward = random_rewards(len(parent), seed=3, kind="normal")
    adv64, _ = trees.tree_advantages(parent, reward.double(), method="treerl")
    assert adv64.dtype == torch.float64
    expected, _ = reference.tree_advantages(parent, reward.double(), "treerl")
    torch.testing.assert_close(adv64, expected, rtol=1e-12, atol=1e-12)
    for dtype in (torch.bfloat16, torch.float16):
        values = trees.tree_values(parent, reward.to(dtype), mode="mean_leaves")
        assert values.dtype == torch.float32
        torch.testing.assert_close(values.double(), reference.tree_values(parent, reward.to(dtype), "mean_leaves"),
                                   rtol=1e-6, atol=1e-6)


def test_shuffling_does_not_change_results(backend):
    parent = random_forest(6, 6, 4, seed=12, shuffle=False)
    reward = random_rewards(len(parent), seed=4, kind="normal")
    perm = torch.randperm(len(parent), generator=torch.Generator().manual_seed(0))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    moved = parent[perm]
    shuffled = torch.where(moved >= 0, inverse[moved.clamp(min=0)], moved)
    for method in METHODS:
        a, k = trees.tree_advantages(parent, reward, method=method)
        b, kb = trees.tree_advantages(shuffled, reward[perm], method=method)
        torch.testing.assert_close(b, a[perm], rtol=1e-6, atol=1e-6)


def test_edge_forests(backend):
    # A single node, a forest of single nodes, one long chain, and the empty forest.
    one = torch.tensor([-1])
    for method in METHODS:  # a lone root is a prompt without any continuation
        adv, keep = trees.tree_advantages(one, torch.tensor([0.7]), method=method)
        assert adv.tolist() == [0.0] and keep.tolist() == [False]
    assert trees.tree_values(torch.full((5,), -1), torch.arange(5.0), mode="mean_children").tolist() == [0, 1, 2, 3, 4]
    chain = torch.tensor([-1] + list(range(199)))
    values = trees.tree_values(chain, torch.full((200,), 0.25), mode="mean_children")
    assert (values == 0.25).all()
    adv, keep = trees.tree_advantages(chain, torch.full((200,), 0.25), method="spo_rloo")
    assert (adv == 0).all() and not keep.any()
    empty = torch.zeros(0, dtype=torch.int64)
    assert trees.tree_values(empty, torch.zeros(0), mode="mean_leaves").shape == (0,)
    adv, keep = trees.tree_advantages(empty, torch.zeros(0), method="treepo")
    assert adv.shape == (0,) and keep.shape == (0,)


def _depths(parent):
    depth = []
    for i in range(len(parent)):
        d, j = 0, int(parent[i])
        while j != -1:
            d, j = d + 1, int(parent[j])
        depth.append(d)
    return depth


def test_max_depth(backend):
    # chains make the forest 13 levels deep; a bound at the depth or above changes nothing
    parent = random_forest(6, 5, 3, seed=13, single_nodes=1, chains=3)
    reward = random_rewards(len(parent), seed=13, kind="normal")
    depth = _depths(parent)
    deepest = max(depth)
    for bound in (deepest, deepest + 4):
        torch.testing.assert_close(trees.tree_values(parent, reward, mode="mean_leaves", max_depth=bound),
                                   trees.tree_values(parent, reward, mode="mean_leaves"))
        for method in METHODS:
            ours = trees.tree_advantages(parent, reward, method=method, return_values=True, max_depth=bound)
            for x, y in zip(ours, trees.tree_advantages(parent, reward, method=method, return_values=True)):
                torch.testing.assert_close(x, y)
    for bound in (0, deepest - 1):
        first = min(i for i, d in enumerate(depth) if d > bound)
        match = rf"max_depth={bound} but node {first} is at depth {depth[first]}$"
        with pytest.raises(ValueError, match=match):
            trees.tree_values(parent, reward, max_depth=bound)
        with pytest.raises(ValueError, match=match):
            trees.tree_advantages(parent, reward, method="treepo", max_depth=bound)
    # structure errors come first
    with pytest.raises(ValueError, match="does not lead to a root"):
        trees.tree_values(torch.tensor([-1, 2, 1]), torch.zeros(3), max_depth=0)


class _NoHostSync(TorchDispatchMode):
    """Fails on every op that reads tensor values back to the host, or sizes its output by them."""

    aten = torch.ops.aten
    SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default, aten.masked_select.default,
             aten.unique_consecutive.default, aten._unique2.default, aten.repeat_interleave.Tensor}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def test_triton_no_host_sync_with_max_depth(monkeypatch):
    # The Triton path builds the forest's structure and runs every level without reading anything
    # back when max_depth is given (what CUDA-graph capture needs); without it, it reads the
    # number of levels once. Kernel entry points are called directly: the op layer's structure
    # checks read values by design (on CPU tensors, and on CUDA with RLKERN_VALIDATE=1).
    if not _backend.triton_interpreted():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    from rlkern.kernels import trees as triton_trees

    parent = random_forest(4, 4, 3, seed=1, single_nodes=2, chains=1)
    reward = random_rewards(len(parent), seed=1, kind="normal")
    deepest = max(_depths(parent))
    expected = {m: reference.tree_advantages(parent, reward, m, return_values=True) for m in METHODS}

    def no_tolist(self):
        raise AssertionError("host sync: tolist")

    monkeypatch.setattr(torch.Tensor, "tolist", no_tolist)
    with _NoHostSync():
        got = {m: triton_trees.tree_advantages(parent, reward, m, False, False, True, None, 1e-8, True, deepest + 2)
               for m in METHODS}
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        triton_trees.tree_values(parent, reward, "mean_leaves")
    monkeypatch.undo()
    for method in METHODS:
        adv, keep, values = got[method]
        _assert_advantages(adv, keep, expected[method][0], expected[method][1], method)
        torch.testing.assert_close(values.double(), expected[method][2], rtol=1e-6, atol=1e-6)
    # A bound below the depth of a tree: without validation its nodes get NaN, the others are exact.
    tree = torch.tensor([-1, 0, 1, -1, 3])  # depths 0 1 2 | 0 1
    values = triton_trees.tree_values(tree, torch.tensor([9.0, 9.0, 0.5, 9.0, 0.25]), "mean_children", 1)
    assert values[:3].isnan().all() and values[3:].tolist() == [0.25, 0.25]
    adv, keep, _ = triton_trees.tree_advantages(tree, torch.ones(5), "treerl", False, False, True, None, 1e-8, False, 1)
    assert adv[0] == 0 and adv[1:3].isnan().all() and not keep[2] and keep[4] and adv[4] == 0  # roots: A = 0


def test_cpp_int64_positions():
    # Forests under 2^31 nodes run on int32 positions; RLKERN_TREES_INDEX64=1 (read once per
    # process, hence the subprocess) runs the int64 instantiation used above that size.
    if not _backend.has_cpp():
        pytest.fail("rlkern._C did not build")
    code = (
        "import torch, rlkern.trees as t\n"
        "from rlkern.reference import trees as ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "parent = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, 400)])\n"
        "reward = torch.randint(0, 2, (400,), generator=g).float()\n"
        "for method in ('spo_rloo', 'spo_grpo', 'treerl', 'treepo', 'arpo'):\n"
        "    a, k = t.tree_advantages(parent, reward, method=method)\n"
        "    b, kb = ref.tree_advantages(parent, reward, method)\n"
        "    assert (a.double() - b).abs().max() < 1e-6 and (k == kb).all(), method\n"
        "v = t.tree_values(parent, reward).double()\n"
        "assert (v - ref.tree_values(parent, reward, 'mean_children')).abs().max() < 1e-6\n"
    )
    env = {**os.environ, "RLKERN_TREES_INDEX64": "1", "RLKERN_BACKEND": "cpp"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Hand-computed examples from each paper's definition

def _example_tree():
    """root(0) -> leaf 1 (r=1), node 2 -> leaves 3, 4, 5 (r=1, 1, 0), leaf 6 (r=0);
    node order scrambled: a parent may come after its child."""
    nodes = {"root": -1, "a": "root", "x": "root", "b": "x", "c": "x", "d": "x", "e": "root"}
    reward = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0, "e": 0.0}
    order = ["c", "x", "a", "root", "e", "d", "b"]
    index = {n: i for i, n in enumerate(order)}
    parent = torch.tensor([-1 if nodes[n] == -1 else index[nodes[n]] for n in order])
    rew = torch.tensor([reward.get(n, float("nan")) for n in order])
    return parent, rew, index


def test_spo_tree_example(backend):
    parent, reward, at = _example_tree()
    values = trees.tree_values(parent, reward, mode="mean_children")
    # V(x) = mean(1, 1, 0) = 2/3; V(root) = mean(1, 2/3, 0) = 5/9
    assert values[at["x"]].item() == pytest.approx(2 / 3)
    assert values[at["root"]].item() == pytest.approx(5 / 9)
    adv, keep = trees.tree_advantages(parent, reward, method="spo_rloo")
    assert adv[at["a"]].item() == pytest.approx(1 - 5 / 9)
    assert adv[at["x"]].item() == pytest.approx(2 / 3 - 5 / 9)
    assert adv[at["e"]].item() == pytest.approx(-5 / 9)
    assert adv[at["b"]].item() == pytest.approx(1 / 3) and adv[at["d"]].item() == pytest.approx(-2 / 3)
    assert keep.tolist() == [n != "root" for n in sorted(at, key=at.get)]
    adv, _ = trees.tree_advantages(parent, reward, method="spo_grpo")
    std_root = math.sqrt(((1 - 5 / 9) ** 2 + (2 / 3 - 5 / 9) ** 2 + (5 / 9) ** 2) / 3)  # np.std
    assert adv[at["a"]].item() == pytest.approx((1 - 5 / 9) / (std_root + 1e-8), rel=1e-6)
    std_x = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 3)
    assert adv[at["d"]].item() == pytest.approx(-(2 / 3) / (std_x + 1e-8), rel=1e-6)
    # Equal siblings: no advantage, filtered out (the paper's A != 0).
    parent2 = torch.tensor([-1, 0, 0, 1, 1, 2, 2])
    adv, keep = trees.tree_advantages(parent2, torch.tensor([0, 0, 0, 1, 0, 0, 1.0]), method="spo_rloo")
    assert adv[1] == 0 and adv[2] == 0 and keep.tolist() == [False, False, False, True, True, True, True]


def test_treerl_example(backend):
    parent, reward, at = _example_tree()
    values = trees.tree_values(parent, reward, mode="mean_leaves")
    # leaves 1, 1, 1, 0, 0: V(root) = 3/5; V(x) = 2/3 over 3 leaves
    assert values[at["root"]].item() == pytest.approx(3 / 5)
    adv, keep = trees.tree_advantages(parent, reward, method="treerl")
    assert adv[at["x"]].item() == pytest.approx(((2 / 3 - 3 / 5) + (2 / 3 - 3 / 5)) / math.sqrt(3))
    assert adv[at["a"]].item() == pytest.approx((1 - 3 / 5) + (1 - 3 / 5))
    assert adv[at["d"]].item() == pytest.approx((0 - 3 / 5) + (0 - 2 / 3))
    assert adv[at["root"]].item() == 0 and not keep[at["root"]] and keep.sum() == 6
    adv_rloo, _ = trees.tree_advantages(parent, reward, method="treerl", leaf_rloo=True)
    torch.testing.assert_close(adv_rloo, adv * 5 / 4)  # n / (n - 1) with n = 5 leaves


def test_treepo_example(backend):
    parent, reward, at = _example_tree()
    adv, keep = trees.tree_advantages(parent, reward, method="treepo", whiten=False)
    # subgroups: root (1, 1, 1, 0, 0; mean 3/5) and x (1, 1, 0; mean 2/3)
    assert adv[at["a"]].item() == pytest.approx(1 - 3 / 5)
    assert adv[at["b"]].item() == pytest.approx(((1 - 3 / 5) + (1 - 2 / 3)) / 2)
    assert adv[at["d"]].item() == pytest.approx(((0 - 3 / 5) + (0 - 2 / 3)) / 2)
    assert keep.tolist() == [n in "abcde" for n in sorted(at, key=at.get)]
    adv_gs, _ = trees.tree_advantages(parent, reward, method="treepo", whiten=False, subgroup_weighting="group_size")
    assert adv_gs[at["b"]].item() == pytest.approx(((1 - 3 / 5) * 5 + (1 - 2 / 3) * 3) / 8)
    white, _ = trees.tree_advantages(parent, reward, method="treepo")
    leaves = adv[keep].double()
    expected = (leaves - leaves.mean()) / torch.sqrt(leaves.var() + 1e-8)  # unbiased, like verl
    torch.testing.assert_close(white[keep].double(), expected, rtol=1e-6, atol=1e-6)
    # a chain node (one leaf below) forms no subgroup of its own
    chain = torch.tensor([-1, 0, 1, 0])  # root -> 1 -> 2 (r=1), root -> 3 (r=0)
    adv, _ = trees.tree_advantages(chain, torch.tensor([9.0, 9.0, 1.0, 0.0]), method="treepo", whiten=False)
    assert adv[2].item() == pytest.approx(0.5) and adv[3].item() == pytest.approx(-0.5)


def test_arpo_example(backend):
    # ARPO's hard attribution on root -> a (r=1), root -> x -> {b (r=1), c (r=0)}; scrambled order.
    # Leaves 1, 1, 0: mean 2/3, Bessel variance ((1/3)^2 + (1/3)^2 + (2/3)^2) / 2 = 1/3.
    nodes = {"root": -1, "a": "root", "x": "root", "b": "x", "c": "x"}
    order = ["b", "x", "root", "c", "a"]
    at = {n: i for i, n in enumerate(order)}
    parent = torch.tensor([-1 if nodes[n] == -1 else at[nodes[n]] for n in order])
    reward = torch.tensor([{"a": 1.0, "b": 1.0, "c": 0.0}.get(n, float("nan")) for n in order])
    den = math.sqrt(1 / 3) + 1e-6
    adv, keep = trees.tree_advantages(parent, reward, method="arpo", eps=1e-6)
    assert adv[at["a"]].item() == pytest.approx((1 - 2 / 3) / den, rel=1e-6)  # each leaf: GRPO's
    assert adv[at["b"]].item() == pytest.approx((1 - 2 / 3) / den, rel=1e-6)
    assert adv[at["c"]].item() == pytest.approx((0 - 2 / 3) / den, rel=1e-6)
    # the shared segment x: the mean of b's and c's advantages, ((1/3) + (-2/3)) / 2 / den
    assert adv[at["x"]].item() == pytest.approx(-1 / 6 / den, rel=1e-6)
    assert adv[at["root"]].item() == 0 and keep.tolist() == [n != "root" for n in order]
    adv8, _ = trees.tree_advantages(parent, reward, method="arpo")  # the op's default eps 1e-8
    assert adv8[at["c"]].item() == pytest.approx(-(2 / 3) / (math.sqrt(1 / 3) + 1e-8), rel=1e-6)
    _, _, values = trees.tree_advantages(parent, reward, method="arpo", return_values=True)
    assert values[at["x"]].item() == pytest.approx(0.5) and values[at["root"]].item() == pytest.approx(2 / 3)
    # a tree with a single leaf (a chain): mean 0 and std 1, as rlkern.grpo's group of one
    chain = torch.tensor([-1, 0, 1])
    adv, keep = trees.tree_advantages(chain, torch.tensor([9.0, 9.0, 0.7]), method="arpo", eps=1e-6)
    assert adv[0] == 0 and adv[1:].tolist() == pytest.approx([0.7 / (1 + 1e-6)] * 2, rel=1e-6)
    assert keep.tolist() == [False, True, True]
    import rlkern
    assert rlkern.grpo(torch.tensor([0.7]), [0]).item() == pytest.approx(adv[2].item(), rel=1e-6)
    # equal leaves: 0 everywhere, not 0 / 0
    adv, keep = trees.tree_advantages(torch.tensor([-1, 0, 0, 1]), torch.tensor([0.0, 0.0, 0.3, 0.3]),
                                      method="arpo")
    assert adv.tolist() == [0.0] * 4 and keep.tolist() == [False, True, True, True]


def test_arpo_depth_one_forests_equal_grpo(backend):
    """Every leaf directly under its root: ARPO's hard attribution is GRPO over each tree's leaves,
    rlkern.grpo grouped by tree (groups of one included), at every reward dtype and int32 parent."""
    import rlkern

    g = torch.Generator().manual_seed(5)
    sizes = [4, 1, 3, 6, 2, 5]
    parent, tree = [], []
    for t, size in enumerate(sizes):
        root = len(parent)
        parent.append(-1)
        tree.append(t)
        for _ in range(size):
            parent.append(root)
            tree.append(t)
    parent, tree = torch.tensor(parent), torch.tensor(tree)
    perm = torch.randperm(len(parent), generator=g)  # shuffled node order
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    moved = parent[perm]
    parent, tree = torch.where(moved >= 0, inverse[moved.clamp(min=0)], moved), tree[perm]
    leaves = parent >= 0
    reward = torch.randint(0, 2, (len(parent),), generator=g).double() + 0.25 * torch.rand(len(parent), generator=g,
                                                                                           dtype=torch.float64)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        r = reward.to(dtype)
        want = rlkern.grpo(r[leaves], tree[leaves], eps=1e-6)
        for index in (torch.int64, torch.int32):
            adv, keep = trees.tree_advantages(parent.to(index), r, method="arpo", eps=1e-6)
            assert adv.dtype == want.dtype and torch.equal(keep, leaves), dtype
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            torch.testing.assert_close(adv[leaves], want, rtol=tol, atol=tol, msg=lambda m: f"{dtype}: {m}")
            assert (adv[~leaves] == 0).all()
        expected, _ = reference.tree_advantages(parent, r, "arpo", epsilon=1e-6)
        torch.testing.assert_close(adv.double(), expected, rtol=tol, atol=tol)


def test_arpo_rewards_far_from_zero(backend):
    # Scores around 1e4 with a spread of 0.01: the std comes from deviations merged bottom-up; a
    # sum of squares minus n mean^2 would keep about 4 of the 16 digits (relative error ~1e-4).
    parent = random_forest(5, 5, 3, seed=14, chains=1)
    reward = 1e4 + 0.01 * random_rewards(len(parent), seed=14, kind="normal").double()
    adv, _ = trees.tree_advantages(parent, reward, method="arpo", eps=1e-6)
    expected, _ = reference.tree_advantages(parent, reward, "arpo", epsilon=1e-6)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(adv, expected, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Parity with verl (the trainer TreePO is built on): depth-1 forests are GRPO groups

@pytest.mark.peer
def test_depth_one_forests_match_verl(backend):
    core_algos = import_peer("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(0)
    group_sizes = [4, 1, 3, 6, 2]  # a group of 1: verl's and TreePO's baseline 0
    parent, reward, index, lengths = [], [], [], []
    for gid, size in enumerate(group_sizes):
        root = len(parent)
        parent.append(-1)
        reward.append(float("nan"))
        lengths.append(0)
        for _ in range(size):
            parent.append(root)
            reward.append(float(torch.randint(0, 2, (1,), generator=g)) + 0.1 * float(torch.rand(1, generator=g)))
            index.append(str(gid))
            lengths.append(int(torch.randint(1, 9, (1,), generator=g)))
    parent, reward = torch.tensor(parent), torch.tensor(reward)
    leaves = parent >= 0
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[leaves][:, None]).float()
    token_rewards = torch.zeros(int(leaves.sum()), width)
    token_rewards[torch.arange(len(token_rewards)), torch.tensor(lengths)[leaves] - 1] = reward[leaves]

    theirs, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index, norm_adv_by_std_in_grpo=False)
    ours, _ = trees.tree_advantages(parent, reward, method="treepo", whiten=False)
    torch.testing.assert_close(ours[leaves][:, None] * mask, theirs, rtol=1e-6, atol=1e-6)
    spo, _ = trees.tree_advantages(parent, reward, method="spo_rloo")
    multi = torch.tensor([group_sizes[int(i)] > 1 for i in index])
    torch.testing.assert_close((spo[leaves][:, None] * mask)[multi], theirs[multi], rtol=1e-6, atol=1e-6)

    # ARPO's hard attribution on depth-1 trees is verl's GRPO (std-normalized) over each tree
    theirs, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index)
    ours, _ = trees.tree_advantages(parent, reward, method="arpo", eps=1e-6)
    torch.testing.assert_close(ours[leaves][:, None] * mask, theirs, rtol=1e-5, atol=1e-5)

    theirs, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(token_rewards, mask, index)
    ours, _ = trees.tree_advantages(parent, reward, method="treepo", leaf_weights=torch.tensor(lengths, dtype=torch.float32))
    torch.testing.assert_close(ours[leaves][:, None] * mask, theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad structures

BAD = [
    ([0, -1, 5], ValueError, r"parent\[2\] = 5 is out of range"),
    ([-1, -2], ValueError, r"parent\[1\] = -2 is out of range"),
    ([1, 0], ValueError, "no root"),
    ([0], ValueError, "no root"),
    ([-1, 2, 3, 1], ValueError, r"node 1 does not lead to a root.*1 -> 2 -> 3 -> 1"),
    ([-1, 0, 3, 4, 3], ValueError, r"node 2 does not lead to a root.*3 -> 4 -> 3"),
    ([-1, 1], ValueError, r"node 1 does not lead to a root.*1 -> 1"),
]


@pytest.mark.parametrize("parent,error,match", BAD)
def test_bad_structures_rejected(backend, parent, error, match):
    parent = torch.tensor(parent)
    reward = torch.zeros(len(parent))
    with pytest.raises(error, match=match):
        trees.tree_values(parent, reward, mode="mean_children")
    with pytest.raises(error, match=match):
        trees.tree_advantages(parent, reward, method="treepo")


def test_bad_arguments():
    parent = torch.tensor([-1, 0, 0])
    with pytest.raises(TypeError, match="parent must be int64"):
        trees.tree_values(parent.float(), torch.zeros(3))
    with pytest.raises(TypeError, match="reward must be"):
        trees.tree_values(parent, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"reward must have the shape of parent \(3,\), got \(4,\)"):
        trees.tree_values(parent, torch.zeros(4))
    with pytest.raises(ValueError, match="mode must be one of"):
        trees.tree_values(parent, torch.zeros(3), mode="mean")
    with pytest.raises(ValueError, match="method must be one of"):
        trees.tree_advantages(parent, torch.zeros(3), method="grpo")
    with pytest.raises(ValueError, match="subgroup_weighting must be one of"):
        trees.tree_advantages(parent, torch.zeros(3), method="treepo", subgroup_weighting="size")
    with pytest.raises(ValueError, match=r"max_depth must be >= 0 \(roots have depth 0\), got -1"):
        trees.tree_values(parent, torch.zeros(3), max_depth=-1)
    with pytest.raises(TypeError, match="max_depth must be an int or None, got float"):
        trees.tree_advantages(parent, torch.zeros(3), max_depth=2.0)


# ---------------------------------------------------------------------------------------------
# from_nested

def test_from_nested_matches_hand_built_forest(backend):
    leaf = lambda r, n=2: {"reward": r, "num_tokens": n}  # noqa: E731
    inner = {"num_tokens": 3, "children": [leaf(1.0), leaf(1.0, 4), leaf(0.0)]}
    tree0 = {"num_tokens": 5, "children": [leaf(1.0), inner, leaf(0.0, 1)]}
    forest = trees.from_nested([tree0, {"reward": 0.5, "num_tokens": 0}])
    assert forest.parent.tolist() == [-1, 0, 0, 2, 2, 2, 0, -1]
    assert forest.tree_id.tolist() == [0] * 7 + [1]
    assert forest.segment_start.tolist() == [0, 5, 7, 10, 12, 16, 18, 19]
    assert forest.segment_end.tolist() == [5, 7, 10, 12, 16, 18, 19, 19]
    assert math.isnan(forest.reward[0]) and forest.reward[7] == 0.5
    parent, reward, at = _example_tree()
    ours, _ = trees.tree_advantages(forest.parent, forest.reward, method="treerl")
    ref, _ = trees.tree_advantages(parent, reward, method="treerl")
    for name, i in zip("root a x b c d e".split(), range(7)):
        assert ours[i].item() == pytest.approx(ref[at[name]].item())


def test_from_nested_errors():
    node = {"reward": 1.0}
    with pytest.raises(ValueError, match=r"tree 0.children\[1\] is the same dict as tree 0.children\[0\]"):
        trees.from_nested({"children": [node, node]})
    loop = {"children": []}
    loop["children"].append({"children": [loop]})
    with pytest.raises(ValueError, match=r"tree 0.children\[0\].children\[0\] is its own ancestor"):
        trees.from_nested(loop)
    with pytest.raises(ValueError, match=r"tree 1.children\[0\] is a leaf without a 'reward'"):
        trees.from_nested([{"reward": 1.0}, {"children": [{}]}])
    with pytest.raises(ValueError, match="'children' must be a list of dicts"):
        trees.from_nested({"children": [1, 2]})
    with pytest.raises(ValueError, match="has no 'num_tokens'"):
        trees.from_nested({"num_tokens": 3, "children": [{"reward": 1.0}]})


# ---------------------------------------------------------------------------------------------
# SPO-chain

def _packed(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0)
    # a mix of confident tokens (p ~ 0.99) and uncertain ones
    probs = torch.where(torch.rand(total, generator=g) < 0.4, torch.rand(total, generator=g) * 0.9,
                        0.9 + 0.1 * torch.rand(total, generator=g))
    return probs.log(), cu, g


def _official_chain(probs, values_at_cut, score, interval):
    """The SPO-chain official episode code's per-token loop, re-derived from its description:
    cut points are low-probability positions minus one, every interval-th; a value is known at
    each cut point and at the last token (the score); each token takes the advantage of the next
    known value minus the previous one (0 before the first); confident tokens get 0."""
    n = len(probs)
    cuts = [t - 1 for t in range(n) if probs[t] < 0.9][::interval]
    known = [None] * n
    known[-1] = score
    base = None
    for c in cuts:
        if c == -1:
            base = values_at_cut[0]
        else:
            known[c] = values_at_cut[c + 1]
    adv = [None] * n
    for i in range(n):
        if known[i] is not None:
            adv[i] = 0.0 if base is None else known[i] - base
            base = known[i]
    for i in range(n - 1, -1, -1):
        if adv[i] is None:
            adv[i] = adv[i + 1]
    return [0.0 if probs[i] > 0.9 else a for i, a in enumerate(adv)]


def test_segment_advantages_match_official_loop():
    lengths = [1, 17, 40, 3, 0, 25]
    logprobs, cu, g = _packed(lengths, seed=0)
    total = int(cu[-1])
    logprobs[cu[2]] = math.log(0.5)  # a cut point at the very first token: the prompt's value
    starts = trees.spo_cutpoints(logprobs, cu, threshold=0.9, interval=2)
    cut_values = torch.rand(total, generator=g)
    final = torch.rand(len(lengths), generator=g)
    adv, mask = trees.segment_advantages(starts, cut_values, final, cu, logprobs=logprobs)
    probs = logprobs.double().exp()
    for b in range(len(lengths)):
        s, e = int(cu[b]), int(cu[b + 1])
        if s == e:
            continue
        expected = _official_chain(probs[s:e].tolist(), cut_values[s:e].double().tolist(), float(final[b]), 2)
        torch.testing.assert_close(adv[s:e].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6,
                                   atol=1e-6)
    assert (mask == (probs < 0.9)).all()
    ref_adv, ref_mask = reference.segment_advantages(starts, cut_values, final, cu, logprobs, 0.9)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-6, atol=1e-6)
    assert (ref_mask == mask).all()


@pytest.mark.parametrize("interval", [1, 5])
def test_spo_cutpoints_match_reference(interval):
    logprobs, cu, _ = _packed([7, 0, 33, 60, 1], seed=1)
    starts = trees.spo_cutpoints(logprobs, cu, interval=interval)
    assert (starts == reference.spo_cutpoints(logprobs, cu, 0.9, interval)).all()
    assert starts.sum() > 0


def test_segment_example_by_hand():
    # one sequence of 6 tokens, segments open at tokens 1 and 4: [0] before the first cut, [1, 4), [4, 6)
    starts = torch.tensor([False, True, False, False, True, False])
    cut_values = torch.tensor([9.0, 0.25, 9.0, 9.0, 0.5, 9.0])
    adv, mask = trees.segment_advantages(starts, cut_values, torch.tensor([1.0]), torch.tensor([0, 6]))
    assert adv.tolist() == [0.0, 0.25, 0.25, 0.25, 0.5, 0.5] and mask.all()


# ---------------------------------------------------------------------------------------------
# Token layout

def test_broadcast_to_tokens():
    forest = trees.from_nested({"num_tokens": 2, "children": [{"reward": 1.0, "num_tokens": 3},
                                                              {"reward": 0.0, "num_tokens": 0},
                                                              {"reward": 0.0, "num_tokens": 2}]})
    adv, _ = trees.tree_advantages(forest.parent, forest.reward, method="spo_rloo")
    tokens = trees.broadcast_to_tokens(adv, forest.segment_start, forest.segment_end, 9, fill=-7.0)
    assert tokens.tolist() == pytest.approx([0, 0] + [2 / 3] * 3 + [-1 / 3] * 2 + [-7.0, -7.0])
    # trajectory layout: two paths root->1 and root->3, segments given per (path, node)
    start, end = torch.tensor([0, 2, 5, 7]), torch.tensor([2, 5, 7, 9])
    tokens = trees.broadcast_to_tokens(adv, start, end, 9, node_index=torch.tensor([0, 1, 0, 3]))
    assert tokens.tolist() == pytest.approx([0, 0] + [2 / 3] * 3 + [0, 0] + [-1 / 3] * 2)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 5, (50,), generator=g)
    gaps = torch.randint(0, 3, (50,), generator=g)
    end = (lengths + gaps).cumsum(0)
    start = end - lengths
    perm = torch.randperm(50, generator=g)
    values = torch.randn(20, generator=g)
    index = torch.randint(0, 20, (50,), generator=g)
    total = int(end[-1]) + 3
    ours = trees.broadcast_to_tokens(values, start[perm], end[perm], total, node_index=index)
    ref = reference.broadcast_to_tokens(values, start[perm], end[perm], total, index, 0.0)
    torch.testing.assert_close(ours.double(), ref)
    with pytest.raises(ValueError, match="segments 0 and 1 overlap"):
        trees.broadcast_to_tokens(values[:2], torch.tensor([0, 3]), torch.tensor([4, 6]), 6)
    with pytest.raises(ValueError, match=r"segment 1 = \[3, 9\) is not within"):
        trees.broadcast_to_tokens(values[:2], torch.tensor([0, 3]), torch.tensor([2, 9]), 6)


# ---------------------------------------------------------------------------------------------
# torch.library

def test_opcheck():
    parent = random_forest(3, 4, 3, seed=9)
    reward = random_rewards(len(parent), seed=9, kind="normal")
    torch.library.opcheck(torch.ops.rlkern.tree_values.default, (parent, reward, "mean_leaves", None))
    for method in METHODS:
        for with_values in (False, True):
            torch.library.opcheck(torch.ops.rlkern.tree_advantages.default,
                                  (parent, reward, method, False, "average", True, None, 1e-8, with_values, None))
    torch.library.opcheck(torch.ops.rlkern.tree_advantages.default,
                          (parent, reward, "treerl", True, "average", True, None, 1e-8, True, 12))
    torch.library.opcheck(torch.ops.rlkern.cpp_tree_values.default, (parent, reward, 0))
    torch.library.opcheck(torch.ops.rlkern.cpp_tree_values.default, (parent, reward, 1, 12))
    torch.library.opcheck(torch.ops.rlkern.cpp_tree_advantages.default,
                          (parent, reward, 3, False, True, True, reward.abs(), 1e-8, True, -1))
    logprobs, cu, _ = _packed([5, 9], seed=2)
    torch.library.opcheck(torch.ops.rlkern.spo_cutpoints.default, (logprobs, cu, 0.9, 2))
    starts = trees.spo_cutpoints(logprobs, cu)
    torch.library.opcheck(torch.ops.rlkern.segment_advantages.default,
                          (starts, logprobs.exp(), torch.rand(2), cu, logprobs, 0.9))
    offsets = torch.arange(len(parent))
    torch.library.opcheck(torch.ops.rlkern.broadcast_to_tokens.default,
                          (reward, offsets, offsets + 1, len(parent) + 2, None, 0.0))


def test_torch_compile_fullgraph():
    def step(parent, reward, logprobs, cu, cut_values, final):
        adv, keep = trees.tree_advantages(parent, reward, method="treerl", max_depth=8)
        values = trees.tree_values(parent, reward, mode="mean_children")
        starts = trees.spo_cutpoints(logprobs, cu)
        seg, mask = trees.segment_advantages(starts, cut_values, final, cu, logprobs=logprobs)
        tokens = trees.broadcast_to_tokens(adv * keep, torch.arange(parent.numel()), torch.arange(parent.numel()) + 1,
                                           parent.numel())
        return tokens.sum() + values.sum() + (seg * mask).sum()

    parent = random_forest(3, 4, 3, seed=10)
    reward = random_rewards(len(parent), seed=10, kind="normal")
    logprobs, cu, g = _packed([6, 11], seed=3)
    args = (parent, reward, logprobs, cu, torch.rand(17, generator=g), torch.rand(2, generator=g))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), step(*args))


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the Triton kernels compiled, against the C++ kernels

@pytest.mark.gpu
def test_cuda_matches_cpu(monkeypatch):
    # 100k shuffled nodes: many programs per level, children ranges crossing blocks.
    parent = random_forest(400, 8, 6, seed=21, single_nodes=5, chains=5)
    reward = random_rewards(len(parent), seed=21)
    monkeypatch.setenv("RLKERN_BACKEND", "cpp")
    cpu = {m: trees.tree_advantages(parent, reward, method=m, return_values=True) for m in METHODS}
    monkeypatch.delenv("RLKERN_BACKEND")
    for method in METHODS:
        adv, keep, values = trees.tree_advantages(parent.cuda(), reward.cuda(), method=method, return_values=True)
        torch.testing.assert_close(adv.cpu(), cpu[method][0], rtol=1e-6, atol=1e-6)
        assert (keep.cpu() == cpu[method][1]).all()
        torch.testing.assert_close(values.cpu(), cpu[method][2])
    # Without RLKERN_VALIDATE a cycle is not raised on CUDA (no host sync): its nodes get NaN.
    bad = torch.tensor([-1, 0, 3, 2], device="cuda")
    values = trees.tree_values(bad, torch.ones(4, device="cuda"))
    assert values[:2].tolist() == [1.0, 1.0] and values[2:].isnan().all()
    monkeypatch.setenv("RLKERN_VALIDATE", "1")
    with pytest.raises(ValueError, match="node 2 does not lead to a root"):
        trees.tree_values(bad, torch.ones(4, device="cuda"))


@pytest.mark.gpu
def test_cuda_graph_capture_with_max_depth():
    # With max_depth the CUDA path has no host sync: the whole call can be captured and replayed.
    parent = random_forest(400, 8, 6, seed=22, single_nodes=5, chains=5).cuda()  # depth <= 12
    reward = random_rewards(len(parent), seed=22).cuda()
    expected = {m: trees.tree_advantages(parent, reward, method=m, return_values=True) for m in METHODS}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for method in METHODS:
            trees.tree_advantages(parent, reward, method=method, return_values=True, max_depth=12)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = {m: trees.tree_advantages(parent, reward, method=m, return_values=True, max_depth=12) for m in METHODS}
    reward.copy_(random_rewards(len(parent), seed=23).cuda())  # replay reads the new rewards
    graph.replay()
    torch.cuda.synchronize()
    for method in METHODS:
        fresh = trees.tree_advantages(parent, reward, method=method, return_values=True)
        for x, y in zip(captured[method], fresh):
            torch.testing.assert_close(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(captured["treerl"], expected["treerl"]))


_SM90_SCRIPT = """
import itertools
from rlkern.kernels import trees as K

f64, i64 = "*fp64", "*i64"
for mean_leaves, with_std in itertools.product([True, False], repeat=2):
    build(K._bottom_up_kernel, dict(value=f64, leaf_sum=f64, leaf_count=i64, spread=f64, reward_pos=f64,
                                    first_child=i64, num_children=i64, levels=i64, level="i64"),
          dict(MEAN_LEAVES=mean_leaves, WITH_STD=with_std, BLOCK=K._BLOCK), num_warps=4)
for method, leaf_rloo, group_size in itertools.product(range(5), [True, False], [True, False]):
    build(K._top_down_kernel, dict(adv=f64, keep="*i8", value=f64, leaf_sum=f64, leaf_count=i64, spread=f64,
                                   reward_pos=f64, parent_pos=i64, num_children=i64, carry_a=f64, carry_b=f64,
                                   levels=i64, level="i64", epsilon="fp32"),
          dict(METHOD=method, LEAF_RLOO=leaf_rloo, GROUP_SIZE=group_size, BLOCK=K._BLOCK), num_warps=4)
print("ok")
"""


def test_triton_kernels_compile_for_h100():
    # The interpreter runs the kernels' Python, not Triton's compiler, which is stricter: both
    # level kernels, every method and flag, are compiled to sm_90 cubins (no GPU needed; a fresh
    # interpreter without TRITON_INTERPRET, so that the kernels are JITFunctions).
    compile_for_sm90(_SM90_SCRIPT)


# ---------------------------------------------------------------------------------------------
# Regressions found by property-based testing (issue: one way through the ops layer)

def test_from_nested_is_linear_in_depth():
    """A 40k-deep chain (it stored each node's full path and ancestor set: 5.4 s and 2.5 GB at
    20k deep, out of memory at 40k); its values equal the leaf reward at every node."""
    depth = 40_000
    node = {"reward": 1.0, "num_tokens": 1}
    for _ in range(depth - 1):
        node = {"children": [node], "num_tokens": 1}
    forest = trees.from_nested(node)
    assert forest.parent.tolist() == [-1] + list(range(depth - 1))
    assert forest.segment_end[-1].item() == depth
    values = trees.tree_values(forest.parent, torch.nan_to_num(forest.reward))
    assert torch.equal(values, torch.ones(depth))


def test_from_nested_rejects_bad_counts_and_rewards():
    with pytest.raises(ValueError, match=r"tree 0.children\[0\]: 'num_tokens' must be an int >= 0, got -3"):
        trees.from_nested({"num_tokens": 1, "children": [{"reward": 1.0, "num_tokens": -3}]})
    with pytest.raises(ValueError, match=r"tree 0: 'num_tokens' must be an int >= 0, got 2.5"):
        trees.from_nested({"reward": 1.0, "num_tokens": 2.5})
    with pytest.raises(ValueError, match=r"tree 1.children\[1\]: 'reward' must be a number, got '1.0'"):
        trees.from_nested([{"reward": 0}, {"children": [{"reward": 1}, {"reward": "1.0"}]}])


def test_spo_grpo_eps_must_be_positive():
    """eps = 0 gave 0 / 0 = NaN advantages marked trainable for a group of equal values."""
    parent, reward = torch.tensor([-1, 0, 0]), torch.tensor([0.0, 1.0, 1.0])
    for eps in (0.0, -1e-8, math.nan, True):
        with pytest.raises(ValueError, match="tree_advantages: eps must be a finite number > 0"):
            trees.tree_advantages(parent, reward, method="spo_grpo", eps=eps)
    adv, keep = trees.tree_advantages(parent, reward, method="spo_grpo")
    assert torch.equal(adv, torch.zeros(3)) and not keep.any()


def test_treepo_rejects_negative_leaf_weights():
    parent, reward = torch.tensor([-1, 0, 0]), torch.tensor([0.0, 1.0, 0.0])
    weights = torch.tensor([-5.0, 2.0, 3.0])  # read on leaves only: the root's -5 is ignored
    adv, _ = trees.tree_advantages(parent, reward, method="treepo", leaf_weights=weights)
    assert torch.isfinite(adv).all()
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="leaf_weights must be >= 0 on leaves"):
            trees.tree_advantages(parent, reward, method="treepo", leaf_weights=torch.tensor([1.0, 2.0, bad]))


@pytest.mark.parametrize("n_seqs", [0, 3])
def test_segment_advantages_with_no_token(backend, n_seqs):
    """Zero packed tokens (B empty sequences, or B = 0) raised IndexError."""
    cu = torch.zeros(n_seqs + 1, dtype=torch.int64)
    for dtype in (torch.float32, torch.float64):
        adv, keep = trees.segment_advantages(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=dtype),
                                             torch.ones(n_seqs), cu, logprobs=torch.zeros(0))
        assert adv.shape == keep.shape == (0,) and adv.dtype == dtype and keep.dtype == torch.bool


def test_float64_runs_the_kernels(backend, monkeypatch):
    """float64 rewards ran the reference (a 1M-node forest: 9 s against 35 ms in float32) although
    both tree kernels accumulate in float64 and write float64 for float64 rewards."""
    if backend == "torch":
        pytest.skip("the reference itself")
    import rlkern.ops.trees as ops_trees

    parent = random_forest(7, 6, 4, seed=21)
    reward = random_rewards(len(parent), seed=4, kind="normal").double()
    expected = {method: reference.tree_advantages(parent, reward, method, return_values=True)
                for method in METHODS}
    expected_values = reference.tree_values(parent, reward, "mean_children")

    def boom(*args, **kwargs):
        raise AssertionError("float64 ran the reference")

    monkeypatch.setattr(ops_trees.reference, "tree_values", boom)
    monkeypatch.setattr(ops_trees.reference, "tree_advantages", boom)
    values = trees.tree_values(parent, reward, mode="mean_children")
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, expected_values, rtol=1e-12, atol=1e-12)
    for method, (adv, keep, values) in expected.items():
        ours = trees.tree_advantages(parent, reward, method=method, return_values=True)
        assert ours[0].dtype == ours[2].dtype == torch.float64
        torch.testing.assert_close(ours[0], adv, rtol=1e-12, atol=1e-12, msg=method)
        assert torch.equal(ours[1], keep), method
        torch.testing.assert_close(ours[2], values, rtol=1e-12, atol=1e-12, msg=method)


# ---------------------------------------------------------------------------------------------
# SPO-chain kernels (csrc/segments.cpp, kernels/segments.py): every backend against the float64
# reference, at every input dtype, with empty sequences, B = 0, T = 0 and many blocks per sequence

import rlkern.ops.segments as ops_segments  # noqa: E402
from conftest import assert_as_close_as_torch  # noqa: E402

CHAIN_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# empty sequences first, inside and last; a long one crossing many blocks; odd sizes
CHAIN_LENGTHS = [0, 1, 17, 0, 301, 2, 0, 45, 0]


@pytest.fixture
def small_blocks(monkeypatch):
    """Triton blocks of 16 tokens: the carried state crosses many blocks at these sizes."""
    from rlkern.kernels import segments as segment_kernels

    monkeypatch.setattr(segment_kernels, "MAX_BLOCK", 16)


def _chain_inputs(lengths, seed, dtype):
    logprobs, cu, g = _packed(lengths, seed)
    total = int(cu[-1])
    starts = torch.rand(total, generator=g) < 0.15
    starts[cu[:-1][torch.tensor(lengths) > 0][::2]] = True  # some sequences open at their first token
    starts[-3:] = True  # consecutive starts, the last token opening a segment
    cut_values = torch.randn(total, generator=g).to(dtype)
    final = torch.randn(len(lengths), generator=g).to(dtype)
    return logprobs.to(dtype), cu, starts, cut_values, final


@pytest.mark.parametrize("dtype", CHAIN_DTYPES, ids=str)
@pytest.mark.parametrize("interval", [1, 3])
def test_spo_cutpoints_kernels_match_reference(backend, small_blocks, dtype, interval):
    logprobs, cu, *_ = _chain_inputs(CHAIN_LENGTHS, 31, dtype)
    for threshold in (0.9, 0.5):
        starts = trees.spo_cutpoints(logprobs, cu, threshold=threshold, interval=interval)
        expected = reference.spo_cutpoints(logprobs, cu, threshold, interval)
        assert starts.dtype == torch.bool and torch.equal(starts, expected), (threshold, interval)
        assert expected.sum() > 10
    for cu_type in (torch.int32, torch.int64):
        starts = trees.spo_cutpoints(logprobs, cu.to(cu_type), interval=interval)
        assert torch.equal(starts, reference.spo_cutpoints(logprobs, cu, 0.9, interval))


@pytest.mark.parametrize("dtype", CHAIN_DTYPES, ids=str)
def test_segment_advantages_kernels_match_reference(backend, small_blocks, dtype):
    logprobs, cu, starts, cut_values, final = _chain_inputs(CHAIN_LENGTHS, 32, dtype)
    out = ops_segments.out_dtype(cut_values)
    for lp in (None, logprobs, logprobs.double()):
        adv, mask = trees.segment_advantages(starts, cut_values, final, cu, logprobs=lp)
        ref_adv, ref_mask = reference.segment_advantages(starts, cut_values, final, cu, lp, 0.9)
        assert adv.dtype == out and mask.dtype == torch.bool
        assert torch.equal(mask, ref_mask)
        # the PyTorch backend at this dtype (the error PyTorch itself makes: one rounding)
        torch_adv, _ = ops_segments._torch_segment_advantages(starts, cut_values, final, cu, lp, 0.9)
        assert_as_close_as_torch(adv, ref_adv, torch_adv, floor=1e-15 if dtype == torch.float64 else 1e-7,
                                 name="advantages")
        assert (adv[~ref_mask] == 0).all() and (ref_adv != 0).sum() > 50
    # a chain of the official trainer: cut points from the log-probs, then advantages
    starts = trees.spo_cutpoints(logprobs, cu, interval=2)
    adv, mask = trees.segment_advantages(starts, cut_values, final, cu, logprobs=logprobs)
    ref_adv, ref_mask = reference.segment_advantages(starts, cut_values, final, cu, logprobs, 0.9)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=0, atol=2e-7 if out == torch.float32 else 0)
    assert torch.equal(mask, ref_mask)


def test_segment_advantages_kernels_edge_layouts(backend, small_blocks):
    # one sequence without a start, one that is all starts, one opening only at its last token
    cu = torch.tensor([0, 0, 5, 9, 9, 14, 14])
    starts = torch.tensor([False] * 5 + [True] * 4 + [False] * 4 + [True])
    cut_values, final = torch.arange(14, dtype=torch.float64) * 0.5, torch.tensor([7.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    adv, mask = trees.segment_advantages(starts, cut_values, final, cu)
    ref_adv, _ = reference.segment_advantages(starts, cut_values, final, cu, None, 0.9)
    assert torch.equal(adv, ref_adv) and mask.all()
    assert adv[:5].eq(0).all() and adv[5:8].eq(0.5).all() and adv[8] == 2.0 - 4.0 and adv[13] == 4.0 - 6.5


@pytest.mark.parametrize("dtype", CHAIN_DTYPES, ids=str)
def test_broadcast_to_tokens_kernels_match_reference(backend, small_blocks, dtype):
    g = torch.Generator().manual_seed(33)
    lengths = torch.randint(0, 40, (61,), generator=g)
    lengths[::7] = 0  # empty segments
    gaps = torch.randint(0, 3, (61,), generator=g)
    end = (lengths + gaps).cumsum(0)
    start = end - lengths
    perm = torch.randperm(61, generator=g)
    start, end = start[perm], end[perm]
    total = int(end.max()) + 5
    values = torch.randn(61, generator=g).to(dtype)
    out = ops_segments.out_dtype(values)
    for index_type in (None, torch.int64, torch.int32):
        index = None if index_type is None else torch.randint(0, 61, (61,), generator=g).to(index_type)
        for fill in (0.0, -7.25):
            ours = trees.broadcast_to_tokens(values, start, end, total, node_index=index, fill=fill)
            ref = reference.broadcast_to_tokens(values, start, end, total, index, fill)
            assert ours.dtype == out and ours.shape == (total,)
            torch.testing.assert_close(ours.double(), ref, rtol=0, atol=0)  # copies: exact
    # int32 offsets, S = 0, T = 0, segments all empty
    ours = trees.broadcast_to_tokens(values, start.int(), end.int(), total)
    torch.testing.assert_close(ours.double(), reference.broadcast_to_tokens(values, start, end, total, None, 0.0),
                               rtol=0, atol=0)
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(trees.broadcast_to_tokens(values[:0], empty, empty, 9, fill=2.5), torch.full((9,), 2.5, dtype=out))
    assert trees.broadcast_to_tokens(values, torch.zeros(61, dtype=torch.int64), torch.zeros(61, dtype=torch.int64),
                                     0).shape == (0,)
    assert torch.equal(trees.broadcast_to_tokens(values[:2], torch.tensor([1, 3]), torch.tensor([1, 3]), 4, fill=1.5),
                       torch.full((4,), 1.5, dtype=out))


@pytest.mark.parametrize("n_seqs", [0, 4])
def test_spo_chain_kernels_with_no_token(backend, n_seqs):
    cu = torch.zeros(n_seqs + 1, dtype=torch.int64)
    for dtype in CHAIN_DTYPES:
        starts = trees.spo_cutpoints(torch.zeros(0, dtype=dtype), cu)
        assert starts.shape == (0,) and starts.dtype == torch.bool
    if backend == "torch":
        return  # the op layer returns early for segment_advantages without tokens: kernels only below
    none = torch.zeros(0)
    adv, mask = ops_segments._SEGMENT_ADVANTAGES.get(backend)(torch.zeros(0, dtype=torch.bool), none,
                                                               torch.ones(n_seqs), cu, none, 0.9)
    assert adv.shape == mask.shape == (0,) and adv.dtype == torch.float32 and mask.dtype == torch.bool


def test_spo_chain_ops_run_the_kernels_on_cpu(kernels_only, monkeypatch):
    """On CPU tensors, float32, float64 and bfloat16 inputs run csrc/segments.cpp."""
    monkeypatch.delenv("RLKERN_BACKEND", raising=False)
    for dtype in CHAIN_DTYPES:
        logprobs, cu, starts, cut_values, final = _chain_inputs([3, 0, 40], 34, dtype)
        for op in (ops_segments._SPO, ops_segments._SEGMENT_ADVANTAGES, ops_segments._BROADCAST):
            assert op.backend(cut_values) == "cpp", (op.op, dtype)
        assert torch.equal(trees.spo_cutpoints(logprobs, cu), reference.spo_cutpoints(logprobs, cu, 0.9, 5))
        adv, mask = trees.segment_advantages(starts, cut_values, final, cu, logprobs=logprobs)
        ref_adv, ref_mask = reference.segment_advantages(starts, cut_values, final, cu, logprobs, 0.9)
        torch.testing.assert_close(adv.double(), ref_adv, rtol=0, atol=2e-7 if dtype != torch.float64 else 0)
        assert torch.equal(mask, ref_mask)
        offsets = torch.tensor([0, 5, 9])
        tokens = trees.broadcast_to_tokens(cut_values[:2], offsets[:2], offsets[1:], 12, fill=-1.0)
        assert torch.equal(tokens.double(),
                           reference.broadcast_to_tokens(cut_values[:2], offsets[:2], offsets[1:], 12, None, -1.0))


def test_spo_chain_cpp_opcheck_and_errors():
    logprobs, cu, starts, cut_values, final = _chain_inputs([5, 0, 9], 35, torch.float32)
    ops = torch.ops.rlkern
    for lp, cv, fr in ((logprobs, cut_values, final), (logprobs.double(), cut_values.double(), final.double())):
        torch.library.opcheck(ops.cpp_spo_cutpoints.default, (lp, cu, 0.9, 2))
        torch.library.opcheck(ops.cpp_segment_advantages.default, (starts, cv, fr, cu, lp, 0.9))
        torch.library.opcheck(ops.cpp_segment_advantages.default, (starts, cv, fr, cu, None, 0.9))
        offsets = torch.tensor([0, 4, 6])
        torch.library.opcheck(ops.cpp_broadcast_to_tokens.default, (cv[:2], offsets[:2], offsets[1:], 8, None, 0.5))
        torch.library.opcheck(ops.cpp_broadcast_to_tokens.default,
                              (cv[:3], offsets[:2], offsets[1:], 8, torch.tensor([2, 0]), 0.5))
    # called directly, the C++ kernels raise instead of reading out of bounds
    with pytest.raises(ValueError, match="spo_cutpoints: cu_seqlens must start at 0 and end at 14"):
        ops.cpp_spo_cutpoints(logprobs, torch.tensor([0, 5, 20]), 0.9, 2)
    with pytest.raises(ValueError, match="segment_advantages: cu_seqlens must be non-decreasing"):
        ops.cpp_segment_advantages(starts, cut_values, final, torch.tensor([0, 10, 9, 14]), None, 0.9)
    with pytest.raises(ValueError, match=r"broadcast_to_tokens: segment 1 = \[3, 9\) is not within"):
        ops.cpp_broadcast_to_tokens(final[:2], torch.tensor([0, 3]), torch.tensor([2, 9]), 6, None, 0.0)
    with pytest.raises(ValueError, match=r"broadcast_to_tokens: node_index\[0\] = 5 is not a node in \[0, 2\)"):
        ops.cpp_broadcast_to_tokens(final[:2], torch.tensor([0, 3]), torch.tensor([2, 4]), 6, torch.tensor([5, 0]), 0.0)


_SM90_SEGMENTS_SCRIPT = """
import itertools
from rlkern.kernels import segments as K

floats = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}
for name, ptr in floats.items():
    fp64 = name == "fp64"
    build(K._spo_cutpoints_kernel, dict(lp_ptr=ptr, cu_ptr="*i64", thr_ptr="*fp64", out_ptr="*u8", threshold="fp32",
                                        interval="i32"), dict(FP64=fp64, BLOCK=K.MAX_BLOCK), num_warps=4)
    for has_lp in (True, False):
        build(K._segment_advantages_kernel,
              dict(start_ptr="*u8", cut_ptr=ptr, reward_ptr="*fp64" if fp64 else "*fp32", cu_ptr="*i64",
                   lp_ptr=ptr, thr_ptr="*fp64", adv_ptr="*fp64" if fp64 else "*fp32", mask_ptr="*u8",
                   threshold="fp32"), dict(HAS_LP=has_lp, FP64=fp64, BLOCK=K.MAX_BLOCK), num_warps=4)
    for has_index in (True, False):
        build(K._broadcast_kernel, dict(values_ptr=ptr, start_ptr="*i64", end_ptr="*i64", index_ptr="*i64",
                                        out_ptr="*fp64" if fp64 else "*fp32"),
              dict(HAS_INDEX=has_index, BLOCK=64), num_warps=4)
print("ok")
"""


def test_segments_triton_kernels_compile_for_h100():
    compile_for_sm90(_SM90_SEGMENTS_SCRIPT)


def test_broadcast_to_tokens_overlap_check_without_sort():
    """Segments in order of their starts are checked without a sort: the same verdict as a
    pairwise check, empty segments inside others included; the error names the same pair."""
    g = torch.Generator().manual_seed(36)
    for case in range(300):
        n = int(torch.randint(1, 7, (), generator=g))
        start = torch.randint(0, 12, (n,), generator=g).sort().values
        end = start + torch.randint(0, 4, (n,), generator=g) * (torch.rand(n, generator=g) < 0.8)
        overlap = any(min(end[i], end[j]) > max(start[i], start[j]) for i in range(n) for j in range(i)
                      if end[i] > start[i] and end[j] > start[j])
        assert ops_segments._sorted_without_overlap(start, end) == (not overlap), (start, end)
        values = torch.randn(n)
        if overlap:
            with pytest.raises(ValueError, match="broadcast_to_tokens: segments .* overlap"):
                trees.broadcast_to_tokens(values, start, end, 20)
        else:
            expected = reference.broadcast_to_tokens(values, start, end, 20, None, 0.0)
            torch.testing.assert_close(trees.broadcast_to_tokens(values, start, end, 20).double(), expected)
    with pytest.raises(ValueError, match=r"segments 0 and 2 overlap: \[0, 4\) and \[3, 5\)"):
        trees.broadcast_to_tokens(torch.ones(3), torch.tensor([0, 3, 3]), torch.tensor([4, 3, 5]), 6)
