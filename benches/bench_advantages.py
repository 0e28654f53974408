"""Advantage estimators: rlkern vs verl 0.9.1's own functions (eager PyTorch loops without verl).

    python -m rlkern.benches.bench_advantages [--batch B --steps T --samples N --group G] [--out FILE]

Defaults (the issue's shapes): GAE at B=256, T=8192 (fp32 rewards/values, int64 mask, ~1/4
of each row padding, whitened as verl returns it), and the same in float64 beside float32; the Optimal Token Baseline over that batch in
groups of G (string uids; padded, and packed with cu_seqlens) vs verl's
``compute_optimal_token_baseline_advantage``; GRPO over N=65536 samples in groups of 16 with
string uids (a numpy object array of uuid4 strings, as verl's ``uid``) and T=128 response
tokens, shuffled. The GRPO timings include mapping the strings to groups; that mapping alone
is a separate row (rlkern's C++ hash vs ``np.unique``, which verl's ``grpo_vectorized`` uses),
and "rlkern (int ids)" is the same call with the dense group numbers already made.
Bytes counted: GAE reads r, v (4 B) and the mask (8 B) and writes advantages and returns (4 B
each) per token; OTB reads r, old log-probs, sum pi^2 (4 B) and the mask (8 B) and writes two
outputs (4 B each) per padded token; GRPO reads the [N, T] rewards and mask and writes [N, T]
advantages. The float64 rows time the same call on float64 inputs (float64 outputs) beside the
float32 call; GRPO's float64 row counts the int64 mask read and the float64 advantages written.
"""

from __future__ import annotations

import argparse
import uuid

import numpy as np
import torch

from rlkern.benches import common
from rlkern.ops import advantages as ops


def _eager_gae(rewards, values, mask, gamma, lam):
    """verl's algorithm written out (used when verl is not installed)."""
    next_values = torch.zeros_like(rewards[:, 0])
    last = torch.zeros_like(rewards[:, 0])
    out = torch.empty_like(rewards)
    m = mask.to(rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t] + (1 - m[:, t]) * last
        next_values = values[:, t] * m[:, t] + (1 - m[:, t]) * next_values
        out[:, t] = last
    returns = out + values
    valid = m.bool()
    mean = out[valid].mean()
    return (out - mean) * torch.rsqrt(out[valid].var() + 1e-8), returns


def _eager_grpo(rewards, mask, index, eps=1e-6):
    """A dict-of-lists GRPO like verl's (used when verl is not installed)."""
    scores = rewards.sum(-1)
    groups: dict = {}
    for i, key in enumerate(index):
        groups.setdefault(key, []).append(i)
    out = torch.empty_like(scores)
    for members in groups.values():
        x = scores[members]
        mean, std = (x.mean(), x.std()) if len(members) > 1 else (0.0, 1.0)
        out[members] = (x - mean) / (std + eps)
    return out[:, None] * mask


def _mask(batch, steps, gen, device):
    lengths = torch.randint(steps // 2, steps + 1, (batch,), generator=gen)
    return (torch.arange(steps)[None, :] < lengths[:, None]).to(torch.int64).to(device)


def run(device: torch.device, batch: int, steps: int, samples: int, group: int, tokens: int,
        rounds: int = 5) -> list[common.Row]:
    gen = torch.Generator().manual_seed(0)
    core, verl_missing = common.peer("verl.trainer.ppo.core_algos")
    peak_bw = common.copy_bandwidth_gbps(device)
    rows: list[common.Row] = []

    def add(bench, shape, fns, bytes_moved, verl=True):
        """Time the case; verl=True: verl's function is one of its rows (a "not run" row without verl)."""
        for name, (med, p20, p80) in common.measure(fns, device, rounds, label=f"{bench} {shape}").items():
            gbps = bytes_moved / (med * 1e-3) / 1e9 if bytes_moved else None
            rows.append(common.Row(bench, name, shape, med, p20, p80, gbps,
                                   100 * gbps / peak_bw if gbps else None))
        if verl and core is None:
            rows.append(common.missing_row(bench, "verl", shape, verl_missing))

    # GRPO with string uids, first: after the [B, T] sections below, glibc's dynamic mmap
    # threshold has grown and its 32 MiB outputs faulted in their pages on some calls (measured
    # 15 ms alone, 25-45 ms after them)
    n_groups = samples // group
    uids = np.array([str(uuid.uuid4()) for _ in range(n_groups)], dtype=object).repeat(group)
    uids = uids[np.random.default_rng(0).permutation(samples)]
    scores = (torch.rand(samples, generator=gen) > 0.5).float()
    grpo_mask = _mask(samples, tokens, gen, device)
    token_rewards = torch.zeros(samples, tokens)
    token_rewards[torch.arange(samples), grpo_mask.cpu().sum(-1) - 1] = scores
    token_rewards = token_rewards.to(device)
    dense_ids = ops.group_index(uids)
    fns = {"rlkern": lambda: ops.grpo(token_rewards.sum(-1), uids, grpo_mask),
           "rlkern (int ids)": lambda: ops.grpo(token_rewards.sum(-1), dense_ids, grpo_mask)}
    if core is not None:
        fns["verl grpo"] = lambda: core.compute_grpo_outcome_advantage(token_rewards, grpo_mask, uids)
        fns["verl grpo_vectorized"] = lambda: core.compute_grpo_vectorized_outcome_advantage(
            token_rewards, grpo_mask, uids)
    else:
        fns["eager"] = lambda: _eager_grpo(token_rewards, grpo_mask, uids)
    with torch.no_grad():
        add("grpo (str uids)", f"N={samples} G={group} T={tokens}",
            fns, samples * tokens * (4 + 8 + 4))

    # the same GRPO on float64 scores (numpy's default): float64 in, float64 out, beside float32
    scores32 = token_rewards.sum(-1)
    scores64 = scores32.double()
    fns = {"rlkern": lambda: ops.grpo(scores64, dense_ids, grpo_mask),
           "rlkern (float32 scores)": lambda: ops.grpo(scores32, dense_ids, grpo_mask)}
    with torch.no_grad():
        add("grpo (int ids), float64", f"N={samples} G={group} T={tokens} fp64", fns, samples * tokens * (8 + 8),
            verl=False)

    # the other outcome estimators over the same batch (segment sums over the dense group numbers)
    outcome = {"rloo (str uids)": (lambda ids: ops.rloo(token_rewards.sum(-1), ids, grpo_mask),
                                   ["compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage"]),
               "opo (str uids)": (lambda ids: ops.opo(token_rewards.sum(-1), ids, grpo_mask),
                                  ["compute_opo_outcome_advantage"]),
               "reinforce++ baseline (str uids)": (lambda ids: ops.reinforce_pp_baseline(token_rewards.sum(-1), ids,
                                                                                         grpo_mask),
                                                   ["compute_reinforce_plus_plus_baseline_outcome_advantage"])}
    for bench, (ours, verl_names) in outcome.items():
        fns = {"rlkern": lambda ours=ours: ours(uids), "rlkern (int ids)": lambda ours=ours: ours(dense_ids)}
        for name in verl_names if core is not None else []:
            fn = getattr(core, name)
            label = "verl " + name.removeprefix("compute_").removesuffix("_outcome_advantage")
            fns[label] = lambda fn=fn: fn(token_rewards, grpo_mask, uids)
        with torch.no_grad():
            add(bench, f"N={samples} G={group} T={tokens}", fns, samples * tokens * (4 + 8 + 4))

    # the string -> group mapping alone
    fns = {"rlkern": lambda: ops.group_index(uids),
           "rlkern (<U array)": lambda: ops.group_index(uids_u),
           "np.unique": lambda: np.unique(uids, return_inverse=True)}
    uids_u = uids.astype(str)
    add("str uids -> groups", f"N={samples} uuid4", fns, None, verl=False)
    # GAE, whitened (verl's compute_gae_advantage_return output)
    rewards = torch.randn(batch, steps, generator=gen).to(device)
    values = torch.randn(batch, steps, generator=gen).to(device)
    mask = _mask(batch, steps, gen, device)
    fns = {"rlkern": lambda: ops.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True),
           "rlkern (no whiten)": lambda: ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)}
    if core is not None:
        fns["verl"] = lambda: core.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    else:
        fns["eager"] = lambda: _eager_gae(rewards, values, mask, 0.99, 0.95)
    with torch.no_grad():
        add("gae+whiten", f"B={batch} T={steps} fp32", fns, batch * steps * (4 + 4 + 8 + 4 + 4))
    # the same on float64 rewards and values (numpy's default): float64 in, float64 out
    r64, v64 = rewards.double(), values.double()
    fns = {"rlkern": lambda: ops.gae(r64, v64, mask, gamma=0.99, lam=0.95, whiten=True),
           "rlkern (float32 inputs)": lambda: ops.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True)}
    if core is not None:
        fns["verl"] = lambda: core.compute_gae_advantage_return(r64, v64, mask, 0.99, 0.95)
    with torch.no_grad():
        add("gae+whiten, float64", f"B={batch} T={steps} fp64", fns, batch * steps * (8 + 8 + 8 + 8 + 8))

    # Optimal Token Baseline over the GAE [B, T] batch in groups of `group` (string uids), padded
    # and packed (the valid tokens of each row, cu_seqlens), vs verl's loop over groups.
    otb_ids = np.array([f"uid-{i}" for i in range(max(batch // group, 1))], dtype=object).repeat(group)[:batch]
    otb_ids = otb_ids[np.random.default_rng(1).permutation(len(otb_ids))]
    logp = (-torch.rand(batch, steps, generator=gen) * 3).to(device)
    spp = (torch.rand(batch, steps, generator=gen) * 0.5).to(device)
    inside = mask != 0  # right padding: the packed tokens are the valid ones
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = inside.sum(-1).cumsum(0)
    packed = [t[inside] for t in (rewards, mask, logp, spp)]
    fns = {"rlkern": lambda: ops.optimal_token_baseline(rewards, otb_ids, mask, logp, spp),
           "rlkern (packed)": lambda: ops.optimal_token_baseline(packed[0], otb_ids, packed[1], packed[2], packed[3],
                                                                 cu_seqlens=cu)}
    if core is not None:
        fns["verl"] = lambda: core.compute_optimal_token_baseline_advantage(rewards, mask, otb_ids, logp, spp)
    with torch.no_grad():
        add("optimal_token_baseline", f"B={batch} T={steps} G={group}", fns,
            batch * steps * (4 + 8 + 4 + 4 + 4 + 4))

    common.fill_ratios(rows)
    return rows


def main(argv=None) -> list[common.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=65536)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="write FILE.json and FILE.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    rows = run(device, args.batch, args.steps, args.samples, args.group, args.tokens, args.rounds)
    return common.report(rows, device, args.out, __spec__.name, argv)


if __name__ == "__main__":
    main()
