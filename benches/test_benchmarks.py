"""The cases of ``rlkern bench`` (its quick suite) under pytest-benchmark, for regression tracking:

    pytest benches/ --benchmark-only                  # time every case, CPU (and CUDA when present)
    pytest benches/ --benchmark-only --benchmark-autosave --benchmark-compare   # against the last run

Each bench's ``main`` runs under ``common.collect()``, which records every (case, implementation)
callable instead of timing it; each becomes one test. CUDA cases are skipped without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import io

import pytest
import torch

from rlkern.benches import common, suite


def _cases(device: str) -> list:
    cases = []
    for family in suite.FAMILIES:
        module = importlib.import_module(f"rlkern.benches.bench_{family}")
        for _, args in suite.runs(family, full=False, cuda=device == "cuda"):
            common.set_family(family)
            with common.collect() as collected, contextlib.redirect_stdout(io.StringIO()):
                module.main([*args, "--device", device])
            cases += [pytest.param(fn, id=f"{device} {label} | {impl}") for label, impl, fn in collected]
    return cases


CASES = _cases("cpu")
if torch.cuda.is_available():
    CASES += _cases("cuda")
else:
    CASES += [pytest.param(None, id=f"cuda [{family}]", marks=pytest.mark.skip(reason="needs a CUDA device"))
              for family in suite.FAMILIES]


@pytest.mark.parametrize("fn", CASES)
def test_case(benchmark, fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()

    def call():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=3, warmup_rounds=1)
