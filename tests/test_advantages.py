"""Advantage estimators vs the float64 reference (every backend) and vs verl 0.9.1 / TRL 1.16.

Backends: "cpp" (C++ kernels, the CPU default), "triton" (Triton kernels under
TRITON_INTERPRET=1 on CPU tensors), "torch" (the op layer's PyTorch fallback).
"""

import uuid

import numpy as np
import pytest
import torch

import rlkern.algos.advantages as algos
from rlkern import _backend
from rlkern.ops import advantages as A
from rlkern.reference import advantages as R
from conftest import import_peer, compile_for_sm90



def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mask(batch, steps, layout, dtype=torch.int64, seed=0):
    """Ragged response masks: right/left padding, holes (observation tokens), an empty row."""
    g = _gen(seed)
    lengths = torch.randint(0, steps + 1, (batch,), generator=g)
    pos = torch.arange(steps)[None, :]
    if layout == "right":
        m = pos < lengths[:, None]
    elif layout == "left":
        m = pos >= (steps - lengths)[:, None]
    elif layout == "holes":
        m = (pos < lengths[:, None]) & (torch.rand(batch, steps, generator=g) > 0.3)
    else:
        m = torch.ones(batch, steps, dtype=torch.bool)
    if batch > 2 and layout != "full":
        m[1] = False  # an empty row
    return m.to(dtype)


def _close(ours, ref, tol=2e-5, name="value"):
    # fp32 outputs of float64 accumulations: one fp32 rounding (plus the fp32 inputs' own).
    torch.testing.assert_close(ours.double(), ref.double(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# GAE / EGAE / discounted returns

# (1, 1): T = 1; (5, 17): odd sizes; (4, 300): several Triton chunks with a partial last one.
GAE_SHAPES = [(1, 1), (5, 17), (4, 300)]


@pytest.mark.parametrize("batch,steps", GAE_SHAPES)
@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_gae_matches_reference(backend, batch, steps, layout, gamma, lam):
    g = _gen(1)
    rewards, values = torch.randn(batch, steps, generator=g), torch.randn(batch, steps, generator=g)
    mask = _mask(batch, steps, layout)
    adv, ret = A.gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = R.gae(rewards, values, mask, gamma, lam)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    _close(adv, ref_adv, name="advantages")
    _close(ret, ref_ret, name="returns")


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16,
                                        torch.bfloat16, torch.float32])
def test_gae_mask_dtypes_and_sliced_inputs(backend, mask_dtype):
    g = _gen(2)
    base_r, base_v = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    rewards, values = base_r[:, 3:33], base_v[::1, 5:35]  # strided rows (row stride 40)
    mask = _mask(6, 30, "holes", mask_dtype)
    adv, ret = A.gae(rewards, values, mask, gamma=0.97, lam=0.9)
    ref_adv, ref_ret = R.gae(rewards, values, mask, 0.97, 0.9)
    _close(adv, ref_adv)
    _close(ret, ref_ret)


@pytest.mark.parametrize("backend", ["cpp", "torch"], indirect=True)  # interpreter: see test_gae_many_blocks
def test_gae_long_sequence(backend):
    # T = 20000 with gamma = lam = 1: a sum of 20000 terms; float64 carries keep fp32 accuracy.
    g = _gen(3)
    rewards, values = torch.randn(2, 20000, generator=g), torch.randn(2, 20000, generator=g)
    mask = _mask(2, 20000, "holes")
    adv, ret = A.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    ref_adv, ref_ret = R.gae(rewards, values, mask, 1.0, 1.0)
    tol = 2e-5 * max(1.0, ref_adv.abs().max().item())
    _close(adv, ref_adv, tol=tol)
    _close(ret, ref_ret, tol=tol)


@pytest.mark.parametrize("backend", ["cpp", "torch"], indirect=True)
def test_discounted_returns_long_sequence(backend):
    g = _gen(3)
    rewards = torch.randn(2, 20000, generator=g)
    mask = _mask(2, 20000, "holes")
    ref = R.discounted_returns(rewards, mask, 1.0)
    _close(A.discounted_returns(rewards, mask, gamma=1.0), ref, tol=2e-5 * max(1.0, ref.abs().max().item()))


def test_gae_many_blocks_triton(monkeypatch):
    # Blocks of 16: T = 300 runs 19 chained block scans (the carry between blocks), packed too.
    if not _backend.has_triton():
        pytest.fail("triton is not installed (it is in the test extra)")
    from rlkern.kernels import advantages as triton_advantages

    monkeypatch.setattr(triton_advantages, "MAX_BLOCK", 16)
    monkeypatch.setenv("RLKERN_BACKEND", "triton")
    g = _gen(30)
    rewards, values = torch.randn(3, 300, generator=g), torch.randn(3, 300, generator=g)
    mask = _mask(3, 300, "holes", torch.bool)
    truncated = torch.tensor([True, False, True])
    adv, ret = A.egae(rewards, values, mask, truncated, gamma=0.99, lam=0.95)
    ref_adv, ref_ret = R.egae(rewards, values, mask, truncated, 0.99, 0.95)
    _close(adv, ref_adv)
    _close(ret, ref_ret)
    _close(A.discounted_returns(rewards, mask, gamma=0.97), R.discounted_returns(rewards, mask, 0.97))
    cu = torch.tensor([0, 100, 100, 900], dtype=torch.int32)
    adv_p, _ = A.egae(rewards.flatten(), values.flatten(), mask.flatten(), truncated, gamma=0.99, lam=0.95, cu_seqlens=cu)
    for b, (s, e) in enumerate([(0, 100), (100, 100), (100, 900)]):
        r_adv, _ = R.egae(rewards.flatten()[None, s:e], values.flatten()[None, s:e], mask.flatten()[None, s:e],
                          truncated[b:b + 1], 0.99, 0.95)
        _close(adv_p[s:e], r_adv[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_gae_low_precision_and_fp64_inputs(backend, dtype):
    g = _gen(4)
    rewards, values = torch.randn(3, 50, generator=g).to(dtype), torch.randn(3, 50, generator=g).to(dtype)
    mask = _mask(3, 50, "right")
    adv, ret = A.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    ref_adv, ref_ret = R.gae(rewards, values, mask, 0.99, 0.95)  # from the same rounded inputs
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(adv, ref_adv, tol=1e-10 if dtype == torch.float64 else 2e-5)
    _close(ret, ref_ret, tol=1e-10 if dtype == torch.float64 else 2e-5)


def test_egae_paper_example():
    # T-PPO's EGAE by hand: r = [0, 1], V = [0.5, 0.3], cut after 2 tokens, so V(s_2) := V(s_1) = 0.3.
    rewards, values, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.3]]), torch.ones(1, 2)
    adv, ret = A.egae(rewards, values, mask, torch.tensor([True]), gamma=0.9, lam=0.8)
    delta_1 = 1.0 + 0.9 * 0.3 - 0.3  # 0.97
    delta_0 = 0.0 + 0.9 * 0.3 - 0.5  # -0.23
    torch.testing.assert_close(adv, torch.tensor([[delta_0 + 0.9 * 0.8 * delta_1, delta_1]]))
    torch.testing.assert_close(ret, adv + values)
    # gamma = 1: the last token's residual is its reward alone; a finished row is plain GAE (V after EOS = 0)
    zero_r = torch.zeros(1, 2)
    torch.testing.assert_close(A.egae(zero_r, values, mask, torch.tensor([1]))[0], torch.tensor([[-0.2, 0.0]]))
    torch.testing.assert_close(A.egae(zero_r, values, mask, torch.tensor([0]))[0], torch.tensor([[-0.5, -0.3]]))
    # no reward on the cut token (T-PPO gives unfinished responses none): the last residual is
    # (gamma - 1) V(s_{l-1}), the form of the authors' verl recipe
    adv = A.egae(zero_r, values, mask, torch.tensor([True]), gamma=0.9, lam=0.8)[0]
    torch.testing.assert_close(adv[0, 1], torch.tensor((0.9 - 1) * 0.3))
    torch.testing.assert_close(adv[0, 0], torch.tensor(0.9 * 0.3 - 0.5 + 0.9 * 0.8 * (0.9 - 1) * 0.3))


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_egae_matches_reference(backend, layout):
    # The reference writes EGAE as the paper's truncated sum; the kernels run GAE's recurrence
    # with V(s_l) := V(s_{l-1}) (the value at the last valid token) for truncated rows.
    g = _gen(5)
    rewards, values = torch.randn(5, 25, generator=g), torch.randn(5, 25, generator=g)
    mask = _mask(5, 25, layout)
    truncated = torch.tensor([1, 1, 0, 1, 0])  # row 1 is empty
    adv, ret = A.egae(rewards, values, mask, truncated, gamma=0.95, lam=0.9)
    ref_adv, ref_ret = R.egae(rewards, values, mask, truncated, 0.95, 0.9)
    _close(adv, ref_adv)
    _close(ret, ref_ret)
    plain = A.gae(rewards, values, mask, gamma=0.95, lam=0.9)[0]
    torch.testing.assert_close(adv[truncated == 0], plain[truncated == 0])
    assert not torch.allclose(adv[[0, 3]], plain[[0, 3]])
    # with the critic's V(s_l): the standard truncated-GAE bootstrap instead of V(s_{l-1})
    boot = torch.tensor([1.5, -2.0, 0.7, 0.3, 9.0])
    adv, ret = A.egae(rewards, values, mask, truncated.bool(), gamma=0.95, lam=0.9, bootstrap_values=boot)
    ref_adv, ref_ret = R.egae(rewards, values, mask, truncated, 0.95, 0.9, bootstrap=boot)
    _close(adv, ref_adv)
    _close(ret, ref_ret)
    _close(adv, R.gae(rewards, values, mask, 0.95, 0.9, bootstrap=boot * truncated)[0])


def test_gae_packed_matches_padded(backend):
    g = _gen(6)
    lengths = [7, 0, 1, 30, 12]
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
    total = int(cu[-1])
    rewards, values = torch.randn(total, generator=g), torch.randn(total, generator=g)
    mask = (torch.rand(total, generator=g) > 0.2).to(torch.int64)
    truncated = torch.tensor([True, True, False, True, True])
    adv, ret = A.egae(rewards, values, mask, truncated, gamma=0.9, lam=0.8, cu_seqlens=cu)
    ret_only = A.discounted_returns(rewards, mask, gamma=0.9, cu_seqlens=cu)
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ra, rr = R.egae(rewards[None, s:e], values[None, s:e], mask[None, s:e], truncated[b:b + 1], 0.9, 0.8)
        _close(adv[s:e], ra[0])
        _close(ret[s:e], rr[0])
        _close(ret_only[s:e], R.discounted_returns(rewards[None, s:e], mask[None, s:e], 0.9)[0])


@pytest.mark.parametrize("batch,steps", GAE_SHAPES)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_matches_reference(backend, batch, steps, gamma):
    g = _gen(7)
    rewards = torch.randn(batch, steps, generator=g)
    mask = _mask(batch, steps, "holes")
    out = A.discounted_returns(rewards, mask, gamma=gamma)
    ref = R.discounted_returns(rewards, mask, gamma)
    _close(out, ref, tol=2e-5 * max(1.0, ref.abs().max().item()))


def test_gae_whiten_matches_reference(backend):
    g = _gen(8)
    rewards, values = torch.randn(5, 33, generator=g), torch.randn(5, 33, generator=g)
    mask = _mask(5, 33, "holes")
    adv, _ = A.gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True)
    ref_adv, _ = R.gae(rewards, values, mask, 0.99, 0.95)
    ref = R.masked_whiten(ref_adv, mask) * (mask != 0)
    _close(adv, ref)


def test_masked_whiten_matches_reference_and_raises():
    g = _gen(9)
    x = torch.randn(4, 19, generator=g) * 3 + 1
    mask = _mask(4, 19, "holes", torch.float32)
    for shift in (True, False):
        _close(A.masked_whiten(x, mask, shift_mean=shift), R.masked_whiten(x, mask, shift))
    one = torch.zeros(4, 19)
    one[0, 3] = 1
    with pytest.raises(ValueError, match="at least 2"):
        A.masked_whiten(x, one)
    with pytest.raises(ValueError, match="at least 2"):
        A.gae(x, x, torch.zeros(4, 19), whiten=True)


def test_input_errors():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="values must have shape"):
        A.gae(x, torch.randn(3, 4), torch.ones(3, 5))
    with pytest.raises(TypeError, match="rewards must be"):
        A.gae(x.long(), x, torch.ones(3, 5))
    with pytest.raises(TypeError, match="gae: cu_seqlens must be int32 or int64, got torch.float32"):
        A.gae(x.flatten(), x.flatten(), torch.ones(15), cu_seqlens=torch.tensor([0.0, 15.0]))
    with pytest.raises(ValueError, match=r"gae: cu_seqlens must rise from 0 to rewards.numel\(\) = 15"):
        A.gae(x.flatten(), x.flatten(), torch.ones(15), cu_seqlens=torch.tensor([0, 14], dtype=torch.int32))
    with pytest.raises(ValueError, match="group_ids must have 3 entries"):
        A.grpo(torch.randn(3), ["a", "b"])
    with pytest.raises(TypeError, match="only str or only int"):
        A.grpo(torch.randn(3), ["a", 1, "b"])
    with pytest.raises(ValueError, match="std must be one of"):
        A.group_normalize(torch.randn(3), [0, 0, 1], std="sample")
    with pytest.raises(ValueError, match="at least 2 samples"):
        A.grpo_passk(torch.randn(3), [0, 0, 1])
    cu = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens must be \[4\]"):
        A.grpo(torch.randn(3), [0, 0, 1], torch.ones(6), cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="response_mask must be packed"):
        A.rloo(torch.randn(3), [0, 0, 1], torch.ones(3, 2), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens needs the packed response_mask"):
        A.grpo(torch.randn(3), [0, 0, 1], cu_seqlens=cu)
    with pytest.raises(TypeError, match="opo: cu_seqlens must be int32 or int64"):
        A.opo(torch.randn(3), [0, 0, 1], torch.ones(6), cu_seqlens=cu.double())
    with pytest.raises(ValueError, match="outcome_to_tokens: cu_seqlens must rise from 0 to response_mask.numel"):
        A.outcome_to_tokens(torch.randn(3), torch.ones(6), cu_seqlens=torch.tensor([0, 2, 5, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"truncated must have shape \(3,\)"):
        A.egae(x, x, torch.ones(3, 5), torch.ones(2))
    with pytest.raises(TypeError, match="truncated must be a torch.Tensor"):
        A.egae(x, x, torch.ones(3, 5), [True, False, True])
    otb = (x.flatten(), [0, 0, 1], torch.ones(15), -x.flatten().abs(), x.flatten().abs())
    with pytest.raises(ValueError, match="group_ids must have 2 entries"):
        A.optimal_token_baseline(*otb, cu_seqlens=torch.tensor([0, 5, 15], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"response_mask must have shape \(15,\)"):
        A.optimal_token_baseline(*otb[:2], torch.ones(3, 5), *otb[3:], cu_seqlens=torch.tensor([0, 5, 9, 15],
                                                                                            dtype=torch.int32))
    with pytest.raises(ValueError, match=r"with cu_seqlens, rewards must be packed"):
        A.optimal_token_baseline(x, [0, 0, 1], torch.ones(3, 5), -x.abs(), x.abs(),
                                 cu_seqlens=torch.tensor([0, 5, 9, 15], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Group ids


def _uids(groups, size, seed=0, shuffle=True):
    rng = np.random.default_rng(seed)
    names = np.array([str(uuid.UUID(int=int(rng.integers(1 << 62)))) for _ in range(groups)])
    ids = names.repeat(size)
    return ids[rng.permutation(len(ids))] if shuffle else ids


def _same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return all(len(set(b[a == k])) == 1 for k in set(a.tolist())) and len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("backend_name", ["cpp", "torch"])
def test_group_index_every_form_gives_the_same_partition(monkeypatch, backend_name):
    monkeypatch.setenv("RLKERN_BACKEND", backend_name)
    ids = _uids(13, 5, seed=1)
    ids[:3] = ["7", "07", "7"]  # compared as strings: "7" and "07" differ
    ids[3] = ""  # an empty uid is a uid
    forms = [ids.astype(str), ids.astype(object), list(ids), tuple(ids), np.char.encode(ids.astype(str))]
    expected = {k: i for i, k in enumerate(dict.fromkeys(ids.tolist()))}
    truth = np.array([expected[k] for k in ids.tolist()])
    for form in forms:
        dense = A.group_index(form)
        assert dense.dtype == torch.int64 and dense.shape == (len(ids),)
        assert _same_partition(truth, dense.numpy()), type(form)
    ints = torch.tensor([10**12, 5, -3, 5, 10**12, 7])
    for form in (ints, ints.numpy(), ints.tolist(), ints.int()):
        assert _same_partition(ints.numpy(), A.group_index(form).numpy())


@pytest.mark.parametrize("has_cpp", [True, False])
def test_group_index_strings_holding_the_separator(monkeypatch, has_cpp):
    # Lists are joined with "\0" for the C++ hash; a uid holding "\0" must still be its own group
    # (the kernel sees the wrong separator count and Python passes lengths instead). Without
    # the C++ build, the Python strings are sorted.
    monkeypatch.setattr(_backend, "has_cpp", lambda: has_cpp)
    for ids in (["a\0", "a", "a\0", "\0", "", "\0", "a"], ["ü\0", "ü", "ü\0", "x"], ["", "", "b", ""]):
        truth = [{k: i for i, k in enumerate(dict.fromkeys(ids))}[k] for k in ids]
        assert _same_partition(truth, A.group_index(ids).numpy()), ids
        assert _same_partition(truth, A.group_index(np.array(ids, dtype=object)).numpy()), ids
    assert A.group_index([]).shape == (0,)


def test_group_index_string_hash_collisions_and_unicode():
    # Many near-identical strings (one code point apart, non-ASCII, different lengths).
    ids = [f"ü{i}" for i in range(3000)] + [f"ü{i}\u2603" for i in range(3000)] + ["ü1"] * 5
    dense = A.group_index(ids)
    assert len(set(dense.tolist())) == 6000
    assert len(set(dense[[1] + list(range(6000, 6005))].tolist())) == 1


# ---------------------------------------------------------------------------------------------
# Outcome estimators vs the reference


def _scores(n, seed=0, kind="normal"):
    g = _gen(seed)
    if kind == "binary":
        return (torch.rand(n, generator=g) > 0.5).float()
    if kind == "equal":
        return torch.full((n,), 0.3)
    return torch.randn(n, generator=g)


def _group_layout(seed=0):
    """Groups of size 1, 2 and 16, shuffled, string ids."""
    sizes = [1, 1, 2, 5, 16, 16, 3]
    names = [f"uid-{seed}-{i}" for i in range(len(sizes))]
    ids = np.array([name for name, s in zip(names, sizes) for _ in range(s)], dtype=object)
    return ids[np.random.default_rng(seed).permutation(len(ids))]


@pytest.mark.parametrize("group_backend", ["cpp", "triton", "torch"])
def test_group_statistics_backends(monkeypatch, group_backend):
    # Group sums: one C++ kernel (CPU), Triton atomics (GPU path) or PyTorch index_add (fallback).
    monkeypatch.setenv("RLKERN_BACKEND", group_backend)
    ids = _group_layout(12)
    s = _scores(len(ids), 12)
    _close(A.group_normalize(s, ids), R.group_normalize(s, list(ids)))
    _close(A.group_normalize(s, ids, std="population", singleton="zero"),
           R.group_normalize(s, list(ids), 1e-6, "population", "group", "zero"))
    _close(A.gpg(s, ids), R.gpg(s, list(ids)))
    _close(A.bnpo(torch.sigmoid(s), ids), R.bnpo(torch.sigmoid(s), list(ids)), tol=1e-4)


@pytest.mark.parametrize("group_backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.bfloat16])
def test_group_baselines_every_backend(monkeypatch, group_backend, mask_dtype):
    # RLOO (both singleton rules), OPO, GPG and REINFORCE++-baseline: the C++ pass (group sums,
    # baseline, broadcast), the Triton moments and the PyTorch path against the reference, per
    # sample and broadcast to padded and packed tokens (bf16 masks take the PyTorch broadcast).
    monkeypatch.setenv("RLKERN_BACKEND", group_backend)
    ids = _group_layout(5)
    s = _scores(len(ids), 5, "binary")
    s[::7] = 0.5
    mask, packed, inside, cu = _packed_batch(len(ids), 11, 6, mask_dtype)
    m = mask.float()
    lengths = m.sum(-1)
    per_sample = {
        "rloo raw": (A.rloo(s, ids), R.rloo(s, list(ids), "raw"), lambda mk, **kw: A.rloo(s, ids, mk, **kw)),
        "rloo zero": (A.rloo(s, ids, singleton="zero"), R.rloo(s, list(ids), "zero"),
                      lambda mk, **kw: A.rloo(s, ids, mk, singleton="zero", **kw)),
        "gpg": (A.gpg(s, ids, f_norm=2.0), R.gpg(s, list(ids), 2.0), lambda mk, **kw: A.gpg(s, ids, mk, f_norm=2.0,
                                                                                           **kw)),
    }
    for name, (ours, ref, tokens) in per_sample.items():
        _close(ours, ref, name=name)
        _close(tokens(mask), ref[:, None] * m, name=f"{name} tokens")
        _close(tokens(packed, cu_seqlens=cu), (ref[:, None] * m)[inside], name=f"{name} packed")
    opo_ref = (s.double() - R.group_baseline(s, list(ids), lengths))[:, None] * m
    assert not opo_ref.isnan().any()
    _close(A.opo(s, ids, mask), opo_ref, name="opo")
    _close(A.opo(s, ids, packed, cu_seqlens=cu), opo_ref[inside], name="opo packed")
    rpp_ref = R.masked_whiten((s.double() - R.group_baseline(s, list(ids)))[:, None] * m, mask) * m
    _close(A.reinforce_pp_baseline(s, ids, mask), rpp_ref, tol=1e-4, name="rpp")
    _close(A.reinforce_pp_baseline(s, ids, packed, cu_seqlens=cu), rpp_ref[inside], tol=1e-4, name="rpp packed")


@pytest.mark.parametrize("kind", ["normal", "binary", "equal"])
@pytest.mark.parametrize("std", ["unbiased", "population", None])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("singleton", ["verl", "zero"])
def test_group_normalize_matches_reference(kind, std, scale, singleton):
    ids = _group_layout(1)
    s = _scores(len(ids), 1, kind)
    out = A.group_normalize(s, ids, eps=1e-4, std=std, scale=scale, singleton=singleton)
    ref = R.group_normalize(s, list(ids), 1e-4, std, scale, singleton)
    # equal scores: (s - mean) is 0 up to the rounding of the mean, divided by eps
    _close(out, ref, tol=2e-5 if kind != "equal" else 1e-3)


@pytest.mark.parametrize("group_backend", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("std", ["unbiased", "population", None])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("singleton", ["verl", "zero"])
def test_group_normalize_skip_nan(monkeypatch, group_backend, std, scale, singleton):
    # TRL's unscorable completions: NaN scores leave the statistics; groups shrink (to one scored
    # sample, to none) and the NaN samples get 0.
    monkeypatch.setenv("RLKERN_BACKEND", group_backend)
    ids = _group_layout(3)
    s = _scores(len(ids), 3)
    g = _gen(4)
    s[torch.rand(len(s), generator=g) < 0.3] = float("nan")
    sizes = {}
    for i, key in enumerate(ids):
        sizes.setdefault(key, []).append(i)
    two = next(m for m in sizes.values() if len(m) == 2)
    s[two[0]] = float("nan")  # a pair left with one scored sample
    s[next(m for m in sizes.values() if len(m) == 1)[0]] = float("nan")  # a group with none
    out = A.group_normalize(s, ids, eps=1e-4, std=std, scale=scale, singleton=singleton, skip_nan=True)
    ref = R.group_normalize(s, list(ids), 1e-4, std, scale, singleton, skip_nan=True)
    assert not out.isnan().any() and (out[s.isnan()] == 0).all()
    _close(out, ref, tol=2e-5)
    # no NaN among the scores: the same numbers as without skip_nan
    clean = s.nan_to_num(0.5)
    torch.testing.assert_close(A.group_normalize(clean, ids, std=std, scale=scale, skip_nan=True),
                               A.group_normalize(clean, ids, std=std, scale=scale))
    mask = _mask(len(ids), 7, "holes")
    torch.testing.assert_close(A.group_normalize(s, ids, skip_nan=True, response_mask=mask),
                               A.group_normalize(s, ids, skip_nan=True)[:, None] * mask.float())


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32,
                                        torch.bfloat16])
def test_group_normalize_token_broadcast_and_id_forms(mask_dtype):
    ids = _group_layout(2)
    s = _scores(len(ids), 2)
    mask = _mask(len(ids), 9, "holes", mask_dtype)
    if mask_dtype in (torch.int64, torch.float32):
        mask[0, 0], mask[3, 2] = 2, -1  # verl multiplies by the mask's value (the int64 kernel's slow path)
    per_sample = A.group_normalize(s, ids)
    tokens = A.group_normalize(s, ids, response_mask=mask)
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, per_sample[:, None] * mask.float(), rtol=0, atol=0)
    sliced = torch.cat([mask, mask], 1)[:, 9:]  # row stride 18
    torch.testing.assert_close(A.group_normalize(s, ids, response_mask=sliced), tokens, rtol=0, atol=0)
    dense = torch.from_numpy(np.unique(ids.astype(str), return_inverse=True)[1].reshape(-1))
    for form in (ids.astype(str), list(ids), dense):
        torch.testing.assert_close(A.group_normalize(s, form), per_sample)


@pytest.mark.parametrize("singleton", ["raw", "zero"])
def test_rloo_matches_reference(singleton):
    ids = _group_layout(3)
    s = _scores(len(ids), 3)
    _close(A.rloo(s, ids, singleton=singleton), R.rloo(s, list(ids), singleton))


def test_opo_gpg_baselines_match_reference():
    ids = _group_layout(4)
    s = _scores(len(ids), 4, "binary")
    mask = _mask(len(ids), 11, "right")
    mask[mask.sum(-1) == 0, 0] = 1  # OPO divides by the group's total length
    lengths = mask.sum(-1)
    _close(A.opo(s, ids, mask), (s.double() - R.group_baseline(s, list(ids), lengths))[:, None] * mask)
    _close(A.gpg(s, ids, f_norm=2.0), R.gpg(s, list(ids), 2.0))


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("kind", ["normal", "binary"])
def test_grpo_passk_matches_reference(norm_by_std, kind):
    ids = np.repeat(np.array(["a", "b", "c", "d"]), [2, 5, 16, 3])
    s = _scores(len(ids), 5, kind)
    _close(A.grpo_passk(s, ids, norm_by_std=norm_by_std), R.grpo_passk(s, list(ids), 1e-6, norm_by_std))


@pytest.mark.parametrize("kind", ["binary", "normal"])
def test_bnpo_matches_reference(kind):
    ids = _group_layout(6)
    s = _scores(len(ids), 6, kind)
    lo, hi = (0.0, 1.0) if kind == "binary" else (-5.0, 5.0)
    _close(A.bnpo(s, ids, min_value=lo, max_value=hi), R.bnpo(s, list(ids), lo, hi), tol=1e-4)
    # every group with the same success rate: weight 1
    same = torch.tensor([1.0, 0.0, 1.0, 0.0])
    _close(A.bnpo(same, [0, 0, 1, 1]), R.bnpo(same, [0, 0, 1, 1]))


@pytest.mark.parametrize("norm_by_std", [False, True])
def test_gigpo_step_groups_matches_reference(norm_by_std):
    rng = np.random.default_rng(7)
    episodes = np.array([f"ep{i}" for i in rng.integers(0, 3, 60)])
    anchors = np.array([f"obs{i}" for i in rng.integers(0, 6, 60)])
    step_returns = _scores(60, 7)
    out = A.gigpo_step_groups(step_returns, anchors, episodes, norm_by_std=norm_by_std)
    _close(out, R.gigpo_step(step_returns, list(anchors), list(episodes), 1e-6, norm_by_std))


def _otb_kernel_ran(fn):
    """fn() and whether it ran the C++ OTB kernel (seen by the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.name == "rlkern::cpp_optimal_token_baseline" for e in prof.events())


# OTB has a C++ kernel and the PyTorch path (no Triton kernel: "triton" would run the C++ one).
OTB_BACKENDS = pytest.mark.parametrize("backend", ["cpp", "torch"], indirect=True)


@OTB_BACKENDS
@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("handle_zero_tail", [True, False])
def test_optimal_token_baseline_matches_reference(backend, multi_turn, handle_zero_tail):
    g = _gen(8)
    ids = np.array(["a"] * 4 + ["b"] * 3 + ["c"] + ["d"] * 2)
    batch, steps = len(ids), 14
    mask = _mask(batch, steps, "holes" if multi_turn else "right")
    rewards = torch.randn(batch, steps, generator=g) * mask
    logp = -torch.rand(batch, steps, generator=g) * 3
    spp = torch.rand(batch, steps, generator=g) * 0.5
    isw = torch.rand(batch, steps, generator=g) + 0.5
    (adv, ret), ran = _otb_kernel_ran(lambda: A.optimal_token_baseline(
        rewards, ids, mask, logp, spp, isw, handle_zero_tail=handle_zero_tail, multi_turn=multi_turn))
    assert ran == (backend == "cpp")
    ref_adv, ref_ret = R.optimal_token_baseline(rewards, mask, list(ids), logp, spp, isw, handle_zero_tail, 1e-8,
                                                compact=multi_turn)
    _close(adv, ref_adv, tol=1e-4)
    _close(ret, ref_ret)


def _otb_packed_batch(seed):
    """Ragged OTB batch, right-padded [B, T] with holes and its packed twin. Groups: "a" has a
    unique longest response (the zero tail), "b" two equally long ones, "c" is a group of one,
    "d" holds an empty sequence (no tokens at all), "e" one whose tokens are all masked (left out
    of its group with multi_turn, so "e" becomes a group of one there)."""
    g = _gen(seed)
    ids = np.array(["a", "b", "a", "c", "d", "b", "e", "a", "d", "e"], dtype=object)
    lengths = torch.tensor([6, 9, 13, 4, 0, 9, 5, 3, 7, 8])
    n, steps = len(ids), int(lengths.max())
    inside = torch.arange(steps)[None, :] < lengths[:, None]
    mask = (inside & (torch.rand(n, steps, generator=g) > 0.25)).to(torch.int64)
    mask[[1, 5], :9] = 1  # "b": equal numbers of valid tokens
    mask[2, :13] = 1  # "a": unique longest
    mask[6] = 0
    tensors = dict(rewards=torch.randn(n, steps, generator=g) * inside,
                   old_log_probs=-torch.rand(n, steps, generator=g) * 3,
                   sum_pi_squared=torch.rand(n, steps, generator=g) * 0.5,
                   rollout_is_weights=torch.rand(n, steps, generator=g) + 0.5)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return ids, mask, tensors, inside, cu


@OTB_BACKENDS
@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("handle_zero_tail", [True, False])
def test_optimal_token_baseline_packed_matches_padded_and_reference(backend, multi_turn, handle_zero_tail):
    ids, mask, tensors, inside, cu = _otb_packed_batch(23)
    kw = dict(handle_zero_tail=handle_zero_tail, multi_turn=multi_turn)
    for with_is in (False, True):
        padded_in = [tensors[k] for k in ("rewards", "old_log_probs", "sum_pi_squared")]
        padded_in.append(tensors["rollout_is_weights"] if with_is else None)
        r, lp, spp, isw = [None if t is None else t[inside] for t in padded_in]
        (adv, ret), ran = _otb_kernel_ran(
            lambda: A.optimal_token_baseline(r, ids, mask[inside], lp, spp, isw, cu_seqlens=cu, **kw))
        assert ran == (backend == "cpp")
        assert adv.shape == (int(cu[-1]),) and adv.dtype == torch.float32
        padded_adv, padded_ret = A.optimal_token_baseline(padded_in[0], ids, mask, *padded_in[1:], **kw)
        # the same float64 sums (torch path: the packed ones as differences of batch-wide prefix sums)
        torch.testing.assert_close(adv, padded_adv[inside], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ret, padded_ret[inside], rtol=1e-6, atol=1e-6)
        ref_adv, ref_ret = R.optimal_token_baseline(r, mask[inside], list(ids), lp, spp, isw, handle_zero_tail, 1e-8,
                                                    compact=multi_turn, cu_seqlens=cu)
        _close(adv, ref_adv, name="advantages")
        _close(ret, ref_ret, name="returns")
    # the cases the batch is built for really happen: zero tail, a group of one
    tail = adv[int(cu[2]) + 9:int(cu[3])]  # "a"'s longest response beyond the second-longest
    tail_ret = ret[int(cu[2]) + 9:int(cu[3])]
    if handle_zero_tail:
        torch.testing.assert_close(tail, tail_ret)
    else:
        assert not torch.allclose(tail, tail_ret)
    single = slice(int(cu[3]), int(cu[4]))  # "c"
    torch.testing.assert_close(adv[single], ret[single] * (mask[inside][single] != 0))
    # response_mask None: every token valid
    all_valid = torch.ones(int(cu[-1]), dtype=torch.bool)
    torch.testing.assert_close(A.optimal_token_baseline(r, ids, None, lp, spp, isw, cu_seqlens=cu, **kw),
                               A.optimal_token_baseline(r, ids, all_valid, lp, spp, isw, cu_seqlens=cu, **kw))


def _otb_both(monkeypatch, *args, **kwargs):
    """(C++ kernel, PyTorch path) results of optimal_token_baseline(*args, **kwargs)."""
    out = {}
    for name in ("cpp", "torch"):
        monkeypatch.setenv("RLKERN_BACKEND", name)
        out[name], ran = _otb_kernel_ran(lambda: A.optimal_token_baseline(*args, **kwargs))
        assert ran == (name == "cpp")
    return out["cpp"], out["torch"]


@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_optimal_token_baseline_cpp_matches_torch_path(monkeypatch, multi_turn, packed):
    """The C++ kernel vs the op's float64 PyTorch path where the small tests above do not reach:
    rows of up to 1031 tokens (two 512-token chunks plus a tail that is no multiple of the
    4-token scan blocks), mixed input dtypes, sliced inputs, no mask, log-probs beyond exp's
    fast range (-inf, -720, 3), one group for the batch and groups of one, 1 vs 2 threads."""
    g = _gen(31)
    batch, steps = 19, 1031
    lengths = torch.randint(0, steps + 1, (batch,), generator=g)
    lengths[:3] = torch.tensor([steps, 0, 700])
    inside = torch.arange(steps)[None, :] < lengths[:, None]
    mask = inside & (torch.rand(batch, steps, generator=g) > 0.2)
    ids = [f"g{int(i)}" for i in torch.randint(0, 5, (batch,), generator=g)]
    ids[5] = "alone"
    wide = torch.randn(batch, steps + 3, generator=g)
    rewards = wide[:, 1:-2]  # a row stride that is not T
    logp = -torch.rand(batch, steps, generator=g) * 4
    logp[0, [3, 9, 11]] = torch.tensor([-float("inf"), -720.0, 3.0])
    spp = torch.rand(batch, steps, generator=g) * 0.5
    rho = torch.rand(batch, steps, generator=g) + 0.5
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)

    def lay(t):
        return t if t is None or not packed else t[inside]

    kw = dict(multi_turn=multi_turn, cu_seqlens=cu if packed else None)
    cases = [
        (rewards, mask.to(torch.int64), ids, logp, spp, rho),
        (rewards.bfloat16(), mask.half(), ids, logp.double(), spp.half(), None),  # mixed dtypes
        (rewards, None, ["one"] * batch, logp, spp, rho),  # no mask, one group
        (rewards, mask.float(), list(map(str, range(batch))), logp, spp, None),  # groups of one
    ]
    for r, m, group_ids, lp, sp, isw in cases:
        for zero_tail in (True, False):
            ours, torch_path = _otb_both(monkeypatch, lay(r), group_ids, lay(m), lay(lp), lay(sp), lay(isw),
                                         handle_zero_tail=zero_tail, **kw)
            for a, b in zip(ours, torch_path):
                assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("RLKERN_BACKEND", "cpp")
    args = [lay(t) for t in (rewards, None, mask, logp, spp, rho)]
    args[1] = ids
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = A.optimal_token_baseline(*args, **kw)
        torch.set_num_threads(2)
        two = A.optimal_token_baseline(*args, **kw)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):  # a group's sums run in one order at any thread count
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (1, 1)])
def test_optimal_token_baseline_cpp_tiny_batches(monkeypatch, shape):
    g = _gen(32)
    r, lp = torch.randn(shape, generator=g), -torch.rand(shape, generator=g)
    ids = torch.arange(shape[0]) % 2  # int ids: an empty batch goes through the sort path on "torch"
    for multi_turn in (False, True):
        ours, torch_path = _otb_both(monkeypatch, r, ids, torch.ones(shape), lp, lp.abs(), multi_turn=multi_turn)
        for a, b in zip(ours, torch_path):
            assert a.shape == shape
            torch.testing.assert_close(a, b)
        cu = torch.zeros(shape[0] + 1, dtype=torch.int32)
        cu[1:] = torch.full((shape[0],), shape[1]).cumsum(0)
        ours, torch_path = _otb_both(monkeypatch, r.flatten(), ids, None, lp.flatten(), lp.abs().flatten(),
                                     multi_turn=multi_turn, cu_seqlens=cu)
        for a, b in zip(ours, torch_path):
            torch.testing.assert_close(a, b)


def test_remax_and_reinforce_pp_match_reference():
    g = _gen(9)
    rewards = torch.randn(6, 12, generator=g)
    mask = _mask(6, 12, "holes")
    base = torch.randn(6, generator=g)
    adv, ret = A.remax(rewards, base, mask)
    ref_ret = R.reverse_cumsum(rewards, mask)
    _close(ret, ref_ret)
    _close(adv, ref_ret - base.double()[:, None] * mask)
    adv, ret = A.reinforce_pp(rewards, mask, gamma=0.9)
    ref_ret = R.discounted_returns(rewards, mask, 0.9)
    _close(ret, ref_ret)
    _close(adv, R.masked_whiten(ref_ret, mask) * (mask != 0))


# ---------------------------------------------------------------------------------------------
# Packed layout: [total] tokens + cu_seqlens give the padded layout's numbers


def _packed_batch(n, steps, seed, mask_dtype):
    """A right-padded [n, steps] mask with holes and its packed twin (row i's first length_i
    tokens, holes included): an empty row, a full-length row. Returns (mask, packed, inside, cu)."""
    g = _gen(seed)
    lengths = torch.randint(1, steps + 1, (n,), generator=g)
    lengths[1], lengths[2] = 0, steps
    inside = torch.arange(steps)[None, :] < lengths[:, None]
    mask = (inside & (torch.rand(n, steps, generator=g) > 0.25)).to(mask_dtype)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return mask, mask[inside], inside, cu


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float16])  # fp16: the PyTorch broadcast
def test_outcome_estimators_packed_match_padded_and_reference(backend, mask_dtype):
    ids = _group_layout(20)
    n = len(ids)
    s = _scores(n, 20)
    probs = torch.sigmoid(s)
    mask, packed, inside, cu = _packed_batch(n, 9, 20, mask_dtype)
    episodes = np.array([f"ep{i % 3}" for i in range(n)])
    cases = {
        "grpo": lambda m, **kw: A.grpo(s, ids, m, **kw),
        "dr_grpo": lambda m, **kw: A.grpo(s, ids, m, norm_by_std=False, **kw),
        "trl batch": lambda m, **kw: A.group_normalize(s, ids, eps=1e-4, scale="batch", singleton="zero",
                                                       response_mask=m, **kw),
        "rloo": lambda m, **kw: A.rloo(s, ids, m, **kw),
        "rloo zero": lambda m, **kw: A.rloo(s, ids, m, singleton="zero", **kw),
        "opo": lambda m, **kw: A.opo(s, ids, m, **kw),
        "gpg": lambda m, **kw: A.gpg(s, ids, m, f_norm=2.0, **kw),
        "bnpo": lambda m, **kw: A.bnpo(probs, ids, m, **kw),
        "gigpo": lambda m, **kw: A.gigpo_step_groups(s, ids, episodes, m, norm_by_std=True, **kw),
        "reinforce_pp_baseline": lambda m, **kw: A.reinforce_pp_baseline(s, ids, m, **kw),
        "gdpo": lambda m, **kw: A.gdpo(torch.stack([s, probs], 1), ids, m, weights=[0.5, 2.0], **kw),
        "outcome_to_tokens": lambda m, **kw: A.outcome_to_tokens(s, m, **kw),
    }
    for name, fn in cases.items():
        padded, ours = fn(mask), fn(packed, cu_seqlens=cu)
        assert ours.shape == packed.shape and ours.dtype == torch.float32, name
        torch.testing.assert_close(ours, padded[inside], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    passk_ids = np.repeat(np.array(["a", "b", "c", "d"]), [2, 5, 16, 3])
    passk_mask, passk_packed, passk_inside, passk_cu = _packed_batch(26, 7, 21, mask_dtype)
    torch.testing.assert_close(A.grpo_passk(s[:26], passk_ids, passk_packed, cu_seqlens=passk_cu),
                               A.grpo_passk(s[:26], passk_ids, passk_mask)[passk_inside])
    # against the float64 reference, per token
    seg = torch.repeat_interleave(torch.arange(n), cu.diff().long())
    m = packed.double()
    _close(A.grpo(s, ids, packed, cu_seqlens=cu), R.group_normalize(s, list(ids))[seg] * m)
    _close(A.rloo(s, ids, packed, cu_seqlens=cu), R.rloo(s, list(ids))[seg] * m)
    lengths = torch.zeros(n, dtype=torch.float64).index_add_(0, seg, m)
    _close(A.opo(s, ids, packed, cu_seqlens=cu), (s.double() - R.group_baseline(s, list(ids), lengths))[seg] * m)
    _close(A.gpg(s, ids, packed, f_norm=2.0, cu_seqlens=cu), R.gpg(s, list(ids), 2.0)[seg] * m)
    _close(A.bnpo(probs, ids, packed, cu_seqlens=cu), R.bnpo(probs, list(ids))[seg] * m, tol=1e-4)
    _close(A.gigpo_step_groups(s, ids, episodes, packed, norm_by_std=True, cu_seqlens=cu),
           R.gigpo_step(s, list(ids), list(episodes), 1e-6, True)[seg] * m)
    tokens = (s.double() - R.group_baseline(s, list(ids)))[seg] * m
    _close(A.reinforce_pp_baseline(s, ids, packed, cu_seqlens=cu), R.masked_whiten(tokens, packed) * m)


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32])
def test_token_estimators_packed_match_padded_and_reference(backend, mask_dtype):
    n = 7
    mask, packed, inside, cu = _packed_batch(n, 12, 22, mask_dtype)
    rewards = torch.randn(n, 12, generator=_gen(22)) * inside
    base = torch.randn(n, generator=_gen(23))
    for ours, theirs in zip(A.reinforce_pp(rewards[inside], packed, gamma=0.9, cu_seqlens=cu),
                            A.reinforce_pp(rewards, mask, gamma=0.9)):
        torch.testing.assert_close(ours, theirs[inside], rtol=1e-6, atol=1e-6)
    adv, ret = A.remax(rewards[inside], base, packed, cu_seqlens=cu)
    padded_adv, padded_ret = A.remax(rewards, base, mask)
    torch.testing.assert_close(adv, padded_adv[inside], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret, padded_ret[inside], rtol=1e-6, atol=1e-6)
    ref_ret = R.reverse_cumsum(rewards, mask)
    _close(ret, ref_ret[inside])
    _close(adv, (ref_ret - base.double()[:, None] * mask.double())[inside])


# ---------------------------------------------------------------------------------------------
# Parity with verl 0.9.1 (every ADV_ESTIMATOR_REGISTRY entry) and TRL 1.16


def _verl():
    return import_peer("verl.trainer.ppo.core_algos")


def _verl_batch(seed=0, batch=48, steps=24, group=4, singles=True):
    g = _gen(seed)
    mask = _mask(batch, steps, "right", torch.int64, seed=seed)
    mask[:, 0] = 1  # verl's opo/whitening need non-empty responses
    ids = _uids(batch // group, group, seed=seed)
    if singles:
        ids[:2] = ["single-a", "single-b"]
    ids = ids.astype(object)
    scores = torch.randint(0, 3, (batch,), generator=g).float() / 2  # exact sums/means in fp32
    rewards = torch.zeros(batch, steps)
    rewards[torch.arange(batch), mask.sum(-1) - 1] = scores
    return rewards, mask, ids


class _Cfg(dict):
    def __getattr__(self, key):
        return self[key]


def _assert_verl_close(ours, theirs, mask, tol=1e-5, name="value"):
    m = mask != 0
    torch.testing.assert_close(ours.double()[m], theirs.double()[m], rtol=tol, atol=tol,
                               msg=lambda msg: f"{name}: {msg}")


@pytest.mark.peer
def test_verl_registry_is_covered():
    core = _verl()
    assert set(core.ADV_ESTIMATOR_REGISTRY) == set(algos.VERL_ADV_ESTIMATORS)


@pytest.mark.peer
@pytest.mark.parametrize("layout", ["right", "holes"])
def test_verl_gae_parity(layout):
    core = _verl()
    g = _gen(10)
    rewards, values = torch.randn(16, 40, generator=g), torch.randn(16, 40, generator=g)
    mask = _mask(16, 40, layout)
    mask[:, 0] = 1
    theirs = core.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    ours = algos.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    # verl's whitening and recurrence run in fp32 (ours float64): fp32 error of 40 steps
    _assert_verl_close(ours[0], theirs[0], mask, 1e-4, "advantages")
    _assert_verl_close(ours[1], theirs[1], mask, 1e-4, "returns")


OUTCOME_CASES = [(name, norm) for name in ("grpo", "grpo_vectorized", "gdpo") for norm in (True, False)] + [
    (name, None) for name in ("rloo", "rloo_vectorized", "opo", "gpg", "reinforce_plus_plus_baseline")]


@pytest.mark.peer
@pytest.mark.parametrize("name,norm", OUTCOME_CASES)
def test_verl_outcome_parity(name, norm):
    core = _verl()
    rewards, mask, ids = _verl_batch(seed=11)
    kwargs = dict(token_level_rewards=rewards, response_mask=mask, index=ids)
    if norm is not None:
        kwargs["norm_adv_by_std_in_grpo"] = norm
    theirs = core.ADV_ESTIMATOR_REGISTRY[name](**kwargs)
    ours = algos.VERL_ADV_ESTIMATORS[name](**kwargs)
    _assert_verl_close(ours[0], theirs[0], mask, name=name)
    _assert_verl_close(ours[1], theirs[1], mask, name=name)


@pytest.mark.peer
@pytest.mark.parametrize("name", ["grpo", "rloo", "opo"])
def test_verl_outcome_parity_packed(name):
    # verl's padded numbers at the valid tokens == rlkern's packed output
    core = _verl()
    rewards, mask, ids = _verl_batch(seed=19)
    theirs = core.ADV_ESTIMATOR_REGISTRY[name](token_level_rewards=rewards, response_mask=mask, index=ids)[0]
    inside = mask != 0  # right padding, no holes: the packed tokens are the valid ones
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    cu[1:] = mask.sum(-1).cumsum(0)
    ours = getattr(A, name)(rewards.sum(-1), ids, mask[inside], cu_seqlens=cu)
    torch.testing.assert_close(ours.double(), theirs[inside].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.peer
def test_verl_gdpo_multi_reward_parity():
    core = _verl()
    rewards, mask, ids = _verl_batch(seed=12, singles=False)
    batch, steps = mask.shape
    g = _gen(12)
    components = {"fmt": (torch.rand(batch, generator=g) > 0.5).float().numpy(),
                  "acc": torch.randint(0, 3, (batch,), generator=g).float().numpy()}
    prompt_len = 3
    attention = torch.cat([torch.ones(batch, prompt_len, dtype=torch.int64), mask], 1)
    config = _Cfg(gdpo_reward_keys=["fmt", "acc"], gdpo_reward_weights=[0.5, 2.0])
    kwargs = dict(token_level_rewards=rewards, response_mask=mask, index=ids, config=config,
                  non_tensor_batch=components, batch={"prompts": torch.zeros(batch, prompt_len),
                                                      "attention_mask": attention})
    theirs = core.compute_gdpo_outcome_advantage(**kwargs)
    ours = algos.compute_gdpo_outcome_advantage(**kwargs)
    _assert_verl_close(ours[0], theirs[0], mask, 1e-5)


@pytest.mark.peer
@pytest.mark.parametrize("norm", [True, False])
def test_verl_grpo_passk_parity(norm):
    core = _verl()
    rewards, mask, ids = _verl_batch(seed=13, singles=False)
    config = _Cfg(norm_adv_by_std_in_grpo=norm)
    theirs = core.compute_grpo_passk_outcome_advantage(rewards, mask, ids, config=config)
    ours = algos.compute_grpo_passk_outcome_advantage(rewards, mask, ids, config=config)
    # ties for the best sample: verl's topk and rlkern may pick different (zero-gap) winners
    _assert_verl_close(ours[0].sum(-1), theirs[0].sum(-1), torch.ones(len(ids)), name="per-sample")


@pytest.mark.peer
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_verl_reinforce_pp_and_remax_parity(gamma):
    core = _verl()
    g = _gen(14)
    mask = _mask(12, 30, "holes")
    mask[:, 0] = 1
    rewards = torch.randn(12, 30, generator=g) * mask
    cfg = _Cfg(gamma=gamma)
    theirs = core.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=cfg)
    ours = algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=cfg)
    _assert_verl_close(ours[0], theirs[0], mask, 1e-4)
    _assert_verl_close(ours[1], theirs[1], mask, 1e-4)
    base = torch.randn(12, generator=g)
    theirs = core.compute_remax_outcome_advantage(rewards, base, mask)
    ours = algos.compute_remax_outcome_advantage(rewards, base, mask)
    _assert_verl_close(ours[0], theirs[0], torch.ones_like(mask), 1e-4)  # every position, as verl
    _assert_verl_close(ours[1], theirs[1], torch.ones_like(mask), 1e-4)


@pytest.mark.peer
@OTB_BACKENDS
@pytest.mark.parametrize("name", ["optimal_token_baseline", "tir_optimal_token_baseline"])
@pytest.mark.parametrize("with_is", [False, True])
def test_verl_optimal_token_baseline_parity(backend, name, with_is):
    core = _verl()
    g = _gen(15)
    ids = np.array(["a"] * 4 + ["b"] * 3 + ["c"] + ["d"] * 2 + ["e"] * 2, dtype=object)
    batch, steps = len(ids), 16
    mask = _mask(batch, steps, "holes" if name.startswith("tir") else "right", seed=15)
    if not name.startswith("tir"):
        mask[mask.sum(-1) == 0, :2] = 1  # verl's OTB sorts lengths of every member
    mask[-2:] = 0
    mask[-2:, :5] = 1  # group "e": two equal longest responses (no zero tail)
    rewards = torch.randn(batch, steps, generator=g) * mask
    logp = -torch.rand(batch, steps, generator=g) * 3
    spp = torch.rand(batch, steps, generator=g) * 0.5
    kwargs = dict(token_level_rewards=rewards, response_mask=mask, index=ids, old_log_probs=logp, sum_pi_squared=spp,
                  rollout_is_weights=torch.rand(batch, steps, generator=g) + 0.5 if with_is else None)
    theirs = core.ADV_ESTIMATOR_REGISTRY[name](**kwargs)
    ours = algos.VERL_ADV_ESTIMATORS[name](**kwargs)
    _assert_verl_close(ours[0], theirs[0], torch.ones_like(mask), 1e-4, "advantages")
    _assert_verl_close(ours[1], theirs[1], torch.ones_like(mask), 1e-4, "returns")
    # packed: each row cut after its last valid token (holes kept, empty rows empty) gives verl's
    # padded numbers at those tokens
    row_len = torch.where(mask != 0, torch.arange(1, steps + 1), 0).amax(-1)
    inside = torch.arange(steps)[None, :] < row_len[:, None]
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = row_len.cumsum(0)
    isw = kwargs["rollout_is_weights"]
    packed = A.optimal_token_baseline(rewards[inside], ids, mask[inside], logp[inside], spp[inside],
                                      None if isw is None else isw[inside], multi_turn=name.startswith("tir"),
                                      cu_seqlens=cu)
    for ours_packed, theirs_padded in zip(packed, theirs):
        torch.testing.assert_close(ours_packed.double(), theirs_padded[inside].double(), rtol=1e-4, atol=1e-4)


def _verl_edge_mask(case, batch=8):
    if case == "T1":
        mask = torch.ones(batch, 1, dtype=torch.int64)
        mask[1] = 0  # an empty row among one-token rows
        return mask
    lengths = torch.tensor([12, 1, 0, 5, 9, 12, 3, 7])[:batch]
    pos = torch.arange(12)[None, :]
    if case == "left":
        return (pos >= 12 - lengths[:, None]).long()
    return (pos < lengths[:, None]).long()  # "empty": right padding with an empty row (row 2)


# every case keeps >= 2 valid tokens in the batch: verl's masked_whiten (GAE, REINFORCE++) is NaN below that,
# so no all-empty batch is generated
@pytest.mark.peer
@pytest.mark.parametrize("case", ["left", "empty", "T1"])
@pytest.mark.parametrize("estimator", ["gae", "reinforce_plus_plus", "grpo_norm", "grpo_nonorm"])
def test_verl_edge_case_parity(case, estimator):
    core = _verl()
    g = _gen(21)
    mask = _verl_edge_mask(case)
    batch, steps = mask.shape
    rewards = torch.randn(batch, steps, generator=g) * mask
    assert mask.sum() >= 2
    if estimator == "gae":
        values = torch.randn(batch, steps, generator=g)
        theirs = core.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
        ours = algos.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    elif estimator == "reinforce_plus_plus":
        cfg = _Cfg(gamma=0.9)
        theirs = core.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=cfg)
        ours = algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=cfg)
    else:
        ids = np.array(["a", "a", "a", "b", "b", "c", "d", "d"], dtype=object)  # "c": a singleton
        kwargs = dict(token_level_rewards=rewards, response_mask=mask, index=ids,
                      norm_adv_by_std_in_grpo=estimator == "grpo_norm")
        theirs = core.compute_grpo_outcome_advantage(**kwargs)
        ours = algos.compute_grpo_outcome_advantage(**kwargs)
    # valid tokens only (rlkern writes 0 at masked GAE positions, verl carries values there)
    assert (mask != 0).any(-1).sum() >= 2
    _assert_verl_close(ours[0], theirs[0], mask, 1e-5, f"{estimator} advantages")
    _assert_verl_close(ours[1], theirs[1], mask, 1e-5, f"{estimator} returns")


_TRL_BLOCK_START = 'if self.multi_objective_aggregation == "sum_then_normalize":'
_TRL_BLOCK_END = "advantages = torch.nan_to_num(advantages, nan=0.0)"


def _trl_advantage_block():
    """TRL's own advantage code, cut from GRPOTrainer._generate_and_score_completions."""
    import inspect
    import textwrap

    grpo = import_peer("trl.trainer.grpo_trainer")
    lines = inspect.getsource(grpo.GRPOTrainer._generate_and_score_completions).splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(_TRL_BLOCK_START)]
    ends = [i for i, line in enumerate(lines) if line.strip() == _TRL_BLOCK_END]
    if not starts or not ends or ends[-1] < starts[0]:
        pytest.fail("TRL's code moved: GRPOTrainer._generate_and_score_completions no longer holds the "
                    f"block {_TRL_BLOCK_START!r} ... {_TRL_BLOCK_END!r}; update this test")
    end = next(i for i in ends if i > starts[0])
    return textwrap.dedent("\n".join(lines[starts[0]:end + 1]))


@pytest.mark.peer
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("num_generations", [1, 4])
@pytest.mark.parametrize("funcs", [1, 3])
def test_trl_advantages_parity(aggregation, scale_rewards, num_generations, funcs):
    # TRL computes GRPO advantages inline in GRPOTrainer._generate_and_score_completions: run that
    # source itself on per-function rewards with None (NaN) entries and unscorable rows.
    import types

    trl_utils = import_peer("trl.trainer.utils")
    from rlkern.algos.advantages import trl_grpo_advantages

    code = _trl_advantage_block()
    n = 32
    g = _gen(16 + funcs)
    rewards_per_func = torch.randn(n, funcs, generator=g)
    weights = torch.rand(funcs, generator=g) + 0.5
    if funcs > 1:
        rewards_per_func[torch.rand(n, funcs, generator=g) < 0.2] = float("nan")  # one function returned None
    rewards_per_func[[3, 9, 10, 11]] = float("nan")  # unscorable rows; group 2 keeps one scored row
    if num_generations > 1:
        rewards_per_func[[16, 17, 18, 19]] = float("nan")  # a whole group unscorable
    trainer = types.SimpleNamespace(multi_objective_aggregation=aggregation, scale_rewards=scale_rewards,
                                    reward_weights=weights, reward_funcs=[None] * funcs)
    namespace = dict(torch=torch, nanstd=trl_utils.nanstd, device=torch.device("cpu"),
                     num_generations=num_generations, rewards_per_func=rewards_per_func.clone(),
                     unscorable_mask=rewards_per_func.isnan().all(dim=1), self=trainer)
    exec(compile(code, "<trl GRPOTrainer advantages>", "exec"), namespace)
    theirs = namespace["advantages"]
    assert theirs.shape == (n,) and not theirs.isnan().any()
    assert (theirs != 0).sum() >= n // 2 or num_generations == 1  # a group of one has advantage 0 in TRL
    ours = trl_grpo_advantages(rewards_per_func, num_generations, weights, scale_rewards=scale_rewards,
                               multi_objective_aggregation=aggregation)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if aggregation == "sum_then_normalize" and funcs == 1:  # the op directly, as the docstring says
        ids = torch.arange(n) // num_generations
        direct = A.group_normalize(rewards_per_func[:, 0] * weights[0], ids, eps=1e-4, scale=scale_rewards,
                                   singleton="zero", skip_nan=True)
        torch.testing.assert_close(direct, theirs, rtol=1e-5, atol=1e-5)


def test_trl_advantages_rejects_bad_input():
    from rlkern.algos.advantages import trl_grpo_advantages

    with pytest.raises(ValueError, match="num_generations must be a positive int dividing N=6"):
        trl_grpo_advantages(torch.zeros(6, 1), 4)
    with pytest.raises(ValueError, match=r"rewards_per_func must be a \[N, K\] tensor"):
        trl_grpo_advantages(torch.zeros(6), 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        trl_grpo_advantages(torch.zeros(6, 1), 3, scale_rewards="std")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        trl_grpo_advantages(torch.zeros(6, 1), 3, multi_objective_aggregation="mean")
    with pytest.raises(ValueError, match=r"reward_weights must have shape \(2,\)"):
        trl_grpo_advantages(torch.zeros(6, 2), 3, [1.0])


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile


def test_opcheck_custom_ops():
    g = _gen(17)
    r, v = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    mask = _mask(3, 9, "holes")
    mask[0, :3] = 1
    inverse = A.group_index(["a", "a", "b", "c", "c", "c"])
    s = torch.randn(6, generator=g)
    cu = torch.tensor([0, 4, 4, 27], dtype=torch.int32)
    O = torch.ops.rlkern  # noqa: E741  (the custom ops, by their registered names)
    cases = [
        (O.gae, (r, v, mask, None, None, 0.9, 0.8, True)),
        (O.gae, (r.flatten(), v.flatten(), mask.flatten(), torch.randn(3), cu, 0.9, 0.8, False)),
        (O.discounted_returns, (r, mask, None, 0.9)),
        (O.masked_whiten, (r, mask, True)),
        (O.group_index, (torch.tensor([5, 3, 5, 9]),)),
        (O.group_normalize, (s, inverse, None, None, 1e-6, "unbiased", "group", "verl")),
        (O.group_normalize, (s, inverse, _mask(6, 5, "holes"), None, 1e-6, "population", "batch", "zero")),
        (O.group_normalize, (torch.tensor([1.0, float("nan"), 2.0, 0.5, float("nan"), 3.0]), inverse, None, None,
                                 1e-4, "unbiased", "batch", "zero", True)),
        (O.group_normalize, (s, inverse, torch.ones(27, dtype=torch.bool),
                                 torch.tensor([0, 4, 4, 10, 20, 26, 27], dtype=torch.int32), 1e-4, "unbiased",
                                 "group", "verl")),
        (O.group_baseline, (s, inverse, None, None, None, "rloo_raw", 0.0)),
        (O.group_baseline, (s, inverse, torch.rand(6, generator=g), _mask(6, 5, "holes"), None, "weighted", 0.0)),
        (O.group_baseline, (s, inverse, None, torch.ones(27, dtype=torch.bool),
                                torch.tensor([0, 4, 4, 10, 20, 26, 27], dtype=torch.int32), "gpg", 2.0)),
        (O.grpo_passk, (s, A.group_index(["a", "a", "b", "b", "b", "b"]), 1e-6, True)),
        (O.bnpo, (torch.rand(6, generator=g), inverse, 0.0, 1.0)),
        (O.remax, (r, torch.randn(3), mask, None)),
        (O.remax, (r.flatten(), torch.randn(3), mask.flatten(), cu)),
        (O.optimal_token_baseline, (r, mask, torch.tensor([0, 0, 1]), -torch.rand(3, 9), torch.rand(3, 9), None, None, True, 1e-8,
                     True)),
        (O.optimal_token_baseline, (r.flatten(), mask.flatten(), torch.tensor([0, 0, 1]), -torch.rand(27), torch.rand(27),
                     torch.rand(27) + 0.5, cu, True, 1e-8, False)),
        (O.optimal_token_baseline, (r.flatten(), None, torch.tensor([0, 1, 1]), -torch.rand(27), torch.rand(27), None, cu, False,
                     1e-8, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


def test_torch_compile_fullgraph():
    g = _gen(18)
    r, v = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    mask = _mask(4, 10, "right")
    mask[:, 0] = 1
    ids = torch.tensor([3, 3, 8, 8])

    cu = torch.tensor([0, 10, 20, 30, 40], dtype=torch.int32)

    def step(r, v, mask, ids):
        adv, ret = A.gae(r, v, mask, gamma=0.99, lam=0.95, whiten=True)
        scores = r.sum(-1)
        truncated = torch.tensor([True, False, True, False])
        return (adv, ret, A.discounted_returns(r, mask, gamma=0.9), A.grpo(scores, ids, mask), A.rloo(scores, ids),
                A.masked_whiten(r, mask), A.remax(r, scores, mask)[0], A.bnpo(torch.sigmoid(scores), ids),
                A.egae(r, v, mask, truncated, gamma=0.99, lam=0.95)[0], A.grpo(scores, ids, mask.flatten(), cu_seqlens=cu),
                A.opo(scores, ids, mask.flatten(), cu_seqlens=cu),
                A.egae(r.flatten(), v.flatten(), mask.flatten(), truncated, cu_seqlens=cu)[1],
                *A.optimal_token_baseline(r, ids, mask, -v.abs(), v.abs(), multi_turn=True),
                *A.optimal_token_baseline(r.flatten(), ids, mask.flatten(), -v.abs().flatten(), v.abs().flatten(),
                                          cu_seqlens=cu))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for ours, ref in zip(compiled(r, v, mask, ids), step(r, v, mask, ids)):
        torch.testing.assert_close(ours, ref)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the Triton kernels compiled, at the benchmark's shapes, vs the
# float64 reference; no host sync on any op that promises none.

def _cuda(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_cuda_gae_and_returns_long_rows(layout):
    # T = 20000 (many chained block scans per row), B = 6 with an empty row, padded and packed,
    # against the op on float64 CPU inputs (the PyTorch float64 path, itself checked against
    # the reference at T = 20000 above).
    g = _gen(40)
    rewards, values = torch.randn(6, 20000, generator=g), torch.randn(6, 20000, generator=g)
    mask = _mask(6, 20000, layout, torch.bool)
    r64, v64 = rewards.double(), values.double()
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95)]:
        ref_adv, ref_ret = A.gae(r64, v64, mask, gamma=gamma, lam=lam)
        tol = 2e-5 * max(1.0, ref_adv.abs().max().item())
        adv, ret = A.gae(*_cuda(rewards, values, mask), gamma=gamma, lam=lam)
        assert adv.is_cuda and adv.dtype == torch.float32
        _close(adv.cpu(), ref_adv, tol=tol, name="advantages")
        _close(ret.cpu(), ref_ret, tol=tol, name="returns")
        ref = A.discounted_returns(r64, mask, gamma=gamma)
        _close(A.discounted_returns(*_cuda(rewards, mask), gamma=gamma).cpu(), ref,
               tol=2e-5 * max(1.0, ref.abs().max().item()), name="discounted returns")
    truncated = torch.tensor([True, False, True, True, False, True])
    ref_adv, _ = A.egae(r64, v64, mask, truncated, gamma=0.99, lam=0.95)
    adv, _ = A.egae(*_cuda(rewards, values, mask, truncated), gamma=0.99, lam=0.95)
    _close(adv.cpu(), ref_adv, tol=2e-5 * max(1.0, ref_adv.abs().max().item()), name="egae")
    lengths = torch.tensor([20000, 0, 7, 19999, 1, 12345])
    inside = torch.arange(20000)[None, :] < lengths[:, None]
    cu = torch.zeros(7, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    adv_p, ret_p = A.gae(*_cuda(rewards[inside], values[inside], mask[inside]), gamma=0.99, lam=0.95, cu_seqlens=cu.cuda())
    ref_adv, ref_ret = A.gae(r64 * inside, v64 * inside, mask & inside, gamma=0.99, lam=0.95)
    tol = 2e-5 * max(1.0, ref_adv.abs().max().item())
    _close(adv_p.cpu(), ref_adv[inside], tol=tol, name="packed advantages")
    _close(ret_p.cpu(), ref_ret[inside], tol=tol, name="packed returns")


@pytest.mark.gpu
def test_cuda_whiten_and_gae_whiten():
    g = _gen(41)
    rewards, values = torch.randn(32, 1000, generator=g), torch.randn(32, 1000, generator=g)
    mask = _mask(32, 1000, "holes", torch.bool)
    _close(A.masked_whiten(*_cuda(rewards, mask)).cpu(), R.masked_whiten(rewards, mask), tol=1e-4)
    adv, _ = A.gae(*_cuda(rewards, values, mask), gamma=0.99, lam=0.95, whiten=True)
    _close(adv.cpu(), R.masked_whiten(R.gae(rewards, values, mask, 0.99, 0.95)[0], mask) * mask, tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("std", ["unbiased", "population", None])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("singleton", ["verl", "zero"])
@pytest.mark.parametrize("skip_nan", [False, True])
def test_cuda_group_normalize(std, scale, singleton, skip_nan):
    # 65536 samples in shuffled groups of 16 plus singletons and pairs (the Triton atomics path).
    g = _gen(42)
    ids = torch.cat([torch.arange(65536) // 16, torch.tensor([10**6, 10**6 + 1, 10**6 + 1])])
    ids = ids[torch.randperm(len(ids), generator=g)]
    s = torch.randn(len(ids), generator=g)
    if skip_nan:
        s[torch.rand(len(s), generator=g) < 0.1] = float("nan")
    out = A.group_normalize(*_cuda(s, ids), eps=1e-4, std=std, scale=scale, singleton=singleton, skip_nan=skip_nan)
    ref = A.group_normalize(s.double(), ids, eps=1e-4, std=std, scale=scale, singleton=singleton, skip_nan=skip_nan)
    _close(out.cpu(), ref, tol=2e-5)
    small = torch.tensor([0, 0, 1, 2, 2, 2])
    x = torch.tensor([1.0, 2.0, 5.0, 0.5, 1.5, float("nan") if skip_nan else 4.0])
    _close(A.group_normalize(*_cuda(x, small), std=std, scale=scale, singleton=singleton, skip_nan=skip_nan).cpu(),
           R.group_normalize(x, small.tolist(), 1e-6, std, scale, singleton, skip_nan=skip_nan))


@pytest.mark.gpu
def test_cuda_outcome_estimators_match_reference():
    ids = _group_layout(43)
    dense = torch.from_numpy(np.unique(ids.astype(str), return_inverse=True)[1].reshape(-1))
    s = _scores(len(ids), 43)
    mask = _mask(len(ids), 50, "holes", torch.bool)
    cs, cids, cmask = _cuda(s, dense, mask)
    _close(A.grpo(cs, cids, cmask).cpu(), R.group_normalize(s, list(ids))[:, None] * mask)
    for singleton in ("raw", "zero"):
        _close(A.rloo(cs, cids, singleton=singleton).cpu(), R.rloo(s, list(ids), singleton))
    _close(A.gpg(cs, cids).cpu(), R.gpg(s, list(ids)))
    _close(A.opo(cs, cids, cmask).cpu(), A.opo(s, dense, mask))
    _close(A.bnpo(torch.sigmoid(cs), cids).cpu(), R.bnpo(torch.sigmoid(s), list(ids)), tol=1e-4)
    _close(A.reinforce_pp_baseline(cs, cids, cmask).cpu(), A.reinforce_pp_baseline(s, dense, mask), tol=1e-4)
    r = torch.randn(len(ids), 50, generator=_gen(44))
    for out, ref in zip(A.remax(*_cuda(r, s, mask)), A.remax(r, s, mask)):
        _close(out.cpu(), ref)
    for out, ref in zip(A.optimal_token_baseline(*_cuda(r, dense, mask, -r.abs(), r.abs())),
                        A.optimal_token_baseline(r, dense, mask, -r.abs(), r.abs())):
        _close(out.cpu(), ref, tol=1e-4)


@pytest.mark.gpu
def test_cuda_ops_do_not_sync():
    # The module docstring promises no host sync on GPU tensors (the value checks are skipped
    # there): torch raises on any synchronizing call in this mode.
    g = _gen(45)
    r, v = _cuda(torch.randn(8, 300, generator=g), torch.randn(8, 300, generator=g))
    mask = _cuda(_mask(8, 300, "holes", torch.bool))[0]
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3], device="cuda")
    scores = r.sum(-1)
    cu = torch.arange(0, 2401, 300, dtype=torch.int32, device="cuda")
    A.gae(r, v, mask, gamma=0.99, lam=0.95, whiten=True)  # compile the kernels outside the checked region
    A.group_normalize(scores, ids)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        A.gae(r, v, mask, gamma=0.99, lam=0.95, whiten=True)
        A.gae(r.flatten(), v.flatten(), mask.flatten(), gamma=0.99, lam=0.95, cu_seqlens=cu)
        A.discounted_returns(r, mask, gamma=0.9)
        A.masked_whiten(r, mask)
        A.group_normalize(scores, ids, response_mask=mask)
        A.group_normalize(scores, ids, scale="batch", singleton="zero", skip_nan=True)
        A.rloo(scores, ids, mask)
        A.opo(scores, ids, mask)
        A.gpg(scores, ids, mask)
        A.bnpo(torch.sigmoid(scores), ids, mask)
        A.optimal_token_baseline(r, ids, mask, -v.abs(), v.abs())
    finally:
        torch.cuda.set_sync_debug_mode("default")


_SM90_SCRIPT = """
import itertools
from rlkern.kernels import advantages as K

for (values, boot, packed), (lp, mask) in itertools.product(
        itertools.product([True, False], repeat=3),
        [("*fp32", "*u8"), ("*bf16", "*i64"), ("*fp16", "*fp32"), ("*fp64", "*u8"), ("*fp64", "*fp64")]):
    out = "*fp64" if lp == "*fp64" else "*fp32"
    build(K._gae_kernel, dict(r_ptr=lp, v_ptr=lp, m_ptr=mask, boot_ptr=out, cu_ptr="*i32", adv_ptr=out,
                              ret_ptr=out, par_ptr="*fp64", r_stride="i64", v_stride="i64", m_stride="i64", T="i32",
                              gamma="fp32", lam="fp32"),
          dict(HAS_VALUES=values, HAS_BOOT=boot, PACKED=packed, FP64=lp == "*fp64", BLOCK=K.MAX_BLOCK), num_warps=4)
build(K._group_add_kernel, dict(x_ptr="*fp64", idx_ptr="*i64", out_ptr="*fp64", N="i32"), dict(BLOCK=1024),
      num_warps=4)
print("ok")
"""


def test_triton_kernels_compile_for_h100():
    # The interpreter runs the kernels' Python, not Triton's compiler, which is stricter: every
    # variant of the GAE scan and the group-sum kernel is compiled to an sm_90 cubin (no GPU
    # needed; a fresh interpreter without TRITON_INTERPRET, so that the kernels are JITFunctions).
    compile_for_sm90(_SM90_SCRIPT)


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16, torch.int8, torch.int16])
def test_scan_ops_take_every_documented_mask_dtype(backend, mask_dtype):
    """The C++ kernels rejected float16/bfloat16 masks ("mask must be bool/uint8/int32/int64/
    float32/float64") that the docs and the other backends accept; int8/int16 were rejected by
    the op layer although the docs say "int"."""
    g = _gen(31)
    rewards, values = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    mask = _mask(4, 9, "holes", torch.int64)
    truncated = torch.tensor([True, False, False, True])
    calls = {
        "gae": lambda m: A.gae(rewards, values, m, gamma=0.97, lam=0.9),
        "egae": lambda m: A.egae(rewards, values, m, truncated, gamma=0.97, lam=0.9),
        "discounted_returns": lambda m: (A.discounted_returns(rewards, m, gamma=0.9),),
        "reinforce_pp": lambda m: A.reinforce_pp(rewards, m, gamma=0.9),
    }
    for name, call in calls.items():
        for ours, expected in zip(call(mask.to(mask_dtype)), call(mask)):
            torch.testing.assert_close(ours, expected, rtol=0, atol=0, msg=name)


def test_single_column_inputs_with_any_last_stride(backend):
    """[B, 1] tensors whose last stride is not 1 (a transposed [1, B]) passed the op layer's check
    and were rejected by the C++ kernels ("needs a contiguous last dim")."""
    g = _gen(32)
    rewards, values = torch.randn(1, 5, generator=g).t(), torch.randn(1, 5, generator=g).t()
    assert rewards.shape == (5, 1) and rewards.stride() == (1, 5)
    mask = torch.ones(5, 1)
    for ours, expected in zip(A.gae(rewards, values, mask, gamma=0.9, lam=0.8),
                              A.gae(rewards.contiguous(), values.contiguous(), mask, gamma=0.9, lam=0.8)):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    truncated = torch.tensor([True, False, True, False, False])
    for ours, expected in zip(A.egae(rewards, values, mask, truncated, gamma=0.9, lam=0.8),
                              A.egae(rewards.contiguous(), values.contiguous(), mask, truncated, gamma=0.9, lam=0.8)):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    logp, spp = -torch.rand(1, 5, generator=g).t(), torch.rand(1, 5, generator=g).t()
    ids = np.array(["a", "b", "a", "b", "a"], dtype=object)
    for ours, expected in zip(A.optimal_token_baseline(rewards, ids, mask, logp, spp),
                              A.optimal_token_baseline(rewards.contiguous(), ids, mask, logp.contiguous(),
                                                       spp.contiguous())):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_float64_scans_run_the_kernels(backend, kernels_only):
    """float64 rewards (numpy's default) ran the PyTorch loops, 19x slower than float32 for gae;
    the C++ scans and whitening now read and write float64 (the Triton scans are float32: on
    CUDA float64 still runs PyTorch)."""
    if backend == "torch":
        pytest.skip("the PyTorch path itself")
    g = _gen(41)
    rewards, values = torch.randn(5, 23, generator=g, dtype=torch.float64), torch.randn(5, 23, generator=g,
                                                                                       dtype=torch.float64)
    mask = _mask(5, 23, "holes")
    truncated = torch.tensor([True, False, True, False, False])
    expected = {
        "gae": R.gae(rewards, values, mask, 0.97, 0.9),
        "gae whiten": (R.masked_whiten(R.gae(rewards, values, mask, 0.97, 0.9)[0], mask) * mask,),
        "discounted_returns": (R.discounted_returns(rewards, mask, 0.9),),
        "masked_whiten": (R.masked_whiten(rewards, mask),),
    }

    ours = {
        "gae": A.gae(rewards, values, mask, gamma=0.97, lam=0.9),
        "gae whiten": (A.gae(rewards, values, mask, gamma=0.97, lam=0.9, whiten=True)[0],),
        "discounted_returns": (A.discounted_returns(rewards, mask, gamma=0.9),),
        "masked_whiten": (A.masked_whiten(rewards, mask),),
    }
    for name, outs in ours.items():
        for out, ref in zip(outs, expected[name]):
            assert out.dtype == torch.float64, name
            torch.testing.assert_close(out, ref.to(torch.float64), rtol=1e-12, atol=1e-12, msg=name)
    egae = A.egae(rewards, values, mask, truncated, gamma=0.97, lam=0.9)
    assert egae[0].dtype == torch.float64
    rpp = A.reinforce_pp(rewards, mask, gamma=0.9)
    assert rpp[0].dtype == torch.float64


def test_cu_seqlens_int64_same_as_int32():
    # One cu_seqlens rule for every op (rlkern/ops/_checks.py): int32 and int64 give the same numbers.
    g = _gen(71)
    cu32 = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    r, v, m = torch.randn(11, generator=g), torch.randn(11, generator=g), _mask(1, 11, "holes")[0]
    m[:2] = 1
    s = torch.randn(3, generator=g)
    for cu in (cu32, cu32.long()):
        outs = [*A.gae(r, v, m, gamma=0.9, lam=0.8, cu_seqlens=cu), A.discounted_returns(r, m, gamma=0.9, cu_seqlens=cu),
                A.grpo(s, [0, 0, 1], m, cu_seqlens=cu), A.remax(r, s, m, cu_seqlens=cu)[0],
                A.optimal_token_baseline(r, [0, 0, 1], m, -r.abs(), r.abs(), cu_seqlens=cu)[0]]
        if cu.dtype == torch.int32:
            expected = outs
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# float64 through every backend, half-precision masks, and no PyTorch path for float64 on CPU
#
# float64 scores are read, computed and written in float64 by every kernel (C++ on CPU; the
# Triton GAE scan; the Triton group moments are float64 for every dtype), so the outputs match
# the float64 reference to rounding (1e-12 relative to the largest value).

def _close64(ours, ref, name="value", rel=1e-12):
    assert ours.dtype == torch.float64, f"{name}: dtype {ours.dtype}"
    ref = ref.to(torch.float64)
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(ours, ref, rtol=rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")


def _f64_outcome_cases(s, ids, tokens, weights, **layout):
    """(name, ours, float64 reference) of every outcome estimator, per sample when tokens is None,
    else broadcast as value * tokens (weights: the mask's values in float64, in tokens' layout)."""
    ids_list = list(ids)
    probs = torch.sigmoid(s)
    seg = layout.pop("seg", None)
    per_token = (lambda ref: ref if tokens is None else
                 (ref[:, None] * weights if seg is None else ref[seg] * weights))
    kw = {} if tokens is None else dict(layout)
    cases = [
        ("grpo", A.grpo(s, ids, tokens, **kw), per_token(R.group_normalize(s, ids_list))),
        ("dr_grpo", A.grpo(s, ids, tokens, norm_by_std=False, **kw),
         per_token(R.group_normalize(s, ids_list, std=None))),
        ("trl batch", A.group_normalize(s, ids, eps=1e-4, scale="batch", singleton="zero", response_mask=tokens, **kw),
         per_token(R.group_normalize(s, ids_list, 1e-4, "unbiased", "batch", "zero"))),
        ("population", A.group_normalize(s, ids, std="population", response_mask=tokens, **kw),
         per_token(R.group_normalize(s, ids_list, 1e-6, "population"))),
        ("rloo raw", A.rloo(s, ids, tokens, **kw), per_token(R.rloo(s, ids_list, "raw"))),
        ("rloo zero", A.rloo(s, ids, tokens, singleton="zero", **kw), per_token(R.rloo(s, ids_list, "zero"))),
        ("gpg", A.gpg(s, ids, tokens, f_norm=2.0, **kw), per_token(R.gpg(s, ids_list, 2.0))),
        ("bnpo", A.bnpo(probs, ids, tokens, **kw), per_token(R.bnpo(probs, ids_list))),
    ]
    return cases


@pytest.mark.parametrize("layout", ["per_sample", "padded", "packed"])
def test_float64_outcome_estimators_every_backend(backend, layout):
    ids = _group_layout(51)  # groups of 1, 2, 3, 5 and 16
    n = len(ids)
    s = _scores(n, 51).double()
    mask, packed, inside, cu = _packed_batch(n, 9, 51, torch.float64)
    mask = mask * torch.where(torch.rand(n, 9, generator=_gen(52)) > 0.5, 1.0, 0.5).double()  # weights
    packed = mask[inside]
    seg = torch.repeat_interleave(torch.arange(n), cu.diff().long())
    if layout == "per_sample":
        cases = _f64_outcome_cases(s, ids, None, None)
    elif layout == "padded":
        cases = _f64_outcome_cases(s, ids, mask, mask)
    else:
        cases = _f64_outcome_cases(s, ids, packed, packed, cu_seqlens=cu, seg=seg)
    for name, ours, ref in cases:
        _close64(ours, ref, name=f"{name} {layout}")
    if layout == "per_sample":
        return
    tokens, kw, m = (mask, {}, mask) if layout == "padded" else (packed, {"cu_seqlens": cu}, packed)
    bound = (lambda ref: ref[:, None] * m) if layout == "padded" else (lambda ref: ref[seg] * m)
    lengths = mask.sum(-1)
    _close64(A.opo(s, ids, tokens, **kw), bound(s - R.group_baseline(s, list(ids), lengths)), name="opo")
    rpp_tokens = bound(s - R.group_baseline(s, list(ids)))
    _close64(A.reinforce_pp_baseline(s, ids, tokens, **kw), R.masked_whiten(rpp_tokens, tokens) * m, name="rpp")
    passk_ids = np.repeat(np.array(["a", "b", "c", "d"]), [2, 5, n - 10, 3])[np.random.default_rng(53).permutation(n)]
    for norm in (True, False):
        ref = R.grpo_passk(s, list(passk_ids), 1e-6, norm)
        _close64(A.grpo_passk(s, passk_ids, tokens, norm_by_std=norm, **kw), bound(ref), name=f"passk {norm}")


def test_float64_remax_every_backend(backend):
    # verl's compute_remax_outcome_advantage multiplies by the mask's value: fractional weights
    # and a float64 baseline, padded and packed (a packed row is its padded row's first tokens).
    core = _verl()
    g = _gen(54)
    n, steps = 7, 13
    mask, packed, inside, cu = _packed_batch(n, steps, 54, torch.float64)
    mask = mask * torch.where(torch.rand(n, steps, generator=g) > 0.5, 1.0, 0.25).double()
    rewards = torch.randn(n, steps, generator=g, dtype=torch.float64)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    theirs = core.compute_remax_outcome_advantage(rewards * inside, base, mask)
    ours = A.remax(rewards, base, mask)
    for out, ref, name in zip(ours, theirs, ("advantages", "returns")):
        _close64(out, ref, name=name)
    ours = A.remax(rewards[inside], base, mask[inside], cu_seqlens=cu)
    for out, ref, name in zip(ours, theirs, ("advantages", "returns")):
        _close64(out, ref[inside], name=f"packed {name}")
    # every mask dtype, against the float64 reference (mask != 0 for 0/1 masks)
    binary = mask != 0
    ref_ret = R.reverse_cumsum(rewards, binary)
    for mask_dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                       torch.bfloat16, torch.float32):
        adv, ret = A.remax(rewards, base, binary.to(mask_dtype))
        _close64(ret, ref_ret, name=f"returns {mask_dtype}")
        _close64(adv, ref_ret - base[:, None] * binary, name=f"advantages {mask_dtype}")
    empty = A.remax(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), torch.zeros(0, 5))
    assert all(x.shape == (0, 5) and x.dtype == torch.float64 for x in empty)


@OTB_BACKENDS
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("multi_turn", [False, True])
def test_float64_optimal_token_baseline(backend, packed, multi_turn):
    g = _gen(55)
    batch, steps = 9, 17
    rewards = torch.randn(batch, steps, generator=g, dtype=torch.float64)
    logp = -torch.rand(batch, steps, generator=g, dtype=torch.float64)
    spp = torch.rand(batch, steps, generator=g, dtype=torch.float64)
    rho = torch.rand(batch, steps, generator=g, dtype=torch.float64) + 0.5
    lengths = torch.randint(0, steps + 1, (batch,), generator=g)
    lengths[2] = steps
    inside = torch.arange(steps)[None, :] < lengths[:, None]
    mask = inside & (torch.rand(batch, steps, generator=g) > 0.2)
    ids = [0, 0, 1, 1, 1, 2, 3, 3, 3]  # group 2 has one row
    if packed:
        cu = torch.zeros(batch + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        args, kw = (rewards[inside], mask[inside], ids, logp[inside], spp[inside], rho[inside]), {"cu_seqlens": cu}
    else:
        args, kw = (rewards, mask, ids, logp, spp, rho), {}
    ref = R.optimal_token_baseline(*args, compact=multi_turn, **kw)
    for mask_dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float64):
        ours = A.optimal_token_baseline(args[0], args[2], args[1].to(mask_dtype), *args[3:], multi_turn=multi_turn, **kw)
        for out, expected, name in zip(ours, ref, ("advantages", "returns")):
            _close64(out, expected, name=f"{name} {mask_dtype}")


@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_masks_every_backend(backend, scores_dtype, mask_dtype):
    """float16/bfloat16 masks (weights 0, 0.5, 1: exact in both) multiply the per-sample value as
    every other mask dtype; on CPU they run the C++ kernels (they took the PyTorch broadcast)."""
    ids = _group_layout(56)
    n = len(ids)
    s = _scores(n, 56).to(scores_dtype)
    mask, packed, inside, cu = _packed_batch(n, 10, 56, torch.float64)
    mask = mask * torch.where(torch.rand(n, 10, generator=_gen(57)) > 0.5, 1.0, 0.5).double()
    seg = torch.repeat_interleave(torch.arange(n), cu.diff().long())
    check = _close64 if scores_dtype == torch.float64 else (lambda o, r, name: _close(o, r, name=name))
    out_dtype = scores_dtype if scores_dtype == torch.float64 else torch.float32
    for (name, ours, ref), (_, ours_p, ref_p) in zip(_f64_outcome_cases(s, ids, mask.to(mask_dtype), mask),
                                                     _f64_outcome_cases(s, ids, mask[inside].to(mask_dtype),
                                                                        mask[inside], cu_seqlens=cu, seg=seg)):
        assert ours.dtype == ours_p.dtype == out_dtype, name
        check(ours, ref, name=f"{name} {mask_dtype}")
        check(ours_p, ref_p, name=f"{name} packed {mask_dtype}")
    check(A.outcome_to_tokens(s, mask.to(mask_dtype)), s.double()[:, None] * mask, name="outcome_to_tokens")


def _kernels_called(fn):
    """fn() and the names of the rlkern C++ kernels it ran (seen by the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name.removeprefix("rlkern::") for e in prof.events() if e.name.startswith("rlkern::cpp_")}


@pytest.mark.parametrize("forced", [None, "cpp"])
def test_float64_runs_the_cpp_kernels_on_cpu(monkeypatch, forced, kernels_only):
    """float64 (and half-mask) outcome ops on CPU ran the PyTorch path: now each runs its C++
    kernel, and the PyTorch helpers they used raise here."""
    if forced:
        monkeypatch.setenv("RLKERN_BACKEND", forced)
    else:
        monkeypatch.delenv("RLKERN_BACKEND", raising=False)

    ids = _group_layout(58)
    n = len(ids)
    s = _scores(n, 58).double()
    mask, packed, inside, cu = _packed_batch(n, 8, 58, torch.float16)
    m = mask.double()
    seg = torch.repeat_interleave(torch.arange(n), cu.diff().long())
    passk_ids = np.repeat(np.arange(3), [2, 5, n - 7])
    r = torch.randn(n, 8, generator=_gen(59), dtype=torch.float64)
    calls = {
        "cpp_group_normalize": [
            (lambda: A.grpo(s, ids, mask), R.group_normalize(s, list(ids))[:, None] * m),
            (lambda: A.grpo(s, ids, packed, cu_seqlens=cu), R.group_normalize(s, list(ids))[seg] * m[inside])],
        "cpp_group_baseline": [
            (lambda: A.rloo(s, ids, mask), R.rloo(s, list(ids))[:, None] * m),
            (lambda: A.gpg(s, ids, packed, cu_seqlens=cu), R.gpg(s, list(ids))[seg] * m[inside])],
        "cpp_grpo_passk": [
            (lambda: A.grpo_passk(s, passk_ids), R.grpo_passk(s, list(passk_ids)))],
        "cpp_bnpo": [(lambda: A.bnpo(torch.sigmoid(s), ids), R.bnpo(torch.sigmoid(s), list(ids)))],
        "cpp_outcome_to_tokens": [
            (lambda: A.grpo_passk(s, passk_ids, mask), R.grpo_passk(s, list(passk_ids))[:, None] * m),
            (lambda: A.bnpo(torch.sigmoid(s), ids, packed, cu_seqlens=cu),
             R.bnpo(torch.sigmoid(s), list(ids))[seg] * m[inside])],
        "cpp_remax": [
            (lambda: A.remax(r, s, mask)[1], R.reverse_cumsum(r, mask))],
        "cpp_optimal_token_baseline": [
            (lambda: A.optimal_token_baseline(r, ids, mask, -r.abs(), r.abs())[0],
             R.optimal_token_baseline(r, mask, list(ids), -r.abs(), r.abs())[0])],
        "cpp_gae": [(lambda: A.gae(r, r.flip(0), mask, gamma=0.9, lam=0.8)[0],
                                   R.gae(r, r.flip(0), mask, 0.9, 0.8)[0])],
    }
    for kernel, cases in calls.items():
        for fn, ref in cases:
            out, ran = _kernels_called(fn)
            assert kernel in ran, f"{kernel} did not run (ran {sorted(ran)})"
            _close64(out, ref, name=kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_passk_and_bnpo_value_errors_every_backend(backend, dtype):
    """The C++ kernels raise the op layer's ValueErrors, with the same messages."""
    with pytest.raises(ValueError, match=r"^grpo_passk: every group needs at least 2 samples \(Pass@k compares the "
                                         r"best two\); smallest group has 1$"):
        A.grpo_passk(torch.tensor([0.1, 0.9, 0.3, 0.4, 0.5], dtype=dtype), [0, 0, 1, 2, 2])
    for lo, hi in [(0.0, 1.0), (-5.0, 1e-05), (0.1, 1e16), (-1e-5, 123456.789), (2.5e-300, 3.0)]:
        scores = torch.full((4,), lo - 100 * (hi - lo) - 1, dtype=dtype)
        expected = (f"bnpo: group success rates must lie in [0, 1] after (s - {lo}) / ({hi} - {lo}); "
                    "adjust min_value/max_value")
        with pytest.raises(ValueError) as error:
            A.bnpo(scores, [0, 0, 1, 1], min_value=lo, max_value=hi)
        assert str(error.value) == expected
    for fn in (lambda e: A.grpo_passk(e, []), lambda e: A.bnpo(e, [])):  # empty batches
        out = fn(torch.zeros(0, dtype=dtype))
        assert out.shape == (0,) and out.dtype == dtype


def test_opcheck_float64_and_new_kernels():
    g = _gen(60)
    r = torch.randn(3, 9, generator=g, dtype=torch.float64)
    mask = _mask(3, 9, "holes")
    mask[0, :3] = 1
    inverse = A.group_index(["a", "a", "b", "c", "c", "c"])
    s = torch.randn(6, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 4, 4, 27], dtype=torch.int32)
    half = _mask(6, 5, "holes", torch.float16)
    O = torch.ops.rlkern  # noqa: E741
    cases = [
        (O.group_normalize, (s, inverse, half, None, 1e-6, "unbiased", "group", "verl")),
        (O.group_baseline, (s, inverse, None, half.to(torch.bfloat16), None, "rloo_raw", 0.0)),
        (O.grpo_passk, (s, A.group_index(["a", "a", "b", "b", "b", "b"]), 1e-6, True)),
        (O.bnpo, (torch.rand(6, generator=g, dtype=torch.float64), inverse, 0.0, 1.0)),
        (O.remax, (r, torch.randn(3, dtype=torch.float64), mask.to(torch.float16), None)),
        (O.remax, (r.flatten(), torch.randn(3, dtype=torch.float64), mask.flatten(), cu)),
        (O.optimal_token_baseline, (r, mask, torch.tensor([0, 0, 1]), -torch.rand(3, 9), torch.rand(3, 9), None, None, True, 1e-8,
                     False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)
    for name, args in [("cpp_remax", (r, torch.randn(3), mask, None)),
                       ("cpp_grpo_passk", (s, A.group_index(["a", "a", "b", "b", "b", "b"]), 1e-6,
                                                         False)),
                       ("cpp_bnpo", (torch.rand(6, generator=g), inverse, 0.0, 1.0))]:
        torch.library.opcheck(getattr(torch.ops.rlkern, name).default, args)


# ---------------------------------------------------------------------------------------------
# Triton outcome kernels (kernels/advantages.py): the broadcast to tokens, group normalization,
# group baselines and ReMax, under TRITON_INTERPRET=1 on CPU tensors, against the float64
# reference and verl

TRITON_ONLY = pytest.mark.parametrize("backend", ["triton"], indirect=True)
ALL_MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                   torch.bfloat16, torch.float32, torch.float64]
_TRITON_OPS = ("outcome_to_tokens", "group_normalize", "group_baseline", "remax")


@pytest.fixture
def triton_ran(monkeypatch, kernels_only):
    """The backends the outcome ops ran ({op: set of backends}); kernels_only fails a PyTorch pick."""
    ran = {}
    original = _backend.Kernels.get

    def get(self, name):
        ran.setdefault(self.op, set()).add(name)
        return original(self, name)

    monkeypatch.setattr(_backend.Kernels, "get", get)
    return ran


def _assert_triton_ran(ran, ops=_TRITON_OPS):
    for op in ops:
        assert ran.get(op) == {"triton"}, f"{op} ran {sorted(ran.get(op, ()))}, not the Triton kernel"


def _weighted_mask(n, steps, seed, mask_dtype):
    """_packed_batch's mask in mask_dtype with values other than 0/1 where the dtype holds them (the
    ops multiply by the mask's value, as verl): 2 and -1 for signed ints, 2 for uint8, 0.5 and -1 for
    floats. Returns (mask, packed, inside, cu, float64 mask)."""
    mask, _, inside, cu = _packed_batch(n, steps, seed, torch.float64)
    g = _gen(seed + 1)
    pick = torch.rand(n, steps, generator=g)
    if mask_dtype.is_floating_point:
        mask = mask * torch.where(pick < 0.3, 0.5, torch.where(pick < 0.4, -1.0, 1.0)).double()
    elif mask_dtype != torch.bool:
        low = 2.0 if mask_dtype == torch.uint8 else -1.0
        mask = mask * torch.where(pick < 0.2, 2.0, torch.where(pick < 0.3, low, 1.0)).double()
    typed = mask.to(mask_dtype)
    return typed, typed[inside], inside, cu, typed.double()


def _check_dtype(scores_dtype):
    """Output dtype and closeness check of an outcome op for scores of scores_dtype."""
    if scores_dtype == torch.float64:
        return torch.float64, _close64
    return torch.float32, lambda ours, ref, name: _close(ours, ref, name=name)


@TRITON_ONLY
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["per_sample", "padded", "packed"])
def test_triton_outcome_ops_match_reference(backend, triton_ran, scores_dtype, layout):
    # Groups of 1, 1, 2, 3, 5, 16, 16 (shuffled), 13 odd-length rows with an empty one; the float64
    # reference of the scores' values (bf16 scores are exact in float64).
    ids = _group_layout(61)
    n = len(ids)
    s = _scores(n, 61).to(scores_dtype)
    s[::9] = 0.0  # GPG's alpha counts the nonzero scores
    out_dtype, check = _check_dtype(scores_dtype)
    mask, packed, inside, cu, m = _weighted_mask(n, 13, 61, torch.float32)
    seg = torch.repeat_interleave(torch.arange(n), cu.diff().long())
    if layout == "per_sample":
        tokens, kw, bound = None, {}, (lambda ref: ref)
    elif layout == "padded":
        tokens, kw, bound = mask, {}, (lambda ref: ref[:, None] * m)
    else:
        tokens, kw, bound = packed, {"cu_seqlens": cu}, (lambda ref: ref[seg] * m[inside])
    ids_list = list(ids)
    lengths = m.sum(-1)  # verl's response_mask.sum(-1): the mask's values
    cases = [
        ("grpo", A.grpo(s, ids, tokens, **kw), R.group_normalize(s, ids_list)),
        ("dr_grpo", A.grpo(s, ids, tokens, norm_by_std=False, **kw), R.group_normalize(s, ids_list, std=None)),
        ("trl group", A.group_normalize(s, ids, eps=1e-4, singleton="zero", response_mask=tokens, **kw),
         R.group_normalize(s, ids_list, 1e-4, "unbiased", "group", "zero")),
        ("trl batch", A.group_normalize(s, ids, eps=1e-4, scale="batch", singleton="zero", response_mask=tokens, **kw),
         R.group_normalize(s, ids_list, 1e-4, "unbiased", "batch", "zero")),
        ("population batch", A.group_normalize(s, ids, std="population", scale="batch", response_mask=tokens, **kw),
         R.group_normalize(s, ids_list, 1e-6, "population", "batch")),
        ("population", A.group_normalize(s, ids, std="population", response_mask=tokens, **kw),
         R.group_normalize(s, ids_list, 1e-6, "population")),
        ("scale none", A.group_normalize(s, ids, scale="none", singleton="zero", response_mask=tokens, **kw),
         R.group_normalize(s, ids_list, 1e-6, "unbiased", "none", "zero")),
        ("rloo raw", A.rloo(s, ids, tokens, **kw), R.rloo(s, ids_list, "raw")),
        ("rloo zero", A.rloo(s, ids, tokens, singleton="zero", **kw), R.rloo(s, ids_list, "zero")),
        ("gpg", A.gpg(s, ids, tokens, f_norm=3.0, **kw), R.gpg(s, ids_list, 3.0)),
    ]
    if tokens is not None:
        cases += [
            ("opo", A.opo(s, ids, tokens, **kw), s.double() - R.group_baseline(s, ids_list, lengths)),
            ("outcome_to_tokens", A.outcome_to_tokens(s.double(), tokens, **kw), s.double()),
        ]
    for name, ours, ref in cases:
        if name == "outcome_to_tokens":  # float64 scores: a float64 product
            _close64(ours, bound(ref), name=name)
        else:
            assert ours.dtype == out_dtype, name
            check(ours, bound(ref), name=name)
    _assert_triton_ran(triton_ran, ("group_normalize", "group_baseline") +
                       (() if tokens is None else ("outcome_to_tokens",)))


@TRITON_ONLY
@pytest.mark.parametrize("mask_dtype", ALL_MASK_DTYPES)
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_broadcast_every_mask_dtype(backend, triton_ran, mask_dtype, scores_dtype):
    # verl's scores.unsqueeze(-1) * response_mask, bit for bit (PyTorch's type promotion: a float64
    # mask multiplies float32 scores in float64), padded, sliced (row stride 2T) and packed.
    n, steps = 9, 17
    mask, packed, inside, cu, m = _weighted_mask(n, steps, 62, mask_dtype)
    s = torch.randn(n, generator=_gen(62)).to(scores_dtype)
    expected = (s[:, None] * mask).to(scores_dtype)
    ours = A.outcome_to_tokens(s, mask)
    assert ours.dtype == scores_dtype
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    sliced = torch.cat([mask, mask], 1)[:, steps:]
    torch.testing.assert_close(A.outcome_to_tokens(s, sliced), expected, rtol=0, atol=0)
    torch.testing.assert_close(A.outcome_to_tokens(s, packed, cu_seqlens=cu), expected[inside], rtol=0, atol=0)
    torch.testing.assert_close(A.outcome_to_tokens(s, packed, cu_seqlens=cu.long()), expected[inside], rtol=0,
                               atol=0)
    # group ops: the per-sample values times the mask's value, against the float64 reference
    ids = np.array(["a", "b", "a", "c", "b", "b", "d", "a", "c"], dtype=object)  # "d": a group of one
    out_dtype, check = _check_dtype(scores_dtype)
    seg = torch.repeat_interleave(torch.arange(n), cu.diff().long())
    for name, fn, ref in [
        ("grpo", lambda mk, **kw: A.grpo(s, ids, mk, **kw), R.group_normalize(s, list(ids))),
        ("rloo", lambda mk, **kw: A.rloo(s, ids, mk, **kw), R.rloo(s, list(ids))),
        ("gpg", lambda mk, **kw: A.gpg(s, ids, mk, **kw), R.gpg(s, list(ids))),
    ]:
        padded, packed_out = fn(mask), fn(packed, cu_seqlens=cu)
        assert padded.dtype == packed_out.dtype == out_dtype, name
        check(padded, ref[:, None] * m, name=f"{name} padded")
        check(packed_out, ref[seg] * m[inside], name=f"{name} packed")
    _assert_triton_ran(triton_ran, ("outcome_to_tokens", "group_normalize", "group_baseline"))


@TRITON_ONLY
@pytest.mark.parametrize("std", ["unbiased", "population", None])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("singleton", ["verl", "zero"])
def test_triton_group_normalize_nan_scores(backend, triton_ran, std, scale, singleton):
    # skip_nan (TRL): NaN scores leave every statistic (a pair left with one scored sample, a group
    # with none) and get 0; without it (verl) a NaN propagates to its group, or to the whole batch
    # with scale="batch", as in the float64 reference.
    ids = _group_layout(63)
    s = _scores(len(ids), 63).double()
    s[torch.rand(len(s), generator=_gen(64)) < 0.25] = float("nan")
    members = {}
    for i, key in enumerate(ids):
        members.setdefault(key, []).append(i)
    s[next(v for v in members.values() if len(v) == 2)[0]] = float("nan")
    s[next(v for v in members.values() if len(v) == 1)[0]] = float("nan")
    mask, packed, inside, cu, m = _weighted_mask(len(ids), 6, 63, torch.bool)
    seg = torch.repeat_interleave(torch.arange(len(ids)), cu.diff().long())
    for dtype in (torch.float32, torch.float64):
        x = s.to(dtype)
        _, check = _check_dtype(dtype)
        for skip_nan in (True, False):
            kw = dict(eps=1e-4, std=std, scale=scale, singleton=singleton, skip_nan=skip_nan)
            ref = R.group_normalize(x, list(ids), 1e-4, std, scale, singleton, skip_nan=skip_nan)
            ours = A.group_normalize(x, ids, **kw)
            assert torch.equal(ours.isnan(), ref.isnan()), f"NaN positions, skip_nan={skip_nan}"
            if skip_nan:
                assert not ours.isnan().any() and (ours[s.isnan()] == 0).all()
            keep = ~ref.isnan()
            check(ours[keep], ref[keep], name=f"skip_nan={skip_nan}")
            if skip_nan:  # NaN * 0 stays NaN at masked tokens, so only skip_nan broadcasts cleanly
                check(A.group_normalize(x, ids, response_mask=mask, **kw), ref[:, None] * m, name="padded")
                check(A.group_normalize(x, ids, response_mask=packed, cu_seqlens=cu, **kw), ref[seg] * m[inside],
                      name="packed")
    _assert_triton_ran(triton_ran, ("group_normalize",))


@TRITON_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_outcome_ops_empty_and_tiny_batches(backend, triton_ran, dtype):
    # N = 0 (per sample, [0, T], packed with no tokens), one sample, and packed batches whose
    # segments are all empty.
    empty = torch.zeros(0, dtype=dtype)
    for fn in (lambda mk, **kw: A.grpo(empty, [], mk, **kw), lambda mk, **kw: A.rloo(empty, [], mk, **kw),
               lambda mk, **kw: A.gpg(empty, [], mk, **kw), lambda mk, **kw: A.outcome_to_tokens(empty, mk, **kw)):
        for mk, kw, shape in [(torch.zeros(0, 5, dtype=torch.bool), {}, (0, 5)),
                              (torch.zeros(0, dtype=torch.bool), {"cu_seqlens": torch.zeros(1, dtype=torch.int32)},
                               (0,))]:
            out = fn(mk, **kw)
            assert out.shape == shape and out.dtype == dtype
    assert A.grpo(empty, []).shape == (0,) and A.rloo(empty, []).dtype == dtype
    one = torch.tensor([0.7], dtype=dtype)
    _, check = _check_dtype(dtype)
    check(A.grpo(one, [3]), R.group_normalize(one, [3]), name="grpo of one")
    check(A.rloo(one, [3]), R.rloo(one, [3]), name="rloo of one")
    s = torch.tensor([0.5, -1.0, 2.0], dtype=dtype)
    cu = torch.zeros(4, dtype=torch.int32)
    out = A.grpo(s, [0, 0, 1], torch.zeros(0, dtype=torch.int64), cu_seqlens=cu)
    assert out.shape == (0,) and out.dtype == dtype
    adv, ret = A.remax(torch.zeros(0, dtype=dtype), s, torch.zeros(0), cu_seqlens=cu)
    assert adv.shape == ret.shape == (0,) and adv.dtype == dtype
    for shape in [(0, 5), (3, 0)]:
        adv, ret = A.remax(torch.zeros(shape, dtype=dtype), torch.zeros(shape[0], dtype=dtype), torch.ones(shape))
        assert adv.shape == ret.shape == shape and adv.dtype == ret.dtype == dtype
    _assert_triton_ran(triton_ran, ("group_normalize", "group_baseline", "outcome_to_tokens", "remax"))


@TRITON_ONLY
@pytest.mark.parametrize("rewards_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", ALL_MASK_DTYPES)
def test_triton_remax_matches_reference(backend, triton_ran, rewards_dtype, mask_dtype):
    # sum_{u >= t} r_u mask_u (the mask's value, rounded to the output dtype as PyTorch's
    # mask.to(dtype)) and returns - baseline * mask, padded (sliced rows) and packed.
    n, steps = 7, 23
    mask, packed, inside, cu, _ = _weighted_mask(n, steps, 65, mask_dtype)
    g = _gen(66)
    rewards = torch.randn(n, steps, generator=g).to(rewards_dtype)
    base = torch.randn(n, generator=g, dtype=torch.float64)
    out_dtype, check = _check_dtype(rewards_dtype)
    m = mask.to(out_dtype).double()
    ret_ref = (rewards.double() * m).flip(-1).cumsum(-1).flip(-1)
    adv_ref = ret_ref - base.to(out_dtype).double()[:, None] * m
    adv, ret = A.remax(rewards, base, mask)
    assert adv.dtype == ret.dtype == out_dtype
    check(ret, ret_ref, name="returns")
    check(adv, adv_ref, name="advantages")
    wide = torch.cat([rewards, rewards], 1)[:, :steps]  # row stride 2T
    for ours, ref in zip(A.remax(wide, base, mask), (adv_ref, ret_ref)):
        check(ours, ref, name="sliced rows")
    # packed: a row's valid tokens are a prefix of it (_packed_batch), so its sums are the padded ones
    for ours, ref, name in zip(A.remax(rewards[inside], base, packed, cu_seqlens=cu), (adv_ref, ret_ref),
                               ("advantages", "returns")):
        check(ours, ref[inside], name=f"packed {name}")
    if mask_dtype == torch.bool:
        _close(ret.double(), R.reverse_cumsum(rewards, mask), name="reference")
    _assert_triton_ran(triton_ran, ("remax",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_remax_and_broadcast_many_blocks(monkeypatch, triton_ran, dtype):
    # Blocks of 16: 300 tokens run 19 blocks (the carried suffix sum of the ReMax scan, the token
    # loop of the broadcast), packed with an empty segment.
    if not _backend.has_triton():
        pytest.fail("triton is not installed (it is in the test extra)")
    from rlkern.kernels import advantages as triton_advantages

    monkeypatch.setattr(triton_advantages, "MAX_BLOCK", 16)
    monkeypatch.setenv("RLKERN_BACKEND", "triton")
    g = _gen(67)
    rewards = torch.randn(3, 300, generator=g, dtype=dtype)
    mask = _mask(3, 300, "holes", torch.bool)
    base = torch.randn(3, generator=g, dtype=dtype)
    _, check = _check_dtype(dtype)
    ret_ref = R.reverse_cumsum(rewards, mask)
    adv, ret = A.remax(rewards, base, mask)
    check(ret, ret_ref, name="returns")
    check(adv, ret_ref - base.double()[:, None] * mask, name="advantages")
    cu = torch.tensor([0, 100, 100, 900], dtype=torch.int32)
    adv_p, ret_p = A.remax(rewards.flatten(), base, mask.flatten(), cu_seqlens=cu)
    for b, (start, end) in enumerate([(0, 100), (100, 100), (100, 900)]):
        ref = R.reverse_cumsum(rewards.flatten()[None, start:end], mask.flatten()[None, start:end])[0]
        check(ret_p[start:end], ref, name=f"packed returns {b}")
        check(adv_p[start:end], ref - base[b].double() * mask.flatten()[start:end], name=f"packed advantages {b}")
    torch.testing.assert_close(A.outcome_to_tokens(base, mask), base[:, None] * mask, rtol=0, atol=0)
    tokens = A.outcome_to_tokens(base, mask.flatten(), cu_seqlens=cu)
    torch.testing.assert_close(tokens, base[torch.repeat_interleave(torch.arange(3), cu.diff().long())]
                               * mask.flatten(), rtol=0, atol=0)
    _assert_triton_ran(triton_ran, ("remax", "outcome_to_tokens"))


@pytest.mark.peer
@TRITON_ONLY
@pytest.mark.parametrize("name,norm", OUTCOME_CASES)
def test_triton_verl_outcome_parity(backend, triton_ran, name, norm):
    # verl's estimators against rlkern's drop-ins on the Triton kernels: the padded parity test, and
    # the packed one for the estimators it covers.
    test_verl_outcome_parity(name, norm)
    if name in ("grpo", "rloo", "opo"):
        test_verl_outcome_parity_packed(name)
    ran = "group_baseline" if name.startswith(("rloo", "opo", "gpg", "reinforce")) else "group_normalize"
    _assert_triton_ran(triton_ran, (ran,))


@pytest.mark.peer
@TRITON_ONLY
def test_triton_verl_remax_parity(backend, triton_ran):
    core = _verl()
    g = _gen(69)
    mask = _mask(12, 31, "holes")
    mask[:, 0] = 1
    rewards = torch.randn(12, 31, generator=g) * mask
    base = torch.randn(12, generator=g)
    for dtype in (torch.float32, torch.float64):
        theirs = core.compute_remax_outcome_advantage(rewards.to(dtype), base.to(dtype), mask)
        ours = algos.compute_remax_outcome_advantage(rewards.to(dtype), base.to(dtype), mask)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        _assert_verl_close(ours[0], theirs[0], torch.ones_like(mask), tol, "advantages")  # every position
        _assert_verl_close(ours[1], theirs[1], torch.ones_like(mask), tol, "returns")
    _assert_triton_ran(triton_ran, ("remax",))


def test_outcome_ops_pick_triton_under_the_interpreter(monkeypatch):
    # RLKERN_BACKEND=triton with TRITON_INTERPRET=1 on CPU tensors, and CUDA tensors by default, run
    # the Triton kernels for float32, float64 and bf16 (these ops' GPU path was PyTorch).
    from rlkern.ops.advantages import outcome, returns

    monkeypatch.setenv("RLKERN_BACKEND", "triton")
    kernels = {"outcome_to_tokens": outcome._BROADCAST, "group_normalize": outcome._NORMALIZE,
               "group_baseline": outcome._BASELINE, "remax": returns._REMAX}
    for op, k in kernels.items():
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            if _backend.triton_interpreted():
                assert k.backend(torch.zeros(1, dtype=dtype)) == "triton", (op, dtype)
            if _backend.has_triton():
                assert k.backend_at(torch.device("cuda"), dtype) == "triton", (op, dtype)
        assert k.get("triton").__module__.endswith("kernels.advantages"), op


_SM90_OUTCOME_SCRIPT = """
import itertools
from rlkern.kernels import advantages as K

for packed, (scores, mask) in itertools.product(
        [True, False], [("*fp32", "*u8"), ("*fp32", "*i64"), ("*fp32", "*bf16"), ("*fp32", "*fp64"),
                        ("*fp64", "*fp16"), ("*fp64", "*u8"), ("*bf16", "*i8")]):
    build(K._broadcast_kernel, dict(s_ptr=scores, m_ptr=mask, cu_ptr="*i32", out_ptr=scores, s_stride="i64",
                                    m_row="i64", m_col="i64", T="i32"),
          dict(PACKED=packed, FP64="fp64" in scores + mask, BLOCK=K.MAX_BLOCK), num_warps=4)
for x in ("*fp32", "*bf16", "*fp64"):
    out = "*fp64" if x == "*fp64" else "*fp32"
    for skip_nan, has_w, batch in itertools.product([True, False], repeat=3):
        build(K._group_sums_kernel, dict(x_ptr=x, w_ptr="*fp32", idx_ptr="*i64", sums_ptr="*fp64",
                                         batch_ptr="*fp64", N="i32"),
              dict(SKIP_NAN=skip_nan, HAS_W=has_w, BATCH=batch, BLOCK=K.GROUP_BLOCK), num_warps=4)
    for skip_nan, group in itertools.product([True, False], repeat=2):
        build(K._group_dev_kernel, dict(x_ptr=x, idx_ptr="*i64", sums_ptr="*fp64", batch_ptr="*fp64", N="i32"),
              dict(SKIP_NAN=skip_nan, GROUP=group, BATCH=not group, BLOCK=K.GROUP_BLOCK), num_warps=4)
    for skip_nan, divide, batch_scale, unbiased, verl in itertools.product([True, False], repeat=5):
        build(K._normalize_finish_kernel, dict(x_ptr=x, idx_ptr="*i64", sums_ptr="*fp64", batch_ptr="*fp64",
                                               par_ptr="*fp64", out_ptr=out, N="i32"),
              dict(SKIP_NAN=skip_nan, DIVIDE=divide, BATCH_SCALE=batch_scale, UNBIASED=unbiased, VERL=verl,
                   BLOCK=K.GROUP_BLOCK), num_warps=4)
    for mode in K.BASELINE_MODES.values():
        build(K._baseline_finish_kernel, dict(x_ptr=x, idx_ptr="*i64", sums_ptr="*fp64", batch_ptr="*fp64",
                                              par_ptr="*fp64", out_ptr=out, N="i32"),
              dict(MODE=mode, BLOCK=K.GROUP_BLOCK), num_warps=4)
    for packed, mask in itertools.product([True, False], ["*u8", "*i64", "*fp16", "*fp64"]):
        build(K._remax_kernel, dict(r_ptr=x, m_ptr=mask, b_ptr="*fp32", cu_ptr="*i32", adv_ptr=out, ret_ptr=out,
                                    r_stride="i64", m_stride="i64", b_stride="i64", T="i32"),
              dict(PACKED=packed, BLOCK=K.MAX_BLOCK), num_warps=4)
print("ok")
"""


def test_triton_outcome_kernels_compile_for_h100():
    # Every variant of the broadcast, group-sum, deviation, finishing and ReMax kernels, compiled to
    # sm_90 cubins (the interpreter does not run Triton's compiler).
    compile_for_sm90(_SM90_OUTCOME_SCRIPT)
