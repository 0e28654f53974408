"""Group ids -> dense group numbers (``group_index``), the grouping every outcome op starts from.

Group ids: an integer tensor, a numpy array of str (``<U`` or object dtype), bytes or integers,
or a list of str or int (verl passes its ``uid`` array). Strings are compared as strings ("7"
and "07" are different groups). They are mapped in one pass of a C++ hash over the raw bytes
(``<U`` arrays are read in place; lists and object arrays are joined into one buffer, ASCII
bytes or UTF-32), never a Python loop per sample; on GPU, integer ids are grouped by a sort
(no host sync).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks


def _dense_by_sort(ids: Tensor) -> Tensor:
    """Group numbers in [0, N) from any int64 ids by a stable sort (no host sync, any device)."""
    if ids.numel() == 0:  # a new tensor: a custom op's output may not alias its input
        return torch.empty(0, dtype=torch.int64, device=ids.device)
    sorted_ids, perm = torch.sort(ids.to(torch.int64), stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.int64)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    out = torch.empty_like(sorted_ids)
    out[perm] = starts.cumsum(0) - 1
    return out


def _dense_torch(ids: Tensor) -> Tensor:
    if ids.ndim == 2:  # string code points without C++: numpy factorization of the rows
        rows = np.ascontiguousarray(ids.cpu().numpy()).view(f"V{ids.shape[1] * ids.element_size()}").ravel()
        return torch.from_numpy(np.unique(rows, return_inverse=True)[1].astype(np.int64).reshape(-1)).to(ids.device)
    return _dense_by_sort(ids)


_DENSE = _backend.Kernels("group_index", cpp="cpp_group_index", torch=_dense_torch, fp64=("cpp",))  # ids are ints


@torch.library.custom_op("rlkern::group_index", mutates_args=())
def _dense_group_ids(ids: Tensor) -> Tensor:
    """ids ``[N]`` int64 (or ``[N, W]`` int32 code points) -> group numbers ``[N]`` int64 in [0, N)."""
    if _DENSE.backend(ids) == "cpp":
        return _DENSE.get("cpp")(ids, None)
    return _dense_torch(ids)


@_dense_group_ids.register_fake
def _(ids):
    return ids.new_empty(ids.shape[:1], dtype=torch.int64)


def _strings_to_index(strings: list) -> Tensor:
    """A list of str -> dense group numbers ``[N]`` int64 (CPU), one C++ pass over the joined strings.

    The strings are joined with "\\0" into one buffer: ASCII bytes when every string is ASCII
    (``str.isascii`` is O(1) and the encoding a copy), else UTF-32 code points; the kernel
    splits it at the separators, so no per-string lengths are computed in Python. A string
    that itself holds "\\0" makes the separator count wrong (ValueError): then lengths are passed.
    """
    n = len(strings)
    joined = "\0".join(strings)  # TypeError on a non-str element, handled by the caller
    if not _backend.has_cpp():  # sorts the Python strings themselves (no C++ build)
        return torch.from_numpy(np.unique(np.asarray(strings, dtype=object), return_inverse=True)[1]
                                .astype(np.int64).reshape(-1))
    if joined.isascii():
        keys = torch.frombuffer(bytearray(joined, "ascii"), dtype=torch.uint8) if joined else \
            torch.zeros(0, dtype=torch.uint8)
    else:
        keys = torch.from_numpy(np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.int32).copy())
    try:
        return torch.ops.rlkern.cpp_group_index_joined(keys, n)
    except ValueError:  # a string holds "\0"
        pass
    codes = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), dtype=np.int32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, strings), dtype=np.int64, count=n), out=offsets[1:])
    return torch.ops.rlkern.cpp_group_index(torch.from_numpy(codes.copy()), torch.from_numpy(offsets))


def _from_tensor(op: str, group_ids: Tensor, name: str = "group_ids") -> Tensor:
    if group_ids.dtype not in _checks.INTS + (torch.bool,):
        raise TypeError(f"{op}: {name} must be an integer tensor, got {group_ids.dtype}")
    if group_ids.ndim != 1:
        raise ValueError(f"{op}: {name} must be 1-D [N], got shape {tuple(group_ids.shape)}")
    return _dense_group_ids(group_ids.to(torch.int64))


def _from_items(op: str, items: list, name: str = "group_ids") -> Tensor:
    """A list of str (or of int) -> dense numbers."""
    try:
        return _strings_to_index(items)
    except TypeError:
        pass
    try:
        ints = np.asarray(items, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{op}: {name} must hold only str or only int values, got "
                        f"{sorted({type(x).__name__ for x in items})}") from None
    if ints.ndim != 1 or any(isinstance(x, (float, np.floating)) for x in items):
        raise TypeError(f"{op}: {name} must hold only str or only int values, got "
                        f"{sorted({type(x).__name__ for x in items})}")
    return _dense_group_ids(torch.from_numpy(ints))


def _from_array(op: str, arr: np.ndarray, name: str = "group_ids") -> Tensor:
    if arr.ndim != 1:
        raise ValueError(f"{op}: {name} must be 1-D [N], got shape {arr.shape}")
    if arr.dtype.kind == "U":
        arr = np.ascontiguousarray(arr)
        width = arr.dtype.itemsize // 4
        codes = torch.from_numpy(arr.view(np.int32).reshape(len(arr), width)) if width else \
            torch.zeros(len(arr), 1, dtype=torch.int32)
        return _dense_group_ids(codes)
    if arr.dtype.kind == "S":
        arr = np.ascontiguousarray(arr)
        codes = torch.from_numpy(arr.view(np.uint8).reshape(len(arr), max(arr.dtype.itemsize, 1)))
        return _dense_group_ids(codes.to(torch.int32))
    if arr.dtype.kind in "iub":
        return _dense_group_ids(torch.from_numpy(arr.astype(np.int64)))
    return _from_items(op, arr.tolist(), name)


def dense(op: str, group_ids, n: int | None = None, device: torch.device | str | None = None,
          name: str = "group_ids") -> Tensor:
    """``group_index`` on behalf of ``op`` (its name starts the error messages, ``name`` is the
    argument's)."""
    if isinstance(group_ids, Tensor):
        # ids are read on the host: a meta tensor has no values, and ids on another accelerator
        # than the batch are a caller's mix-up (CPU ids for a CUDA batch are the usual case)
        target = None if device is None else torch.device(device)
        if group_ids.device.type == "meta" and (target is None or target.type != "meta"):
            raise ValueError(f"{op}: {name} is on meta (no values to read), expected a CPU tensor or a list")
        if target is not None and group_ids.device.type not in ("cpu", target.type):
            raise ValueError(f"{op}: {name} is on {group_ids.device}, expected cpu or {target}")
        out = _from_tensor(op, group_ids, name)
    elif isinstance(group_ids, np.ndarray):
        out = _from_array(op, group_ids, name)
    elif isinstance(group_ids, (list, tuple)):
        out = _from_items(op, list(group_ids), name)
    else:
        raise TypeError(f"{op}: {name} must be a tensor, a numpy array or a list, got {type(group_ids).__name__}")
    if n is not None and out.shape[0] != n:
        raise ValueError(f"{op}: {name} must have {n} entries (one per sample), got {out.shape[0]}")
    if device is not None:
        out = out.to(device, non_blocking=True)
    return out


def group_index(group_ids, *, n: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Dense group numbers for any accepted form of group ids.

    Args:
        group_ids: int tensor ``[N]``; numpy array ``[N]`` of str (``<U`` or object), bytes
            (``S``) or integers; or a list/tuple of str or int.
        n: expected N (checked when given).
        device: where the result goes (default: the tensor's device, else CPU).

    Returns:
        int64 ``[N]`` with values in ``[0, N)``; equal ids get equal numbers, different ids
        different numbers (the numbering itself is unspecified).
    """
    return dense("group_index", group_ids, n, device)
