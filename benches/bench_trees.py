"""Tree values + advantages over a 1M-node forest: rlkern vs eager PyTorch vs per-node Python.

    python -m rlkern.benches.bench_trees [--trees 4096 --nodes 250] [--device cpu] [--out FILE]

The forest: ``--trees`` random recursive trees of ``--nodes`` nodes each (every new node picks
its parent among the previous ones of its tree, from a window of random width so that some
trees are bushy and some chain-like; depth capped per tree at 1..12), node order shuffled over
the whole forest. Rewards are 0/1 (verifiable rewards).

Implementations:
- rlkern: ``tree_advantages(..., return_values=True)``, values and advantages from one pass (C++
  on CPU, Triton on CUDA); "rlkern 2 calls": ``tree_values`` then ``tree_advantages``; on CUDA
  also "rlkern max_depth": the same call given the forest's depth bound (12), without host sync;
- eager: the same level-synchronous passes written with PyTorch ops (pointer doubling for the
  depth, one stable sort, index_add per level) -- what a careful user writes without a kernel;
- float64 rewards: the same call on float64 rewards (float64 outputs), beside float32 rewards
  and the float64 reference (what float64 ran before the kernels took it);
- python: a clear per-node Python loop over lists (children lists, breadth-first order, one
  reverse pass for values, one pass for advantages), the way the papers' code walks its trees,
  without any validation; tensors converted with .tolist() (CPU only, a few rounds).

Token layout (``--trees`` sequences of ``--nodes`` * 4 tokens on average, float32 and float64):
``segment_advantages`` with the probability mask, and ``broadcast_to_tokens`` of the forest's
node values over a node-packed layout (0..7 tokens a node, in node order): rlkern (the public op:
checks, then the C++ / Triton kernel) against "torch", the vectorized PyTorch these ops ran
before their kernels (now their torch backend, rlkern/ops/segments.py), called directly.

Bytes counted: the int64 parent array and the float32 reward array read once, the float32
outputs (and bool keep) written once, per op; the kernels touch more (the order they build),
so GB/s here is a lower bound of the traffic.
"""

from __future__ import annotations

import argparse
import math

import torch

import rlkern.trees as trees
from rlkern.ops import segments as ops_segments
from rlkern.reference import trees as reference
from rlkern.benches import common


MAX_DEPTH = 12  # depth cap of random_forest's trees


def random_forest(num_trees: int, nodes_per_tree: int, seed: int = 0, max_depth: int = MAX_DEPTH) -> torch.Tensor:
    """parent [num_trees * nodes_per_tree] int64, shuffled."""
    g = torch.Generator().manual_seed(seed)
    t, n = num_trees, nodes_per_tree
    cap = torch.randint(1, max_depth + 1, (t,), generator=g)
    window = torch.randint(1, n + 1, (t,), generator=g)
    parent = torch.full((t, n), -1, dtype=torch.int64)
    depth = torch.zeros((t, n), dtype=torch.int64)
    rows = torch.arange(t)
    for i in range(1, n):
        lo = (i - window).clamp(min=0)
        p = lo + (torch.rand(t, generator=g) * (i - lo)).long()
        for _ in range(max_depth):  # too deep: attach to an ancestor instead
            too_deep = depth[rows, p] >= cap
            if not too_deep.any():
                break
            p = torch.where(too_deep, parent[rows, p].clamp(min=0), p)
        parent[:, i] = p
        depth[:, i] = depth[rows, p] + 1
    flat = (parent + (rows * n)[:, None])
    flat[:, 0] = -1
    flat = flat.reshape(-1)
    perm = torch.randperm(t * n, generator=g)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(t * n)
    moved = flat[perm]
    return torch.where(moved >= 0, inverse[moved.clamp(min=0)], moved)


def eager_spo(parent: torch.Tensor, reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPO-tree values and "rloo" advantages with PyTorch ops, level by level (no validation)."""
    m = parent.numel()
    idx = torch.arange(m, device=parent.device)
    up = torch.where(parent >= 0, parent, idx)
    depth = (parent >= 0).long()
    for _ in range(math.ceil(math.log2(max(m, 2))) + 1):
        depth = depth + depth[up]
        up = up[up]
    order = torch.argsort(depth, stable=True)
    counts = torch.bincount(depth).tolist()
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    has_parent = parent >= 0
    target = parent.clamp(min=0)
    num_children = torch.zeros(m, dtype=torch.float64, device=parent.device).index_add_(0, target, has_parent.double())
    value = torch.where(num_children == 0, reward.double(), 0.0)
    for d in range(len(counts) - 1, 0, -1):
        nodes = order[bounds[d]:bounds[d + 1]]
        sums = torch.zeros(m, dtype=torch.float64, device=parent.device).index_add_(0, parent[nodes], value[nodes])
        parents = parent[nodes].unique()
        value[parents] = sums[parents] / num_children[parents]
    adv = torch.where(has_parent, value - value[target], 0.0)
    return value.float(), adv.float(), has_parent & (adv != 0)


def python_spo(parent: torch.Tensor, reward: torch.Tensor):
    """SPO-tree values and "rloo" advantages, node by node in plain Python."""
    par, rew = parent.tolist(), reward.tolist()
    children = [[] for _ in par]
    order = []
    for i, p in enumerate(par):
        (order if p < 0 else children[p]).append(i)
    for n in order:  # breadth-first: the list grows while it is read
        order.extend(children[n])
    value = [0.0] * len(par)
    for n in reversed(order):
        kids = children[n]
        value[n] = sum(value[c] for c in kids) / len(kids) if kids else rew[n]
    adv = [0.0] * len(par)
    keep = [False] * len(par)
    for n, p in enumerate(par):
        if p >= 0:
            adv[n] = value[n] - value[p]
            keep[n] = adv[n] != 0
    return torch.tensor(value), torch.tensor(adv), torch.tensor(keep)


def run(device: torch.device, num_trees: int, nodes_per_tree: int, rounds: int = 7,
        python_rounds: int = 3) -> list[common.Row]:
    parent = random_forest(num_trees, nodes_per_tree).to(device)
    m = parent.numel()
    reward = torch.randint(0, 2, (m,), generator=torch.Generator().manual_seed(1)).float().to(device)
    shape = f"M={m} ({num_trees} trees x {nodes_per_tree}) shuffled"
    peak_bw = common.copy_bandwidth_gbps(device)
    rows: list[common.Row] = []

    def add(bench, fns, bytes_moved, n_rounds=rounds, note=None):
        for name, (med, p20, p80) in common.measure(fns, device, n_rounds, label=f"{bench} M={m}").items():
            gbps = bytes_moved / (med * 1e-3) / 1e9
            rows.append(common.Row(bench, name, shape, med, p20, p80, gbps, 100 * gbps / peak_bw,
                                   extra={"note": note} if note else {}))

    io_values = m * (8 + 4 + 4)
    io_adv = m * (8 + 4 + 4 + 1)
    with torch.no_grad():
        for method, mode in (("spo_rloo", "mean_children"), ("treerl", "mean_leaves"), ("treepo", "mean_leaves")):
            fns = {
                "rlkern": lambda method=method: trees.tree_advantages(parent, reward, method=method, return_values=True),
                "rlkern 2 calls": lambda method=method, mode=mode: (trees.tree_values(parent, reward, mode=mode),
                                                                    trees.tree_advantages(parent, reward, method=method)),
            }
            if device.type == "cuda":
                fns["rlkern max_depth"] = lambda method=method: trees.tree_advantages(
                    parent, reward, method=method, return_values=True, max_depth=MAX_DEPTH)
            if method == "spo_rloo":
                fns["eager"] = lambda: eager_spo(parent, reward)
            add(f"{method} values + advantages", fns, io_values + io_adv)
        for method in ("spo_rloo", "spo_grpo", "treerl", "treepo", "arpo"):
            fns = {"rlkern": lambda method=method: trees.tree_advantages(parent, reward, method=method)}
            add(f"advantages {method}", fns, io_adv)
        # float64 rewards: the kernels accumulate in float64 either way; the reference is what
        # float64 ran before the kernels took it.
        reward64 = reward.double()
        fns = {"rlkern": lambda: trees.tree_advantages(parent, reward64, method="spo_rloo", return_values=True),
               "rlkern (float32 rewards)": lambda: trees.tree_advantages(parent, reward, method="spo_rloo",
                                                                         return_values=True)}
        if device.type == "cpu" and python_rounds > 0:
            fns["reference (float64)"] = lambda: reference.tree_advantages(parent, reward64, "spo_rloo",
                                                                           return_values=True)
        add("spo_rloo values + advantages, float64 rewards", fns, io_values + io_adv + 2 * m * 4, python_rounds)
        if device.type == "cpu" and python_rounds > 0:
            fns = {"python": lambda: python_spo(parent, reward)}
            add("spo_rloo values + advantages", fns, io_values + io_adv, python_rounds,
                note=f"{python_rounds} rounds")
        segment_rows(device, num_trees, nodes_per_tree, m, reward, rows, rounds, peak_bw)
    common.fill_ratios(rows)
    return rows


def segment_rows(device, batch: int, nodes_per_tree: int, m: int, node_values: torch.Tensor, rows: list,
                 rounds: int, peak_bw: float) -> None:
    """The token-layout rows (see the module docstring) for float32 and float64 inputs."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(0, 8 * nodes_per_tree + 1, (batch,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
    total = int(lengths.sum())
    probs = torch.where(torch.rand(total, generator=g) < 0.4, torch.rand(total, generator=g) * 0.9, 0.95)
    logprobs = probs.log().to(device)
    starts = (torch.rand(total, generator=g) < 0.02).to(device)
    counts = torch.randint(0, 8, (m,), generator=g)
    seg_end = counts.cumsum(0).to(device)
    seg_start = seg_end - counts.to(device)
    num_tokens = int(counts.sum())
    for dtype in (torch.float32, torch.float64):
        size = torch.finfo(dtype).bits // 8
        cut_values = torch.rand(total, generator=g).to(device=device, dtype=dtype)
        final = torch.rand(batch, generator=g).to(device=device, dtype=dtype)
        values = node_values.to(dtype)
        name = "float32" if dtype == torch.float32 else "float64"
        benches = {
            (f"segment_advantages {name}", f"T={total} (B={batch})", total * (1 + size + 4 + size + 1)): {
                "rlkern": lambda: trees.segment_advantages(starts, cut_values, final, cu, logprobs=logprobs),
                "torch": lambda: ops_segments._torch_segment_advantages(starts, cut_values, final, cu, logprobs, 0.9),
            },
            (f"broadcast_to_tokens {name}", f"T={num_tokens} (S={m} node-packed)", num_tokens * size + m * (size + 16)): {
                "rlkern": lambda: trees.broadcast_to_tokens(values, seg_start, seg_end, num_tokens),
                "torch": lambda: ops_segments._torch_broadcast_to_tokens(values, seg_start, seg_end, num_tokens, None,
                                                                         0.0),
            },
        }
        for (bench, shape, bytes_moved), fns in benches.items():
            for impl, (med, p20, p80) in common.measure(fns, device, rounds, label=f"{bench} {shape}").items():
                gbps = bytes_moved / (med * 1e-3) / 1e9
                rows.append(common.Row(bench, impl, shape, med, p20, p80, gbps, 100 * gbps / peak_bw))


def main(argv=None) -> list[common.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trees", type=int, default=4096)
    parser.add_argument("--nodes", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--python-rounds", type=int, default=3, help="0 skips the per-node Python loop")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the issue's target: 2)")
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = run(device, args.trees, args.nodes, args.rounds, args.python_rounds)
    print(f"# {common.device_name(device)}\n")
    print(common.markdown_table(rows))
    if args.out:
        common.write_results(args.out, device, rows, __spec__.name, argv)
    return rows


if __name__ == "__main__":
    main()
