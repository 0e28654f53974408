"""One small call of every public op (shared by tests/test_compile.py and
tests/test_determinism.py): op name -> (fn(*inputs), inputs, indices of the inputs that get
gradients). float64 inputs; the tests cast them where they need another dtype."""

import math

import torch

import rlkern


def flat(out):
    """Every tensor of an op's result (tensors, NamedTuples, tuples, metric dicts), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in flat(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in flat(item)]
    return []


def cases():
    """op name -> (fn(*inputs), inputs, indices of the inputs that get gradients)."""
    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b, t, v, h = 4, 5, 11, 6
    x = rn(b, t)
    m = torch.ones(b, t)
    m[1, 3:] = 0
    m[3, 4:] = 0
    lp = -rn(b, t).abs()
    ref = -rn(b, t).abs()
    s = rn(b)
    ids = torch.tensor([0, 0, 1, 1])
    labels = torch.randint(0, v, (b, t), generator=g)
    logits = rn(b, t, v)
    hidden, weight = rn(b, t, h), rn(v, h)
    parent = torch.tensor([-1, 0, 0, 1, 1, 2, 2])
    leaf_rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    cu = torch.tensor([0, 6, 13])
    start = torch.zeros(13, dtype=torch.bool)
    start[[0, 3, 7, 10]] = True
    step_ends = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 1, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 1, 0]]).bool()
    judges = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1]]).bool()
    binary = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    R = rlkern  # noqa: N806
    return {
        "entropy_from_logits": (lambda a: R.entropy_from_logits(a), (logits,), (0,)),
        "selective_log_softmax": (lambda a, y: R.selective_log_softmax(a, y, 0.8), (logits, labels), (0,)),
        "selective_log_softmax_and_entropy": (lambda a, y: R.selective_log_softmax_and_entropy(a, y),
                                              (logits, labels), (0,)),
        "token_logprobs": (lambda a, y: R.token_logprobs(a, y, return_entropy=True, temperature=0.9),
                           (logits, labels), (0,)),
        "linear_token_logprobs": (lambda hh, w, y: R.linear_token_logprobs(hh, w, y, return_entropy=True),
                                  (hidden, weight, labels), (0, 1)),
        "aggregate": (lambda a, mm: R.aggregate(a, mm, agg="seq-mean-token-mean"), (x, m), (0,)),
        "kl_penalty": (lambda a, r: R.kl_penalty(a, r), (lp, ref), (0,)),
        "policy_loss": (lambda a, o, adv, mm: R.policy_loss(a, o, adv, mm, clip_high=0.28),
                        (lp, lp + 0.1 * rn(b, t), x, m), (0,)),
        "linear_policy_loss": (lambda hh, w, y, o, adv, mm: R.linear_policy_loss(hh, w, y, o, adv, mm),
                               (hidden, weight, labels, lp, x, m), (0, 1)),
        "value_loss": (lambda a, r, o, mm: R.value_loss(a, r, o, mm), (x, rn(b, t), x + 0.3 * rn(b, t), m), (0,)),
        "preference_loss": (lambda c, r, rc, rr: R.preference_loss(c, r, rc, rr, beta=0.2),
                            (s, rn(b), rn(b), rn(b)), (0, 1)),
        "kto_loss": (lambda a, r, y, k, rk: R.kto_loss(a, r, y, k, rk), (s, rn(b), s > 0, rn(b), rn(b)), (0,)),
        "bco_loss": (lambda a, r, y, d: R.bco_loss(a, r, y, d), (s, rn(b), s > 0, rn(1)[0]), (0,)),
        "token_preference_loss": (lambda a, mm, r: R.token_preference_loss(a, mm, r), (lp, m, ref), (0,)),
        "linear_preference_loss": (lambda hh, w, y, mm, r: R.linear_preference_loss(hh, w, y, mm, r),
                                   (hidden, weight, labels, m, ref), (0, 1)),
        "linear_kto_loss": (lambda hh, w, y, mm, r, k, rk: R.linear_kto_loss(hh, w, y, mm, r, ids > 0, k, rk),
                            (hidden, weight, labels, m, ref, rn(b), rn(b)), (0, 1)),
        "dpo_token_rewards": (lambda a, r, mm: R.dpo_token_rewards(a, r, mm), (lp, ref, m), ()),
        "group_preference_loss": (lambda a, i, sc, r: R.group_preference_loss(a, i, sc, r),
                                  (s, ids, rn(b), rn(b)), (0,)),
        "group_weights": (lambda sc, i, r, o: R.group_weights(sc, i, r, o), (rn(b), ids, rn(b), rn(b)), ()),
        "srpo_loss": (lambda a, r: R.srpo_loss(a, r), (-rn(3, 6).abs(), -rn(3, 6).abs()), (0,)),
        "soft_bellman_loss": (lambda a, mm, r, val, rw: R.soft_bellman_loss(a, mm, r, val, rw, beta=0.3, kl_coef=0.1),
                              (lp, m, ref, x, s), (0, 3)),
        "running_reward_norm": (lambda r: R.running_reward_norm(r, clip=3.0), (s,), ()),
        "constrained_rewards": (lambda r, i, j, base: R.constrained_rewards(r, i, j, base), (s, ids, judges, rn(b)),
                                ()),
        "step_advantage_loss": (lambda a, mm, r, adv, se: R.step_advantage_loss(a, mm, r, adv, se, beta=0.5),
                                (lp, m, ref, x, step_ends), (0,)),
        "ensemble_rewards": (lambda r: R.ensemble_rewards(r, method="mean"), (rn(b, 3),), ()),
        "shape_rewards": (lambda sc, i, calls: R.shape_rewards(sc, i, method="otc", tool_calls=calls),
                          (binary, ids, torch.tensor([2, 0, 1, 3])), ()),
        "hbpo_advantages": (lambda r, i, bud: R.hbpo_advantages(r, i, bud),
                            (s, ids, torch.tensor([512, 512, 1024, 1024])), ()),
        "token_weights": (lambda a, i, mm: R.token_weights(a, i, mm), (torch.log_softmax(rn(b, t, 7), -1), ids, m),
                          ()),
        "broadcast_to_tokens": (lambda nv, lo, hi: R.broadcast_to_tokens(nv, lo, hi, 9),
                                (rn(3), torch.tensor([0, 3, 6]), torch.tensor([2, 5, 9])), ()),
        "segment_advantages": (lambda st, cv, fr, c, a: R.segment_advantages(st, cv, fr, c, logprobs=a, threshold=0.5),
                               (start, rn(13).abs(), binary[:2], cu, -rn(13).abs()), ()),
        "spo_cutpoints": (lambda a, c: R.spo_cutpoints(a, c, interval=2), (-rn(13).abs(), cu), ()),
        "tree_advantages": (lambda p, r: R.tree_advantages(p, r), (parent, leaf_rewards), ()),
        "tree_values": (lambda p, r: R.tree_values(p, r), (parent, leaf_rewards), ()),
        "bnpo": (lambda sc, i, mm: R.bnpo(sc, i, mm), (torch.rand(b, generator=g, dtype=torch.float64), ids, m), ()),
        "discounted_returns": (lambda r, mm: R.discounted_returns(r, mm, gamma=0.9), (x, m), ()),
        "egae": (lambda r, val, mm, tr: R.egae(r, val, mm, tr, gamma=0.99, lam=0.95),
                 (x, rn(b, t), m, torch.tensor([True, False, True, False])), ()),
        "gae": (lambda r, val, mm: R.gae(r, val, mm, gamma=0.99, lam=0.95), (x, rn(b, t), m), ()),
        "gdpo": (lambda sc, i, mm: R.gdpo(sc, i, mm), (rn(b, 2), ids, m), ()),
        "gigpo_step_groups": (lambda sr, ak, i, mm: R.gigpo_step_groups(sr, ak, i, mm),
                              (s, torch.tensor([5, 6, 5, 5]), ids, m), ()),
        "gpg": (lambda sc, i, mm: R.gpg(sc, i, mm), (s, ids, m), ()),
        "group_index": (lambda i: R.group_index(i), (torch.tensor([7, 7, 3, 9]),), ()),
        "group_normalize": (lambda sc, i: R.group_normalize(sc, i), (s, ids), ()),
        "grpo": (lambda sc, i, mm: R.grpo(sc, i, mm), (s, ids, m), ()),
        "grpo_passk": (lambda sc, i, mm: R.grpo_passk(sc, i, mm), (binary, ids, m), ()),
        "masked_whiten": (lambda a, mm: R.masked_whiten(a, mm), (x, m), ()),
        "opo": (lambda sc, i, mm: R.opo(sc, i, mm), (s, ids, m), ()),
        "optimal_token_baseline": (lambda r, i, mm, o, sp: R.optimal_token_baseline(r, i, mm, o, sp),
                                   (x, ids, m, lp, x.abs()), ()),
        "outcome_to_tokens": (lambda sc, mm: R.outcome_to_tokens(sc, mm), (s, m), ()),
        "reinforce_pp": (lambda r, mm: R.reinforce_pp(r, mm, gamma=0.9), (x, m), ()),
        "reinforce_pp_baseline": (lambda sc, i, mm: R.reinforce_pp_baseline(sc, i, mm), (s, ids, m), ()),
        "remax": (lambda r, base, mm: R.remax(r, base, mm), (x, s, m), ()),
        "rloo": (lambda sc, i, mm: R.rloo(sc, i, mm), (s, ids, m), ()),
        "overlong_rewards": (lambda sc, n: R.overlong_rewards(sc, n, max_length=20, cache_length=8),
                             (s, torch.tensor([3, 14, 19, 25])), ()),
        "kl_rewards": (lambda sc, a, r, mm: R.kl_rewards(sc, a, r, mm, kl_coef=0.1, kl_clip=5.0, reward_clip=(-1, 1)),
                       (s, lp, ref, m), ()),
        "gigpo_advantages": (lambda e, st, mm: R.gigpo_advantages(e, st, mm, step_weight=0.5), (s, rn(b), m), ()),
        "action_rewards": (lambda p, tt, pt, bx, f: R.action_rewards(p, tt, pt, bx, f),
                           (torch.tensor([0, 1, 2, -1]), torch.tensor([0, 1, 1, 2]), rn(b, 2),
                            torch.tensor([[-1.0, -1, 1, 1]] * 3 + [[math.nan] * 4], dtype=torch.float64),
                            torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)), ()),
        "dynamic_sampling_mask": (lambda sc, i, mm: R.dynamic_sampling_mask(sc, i, mm),
                                  (torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64), ids, m), ()),
    }
