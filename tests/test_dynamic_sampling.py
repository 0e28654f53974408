"""dynamic_sampling_mask (DAPO's group filter): every backend against the plain-Python oracle
(rlkern/reference/dynamic_sampling.py) and against verl's own rule, the sm_90 compile of its
Triton kernels, and a CUDA run."""

import numpy as np
import pytest
import torch

import rlkern
from conftest import compile_for_sm90
from rlkern.reference import dynamic_sampling as reference


def _batch(n=23, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (n,), generator=g)
    # 0/1 accuracies: some groups all 0, some all 1, some mixed; a few fractional scores
    scores = torch.randint(0, 2, (n,), generator=g).to(torch.float64)
    scores[ids == 2] = 1.0
    scores[ids == 3] = 0.0
    scores[ids == 4] = 0.1  # equal non-dyadic scores
    scores[(ids == 5).nonzero()[:1, 0]] = 0.3
    return scores.to(dtype), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 5, 23, 2049])
def test_matches_the_reference(backend, dtype, n):
    scores, ids = _batch(n=n, seed=n, dtype=dtype)
    ours = rlkern.dynamic_sampling_mask(scores, ids)
    assert ours.dtype == torch.bool and ours.shape == (n,)
    assert torch.equal(ours, reference.dynamic_sampling_mask(scores, ids))


def test_reference_is_verl_rule_on_verl_data():
    """The oracle against verl 0.9.1's own rule (``len(values) > 1 and np.std(values) == 0.0``
    drops a group) on 0/1 accuracies, where float rounding cannot make np.std nonzero."""
    scores, ids = _batch(n=41, seed=3)
    scores = (scores > 0.5).to(torch.float32)
    groups = {}
    for i, s in zip(ids.tolist(), scores.tolist()):
        groups.setdefault(i, []).append(s)
    dropped = {i for i, v in groups.items() if len(v) > 1 and float(np.std(v)) == 0.0}
    expected = torch.tensor([i not in dropped for i in ids.tolist()])
    assert torch.equal(reference.dynamic_sampling_mask(scores, ids), expected)
    assert torch.equal(rlkern.dynamic_sampling_mask(scores, ids), expected)


def test_hand_computed(backend):
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, float("nan"), 0.0, 2.0, 2.0, 2.0])
    ids = ["a", "a", "b", "b", "c", "d", "d", "e", "e", "e"]
    # a: all equal -> drop; b: mixed -> keep; c: one sample -> keep; d: NaN -> keep; e: all equal -> drop
    expected = [False, False, True, True, True, True, True, False, False, False]
    assert rlkern.dynamic_sampling_mask(scores, ids).tolist() == expected


def test_token_masks_padded_and_packed(backend):
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0])
    ids = [0, 0, 1, 1]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.int32)
    out = rlkern.dynamic_sampling_mask(scores, ids, mask)
    assert out.dtype == torch.bool and out.shape == mask.shape
    keep = reference.dynamic_sampling_mask(scores, ids)
    assert torch.equal(out, (mask != 0) & keep[:, None])
    cu = torch.tensor([0, 2, 3, 6, 8])
    packed = torch.tensor([1.0, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    out = rlkern.dynamic_sampling_mask(scores, ids, packed, cu_seqlens=cu)
    rows = torch.repeat_interleave(torch.arange(4), cu.diff())
    assert torch.equal(out, (packed != 0) & keep[rows])


def test_group_id_forms_agree():
    scores, ids = _batch(n=30, seed=5)
    want = rlkern.dynamic_sampling_mask(scores, ids)
    assert torch.equal(rlkern.dynamic_sampling_mask(scores, ids.tolist()), want)
    assert torch.equal(rlkern.dynamic_sampling_mask(scores, np.array([f"u{i}" for i in ids.tolist()])), want)


def test_bad_calls():
    s = torch.zeros(4)
    with pytest.raises(ValueError, match="^dynamic_sampling_mask: "):
        rlkern.dynamic_sampling_mask(s, [0, 1])
    with pytest.raises(ValueError, match="^dynamic_sampling_mask: "):
        rlkern.dynamic_sampling_mask(torch.zeros(4, 2), [0, 0, 1, 1])
    with pytest.raises(TypeError, match="^dynamic_sampling_mask: "):
        rlkern.dynamic_sampling_mask(torch.zeros(4, dtype=torch.int64), [0, 0, 1, 1])


def test_triton_kernels_compile_for_sm90():
    compile_for_sm90("""
from rlkern.kernels import dynamic_sampling as k
for x, rep in (("*fp32", "*fp32"), ("*bf16", "*fp32"), ("*fp64", "*fp64")):
    build(k._represent_kernel, {"x_ptr": x, "idx_ptr": "*i64", "rep_ptr": rep, "count_ptr": "*i32", "N": "i32"},
          {"BLOCK": 1024})
    build(k._differ_kernel, {"x_ptr": x, "idx_ptr": "*i64", "rep_ptr": rep, "varies_ptr": "*i32", "N": "i32"},
          {"BLOCK": 1024})
build(k._keep_kernel, {"idx_ptr": "*i64", "count_ptr": "*i32", "varies_ptr": "*i32", "keep_ptr": "*i8", "N": "i32"},
      {"BLOCK": 1024})
print("ok")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 37, 5001])
def test_triton_on_cuda_matches_the_reference(dtype, n):
    scores, ids = _batch(n=n, seed=n, dtype=dtype)
    ours = rlkern.dynamic_sampling_mask(scores.cuda(), ids.cuda())
    assert ours.is_cuda
    assert torch.equal(ours.cpu(), reference.dynamic_sampling_mask(scores, ids))
