"""Argument checks shared by the ops: one rule per kind of argument, one message shape.

Every message starts with the op's name, names the argument and shows what was received
against what is expected: ``"aggregate: dp_size must be an int >= 1, got 2.5"``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

import torch
from torch import Tensor

from rlkern import _backend


def host_checks(t: Tensor) -> bool:
    """Whether checks that read tensor values run: always on CPU tensors, on CUDA only with
    ``RLKERN_VALIDATE=1`` (a host sync), never while torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _backend.validate_enabled()


def number(op: str, name: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, integer: bool = False) -> float | int:
    """A finite real number (not a bool, not NaN or inf) within ``[low, high]`` (``(low, high]``
    with ``low_open``); ``integer``: an int. numpy scalars count as numbers."""
    kind = "an int" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    wanted = f"{kind}{' ' + ' and '.join(bounds) if bounds else ''}"
    ok = isinstance(value, (numbers.Integral if integer else numbers.Real)) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise ValueError(f"{op}: {name} must be {wanted}, got {value!r}")
    return int(value) if integer else float(value)


def cu_seqlens(op: str, cu: Tensor, total: int, device: torch.device, of: str) -> int:
    """Packed layout offsets: int32/int64 ``[B + 1]`` on ``device``, rising from 0 to ``total``,
    the number of packed tokens of the tensor named ``of`` (values read where ``host_checks``
    allows). Returns B."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{op}: cu_seqlens must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cu_seqlens must be int32 or int64, got {cu.dtype}")
    if cu.ndim != 1 or cu.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be [B + 1] with B >= 0, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu.device}, expected {device}")
    if host_checks(cu):
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu.diff() < 0).any()):
            shown = cu.tolist() if cu.numel() <= 20 else f"[{int(cu[0])}, ..., {int(cu[-1])}] ({cu.numel()} entries)"
            raise ValueError(f"{op}: cu_seqlens must rise from 0 to {of}.numel() = {total}, got {shown}")
    return cu.numel() - 1


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASKS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + FLOATS
INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_KINDS = {"float": FLOATS, "mask": MASKS, "int": INTS}


def tensors(op: str, main: str, specs: dict, shape=None) -> None:
    """Validate ``{name: (tensor or None, kind)}``; kind is "float", "mask" or "int".

    Every tensor must be a Tensor of its kind's dtypes, on ``main``'s device and, when ``shape``
    is given, of that shape (``shape`` may be a dict name -> expected shape for some names).
    """
    ref = specs[main][0]
    for name, (t, kind) in specs.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        allowed = _KINDS[kind]
        if t.dtype not in allowed:
            names = "/".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")
        if isinstance(ref, Tensor) and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {main} is on {ref.device}")
        want = shape.get(name) if isinstance(shape, dict) else shape
        if want is not None and tuple(t.shape) != tuple(want):
            raise ValueError(f"{op}: {name} must have shape {tuple(want)}, got {tuple(t.shape)}")


def flag(op: str, name: str, value) -> bool:
    """A bool or a numpy bool (not 0 / 1 or a string: ``fp32="false"`` would be truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
    return bool(value)


def out_dtype(op: str, value, peer: str) -> torch.dtype | None:
    """A trainer drop-in's ``out_dtype``: None (the trainer's dtype, ``peer`` names the trainer)
    or a float dtype (rlkern's unrounded result in that dtype)."""
    if value is not None and value not in FLOATS:
        raise TypeError(f"{op}: out_dtype must be None ({peer}'s dtype) or a float dtype, got {value!r}")
    return value


def choice(op: str, name: str, value, choices) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def zero_masked(values: Tensor | None, mask: Tensor | None) -> Tensor | None:
    """``values`` with 0 where ``mask`` (same shape) is 0. Ops whose kernels sum ``values * mask``
    call it first: NaN * 0 is NaN, so a NaN or inf in a masked-out position (padding a trainer
    never wrote) would reach every sum it is part of. One elementwise pass, no host sync."""
    if values is None or mask is None:
        return values
    return torch.where(mask != 0, values, values.new_zeros(()))


def no_nan(op: str, name: str, t: Tensor | None, mask: Tensor | None = None) -> None:
    """``t`` holds no NaN (where ``mask``, of ``t``'s leading shape, is nonzero); read where
    ``host_checks`` allows. For tensors an op compares (ranks, maxima, thresholds, equality):
    a comparison with NaN is False, so a NaN there would give a plausible, wrong result instead
    of a NaN one (docs/reliability.md's NaN policy)."""
    if t is None or not host_checks(t) or not t.dtype.is_floating_point:
        return
    bad = t.isnan()
    if mask is not None:
        bad = bad & (mask != 0).reshape(mask.shape + (1,) * (t.ndim - mask.ndim))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{op}: {name} must not hold NaN (the op compares its values), got NaN at {name}{list(where)}")
