"""Advantage estimators: GAE/EGAE, discounted returns, whitening, GRPO-family group normalization.

Token-level estimators (``gae``, ``egae``, ``discounted_returns``, ``reinforce_pp``, ``remax``)
take a padded ``[B, T]`` batch with a response mask (bool, int or float; read as ``mask != 0``)
or a packed ``[total]`` batch with ``cu_seqlens`` (int32, ``[B + 1]``). Outcome estimators take
one score per sample and group ids; with a ``response_mask`` they return the per-token
broadcast ``score * mask`` (verl's layout): ``[N, T]``, or packed ``[total]`` when
``cu_seqlens`` is given (sample i owns ``mask[cu[i]:cu[i + 1]]``); without it one value per
sample. ``optimal_token_baseline`` takes token-level tensors in either layout (``[B, T]``, or
``[total]`` with ``cu_seqlens``).

Group ids: an integer tensor, a numpy array of str (``<U`` or object dtype) or bytes, or a
list of str (verl passes its ``uid`` array). Strings are compared as strings ("7" and "07"
are different groups). They are mapped to dense group numbers in one pass of a C++ hash over
the raw bytes (``<U`` arrays are read in place; lists and object arrays are joined into one
buffer, ASCII bytes or UTF-32), never a Python loop per sample; on GPU, integer ids are grouped
by a sort (no host sync). On CPU, ``group_normalize``/``grpo`` compute the group statistics,
the normalization and the broadcast to tokens in one C++ kernel (``rloo``, ``opo``, ``gpg`` and
``reinforce_pp_baseline``'s group baseline likewise), and ``optimal_token_baseline``
runs one C++ kernel (a task per group, float64 sums); on GPU and for float64 rewards it is
float64 PyTorch.

verl 0.9.1 ``ADV_ESTIMATOR_REGISTRY`` -> rlkern (drop-ins with verl's signatures are in
``rlkern.algos.advantages.VERL_ADV_ESTIMATORS``):

| verl name                      | verl function                                    | rlkern op |
|--------------------------------|--------------------------------------------------|-----------|
| ``gae``                        | ``compute_gae_advantage_return``                 | ``gae(..., whiten=True)`` |
| ``grpo``                       | ``compute_grpo_outcome_advantage``               | ``grpo`` (= ``group_normalize`` verl defaults) |
| ``grpo_vectorized``            | ``compute_grpo_vectorized_outcome_advantage``    | ``grpo`` (same numbers) |
| ``grpo_passk``                 | ``compute_grpo_passk_outcome_advantage``         | ``grpo_passk`` |
| ``rloo``                       | ``compute_rloo_outcome_advantage``               | ``rloo(singleton="raw")`` |
| ``rloo_vectorized``            | ``compute_rloo_vectorized_outcome_advantage``    | ``rloo(singleton="zero")`` |
| ``reinforce_plus_plus``        | ``compute_reinforce_plus_plus_outcome_advantage``| ``reinforce_pp`` (``discounted_returns`` + whiten) |
| ``reinforce_plus_plus_baseline``| ``compute_reinforce_plus_plus_baseline_outcome_advantage`` | ``reinforce_pp_baseline`` |
| ``remax``                      | ``compute_remax_outcome_advantage``              | ``remax`` |
| ``opo``                        | ``compute_opo_outcome_advantage``                | ``opo`` |
| ``gpg``                        | ``compute_gpg_outcome_advantage``                | ``gpg`` |
| ``gdpo``                       | ``compute_gdpo_outcome_advantage``               | ``gdpo`` |
| ``optimal_token_baseline``     | ``compute_optimal_token_baseline_advantage``     | ``optimal_token_baseline`` |
| ``tir_optimal_token_baseline`` | ``compute_multi_turn_optimal_token_baseline_advantage`` | ``optimal_token_baseline(..., multi_turn=True)`` |

Beyond verl: ``egae`` (T-PPO), ``bnpo`` (BNPO), ``gigpo_step_groups`` (GiGPO), TRL's
``scale_rewards`` and unscorable completions (``skip_nan``) through ``group_normalize``
(TRL's whole advantage block, both ``multi_objective_aggregation`` modes:
``rlkern.algos.advantages.trl_grpo_advantages``), ``outcome_to_tokens``, ``group_index``.

Where rlkern deliberately differs from verl (documented per op): ``gae`` writes 0 at masked
positions (verl leaves the carried value there, which nothing reads); ``grpo_passk`` honours
its ``norm_by_std`` argument (verl reads it from ``config`` only); ``gpg`` has no ``alpha``
argument (verl ignores its own and uses N / #nonzero scores); a group of equal scores gets
advantage exactly 0 (verl's float32 mean can differ from the scores in the last bit, and that
rounding divided by std + eps = 1e-6 gives |advantages| up to about 0.1 there); a fractional
mask weight is read as "valid" by the token-level estimators (verl's GAE and whitening weight
by the mask's value; 0/1 masks give the same numbers).

Accumulation is float64 on CPU kernels and in every group statistic; outputs are float32
(float64 for float64 input). No op syncs with the host on GPU tensors; the checks that need
values (``masked_whiten`` with < 2 valid tokens, ``grpo_passk`` with a group of one) raise on
CPU and give 0 / NaN on GPU (``RLKERN_VALIDATE=1`` raises there too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from rlkern import _backend
from rlkern.ops import _checks

_KERNELS = ("cpp", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_STD_MODES = ("unbiased", "population", None)
_SCALES = ("group", "batch", "none")
_SINGLETONS = ("verl", "zero")
_F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Checks


def _check_advantages(op: str, main: str, tensors: dict, shape=None, floats: float | None = None) -> None:
    """Validate ``{name: (tensor or None, kind)}`` for ``op``; kind is "float", "mask" or "int".

    Every tensor must share ``main``'s device and, when ``shape`` is given, have that shape
    (``shape`` may be a dict name -> expected shape for exceptions).
    """
    ref = tensors[main][0]
    for name, (t, kind) in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        allowed = {"float": _FLOAT_DTYPES, "mask": _MASK_DTYPES, "int": _INT_DTYPES}[kind]
        if t.dtype not in allowed:
            names = "/".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {main} is on {ref.device}")
        want = shape.get(name) if isinstance(shape, dict) else shape
        if want is not None and tuple(t.shape) != tuple(want):
            raise ValueError(f"{op}: {name} must have shape {tuple(want)}, got {tuple(t.shape)}")
    if floats:
        for name, value in floats.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")


def _check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")


def _out_dtype(t: Tensor) -> torch.dtype:
    return _F64 if t.dtype == _F64 else torch.float32


def _check_cu_seqlens(op: str, cu_seqlens, total: int, device: torch.device, batch: int | None = None) -> None:
    """cu_seqlens: int32 [B + 1] (B = batch when given) on ``device``, from 0 to ``total``, non-decreasing."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1:
        raise TypeError(f"{op}: cu_seqlens must be an int32 [B + 1] tensor, got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if batch is not None and cu_seqlens.shape[0] != batch + 1:
        raise ValueError(f"{op}: cu_seqlens must be [{batch + 1}] (one segment per sample), "
                         f"got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but the packed tensors are on {device}")
    if _checks.host_checks(cu_seqlens):
        if cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool(
                (cu_seqlens.diff() < 0).any()):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing from 0 to {total}, "
                             f"got {cu_seqlens.tolist()[:8]}...")


def _packed_check(op: str, rewards: Tensor, cu_seqlens: Tensor | None) -> None:
    if cu_seqlens is None:
        if rewards.ndim != 2:
            raise ValueError(f"{op}: rewards must be [B, T] (or [total] with cu_seqlens), got {tuple(rewards.shape)}")
        return
    if rewards.ndim != 1:
        raise ValueError(f"{op}: with cu_seqlens, rewards must be packed [total], got {tuple(rewards.shape)}")
    _check_cu_seqlens(op, cu_seqlens, rewards.numel(), rewards.device)


def _token_layout(op: str, n: int, response_mask: Tensor | None, cu_seqlens: Tensor | None) -> None:
    """An outcome op's token layout: response_mask [N, T], or packed [total] with cu_seqlens [N + 1]."""
    if cu_seqlens is None:
        if response_mask is not None and (response_mask.ndim != 2 or response_mask.shape[0] != n):
            raise ValueError(f"{op}: response_mask must be [{n}, T] (or packed [total] with cu_seqlens), "
                             f"got {tuple(response_mask.shape)}")
        return
    if response_mask is None:
        raise ValueError(f"{op}: cu_seqlens needs the packed response_mask [total]")
    if response_mask.ndim != 1:
        raise ValueError(f"{op}: with cu_seqlens, response_mask must be packed [total], got "
                         f"{tuple(response_mask.shape)}")
    _check_cu_seqlens(op, cu_seqlens, response_mask.shape[0], response_mask.device, batch=n)


def _segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """Sequence number of every packed token, [total] int64 (no host sync)."""
    tokens = torch.arange(total, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)


def _lastdim_contiguous(t: Tensor) -> Tensor:
    return t if t.ndim == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# Group ids -> dense int64 group numbers


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


@torch.library.custom_op("rlkern::advantages_dense_group_ids", mutates_args=())
def _dense_group_ids(ids: Tensor) -> Tensor:
    """ids [N] int (or [N, W] int32 code points) -> group numbers [N] int64 in [0, N)."""
    if ids.device.type == "cpu" and _backend.has_cpp() and _backend.forced() in (None, "cpp"):
        return torch.ops.rlkern.advantages_group_index_kernel(ids, None)
    if ids.ndim == 2:  # string code points on a non-C++ path: numpy factorization of the rows
        rows = np.ascontiguousarray(ids.cpu().numpy()).view(f"V{ids.shape[1] * ids.element_size()}").ravel()
        return torch.from_numpy(np.unique(rows, return_inverse=True)[1].astype(np.int64).reshape(-1)).to(ids.device)
    return _dense_by_sort(ids)


@_dense_group_ids.register_fake
def _(ids):
    return ids.new_empty(ids.shape[:1], dtype=torch.int64)


def _strings_to_index(strings: list) -> Tensor:
    """A list of str -> dense group numbers [N] int64 (CPU), one C++ pass over the joined strings.

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
        return torch.ops.rlkern.advantages_group_index_joined_kernel(keys, n)
    except ValueError:  # a string holds "\0"
        pass
    codes = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), dtype=np.int32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, strings), dtype=np.int64, count=n), out=offsets[1:])
    return torch.ops.rlkern.advantages_group_index_kernel(torch.from_numpy(codes.copy()), torch.from_numpy(offsets))


def group_index(group_ids, n: int | None = None, device: torch.device | str | None = None) -> Tensor:
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
    if isinstance(group_ids, Tensor):
        if group_ids.dtype not in _INT_DTYPES + (torch.bool,):
            raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
        if group_ids.ndim != 1:
            raise ValueError(f"group_ids must be 1-D [N], got shape {tuple(group_ids.shape)}")
        out = _dense_group_ids(group_ids.to(torch.int64))
    else:
        arr = group_ids if isinstance(group_ids, np.ndarray) else None
        if arr is None and not isinstance(group_ids, (list, tuple)):
            raise TypeError(f"group_ids must be a tensor, a numpy array or a list, got {type(group_ids).__name__}")
        if arr is not None and arr.ndim != 1:
            raise ValueError(f"group_ids must be 1-D [N], got shape {arr.shape}")
        if arr is not None and arr.dtype.kind == "U":
            arr = np.ascontiguousarray(arr)
            width = arr.dtype.itemsize // 4
            codes = torch.from_numpy(arr.view(np.int32).reshape(len(arr), width)) if width else \
                torch.zeros(len(arr), 1, dtype=torch.int32)
            out = _dense_group_ids(codes)
        elif arr is not None and arr.dtype.kind == "S":
            arr = np.ascontiguousarray(arr)
            codes = torch.from_numpy(arr.view(np.uint8).reshape(len(arr), max(arr.dtype.itemsize, 1)))
            out = _dense_group_ids(codes.to(torch.int32))
        elif arr is not None and arr.dtype.kind in "iub":
            out = _dense_group_ids(torch.from_numpy(arr.astype(np.int64)))
        else:
            items = arr.tolist() if arr is not None else list(group_ids)
            try:
                out = _strings_to_index(items)
            except TypeError:
                try:
                    ints = np.asarray(items, dtype=np.int64)
                except (TypeError, ValueError, OverflowError):
                    raise TypeError("group_ids must hold only str or only int values, got "
                                    f"{sorted({type(x).__name__ for x in items})}") from None
                if ints.ndim != 1 or any(isinstance(x, (float, np.floating)) for x in items):
                    raise TypeError("group_ids must hold only str or only int values") from None
                out = _dense_group_ids(torch.from_numpy(ints))
    if n is not None and out.shape[0] != n:
        raise ValueError(f"group_ids must have {n} entries (one per sample), got {out.shape[0]}")
    if device is not None:
        out = out.to(device, non_blocking=True)
    return out


# ---------------------------------------------------------------------------------------------
# GAE / EGAE / discounted returns


def _gae_torch(rewards, values, valid, bootstrap, cu_seqlens, gamma, lam):
    """Fallback (no C++ / float64 / non-CUDA device): verl's vectorized-over-batch loop over T."""
    if cu_seqlens is not None:
        return _packed_via_padded(lambda r, v, m, boot: _gae_torch(r, v, m, boot, None, gamma, lam),
                                  (rewards, values, valid), bootstrap, cu_seqlens)
    dtype = _out_dtype(rewards)
    r, v = rewards.to(dtype), values.to(dtype)
    batch, steps = r.shape
    adv, ret = torch.zeros_like(r), torch.zeros_like(r)
    next_value = bootstrap.to(dtype) if bootstrap is not None else r.new_zeros(batch)
    last = r.new_zeros(batch)
    for t in reversed(range(steps)):
        m = valid[:, t]
        candidate = r[:, t] + gamma * next_value - v[:, t] + gamma * lam * last
        last = torch.where(m, candidate, last)
        next_value = torch.where(m, v[:, t], next_value)
        adv[:, t] = torch.where(m, last, 0.0)
        ret[:, t] = torch.where(m, last + v[:, t], 0.0)
    return adv, ret


def _discounted_torch(rewards, valid, cu_seqlens, gamma):
    if cu_seqlens is not None:
        return _packed_via_padded(lambda r, m, boot: (_discounted_torch(r, m, None, gamma),),
                                  (rewards, valid), None, cu_seqlens)[0]
    r = rewards.to(_out_dtype(rewards))
    out = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in reversed(range(r.shape[1])):
        m = valid[:, t]
        running = torch.where(m, r[:, t] + gamma * running, running)
        out[:, t] = torch.where(m, running, 0.0)
    return out


def _packed_via_padded(fn, packed, bootstrap, cu_seqlens):
    """Run a padded-layout fallback on a packed batch (host-side lengths: fallback only)."""
    lengths = cu_seqlens.diff().tolist()
    steps = max(lengths, default=0)
    padded = []
    for x in packed:
        rows = torch.split(x, lengths)
        padded.append(torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True) if rows else
                      x.new_zeros(0, steps))
        if padded[-1].shape[1] < steps:
            padded[-1] = torch.nn.functional.pad(padded[-1], (0, steps - padded[-1].shape[1]))
    outs = fn(*padded, bootstrap) if bootstrap is not None or len(packed) == 3 else fn(*padded, None)
    keep = torch.arange(steps, device=packed[0].device)[None, :] < torch.tensor(lengths, device=packed[0].device)[:, None]
    return tuple(o[keep] for o in outs)


def _triton_advantages():
    from rlkern.kernels import advantages as triton_advantages

    return triton_advantages


@torch.library.custom_op("rlkern::advantages_gae", mutates_args=())
def _gae_op(
    rewards: Tensor,  # [B, T] or packed [total], float
    values: Tensor,  # rewards.shape, same dtype
    mask: Tensor,  # rewards.shape, bool/int/float
    bootstrap: Tensor | None,  # [B] value after the last token (EGAE), or None (0)
    cu_seqlens: Tensor | None,  # [B + 1] int32 for the packed layout
    gamma: float,
    lam: float,
    whiten: bool,
) -> tuple[Tensor, Tensor]:
    backend = _backend.choose(rewards.device, _KERNELS, rewards.dtype, fp64=_KERNELS)
    if backend == "cpp" and rewards.device.type == "cpu":
        adv, ret = torch.ops.rlkern.advantages_gae_kernel(rewards, values, mask, bootstrap, cu_seqlens, gamma, lam)
    elif backend == "triton":
        adv, ret = _triton_advantages().gae(rewards, values, mask, bootstrap, cu_seqlens, gamma, lam)
    else:
        adv, ret = _gae_torch(rewards, values, mask != 0, bootstrap, cu_seqlens, gamma, lam)
    if whiten:
        adv = _whiten_dispatch(adv, mask, True, True, "gae")
    return adv, ret


@_gae_op.register_fake
def _(rewards, values, mask, bootstrap, cu_seqlens, gamma, lam, whiten):
    dtype = _out_dtype(rewards)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def _last_valid_values(values: Tensor, valid: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """V(s_{l-1}) of every sequence: the value at its last valid token (0 without one), [B] (no host sync)."""
    dtype = _out_dtype(values)
    if cu_seqlens is None:
        batch, steps = values.shape
        if steps == 0:
            return values.new_zeros(batch, dtype=dtype)
        last = torch.where(valid, torch.arange(steps, device=values.device), -1).amax(-1)
        at_last = values.gather(-1, last.clamp_min(0)[:, None])[:, 0]
    else:
        batch, total = cu_seqlens.shape[0] - 1, values.shape[0]
        if total == 0:
            return values.new_zeros(batch, dtype=dtype)
        positions = torch.where(valid, torch.arange(total, device=values.device), -1)
        last = torch.full((batch,), -1, dtype=torch.int64, device=values.device).scatter_reduce(
            0, _segment_ids(cu_seqlens, total), positions, "amax")
        at_last = values[last.clamp_min(0)]
    return torch.where(last >= 0, at_last.to(dtype), 0.0)


def _gae_checked(op, rewards, values, response_mask, cu_seqlens, gamma, lam, whiten, truncated=None,
                 bootstrap_values=None):
    _check_advantages(op, "rewards", {"rewards": (rewards, "float"), "values": (values, "float"),
                                      "response_mask": (response_mask, "mask")},
                      shape=tuple(rewards.shape) if isinstance(rewards, Tensor) else None,
                      floats={"gamma": gamma, "lam": lam})
    _packed_check(op, rewards, cu_seqlens)
    batch = rewards.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if values.dtype != rewards.dtype:
        values = values.to(rewards.dtype)
    bootstrap = None
    if truncated is not None:
        if not isinstance(truncated, Tensor):
            raise TypeError(f"{op}: truncated must be a torch.Tensor [B], got {type(truncated).__name__}")
        _check_advantages(op, "rewards", {"rewards": (rewards, "float"), "truncated": (truncated, "mask"),
                                          "bootstrap_values": (bootstrap_values, "float")},
                          shape={"truncated": (batch,), "bootstrap_values": (batch,)})
        next_value = _last_valid_values(values, response_mask != 0, cu_seqlens) if bootstrap_values is None else \
            bootstrap_values.to(_out_dtype(rewards))
        bootstrap = torch.where(truncated != 0, next_value, 0.0)
    return _gae_op(_lastdim_contiguous(rewards), _lastdim_contiguous(values), _lastdim_contiguous(response_mask),
                   bootstrap, cu_seqlens, float(gamma), float(lam), bool(whiten))


def gae(
    rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    *,
    whiten: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation with verl's masking semantics.

    Right to left over the valid tokens of each sequence (mask != 0):
    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``, where
    "next" is the next *valid* token: masked positions (observation tokens in multi-turn
    rollouts, padding) are skipped and carry both the next value and the running advantage
    unchanged, exactly as verl's ``compute_gae_advantage_return``. A sequence ends with
    ``V_next = 0`` (see ``egae`` for truncated rollouts).

    Args:
        rewards: ``[B, T]`` token-level rewards (or packed ``[total]`` with ``cu_seqlens``),
            float16/bfloat16/float32/float64.
        values: critic values, shape of ``rewards`` (converted to rewards' dtype).
        response_mask: shape of ``rewards``, bool/int/float; nonzero = token is trained on.
        gamma: discount; default 1.0 as verl's ``algorithm.gamma``.
        lam: GAE lambda; default 1.0 as verl's ``algorithm.lam``.
        whiten: whiten the advantages over all valid tokens of the batch (verl's
            ``masked_whiten``: unbiased variance, 1e-8) — what verl's estimator returns.
        cu_seqlens: int32 ``[B + 1]`` for the packed layout.

    Returns:
        ``(advantages, returns)``, each of rewards' shape, float32 (float64 for float64
        input). ``returns = unwhitened advantages + values``. Both are 0 at masked positions
        (verl leaves the carried advantage there; no loss reads it). ``whiten=True`` over fewer
        than 2 valid tokens raises ValueError on CPU, gives 0 on GPU.
    """
    return _gae_checked("gae", rewards, values, response_mask, cu_seqlens, gamma, lam, whiten)


def egae(
    rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    truncated: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    *,
    whiten: bool = False,
    cu_seqlens: Tensor | None = None,
    bootstrap_values: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Extended GAE (EGAE) of T-PPO (Fan et al. 2025, "Truncated Proximal Policy Optimization",
    arXiv:2506.15050): advantages for responses cut at length l before they finished.

    A truncated response has neither its reward nor the state s_l after its last generated
    token; EGAE keeps the GAE sum up to that token and stands in V(s_{l-1}) for V(s_l):

        A_t = sum_{k=0}^{l-1-t} (gamma * lam)^k * delta_{t+k},        t = 0 .. l-1
        delta_t     = r_t + gamma * V(s_{t+1}) - V(s_t),                t < l-1
        delta_{l-1} = r_{l-1} + gamma * V(s_{l-1}) - V(s_{l-1})         (V(s_l) := V(s_{l-1}))

    so with gamma = 1 the last token's TD residual is its reward alone. A finished response
    (``truncated[b] == 0``) gets plain ``gae`` (V after EOS = 0). Positions are the valid tokens
    (mask != 0), as in ``gae``: s_{t+1} is the next valid token and l-1 the last valid one.
    The (gamma * lam)^k weights are GAE's, unchanged.

    Source: the paper's full text was not reachable here; V(s_l) := V(s_{l-1}) is what the T-PPO
    recipe for verl computes (open verl pull request #3728, ported from ByteDance Seed's code with
    T-PPO authors as co-authors; ``compute_truncate_gae_advantage_return`` in
    ``recipe/tppo/tppo_algos.py``). That code forms an unfinished response's last residual as
    ``(gamma - 1) * V(s_{l-1})``, without ``r_{l-1}``; its reward manager gives unfinished
    responses score 0, so the two agree unless a per-token reward (a KL penalty folded into the
    rewards) sits on the cut token. Outside this op, the recipe also drops the advantages of
    the last ``window_ignore_token_num`` (8) tokens of an unfinished window (multiply
    ``response_mask`` accordingly), can use VAPO's length-adaptive lambda, and trains the critic
    on finished responses only, with Monte-Carlo returns (rlkern's ``returns`` of truncated rows
    are GAE's ``A + V``).

    Args:
        rewards, values, response_mask, gamma, lam, whiten, cu_seqlens: as in ``gae``.
        truncated: ``[B]`` bool/int/float, nonzero for a response cut before it finished.
        bootstrap_values: optional ``[B]`` float, the critic's V(s_l) for truncated responses:
            replaces the paper's V(s_l) := V(s_{l-1}) with the standard bootstrap of truncated
            GAE (Schulman et al. 2017, PPO); ignored where ``truncated`` is 0.

    Returns:
        ``(advantages, returns)`` as in ``gae`` (``returns = advantages + values``).
    """
    if not isinstance(truncated, Tensor):
        raise TypeError(f"egae: truncated must be a torch.Tensor [B], got {type(truncated).__name__}")
    return _gae_checked("egae", rewards, values, response_mask, cu_seqlens, gamma, lam, whiten, truncated,
                        bootstrap_values)


@torch.library.custom_op("rlkern::advantages_discounted_returns", mutates_args=())
def _discounted_op(rewards: Tensor, mask: Tensor, cu_seqlens: Tensor | None, gamma: float) -> Tensor:
    backend = _backend.choose(rewards.device, _KERNELS, rewards.dtype, fp64=_KERNELS)
    if backend == "cpp" and rewards.device.type == "cpu":
        return torch.ops.rlkern.advantages_discounted_kernel(rewards, mask, cu_seqlens, gamma)
    if backend == "triton":
        return _triton_advantages().discounted_returns(rewards, mask, cu_seqlens, gamma)
    return _discounted_torch(rewards, mask != 0, cu_seqlens, gamma)


@_discounted_op.register_fake
def _(rewards, mask, cu_seqlens, gamma):
    return rewards.new_empty(rewards.shape, dtype=_out_dtype(rewards))


def discounted_returns(rewards: Tensor, response_mask: Tensor, gamma: float = 1.0, *,
                       cu_seqlens: Tensor | None = None) -> Tensor:
    """Discounted reward-to-go over valid tokens: ``G_t = r_t + gamma * G_next`` (REINFORCE++).

    Masked positions are skipped (the running return carries across them) and hold 0, as in
    verl's ``compute_reinforce_plus_plus_outcome_advantage``.

    Args:
        rewards: ``[B, T]`` float (or packed ``[total]`` with ``cu_seqlens``).
        response_mask: shape of ``rewards``, bool/int/float.
        gamma: discount; default 1.0 as verl's ``algorithm.gamma``.
        cu_seqlens: int32 ``[B + 1]`` for the packed layout.

    Returns:
        ``returns`` of rewards' shape, float32 (float64 for float64 input).
    """
    _check_advantages("discounted_returns", "rewards",
                      {"rewards": (rewards, "float"), "response_mask": (response_mask, "mask")},
                      shape=tuple(rewards.shape) if isinstance(rewards, Tensor) else None, floats={"gamma": gamma})
    _packed_check("discounted_returns", rewards, cu_seqlens)
    return _discounted_op(_lastdim_contiguous(rewards), _lastdim_contiguous(response_mask), cu_seqlens, float(gamma))


def reinforce_pp(rewards: Tensor, response_mask: Tensor, gamma: float = 1.0, *,
                 cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (verl ``reinforce_plus_plus``): whitened discounted returns.

    Args:
        rewards: ``[B, T]`` float token-level rewards (or packed ``[total]`` with ``cu_seqlens``).
        response_mask: rewards' shape, bool/int/float.
        gamma: discount; default 1.0 as verl's ``algorithm.gamma``.
        cu_seqlens: int32 ``[B + 1]`` for the packed layout.

    Returns:
        ``(advantages, returns)`` of rewards' shape, float32: ``advantages =
        masked_whiten(returns) * mask`` (over the whole batch), ``returns =
        discounted_returns(rewards, mask, gamma)``.
    """
    returns = discounted_returns(rewards, response_mask, gamma, cu_seqlens=cu_seqlens)
    return masked_whiten(returns, response_mask) * (response_mask != 0), returns


# ---------------------------------------------------------------------------------------------
# Whitening


def _whiten(x: Tensor, valid: Tensor, shift_mean: bool, op: str) -> Tensor:
    """verl's masked_whiten with float64 statistics; n < 2 raises on CPU and gives 0 elsewhere."""
    n = valid.sum(dtype=_F64)
    if x.device.type == "cpu" or _backend.validate_enabled():
        count = int(n)
        if count < 2:
            raise ValueError(f"{op}: whitening needs at least 2 valid tokens in the mask, got {count}")
    total = torch.where(valid, x, 0).sum(dtype=_F64)
    mean = total / (n + 1e-8)
    dev = torch.where(valid, x.to(_F64) - mean, 0.0)
    var = (dev * dev).sum() / (n + 1e-8) * n / (n - 1).clamp_min(1.0)
    out = (x.to(_F64) - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    out = torch.where(n >= 2, out, 0.0)
    return out.to(_out_dtype(x))


def _whiten_dispatch(values: Tensor, mask: Tensor, shift_mean: bool, zero_masked: bool, op: str) -> Tensor:
    """C++ kernel for float32 / float64 CPU tensors (three passes, float64 sums), else ``_whiten``."""
    if (values.dtype in (torch.float32, torch.float64)
            and _backend.choose(values.device, ("cpp",), values.dtype, fp64=("cpp",)) == "cpp"):
        return torch.ops.rlkern.advantages_whiten_kernel(values, mask, shift_mean, zero_masked)
    valid = mask != 0
    out = _whiten(values, valid, shift_mean, op)
    return torch.where(valid, out, 0.0).to(out.dtype) if zero_masked else out


@torch.library.custom_op("rlkern::advantages_masked_whiten", mutates_args=())
def _whiten_op(values: Tensor, mask: Tensor, shift_mean: bool) -> Tensor:
    return _whiten_dispatch(values, mask, shift_mean, False, "masked_whiten")


@_whiten_op.register_fake
def _(values, mask, shift_mean):
    return values.new_empty(values.shape, dtype=_out_dtype(values))


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """verl's ``masked_whiten``: ``(x - mean) / sqrt(var + 1e-8)`` with statistics over the mask.

    mean = sum / (n + 1e-8) and the unbiased variance ``n / (n - 1)`` times the mean squared
    deviation, as verl's ``masked_mean``/``masked_var``; statistics accumulate in float64.

    Args:
        values: any shape, float.
        mask: shape of ``values``, bool/int/float (nonzero = included in the statistics).
        shift_mean: False adds the mean back (verl's default True).

    Returns:
        Tensor of values' shape, float32 (float64 for float64 input); every position is
        transformed (as verl; multiply by the mask to zero padding). Fewer than 2 valid
        entries: ValueError on CPU (verl raises too), zeros on GPU.
    """
    _check_advantages("masked_whiten", "values", {"values": (values, "float"), "mask": (mask, "mask")},
                      shape=tuple(values.shape) if isinstance(values, Tensor) else None)
    return _whiten_op(values, mask, bool(shift_mean))


def _broadcast(scores: Tensor, mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """``scores[b] * mask`` over row b ([B, T]) or segment b (packed [total]), in scores' dtype."""
    if (scores.dtype in (torch.float32, _F64)
            and _backend.choose(scores.device, ("cpp",), scores.dtype, fp64=("cpp",)) == "cpp"):
        return torch.ops.rlkern.advantages_broadcast_kernel(scores, mask, cu_seqlens)
    per_token = scores[:, None] if cu_seqlens is None else scores[_segment_ids(cu_seqlens, mask.shape[0])]
    out = per_token * mask  # one pass: the mask is cast inside the multiply
    return out if out.dtype == scores.dtype else out.to(scores.dtype)


def outcome_to_tokens(scores: Tensor, response_mask: Tensor, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """Broadcast one score per sequence to its tokens: ``scores[:, None] * response_mask``.

    Args:
        scores: ``[B]`` float.
        response_mask: ``[B, T]`` bool/int/float, or packed ``[total]`` with ``cu_seqlens``.
        cu_seqlens: int32 ``[B + 1]``: sequence b is ``response_mask[cu[b]:cu[b + 1]]``.

    Returns:
        response_mask's shape (``[B, T]`` or ``[total]``) in scores' dtype (verl's
        ``scores.unsqueeze(-1) * response_mask``).
    """
    _check_advantages("outcome_to_tokens", "scores", {"scores": (scores, "float"),
                                                      "response_mask": (response_mask, "mask")})
    if scores.ndim != 1:
        raise ValueError(f"outcome_to_tokens: scores must be [B], got {tuple(scores.shape)}")
    _token_layout("outcome_to_tokens", scores.shape[0], response_mask, cu_seqlens)
    return _broadcast(scores, response_mask, cu_seqlens)


# ---------------------------------------------------------------------------------------------
# Group statistics (segment sums over dense group numbers; float64; no host sync)


def _group_sum(x: Tensor, inverse: Tensor) -> Tensor:
    """Per-sample sum of x over its group: [N] -> [N] (x float64)."""
    return torch.zeros_like(x).index_add_(0, inverse, x)[inverse]


def _group_moments(x: Tensor, inverse: Tensor, scored: Tensor | None = None):
    """count, mean, sum of squared deviations of each sample's group, per sample, float64; with
    ``scored`` (float64 0/1 weights, x 0 where 0) only the samples it marks count."""
    count = _group_sum(torch.ones_like(x) if scored is None else scored, inverse)
    mean = _group_sum(x, inverse) / count.clamp_min(1.0)
    dev = x - mean if scored is None else (x - mean) * scored
    return count, mean, _group_sum(dev * dev, inverse)


def _moments_backend(x: Tensor, inverse: Tensor, scored: Tensor | None = None):
    backend = _backend.choose(x.device, ("triton",), None)
    if backend == "triton":
        return _triton_advantages().group_moments(x, inverse, scored)
    return _group_moments(x, inverse, scored)


@torch.library.custom_op("rlkern::advantages_group_normalize", mutates_args=())
def _group_normalize_op(
    scores: Tensor,  # [N] float
    inverse: Tensor,  # [N] int64 dense group numbers in [0, N)
    mask: Tensor | None,  # None, [N, T], or packed [total] with cu_seqlens
    cu_seqlens: Tensor | None,  # [N + 1] int32 (packed mask)
    eps: float,
    std: str,
    scale: str,
    singleton: str,
    skip_nan: bool = False,
) -> Tensor:
    backend = _backend.choose(scores.device, _KERNELS, scores.dtype, fp64=_KERNELS)
    if backend == "cpp":
        # one C++ pass: group sums, the normalization and the broadcast to tokens
        return torch.ops.rlkern.advantages_group_normalize_kernel(scores, inverse, mask, cu_seqlens, eps, std, scale,
                                                                   singleton, skip_nan)
    per_sample = _group_normalize_torch(scores, inverse, eps, std, scale, singleton, skip_nan)
    return per_sample if mask is None else _broadcast(per_sample, mask, cu_seqlens)


def _group_normalize_torch(scores, inverse, eps, std, scale, singleton, skip_nan=False):
    x = scores.to(_F64)
    scored = None
    if skip_nan:
        scored = (~x.isnan()).to(_F64)
        x = x.nan_to_num(0.0)
    count, mean, m2 = _moments_backend(x, inverse, scored)
    single = count <= 1
    if singleton == "verl":
        mean = torch.where(single, 0.0, mean)
    centered = x - mean
    if std == "none" or scale == "none":
        out = centered
    else:
        unbiased = std == "unbiased"
        if scale == "group":
            spread = torch.sqrt(m2 / ((count - 1) if unbiased else count).clamp_min(1.0))
            if singleton == "verl":
                spread = torch.where(single, 1.0, spread)
        else:
            n = scored.sum() if skip_nan else torch.tensor(float(x.numel()), dtype=_F64, device=x.device)
            dev = x - (x.sum() / n.clamp_min(1.0)) if x.numel() else x
            if skip_nan:
                dev = dev * scored
            spread = torch.sqrt((dev * dev).sum() / ((n - 1) if unbiased else n).clamp_min(1.0))
            spread = torch.where(n > 1, spread, 0.0)
        out = centered / (spread + eps)
    if singleton == "zero":
        out = torch.where(single, 0.0, out)
    if skip_nan:
        out = torch.where(scored != 0, out, 0.0)
    return out.to(_out_dtype(scores))


@_group_normalize_op.register_fake
def _(scores, inverse, mask, cu_seqlens, eps, std, scale, singleton, skip_nan=False):
    return scores.new_empty(scores.shape if mask is None else mask.shape, dtype=_out_dtype(scores))


def _outcome_args(op: str, scores: Tensor, group_ids, response_mask: Tensor | None,
                  cu_seqlens: Tensor | None = None):
    _check_advantages(op, "scores", {"scores": (scores, "float"), "response_mask": (response_mask, "mask")})
    if scores.ndim != 1:
        raise ValueError(f"{op}: scores must be [N] (one score per sample), got {tuple(scores.shape)}")
    _token_layout(op, scores.shape[0], response_mask, cu_seqlens)
    if isinstance(group_ids, Tensor) and group_ids.device != scores.device and group_ids.device.type != "cpu":
        raise ValueError(f"{op}: group_ids is on {group_ids.device} but scores are on {scores.device}")
    return group_index(group_ids, n=scores.shape[0], device=scores.device)


def _to_tokens(per_sample: Tensor, response_mask: Tensor | None, cu_seqlens: Tensor | None) -> Tensor:
    return per_sample if response_mask is None else _broadcast(per_sample, response_mask, cu_seqlens)


def _lengths(response_mask: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Per-sequence sum of the mask (verl's ``response_mask.sum(-1)``), float64 [B]."""
    if cu_seqlens is None:
        return ((response_mask != 0).sum(-1) if response_mask.dtype == torch.bool else response_mask.sum(-1)).to(_F64)
    batch = cu_seqlens.shape[0] - 1
    segments = _segment_ids(cu_seqlens, response_mask.shape[0])
    return torch.zeros(batch, dtype=_F64, device=response_mask.device).index_add_(0, segments, response_mask.to(_F64))


def group_normalize(
    scores: Tensor,
    group_ids,
    *,
    eps: float = 1e-6,
    std: str | None = "unbiased",
    scale: str = "group",
    singleton: str = "verl",
    skip_nan: bool = False,
    response_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """GRPO-family group normalization: ``(s - mean_group) / (std + eps)``.

    Presets: verl GRPO (``compute_grpo_outcome_advantage`` and ``grpo_vectorized``): the
    defaults (eps 1e-6 from verl's ``epsilon``, unbiased std, a group of one gets mean 0 and
    std 1 so its advantage is ``s / (1 + eps)``). Dr.GRPO / verl ``norm_adv_by_std_in_grpo=False``:
    ``std=None``. TRL ``GRPOTrainer`` ``scale_rewards`` = "group" / "batch" / "none":
    ``eps=1e-4, singleton="zero", scale=<same>, skip_nan=True`` (TRL divides by the batch std
    with "batch", gives 0 to a group of one, and leaves unscorable completions, NaN scores, out
    of every mean and std with advantage 0); ``rlkern.algos.advantages.trl_grpo_advantages``
    applies it to TRL's ``rewards_per_func`` for both ``multi_objective_aggregation`` modes.

    Args:
        scores: ``[N]`` float, one outcome score per sample.
        group_ids: ``[N]`` group of each sample: int tensor, numpy str/int array, list of str.
        eps: added to the std.
        std: "unbiased" (torch.std, verl and TRL), "population", or None (no division).
        scale: "group" (std of the sample's group), "batch" (std of all N scores), "none".
        singleton: "verl" (mean 0, std 1) or "zero" (advantage 0) for a group of one.
        skip_nan: NaN scores count in no group or batch statistic (a group's size is its
            count of scored samples) and get 0, as TRL 1.16. False (verl): NaN propagates.
        response_mask: optional ``[N, T]`` bool/int/float, or packed ``[total]`` with
            ``cu_seqlens``; then the result is broadcast to tokens (value * mask, as verl).
        cu_seqlens: int32 ``[N + 1]``: sample i's tokens are ``response_mask[cu[i]:cu[i + 1]]``.

    Returns:
        ``[N]`` float32 (float64 for float64 scores), or response_mask's shape (``[N, T]`` or
        ``[total]``) with ``response_mask``.
    """
    _check_choice("group_normalize", "std", std, _STD_MODES)
    _check_choice("group_normalize", "scale", scale, _SCALES)
    _check_choice("group_normalize", "singleton", singleton, _SINGLETONS)
    _check_advantages("group_normalize", "scores", {"scores": (scores, "float")}, floats={"eps": eps})
    inverse = _outcome_args("group_normalize", scores, group_ids, response_mask, cu_seqlens)
    return _group_normalize_op(scores, inverse, response_mask, cu_seqlens, float(eps), std or "none", scale, singleton,
                               bool(skip_nan))


def grpo(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, eps: float = 1e-6,
         norm_by_std: bool = True, cu_seqlens: Tensor | None = None) -> Tensor:
    """verl's GRPO outcome advantage (``grpo`` and ``grpo_vectorized``; Dr.GRPO with
    ``norm_by_std=False``, verl's ``norm_adv_by_std_in_grpo``). See ``group_normalize``
    (``response_mask`` ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``).

    Returns:
        ``[N]`` float32, or ``scores[:, None] * response_mask`` (``[N, T]`` or packed ``[total]``).
    """
    return group_normalize(scores, group_ids, eps=eps, std="unbiased" if norm_by_std else None,
                           response_mask=response_mask, cu_seqlens=cu_seqlens)


@torch.library.custom_op("rlkern::advantages_group_baseline", mutates_args=())
def _group_baseline_op(
    scores: Tensor,  # [N] float
    inverse: Tensor,  # [N] int64 dense group numbers in [0, N)
    weights: Tensor | None,  # [N] float (mode "weighted")
    mask: Tensor | None,  # None, [N, T], or packed [total] with cu_seqlens
    cu_seqlens: Tensor | None,  # [N + 1] int32 (packed mask)
    mode: str,
    param: float,
) -> Tensor:
    """mode: "rloo_raw" / "rloo_zero" / "mean" (s - mean, singleton mean 0) / "weighted" (s -
    sum(w s)/sum(w), singleton 0) / "gpg" (alpha (s - mean) / param); broadcast to mask's tokens."""
    backend = _backend.choose(scores.device, _KERNELS, scores.dtype, fp64=_KERNELS)
    if backend == "cpp":
        # one C++ pass: group sums, the baseline and the broadcast to tokens
        return torch.ops.rlkern.advantages_group_baseline_kernel(scores, inverse, weights, mask, cu_seqlens, mode,
                                                                  param)
    x = scores.to(_F64)
    if mode.startswith("rloo"):
        count = _group_sum(torch.ones_like(x), inverse)
        total = _group_sum(x, inverse)
        loo = (count * x - total) / (count - 1).clamp_min(1.0)
        out = torch.where(count > 1, loo, x if mode == "rloo_raw" else 0.0)
    elif mode == "weighted":
        w = weights.to(_F64)
        count = _group_sum(torch.ones_like(x), inverse)
        base = _group_sum(w * x, inverse) / _group_sum(w, inverse)
        out = x - torch.where(count > 1, base, 0.0)
    else:
        count, mean, _ = _moments_backend(x, inverse)
        out = x - torch.where(count > 1, mean, 0.0)
        if mode == "gpg":
            alpha = x.numel() / torch.count_nonzero(x).clamp_min(1).to(_F64)
            out = alpha * out / param
    out = out.to(_out_dtype(scores))
    return out if mask is None else _broadcast(out, mask, cu_seqlens)


@_group_baseline_op.register_fake
def _(scores, inverse, weights, mask, cu_seqlens, mode, param):
    return scores.new_empty(scores.shape if mask is None else mask.shape, dtype=_out_dtype(scores))


def rloo(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, singleton: str = "raw",
         cu_seqlens: Tensor | None = None) -> Tensor:
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, ``n / (n - 1) * (s - mean_group)``.

    verl's two estimators disagree on a group of one: ``rloo`` keeps its raw score
    (``singleton="raw"``, the default), ``rloo_vectorized`` gives 0 (``singleton="zero"``).

    Args:
        scores: ``[N]`` float.  group_ids: see ``group_normalize``.
        response_mask: optional ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``
            (broadcast to tokens).
        singleton: "raw" or "zero".

    Returns:
        ``[N]`` float32, or response_mask's shape with ``response_mask``.
    """
    _check_choice("rloo", "singleton", singleton, ("raw", "zero"))
    inverse = _outcome_args("rloo", scores, group_ids, response_mask, cu_seqlens)
    return _group_baseline_op(scores, inverse, None, response_mask, cu_seqlens, f"rloo_{singleton}", 0.0)


def opo(scores: Tensor, group_ids, response_mask: Tensor, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """OPO (Hao et al. 2025, arXiv:2505.23585; verl ``opo``): length-weighted group baseline
    ``b = sum(len_i * s_i) / sum(len_i)`` with ``len_i = response_mask[i].sum()``; 0 for a
    group of one.

    Args:
        scores: ``[N]`` float.  group_ids: see ``group_normalize``.
        response_mask: ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]`` (gives
            the lengths; the result is broadcast to tokens).

    Returns:
        response_mask's shape, float32: ``(s - b)[:, None] * response_mask``.
    """
    if response_mask is None:
        raise ValueError("opo: response_mask is required (it gives the response lengths)")
    inverse = _outcome_args("opo", scores, group_ids, response_mask, cu_seqlens)
    lengths = _lengths(response_mask, cu_seqlens)
    return _group_baseline_op(scores, inverse, lengths, response_mask, cu_seqlens, "weighted", 0.0)


def gpg(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, f_norm: float = 1.0,
        cu_seqlens: Tensor | None = None) -> Tensor:
    """GPG (verl ``gpg``): ``alpha * (s - mean_group) / f_norm`` with ``alpha = N / max(#{s != 0}, 1)``
    and mean 0 for a group of one. verl's ``alpha`` argument is ignored by verl itself, so
    rlkern has none. Default ``f_norm=1.0`` as verl. ``response_mask``: optional ``[N, T]``, or
    packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.

    Returns:
        ``[N]`` float32, or response_mask's shape with ``response_mask``.
    """
    _check_advantages("gpg", "scores", {"scores": (scores, "float")}, floats={"f_norm": f_norm})
    inverse = _outcome_args("gpg", scores, group_ids, response_mask, cu_seqlens)
    return _group_baseline_op(scores, inverse, None, response_mask, cu_seqlens, "gpg", float(f_norm))


def reinforce_pp_baseline(scores: Tensor, group_ids, response_mask: Tensor, *,
                          cu_seqlens: Tensor | None = None) -> Tensor:
    """REINFORCE++-baseline (verl ``reinforce_plus_plus_baseline``): ``s - mean_group`` (0 mean
    for a group of one) broadcast to tokens, whitened over the batch's valid tokens, times mask.
    ``response_mask``: ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.

    Returns:
        response_mask's shape, float32.
    """
    if response_mask is None:
        raise ValueError("reinforce_pp_baseline: response_mask is required")
    inverse = _outcome_args("reinforce_pp_baseline", scores, group_ids, response_mask, cu_seqlens)
    tokens = _group_baseline_op(scores, inverse, None, response_mask, cu_seqlens, "mean", 0.0)
    return masked_whiten(tokens, response_mask) * response_mask.to(tokens.dtype)


def remax(rewards: Tensor, reward_baselines: Tensor, response_mask: Tensor, *,
          cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ReMax (Li et al. 2023; verl ``remax``): ``returns_t = sum_{u >= t} r_u * mask_u`` and
    ``advantages = returns - baseline * mask``, with the greedy rollout's score as baseline.

    Args:
        rewards: ``[B, T]`` float (or packed ``[total]`` with ``cu_seqlens``).
        reward_baselines: ``[B]`` float.
        response_mask: rewards' shape, bool/int/float.
        cu_seqlens: int32 ``[B + 1]`` for the packed layout (sums run within each sequence).

    Returns:
        ``(advantages, returns)`` of rewards' shape, float32 (verl's numbers at every position).
    """
    _check_advantages("remax", "rewards", {"rewards": (rewards, "float"), "response_mask": (response_mask, "mask")},
                      shape=tuple(rewards.shape) if isinstance(rewards, Tensor) else None)
    _packed_check("remax", rewards, cu_seqlens)
    batch = rewards.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _check_advantages("remax", "rewards", {"rewards": (rewards, "float"),
                                           "reward_baselines": (reward_baselines, "float")},
                      shape={"reward_baselines": (batch,)})
    return _remax_op(rewards, reward_baselines, response_mask, cu_seqlens)


@torch.library.custom_op("rlkern::advantages_remax", mutates_args=())
def _remax_op(rewards: Tensor, reward_baselines: Tensor, mask: Tensor,
              cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    if _backend.choose(rewards.device, ("cpp",), rewards.dtype, fp64=("cpp",)) == "cpp":
        return torch.ops.rlkern.advantages_remax_kernel(_lastdim_contiguous(rewards), reward_baselines,
                                                        _lastdim_contiguous(mask), cu_seqlens)
    dtype = _out_dtype(rewards)
    m = mask.to(dtype)
    y = rewards.to(_F64) * m
    if cu_seqlens is None:
        returns = y.flip(-1).cumsum(-1).flip(-1).to(dtype)
        return returns - reward_baselines.to(dtype)[:, None] * m, returns
    # packed: the batch-wide suffix sum at t minus the one just past t's sequence (float64)
    segments = _segment_ids(cu_seqlens, y.shape[0])
    suffix = torch.cat([y.flip(0).cumsum(0).flip(0), y.new_zeros(1)])
    returns = (suffix[:-1] - suffix[cu_seqlens[1:].long()][segments]).to(dtype)
    return returns - reward_baselines.to(dtype)[segments] * m, returns


@_remax_op.register_fake
def _(rewards, reward_baselines, mask, cu_seqlens):
    dtype = _out_dtype(rewards)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


@torch.library.custom_op("rlkern::advantages_grpo_passk", mutates_args=())
def _passk_op(scores: Tensor, inverse: Tensor, eps: float, norm_by_std: bool) -> Tensor:
    if _backend.choose(scores.device, _KERNELS, scores.dtype, fp64=_KERNELS) == "cpp":
        return torch.ops.rlkern.advantages_grpo_passk_kernel(scores, inverse, eps, norm_by_std)
    x = scores.to(_F64)
    n = x.numel()
    count, _, m2 = _moments_backend(x, inverse)
    if x.device.type == "cpu" or _backend.validate_enabled():
        if n and bool((count < 2).any()):
            raise ValueError("grpo_passk: every group needs at least 2 samples (Pass@k compares the best two); "
                             f"smallest group has {int(count.min())}")
    index = torch.arange(n, device=x.device)
    best_score = torch.full_like(x, -math.inf).scatter_reduce(0, inverse, x, "amax")[inverse]
    first = torch.full_like(index, n).scatter_reduce(0, inverse, torch.where(x == best_score, index, n), "amin")
    is_best = index == first[inverse]
    second = torch.full_like(x, -math.inf).scatter_reduce(0, inverse, torch.where(is_best, -math.inf, x),
                                                          "amax")[inverse]
    gap = best_score - second
    if norm_by_std:
        gap = gap / (torch.sqrt(m2 / (count - 1).clamp_min(1.0)) + eps)
    gap = torch.where(count >= 2, gap, math.nan)  # GPU without validation: a group of one is NaN
    return torch.where(is_best, gap, 0.0).to(_out_dtype(scores))


@_passk_op.register_fake
def _(scores, inverse, eps, norm_by_std):
    return scores.new_empty(scores.shape, dtype=_out_dtype(scores))


def grpo_passk(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, eps: float = 1e-6,
               norm_by_std: bool = True, cu_seqlens: Tensor | None = None) -> Tensor:
    """Pass@k GRPO (Chen et al. 2025, arXiv:2503.19595; verl ``grpo_passk``): only each group's
    best sample gets ``(max - second max) / (std + eps)`` (unbiased std; no division with
    ``norm_by_std=False``), every other sample 0. Ties for the best give 0.

    verl reads ``norm_adv_by_std_in_grpo`` from its ``config`` only; rlkern takes it here.
    A group of one raises ValueError on CPU (as verl) and gives NaN on GPU. ``response_mask``:
    optional ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.

    Returns:
        ``[N]`` float32, or response_mask's shape with ``response_mask``.
    """
    _check_advantages("grpo_passk", "scores", {"scores": (scores, "float")}, floats={"eps": eps})
    inverse = _outcome_args("grpo_passk", scores, group_ids, response_mask, cu_seqlens)
    return _to_tokens(_passk_op(scores, inverse, float(eps), bool(norm_by_std)), response_mask, cu_seqlens)


@torch.library.custom_op("rlkern::advantages_bnpo", mutates_args=())
def _bnpo_op(scores: Tensor, inverse: Tensor, min_value: float, max_value: float) -> Tensor:
    if _backend.choose(scores.device, _KERNELS, scores.dtype, fp64=_KERNELS) == "cpp":
        return torch.ops.rlkern.advantages_bnpo_kernel(scores, inverse, min_value, max_value)
    s = (scores.to(_F64) - min_value) / (max_value - min_value)
    n = s.numel()
    count, mean, _ = _moments_backend(s, inverse)
    p = torch.where(count > 1, mean, 0.0)
    if s.device.type == "cpu" or _backend.validate_enabled():
        if n and bool(((p < 0) | (p > 1)).any()):
            raise ValueError(f"bnpo: group success rates must lie in [0, 1] after (s - {min_value}) / "
                             f"({max_value} - {min_value}); adjust min_value/max_value")
    index = torch.arange(n, device=s.device)
    first = torch.full_like(index, n).scatter_reduce(0, inverse, index, "amin")
    is_rep = (index == first[inverse]).to(_F64)  # one representative sample per group
    groups = is_rep.sum()
    mu = (p * is_rep).sum() / groups.clamp_min(1.0)
    var = ((p - mu) ** 2 * is_rep).sum() / (groups - 1).clamp_min(1.0)
    mu = torch.where(groups > 1, mu, 0.0)
    var = torch.where(groups > 1, var, 1.0)
    k = mu * (1 - mu) / var - 1
    alpha = torch.clamp(1 + k * mu / 3, min=1.0)
    beta = torch.clamp(1 + k * (1 - mu) / 3, min=1.0)
    log_norm = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    log_pdf = torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_norm
    weight = torch.exp(-log_pdf).clamp(0.0, 1e6)
    weight = torch.where(var > 0, weight, 1.0)
    return (weight * (s - p)).to(_out_dtype(scores))


@_bnpo_op.register_fake
def _(scores, inverse, min_value, max_value):
    return scores.new_empty(scores.shape, dtype=_out_dtype(scores))


def bnpo(scores: Tensor, group_ids, response_mask: Tensor | None = None, *, min_value: float = 0.0,
         max_value: float = 1.0, cu_seqlens: Tensor | None = None) -> Tensor:
    """BNPO (Xiao et al. 2025, "BNPO: Beta Normalization Policy Optimization", arXiv:2506.02864),
    as in the authors' verl recipe (``compute_bnpo_outcome_advantage``):

        s   = (score - min_value) / (max_value - min_value)          (rewards mapped to [0, 1])
        p_g = mean of s over group g (0 for a group of one)          (success rate)
        mu, var = mean and unbiased variance of p_g over the batch's groups (0 and 1 if one group)
        a = (mu (1 - mu) / var - 1) mu,  b = (mu (1 - mu) / var - 1) (1 - mu)   (Beta moments fit)
        alpha = max(1 + a / 3, 1),  beta = max(1 + b / 3, 1)
        A_i = clamp(1 / BetaPDF(p_g; alpha, beta), 0, 1e6) * (s_i - p_g)

    When every group has the same success rate (var = 0) the fit is undefined (the authors'
    code gives NaN); rlkern uses weight 1 there. Success rates outside [0, 1] raise on CPU.
    ``response_mask``: optional ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.

    Returns:
        ``[N]`` float32, or response_mask's shape with ``response_mask``.
    """
    _check_advantages("bnpo", "scores", {"scores": (scores, "float")},
                      floats={"min_value": min_value, "max_value": max_value})
    if not max_value > min_value:
        raise ValueError(f"bnpo: max_value must exceed min_value, got {min_value} and {max_value}")
    inverse = _outcome_args("bnpo", scores, group_ids, response_mask, cu_seqlens)
    return _to_tokens(_bnpo_op(scores, inverse, float(min_value), float(max_value)), response_mask, cu_seqlens)


def gdpo(scores: Tensor, group_ids, response_mask: Tensor, *, weights=None, eps: float = 1e-6,
         norm_by_std: bool = True, cu_seqlens: Tensor | None = None) -> Tensor:
    """GDPO (arXiv:2601.05242; verl ``gdpo``): GRPO-normalize each reward component within its
    group separately, sum them with ``weights``, whiten over the batch's valid tokens.

        A = masked_whiten(sum_k w_k * grpo(scores[:, k])[:, None] * mask, mask) * mask

    Args:
        scores: ``[N]`` or ``[N, K]`` float, K reward components (verl's ``gdpo_reward_keys``).
        group_ids: see ``group_normalize``.
        response_mask: ``[N, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[N + 1]``.
        weights: K floats (verl's ``gdpo_reward_weights``), default all 1.
        eps, norm_by_std: as in ``grpo``.

    Returns:
        response_mask's shape, float32.
    """
    if response_mask is None:
        raise ValueError("gdpo: response_mask is required")
    _check_advantages("gdpo", "scores", {"scores": (scores, "float"), "response_mask": (response_mask, "mask")})
    columns = scores[:, None] if scores.ndim == 1 else scores
    if columns.ndim != 2:
        raise ValueError(f"gdpo: scores must be [N] or [N, K], got {tuple(scores.shape)}")
    k = columns.shape[1]
    weights = [1.0] * k if weights is None else [float(w) for w in weights]
    if len(weights) != k:
        raise ValueError(f"gdpo: weights must have {k} entries (one per reward component), got {len(weights)}")
    inverse = _outcome_args("gdpo", columns[:, 0], group_ids, response_mask, cu_seqlens)
    total = None
    for j in range(k):
        part = _group_normalize_op(columns[:, j].contiguous(), inverse, None, None, float(eps),
                                   "unbiased" if norm_by_std else "none", "group", "verl")
        total = weights[j] * part if total is None else total + weights[j] * part
    tokens = _broadcast(total, response_mask, cu_seqlens)
    return masked_whiten(tokens, response_mask) * response_mask.to(tokens.dtype)


def gigpo_step_groups(step_returns: Tensor, anchor_keys, group_ids, response_mask: Tensor | None = None, *,
                      eps: float = 1e-6, norm_by_std: bool = False, cu_seqlens: Tensor | None = None) -> Tensor:
    """GiGPO step-level relative advantage (Feng et al. 2025, arXiv:2505.10978, Eq. 6-7).

    Steps of the same episode group (``group_ids``) that start from the same anchor state
    (``anchor_keys``: identical observations) form a step group; each step's advantage is its
    discounted return minus the step group's mean (``norm_by_std=True``: divided by the
    group's unbiased std + eps; GiGPO's "mean_std_norm" mode, default "mean_norm" = False).
    A step group of one gets 0, as in verl-agent's ``step_norm_reward``.

    Args:
        step_returns: ``[S]`` float, discounted return of each step.
        anchor_keys: ``[S]`` anchor-state keys (str / int forms of ``group_ids``).
        group_ids: ``[S]`` episode-group ids (the prompt uid).
        response_mask: optional ``[S, T]``, or packed ``[total]`` with ``cu_seqlens`` ``[S + 1]``
            (broadcast to tokens).

    Returns:
        ``[S]`` float32, or response_mask's shape with ``response_mask``.
    """
    _check_advantages("gigpo_step_groups", "step_returns", {"step_returns": (step_returns, "float")},
                      floats={"eps": eps})
    n = step_returns.shape[0] if step_returns.ndim == 1 else -1
    episode = _outcome_args("gigpo_step_groups", step_returns, group_ids, response_mask, cu_seqlens)
    anchor = group_index(anchor_keys, n=n, device=step_returns.device)
    inverse = group_index(episode * max(n, 1) + anchor)
    return _group_normalize_op(step_returns, inverse, response_mask, cu_seqlens, float(eps),
                               "unbiased" if norm_by_std else "none", "group", "zero")


def _otb_slot_baseline(flat: Tensor, returns: Tensor, weighted: Tensor, slots: int, eps: float) -> Tensor:
    """sum G W / (sum W + eps) over the tokens that share a slot (group, aligned position), per token."""
    num = torch.zeros(slots, dtype=_F64, device=flat.device).index_add_(0, flat, (returns * weighted).reshape(-1))
    den = torch.zeros(slots, dtype=_F64, device=flat.device).index_add_(0, flat, weighted.reshape(-1))
    return (num / (den + eps)).index_select(0, flat)


@torch.library.custom_op("rlkern::advantages_optimal_token_baseline", mutates_args=())
def _otb_op(
    rewards: Tensor,  # [B, T] or packed [total], float
    mask: Tensor | None,  # rewards.shape, bool/int/float; None = every token valid
    inverse: Tensor,  # [B] int64 dense group numbers in [0, B)
    old_log_probs: Tensor,  # rewards.shape, float
    sum_pi_squared: Tensor,  # rewards.shape, float
    rollout_is_weights: Tensor | None,  # rewards.shape, float
    cu_seqlens: Tensor | None,  # [B + 1] int32 for the packed layout
    handle_zero_tail: bool,
    eps: float,
    multi_turn: bool,
) -> tuple[Tensor, Tensor]:
    if _backend.choose(rewards.device, ("cpp",), rewards.dtype, fp64=("cpp",)) == "cpp":
        # one C++ task per group: reward-to-go and path weights per row, per-position sums, outputs
        return torch.ops.rlkern.advantages_optimal_token_baseline_kernel(
            _lastdim_contiguous(rewards), None if mask is None else _lastdim_contiguous(mask), inverse,
            _lastdim_contiguous(old_log_probs), _lastdim_contiguous(sum_pi_squared),
            None if rollout_is_weights is None else _lastdim_contiguous(rollout_is_weights), cu_seqlens,
            handle_zero_tail, eps, multi_turn)
    return _otb_torch(rewards, mask, inverse, old_log_probs, sum_pi_squared, rollout_is_weights, cu_seqlens,
                      handle_zero_tail, eps, multi_turn)


def _otb_torch(rewards, mask, inverse, old_log_probs, sum_pi_squared, rollout_is_weights, cu_seqlens,
               handle_zero_tail, eps, multi_turn):
    """The PyTorch path (GPU, float64 rewards, no C++ build): batch-wide float64 tensor ops."""
    dtype = _out_dtype(rewards)
    device = rewards.device
    valid = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask != 0
    m = valid.to(_F64)
    w = 1 - 2 * old_log_probs.to(_F64).exp() + sum_pi_squared.to(_F64)
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.to(_F64) ** 2
    y = rewards.to(_F64) * m
    batch = inverse.shape[0]
    if cu_seqlens is None:
        steps = rewards.shape[1]
        returns = y.flip(-1).cumsum(-1).flip(-1)
        weighted = (w * m).cumsum(-1) * m
        lengths = valid.sum(-1)
        if multi_turn:
            pos = (valid.cumsum(-1) - 1).clamp_min(0)
            baseline = _otb_slot_baseline((inverse[:, None] * steps + pos).reshape(-1), returns, weighted,
                                          rewards.numel(), eps).reshape(batch, steps)
        else:
            pos = torch.arange(steps, device=device)[None, :]
            num = torch.zeros_like(returns).index_add_(0, inverse, returns * weighted)
            den = torch.zeros_like(returns).index_add_(0, inverse, weighted)
            baseline = (num / (den + eps))[inverse]

        def per_token(per_row):
            return per_row[:, None]
    else:
        # segment sums as differences of batch-wide float64 prefix/suffix sums (no host sync)
        total = rewards.shape[0]
        seq = _segment_ids(cu_seqlens, total)

        def per_token(per_seq):
            return per_seq.index_select(0, seq)

        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        suffix = torch.cat([y.flip(0).cumsum(0).flip(0), y.new_zeros(1)])
        returns = suffix[:-1] - per_token(suffix[ends])
        prefix = torch.cat([y.new_zeros(1), (w * m).cumsum(0)])
        weighted = (prefix[1:] - per_token(prefix[starts])) * m
        counts = torch.cat([valid.new_zeros(1, dtype=torch.int64), valid.cumsum(0)])
        lengths = counts[ends] - counts[starts]
        if multi_turn:
            pos = (counts[1:] - per_token(counts[starts]) - 1).clamp_min(0)
        else:
            pos = torch.arange(total, device=device) - per_token(starts)
        # group g owns as many slots as its longest sequence has tokens: the widths sum to at
        # most total, so the per-position sums fit in [total] without a length on the host
        width = torch.zeros(batch, dtype=torch.int64, device=device).scatter_reduce(
            0, inverse, cu_seqlens.diff().long(), "amax")
        baseline = _otb_slot_baseline(per_token((width.cumsum(0) - width)[inverse]) + pos, returns, weighted, total,
                                      eps)
    # per sequence, the position from which its baseline is 0: a group of one from the start; with
    # handle_zero_tail a unique longest response from the group's second-longest length on
    member = (lengths > 0) if multi_turn else torch.ones_like(lengths, dtype=torch.bool)
    count = _group_sum(member.to(_F64), inverse)
    zero_from = torch.where(count > 1, max(rewards.numel(), 1), 0)  # a position is < numel
    if handle_zero_tail:
        length = torch.where(member, lengths, -1)
        longest = torch.full_like(length, -1).scatter_reduce(0, inverse, length, "amax")[inverse]
        is_longest = length == longest
        n_longest = _group_sum(is_longest.to(_F64), inverse)
        second = torch.full_like(length, -1).scatter_reduce(0, inverse, torch.where(is_longest, -1, length),
                                                            "amax")[inverse]
        zero_from = torch.where(is_longest & (n_longest == 1) & (count > 1) & member, second, zero_from)
    baseline = torch.where(pos >= per_token(zero_from), 0.0, baseline)
    adv = torch.where(valid, returns - baseline, 0.0)
    return adv.to(dtype), returns.to(dtype)


@_otb_op.register_fake
def _(rewards, mask, inverse, old_log_probs, sum_pi_squared, rollout_is_weights, cu_seqlens, handle_zero_tail, eps,
      multi_turn):
    dtype = _out_dtype(rewards)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)


def optimal_token_baseline(
    rewards: Tensor,
    response_mask: Tensor | None,
    group_ids,
    old_log_probs: Tensor,
    sum_pi_squared: Tensor,
    rollout_is_weights: Tensor | None = None,
    *,
    handle_zero_tail: bool = True,
    eps: float = 1e-8,
    multi_turn: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Optimal Token Baseline (verl ``optimal_token_baseline`` / ``tir_optimal_token_baseline``).

    Per group and aligned position t: ``B_t = sum_i G_it W_it / (sum_i W_it + eps)`` with
    ``G`` the reward-to-go, ``W_t = sum_{j <= t} (1 - 2 pi_j + sum pi^2) * rho_j^2`` over valid
    tokens; ``A = (G - B) * mask``; a group of one has B = 0; with ``handle_zero_tail`` a unique
    longest response (length = its number of valid tokens) gets B = 0 from the second-longest
    length on. ``multi_turn=True`` (TIR) aligns each response's valid tokens packed to the left
    and leaves empty responses out of their group. Defaults (``handle_zero_tail=True``,
    ``eps=1e-8``) as verl.

    Layouts. Padded: every tensor ``[B, T]``, the position of a token is its column
    (``multi_turn``: its index among the row's valid tokens). Packed (``cu_seqlens`` given):
    every tensor ``[total]``, sequence b is ``[cu[b], cu[b + 1])``, the position of a token is its
    index inside its own sequence (``multi_turn``: among the sequence's valid tokens); the
    numbers equal the padded layout's with each sequence right-padded into a row (masked padding).

    Backends: CPU tensors run a C++ kernel (``RLKERN_BACKEND=cpp``, the default there): one task
    per group, float64 sums in the group's batch order (the same numbers at any thread count),
    exp to 1 ulp; other devices, float64 rewards and ``RLKERN_BACKEND=torch`` run float64
    PyTorch tensor ops (no host sync). The two agree to float64 rounding (the C++ scans add four
    tokens per step), far below the float32 outputs' rounding.

    Args:
        rewards: ``[B, T]`` float token-level rewards, or packed ``[total]``.
        response_mask: rewards' shape, bool/int/float (nonzero = valid); None = every token valid.
        group_ids: ``[B]`` group of each sequence; see ``group_normalize``.
        old_log_probs: rewards' shape, float (log pi of the sampled tokens).
        sum_pi_squared: rewards' shape, float (sum over the vocabulary of pi^2).
        rollout_is_weights: optional, rewards' shape, float (rho; W is scaled by rho^2).
        cu_seqlens: int32 ``[B + 1]`` for the packed layout.

    Returns:
        ``(advantages, returns)`` of rewards' shape (``[B, T]`` or ``[total]``), float32 (float64
        for float64 rewards); ``returns`` is verl's reward-to-go (at every position, as verl),
        ``advantages`` are 0 at masked positions.
    """
    op = "optimal_token_baseline"
    _check_advantages(op, "rewards", {"rewards": (rewards, "float"), "response_mask": (response_mask, "mask"),
                                      "old_log_probs": (old_log_probs, "float"),
                                      "sum_pi_squared": (sum_pi_squared, "float"),
                                      "rollout_is_weights": (rollout_is_weights, "float")},
                      shape=tuple(rewards.shape) if isinstance(rewards, Tensor) else None, floats={"eps": eps})
    _packed_check(op, rewards, cu_seqlens)
    batch = rewards.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    inverse = group_index(group_ids, n=batch, device=rewards.device)
    return _otb_op(rewards, response_mask, inverse, old_log_probs, sum_pi_squared, rollout_is_weights, cu_seqlens,
                   bool(handle_zero_tail), float(eps), bool(multi_turn))
