"""Shared hypothesis profiles, strategies and helpers of the property tests (tests/test_fuzz.py,
tests/test_fuzz_ops.py; issue 21). The CI profile is derandomized and bounded; ``RLKERN_FUZZ=long``
draws random examples, many more of them, on larger shapes (run by hand, CONTRIBUTING.md, Tests).
"""

import os

import torch
from hypothesis import HealthCheck, settings

LONG = os.environ.get("RLKERN_FUZZ") == "long"

# deadline=None: the interpreter's first call of a kernel compiles nothing but is slow and uneven;
# database=None: the CI profile must not depend on a local example database.
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
settings.register_profile("rlkern-fuzz-ci", derandomize=True, max_examples=10, **_COMMON)
settings.register_profile("rlkern-fuzz-long", derandomize=False, max_examples=200, **_COMMON)
PROFILE = settings.get_profile("rlkern-fuzz-long" if LONG else "rlkern-fuzz-ci")

# Examples per test and backend in the CI profile; the long profile multiplies them.
_CI_EXAMPLES = {"cpp": 100, "torch": 30, "triton": 20}


def _fuzz(backend, scale=1.0, long_factor=30):
    """Settings for one backend: fewer examples where the backend is slow (the Triton interpreter);
    the long profile runs ``long_factor`` times the CI count."""
    n = max(1, int(_CI_EXAMPLES[backend] * scale))
    return settings(PROFILE, max_examples=n * long_factor if LONG else n)


def _big(ci, long):
    """Largest size drawn: bounded in CI, larger in the long profile."""
    return long if LONG else ci


def _small(backend, ci, long):
    # The Triton interpreter runs a kernel's Python per block: its shapes stay small in CI.
    if backend == "triton":
        return _big(max(1, ci // 4), max(1, long // 8))
    return _big(ci, long)


def _close(ours, ref, tol=2e-5, name="value", equal_nan=False):
    torch.testing.assert_close(ours.double(), ref.double(), rtol=tol, atol=tol, equal_nan=equal_nan,
                               msg=lambda m: f"{name}: {m}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mask(g, rows, steps, layout):
    """Response masks: right/left padding, holes, full, or empty (every row without a token)."""
    lengths = torch.randint(0, steps + 1, (rows,), generator=g)
    pos = torch.arange(steps)[None, :]
    if layout == "right":
        m = pos < lengths[:, None]
    elif layout == "left":
        m = pos >= (steps - lengths)[:, None]
    elif layout == "holes":
        m = (pos < lengths[:, None]) & (torch.rand(rows, steps, generator=g) > 0.3)
    elif layout == "empty":
        m = torch.zeros(rows, steps, dtype=torch.bool)
    else:
        m = torch.ones(rows, steps, dtype=torch.bool)
    return m


def _inside(mask):
    """The packed layout of padded rows: each row's slots from its first to its last valid token
    (left and right padding removed, holes kept with mask 0), one slot for a row without one."""
    pos = torch.arange(mask.shape[1])[None, :]
    first = torch.where(mask, pos, mask.shape[1]).min(-1).values
    last = torch.where(mask, pos, -1).max(-1).values
    empty = ~mask.any(-1)
    first, last = torch.where(empty, 0, first), torch.where(empty, 0, last)
    return (pos >= first[:, None]) & (pos <= last[:, None])


LAYOUTS = ["right", "left", "holes", "full", "empty"]


def _cu(inside):
    """int32 cu_seqlens of the packed rows selected by ``inside`` ([B, T] bool)."""
    return torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(-1).cumsum(0)]).to(torch.int32)


def _group_ids(g, sizes, form):
    """Group ids of groups of the given sizes, shuffled, as an int tensor, a list or numpy strings."""
    import numpy as np

    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    ids = ids[torch.randperm(len(ids), generator=g)]
    if form == "list":
        return ids.tolist()
    if form == "str":
        return np.array([f"uid-{i}" for i in ids.tolist()])
    return ids


def _scores(g, n, kind, dtype=torch.float32):
    """Outcome scores: normal, binary (pass/fail), all equal, or huge (1e4)."""
    if kind == "binary":
        s = (torch.rand(n, generator=g) > 0.5).double()
    elif kind == "equal":
        s = torch.full((n,), 0.5, dtype=torch.float64)
    elif kind == "huge":
        s = torch.randn(n, generator=g, dtype=torch.float64) * 1e4
    else:
        s = torch.randn(n, generator=g, dtype=torch.float64)
    return s.to(dtype)


# Every public op with the property tests that fuzz it: tests/test_fuzz_ops.py's
# test_every_public_op_is_fuzzed checks it against rlkern.__all__.
FUZZED: dict = {}


def fuzzes(*names):
    """Register a property test as the one of the public ops ``names`` (it must call each)."""
    def register(fn):
        for name in names:
            FUZZED.setdefault(name, []).append(fn)
        return fn
    return register
