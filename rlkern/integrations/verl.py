"""verl 0.9.1 on rlkern in one call: ``rlkern.integrations.verl.patch()``.

``register()`` adds rlkern's twins of verl's policy losses and advantage estimators to verl's
registries under ``rlkern_<name>`` (``rlkern_vanilla``, ``rlkern_grpo``, ...), so a config picks
them by name (``actor.policy_loss.loss_mode=rlkern_vanilla``, ``algorithm.adv_estimator=
rlkern_grpo``); ``register(override=True)`` also puts them under verl's own names.

``patch()`` is ``register(override=True)`` plus every module global through which verl computes
token log-probs and entropy, in every engine:

- ``verl.utils.torch_functional``: ``logprobs_from_logits``, ``entropy_from_logits``,
  ``entropy_from_logits_with_chunking`` (the FSDP, automodel, torchtitan and veomni engines read
  the entropy functions from this module when an engine is built; the log-prob function is
  imported by name into the FSDP / automodel / torchtitan engines, the naive rollout and
  ``verl.trainer.ppo.prefix_grouper_utils``: those copies are replaced too);
- the fused-kernel path (``use_fused_kernels=True``): ``verl.utils.experimental.torch_functional.
  FusedLinearForPPO`` (``impl_backend`` "torch" and "liger") and ``verl.utils.kernel.
  linear_cross_entropy.linear_cross_entropy`` (the "triton" backend, also imported by name into
  the Megatron fused forwards ``verl.models.mcore.model_forward_fused`` / ``_1f1b_overlap``):
  both become :func:`rlkern.linear_token_logprobs`, which never materializes the logits; the
  HF forwards in ``verl/models/transformers/*`` import these names at call time;
- Megatron (tensor parallel, vocabulary-sharded logits): ``verl.utils.megatron.tensor_parallel``
  ``vocab_parallel_log_probs_from_logits``, ``vocab_parallel_entropy``,
  ``vocab_parallel_entropy_with_chunking`` become rlkern's ``process_group=`` path (two small
  all-reduces per token, no logits gathered) over Megatron's tensor-parallel group;
- ``verl.trainer.ppo.core_algos``: every ``POLICY_LOSS_REGISTRY`` and ``ADV_ESTIMATOR_REGISTRY``
  value and the module globals that hold them (``compute_gae_advantage_return`` and
  ``compute_grpo_outcome_advantage``, which ``ray_trainer.compute_advantage`` calls directly,
  ``compute_policy_loss_vanilla``, ...), and ``agg_loss``, ``kl_penalty``,
  ``compute_value_loss`` (the actor's entropy and KL terms and the critic's loss in
  ``verl.workers.utils.losses``, the trainer's KL-in-reward).

The replacement is by identity: every loaded ``verl.*`` module global that *is* one of verl's
originals is swapped, so by-name imports are reached wherever they are. A module imported after
``patch()`` (the Megatron engine, which needs megatron-core, or any engine imported lazily) is
swapped as its import finishes, through an import hook (``sys.meta_path``) that ``unpatch()``
removes; modules that cannot import here (no megatron / vllm / flash-attn) are patched when they
can. The order rule: call ``patch()`` before verl builds its engines, in every process that
computes (each Ray worker: ``VERL_USE_EXTERNAL_MODULES=rlkern.integrations.verl_autopatch``
makes ``import verl`` call it there). An object captured before ``patch()`` keeps verl's function
(an engine's ``compute_entropy_from_logits``, set when the engine is built; a
``functools.partial`` or a ``torch.compile`` wrapper made earlier; a policy-loss function fetched
from the registry earlier).

Numbers and dtypes are verl's: rlkern accumulates in float32 (float64 for float64 input) and
returns the dtype verl's function returns (``fp32=False``, the default):

- ``logprobs_from_logits``: float32 where verl uses flash-attn's cross-entropy (installed and not
  ``VERL_DISABLE_FLASH_ATTN_CE=1``), else the logits' dtype (verl's ``logprobs_from_logits_v2``);
- ``entropy_from_logits``: the logits' dtype; ``entropy_from_logits_with_chunking``: torch's
  default float dtype (float32);
- ``FusedLinearForPPO``: log-probs float32, entropy in ``hidden_states``' dtype;
  ``linear_cross_entropy``: both float32, flattened to ``[N]``;
- Megatron: log-probs float32 (megatron-core upcasts), entropy the logits' dtype, chunked
  entropy float32.

``patch(fp32=True)`` keeps rlkern's float32 outputs everywhere (float64 for float64 inputs; bf16
logits then give float32 log-probs and entropy: more precise than verl, not bit-compatible with
it). Labels equal
to -100 give log-prob 0 (flash-attn's and Liger's convention; verl's PyTorch fallback raises).

``logprobs_from_logits(..., inplace_backward=True)`` (verl's default) lets rlkern's backward write
d logits into the logits buffer, as verl's flash-attn path does; verl's engines pass False where
they take the entropy of the same logits first.

``patch()`` again with the same options does nothing; with other options it raises
(``unpatch()`` first). :data:`calls` (a ``collections.Counter``) counts the calls that reached
rlkern through this module, by name (under ``torch.compile`` a call is counted when it is
traced); ``calls.clear()`` resets it. The same API as ``rlkern.integrations.trl`` and
``rlkern.integrations.openrlhf``.
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.abc
import os
import sys
import threading

import torch

from rlkern.algos.advantages import VERL_ADV_ESTIMATORS
from rlkern.algos.policy_loss import VERL_POLICY_LOSSES
from rlkern.integrations._import_hook import PatchingLoader
from rlkern.ops import _checks
from rlkern.ops import policy_loss as ops
from rlkern.ops.linear_logprobs import linear_token_logprobs
from rlkern.ops.logprobs import token_logprobs

__all__ = ["calls", "is_patched", "originals", "patch", "register", "unpatch"]

_IGNORE = -100  # flash-attn's, Liger's and rlkern's ignore_index

calls: collections.Counter = collections.Counter()
"""Calls that reached rlkern through the verl drop-ins, by drop-in name (``logprobs_from_logits``,
``policy_loss:vanilla``, ``adv_estimator:grpo``, ...)."""
_LOCK = threading.RLock()


class _State:
    fp32 = False
    patched = False
    hook = None
    # id(original) -> (original, replacement); the original is kept alive so its id stays valid
    originals: dict[int, tuple[object, object]] = {}
    # (module or registry dict, key, original, replacement), in the order applied
    applied: list[tuple[object, str, object, object]] = []
    registered: list[tuple[dict, str]] = []  # rlkern_* entries added by register()


def _counted(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    wrapper.__rlkern_verl__ = name
    return wrapper


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rlkern's float32 result in the dtype verl returns (unless patch(fp32=True))."""
    if _State.fp32:
        return t
    return t if t.dtype == dtype else t.to(dtype)


def _rows(logits: torch.Tensor, labels: torch.Tensor | None = None):
    """rlkern's log-prob ops take [N, V] or [B, T, V]: any other rank is flattened."""
    lead = logits.shape[:-1]
    if logits.ndim in (2, 3):
        return logits, labels, lead
    flat = logits.reshape(-1, logits.shape[-1])
    return flat, None if labels is None else labels.reshape(-1), lead


def _no_labels(logits: torch.Tensor) -> torch.Tensor:
    return torch.full(logits.shape[:-1], _IGNORE, dtype=torch.int64, device=logits.device)


# ---------------------------------------------------------------------------------------------
# verl.utils.torch_functional


def _flash_ce_in_use() -> bool:
    verl_F = sys.modules.get("verl.utils.torch_functional")
    available = bool(getattr(verl_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False))
    return available and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits`` on rlkern (``inplace_backward`` as verl: the backward may
    write d logits into the logits buffer; verl passes False when the entropy is also taken)."""
    flat, flat_labels, lead = _rows(logits, labels)
    out = token_logprobs(flat, flat_labels, inplace_backward=bool(inplace_backward)).reshape(lead)
    return _round(out, torch.float32 if _flash_ce_in_use() else logits.dtype)


def entropy_from_logits(logits):
    """verl's ``entropy_from_logits``: entropy in the logits' dtype."""
    flat, _, lead = _rows(logits)
    _, entropy = token_logprobs(flat, _no_labels(flat), return_entropy=True)
    return _round(entropy.reshape(lead), logits.dtype)


def entropy_from_logits_with_chunking(logits, chunk_size=2048):
    """verl's chunked entropy: one fused pass needs no chunks; the result is in torch's default
    float dtype, as verl's ``torch.zeros`` buffer."""
    del chunk_size
    flat, _, lead = _rows(logits)
    _, entropy = token_logprobs(flat, _no_labels(flat), return_entropy=True)
    return _round(entropy.reshape(lead), torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------
# Fused kernels (use_fused_kernels=True): the LM head and the log-probs in one op


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` (both ``impl_backend``s) on :func:`rlkern.linear_token_logprobs`.

    ``forward(hidden_states [.., H], vocab_weights [V, H], input_ids [..], temperature)`` returns
    ``(log_probs float32, entropy)`` of shape ``input_ids.shape``, entropy in ``hidden_states``'
    dtype (verl's output buffer; verl's values also pass through the dtype of ``hidden @
    weight.T``, bf16 under autocast, rlkern's stay float32 until that last rounding).
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"FusedLinearForPPO: impl_backend must be 'torch' or 'liger', got {impl_backend!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        calls["FusedLinearForPPO"] += 1
        if hidden_states.ndim not in (2, 3):
            raise ValueError(f"FusedLinearForPPO: hidden_states must be 2D or 3D, got {tuple(hidden_states.shape)}")
        logp, entropy = linear_token_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                              temperature=float(temperature), return_entropy=True)
        return logp, _round(entropy, hidden_states.dtype)


class _ShareHiddenGrad(torch.autograd.Function):
    """Identity whose backward divides d hidden by the group size.

    verl's sharded kernel returns each rank's partial d hidden (this rank's vocabulary rows only)
    and leaves the sum over ranks to Megatron's region ops around it; rlkern's sharded op returns
    the summed d hidden on every rank. An equal share of that sum on each rank makes the sum over
    ranks (the only thing Megatron reads) verl's."""

    @staticmethod
    def forward(ctx, hidden, group):
        import torch.distributed as dist

        ctx.scale = 1.0 / dist.get_world_size(group)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl's Triton ``linear_cross_entropy``: ``(logprobs, entropy)`` float32 ``[N]`` (the token
    dims flattened); ``reduction`` "sum" / "mean" reduce the log-probs to a scalar.
    ``dist_process_group``: the LM head sharded by vocabulary over that group, as verl's; each
    rank's d hidden is then its share of the sum over ranks (``_ShareHiddenGrad``)."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    if dist_process_group is not None:
        flat = _ShareHiddenGrad.apply(flat, dist_process_group)
    logp, entropy = linear_token_logprobs(flat, weight, labels.reshape(-1), temperature=float(temperature),
                                          return_entropy=True, process_group=dist_process_group)
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# Megatron: logits sharded by vocabulary over the tensor-parallel group


def _tp_group():
    from megatron.core import parallel_state as mpu  # only reached where megatron-core is installed

    return mpu.get_tensor_model_parallel_group()


def vocab_parallel_log_probs_from_logits(logits, labels):
    """verl's Megatron log-probs: float32 (megatron-core computes its cross-entropy in float32)."""
    flat, flat_labels, lead = _rows(logits, labels)
    out = token_logprobs(flat, flat_labels, process_group=_tp_group()).reshape(lead)
    return _round(out, torch.float32)


def vocab_parallel_entropy(vocab_parallel_logits):
    """verl's Megatron entropy, in the logits' dtype as verl's."""
    flat, _, lead = _rows(vocab_parallel_logits)
    _, entropy = token_logprobs(flat, _no_labels(flat), return_entropy=True, process_group=_tp_group())
    return _round(entropy.reshape(lead), vocab_parallel_logits.dtype)


def vocab_parallel_entropy_with_chunking(vocab_parallel_logits, chunk_size=2048):
    """verl's chunked Megatron entropy (no chunks needed), in torch's default float dtype."""
    del chunk_size
    flat, _, lead = _rows(vocab_parallel_logits)
    _, entropy = token_logprobs(flat, _no_labels(flat), return_entropy=True, process_group=_tp_group())
    return _round(entropy.reshape(lead), torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------
# verl.trainer.ppo.core_algos: the loss-side reductions the actor and critic losses call


def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None):
    """verl's ``agg_loss`` (its five modes and global normalizers) on ``rlkern.aggregate``, in the
    dtype verl's returns. An empty mask with a local normalizer gives 0 (verl: NaN)."""
    if loss_agg_mode not in _VERL_AGG_MODES:
        raise ValueError(f"agg_loss: loss_agg_mode must be one of {_VERL_AGG_MODES}, got {loss_agg_mode!r}")
    out = ops.aggregate(loss_mat, loss_mask, agg=loss_agg_mode, global_tokens=batch_num_tokens,
                        global_seqs=global_batch_size, dp_size=dp_size, loss_scale_factor=loss_scale_factor)
    return _round(out, _agg_dtype(loss_mat.dtype, loss_mask, loss_agg_mode, batch_num_tokens, global_batch_size))


def _agg_dtype(dtype, mask, mode, batch_num_tokens, global_batch_size) -> torch.dtype:
    """The dtype of verl's ``agg_loss``: the loss times the mask (a float mask promotes it), the
    seq-mean modes through a float32 sequence mask, then a tensor normalizer."""
    if mask is not None and mask.is_floating_point():
        dtype = torch.promote_types(dtype, mask.dtype)
    if mode.startswith("seq-mean"):
        dtype = torch.promote_types(dtype, torch.float32)
    norm = batch_num_tokens if mode == "token-mean" else global_batch_size if mode.startswith("seq-mean") else None
    if isinstance(norm, torch.Tensor) and norm.is_floating_point():
        dtype = torch.promote_types(dtype, norm.dtype)
    return dtype


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """verl's ``kl_penalty`` (k1/kl, abs, k2/mse, k3/low_var_kl, each with "+") on
    ``rlkern.kl_penalty``, in the dtype of ``logprob - ref_logprob``; other names raise
    NotImplementedError, as verl."""
    base = kl_penalty[:-1] if isinstance(kl_penalty, str) and kl_penalty.endswith("+") else kl_penalty
    if base not in _VERL_KL:
        raise NotImplementedError(f"kl_penalty: {kl_penalty!r} is not implemented (verl: {_VERL_KL}, or with '+')")
    out = ops.kl_penalty(logprob, ref_logprob, kl_estimator=kl_penalty)
    return _round(out, torch.promote_types(logprob.dtype, ref_logprob.dtype))


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                       dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's clipped value loss on ``rlkern.value_loss``: ``(vf_loss, vf_clipfrac)`` 0-dim, in
    the dtypes verl's returns."""
    if loss_agg_mode not in _VERL_AGG_MODES:
        raise ValueError(f"compute_value_loss: loss_agg_mode must be one of {_VERL_AGG_MODES}, got {loss_agg_mode!r}")
    loss, metrics = ops.value_loss(vpreds, returns, values, response_mask, cliprange_value=cliprange_value,
                                   agg=loss_agg_mode, global_tokens=batch_num_tokens, global_seqs=global_batch_size,
                                   dp_size=dp_size, loss_scale_factor=loss_scale_factor)
    losses = torch.promote_types(torch.promote_types(vpreds.dtype, returns.dtype), values.dtype)
    clipfrac = torch.float32
    if response_mask.is_floating_point():
        clipfrac = torch.promote_types(clipfrac, response_mask.dtype)
    return (_round(loss, _agg_dtype(losses, response_mask, loss_agg_mode, batch_num_tokens, global_batch_size)),
            _round(metrics["clipfrac"], clipfrac))


_VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_VERL_KL = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


# ---------------------------------------------------------------------------------------------
# What is replaced: verl's defining module and attribute -> rlkern's drop-in

_DROP_INS = {
    "verl.utils.torch_functional": {
        "logprobs_from_logits": logprobs_from_logits,
        "entropy_from_logits": entropy_from_logits,
        "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking,
    },
    "verl.utils.experimental.torch_functional": {"FusedLinearForPPO": FusedLinearForPPO},
    "verl.utils.kernel.linear_cross_entropy": {"linear_cross_entropy": linear_cross_entropy},
    "verl.trainer.ppo.core_algos": {
        "agg_loss": agg_loss,
        "kl_penalty": kl_penalty,
        "compute_value_loss": compute_value_loss,
    },
    "verl.utils.megatron.tensor_parallel": {
        "vocab_parallel_log_probs_from_logits": vocab_parallel_log_probs_from_logits,
        "vocab_parallel_entropy": vocab_parallel_entropy,
        "vocab_parallel_entropy_with_chunking": vocab_parallel_entropy_with_chunking,
    },
}
# Imported by patch() so that the drop-ins are in place before any engine module reads them; the
# others (megatron) are handled when they import.
_EAGER = ("verl.utils.torch_functional", "verl.utils.experimental.torch_functional",
          "verl.utils.kernel.linear_cross_entropy", "verl.trainer.ppo.core_algos")

_WRAPPED = {name: (fn if isinstance(fn, type) else _counted(name, fn))
            for table in _DROP_INS.values() for name, fn in table.items()}
_LOSSES = {name: _counted(f"policy_loss:{name}", fn) for name, fn in VERL_POLICY_LOSSES.items()}
_ESTIMATORS = {name: _counted(f"adv_estimator:{name}", fn) for name, fn in VERL_ADV_ESTIMATORS.items()}


def _core_algos():
    return importlib.import_module("verl.trainer.ppo.core_algos")


def _set(target, key: str, original, replacement) -> None:
    if isinstance(target, dict):
        target[key] = replacement
    else:
        setattr(target, key, replacement)
    _State.applied.append((target, key, original, replacement))


def _learn(original, replacement) -> None:
    if id(original) not in _State.originals and not hasattr(original, "__rlkern_verl__"):
        _State.originals[id(original)] = (original, replacement)


def _learn_module(module) -> None:
    """A defining module of verl's log-prob functions: remember its originals."""
    for attr, _ in _DROP_INS.get(module.__name__, {}).items():
        original = module.__dict__.get(attr)
        if original is not None:
            _learn(original, _WRAPPED[attr])


def _swap_globals(module) -> None:
    """Replace every global of ``module`` that is one of verl's originals."""
    for key, value in list(vars(module).items()):
        hit = _State.originals.get(id(value))
        if hit is not None and hit[0] is value:
            _set(module, key, value, hit[1])


def _verl_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "verl" or name.startswith("verl."))]


def _patch_imported(module) -> None:
    """Swap the globals of a verl module imported after patch() (run by its PatchingLoader)."""
    with _LOCK:
        if _State.patched:
            _learn_module(module)
            _swap_globals(module)


class _ImportHook(importlib.abc.MetaPathFinder):
    def __init__(self):
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("verl.") or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.on = False
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = PatchingLoader(spec.loader, _patch_imported)
        return spec


def register(*, override: bool = False) -> list[str]:
    """Add rlkern's policy losses and advantage estimators to verl's registries.

    Every ``POLICY_LOSS_REGISTRY`` / ``ADV_ESTIMATOR_REGISTRY`` name of verl 0.9.1 gets an
    ``rlkern_<name>`` twin (same signature, config fields, metric keys; see
    ``rlkern.algos.policy_loss`` and ``rlkern.algos.advantages``). ``override=True`` also
    replaces verl's own entries. ``unpatch()`` undoes it. Returns the names added.
    """
    core = _core_algos()
    added = []
    with _LOCK:
        for registry, twins in ((core.POLICY_LOSS_REGISTRY, _LOSSES), (core.ADV_ESTIMATOR_REGISTRY, _ESTIMATORS)):
            for name, fn in twins.items():
                key = f"rlkern_{name}"
                if registry.get(key) is not fn:
                    if key not in registry:
                        _State.registered.append((registry, key))
                    registry[key] = fn
                added.append(key)
                if override:
                    original = registry.get(name)
                    if original is not fn:
                        if original is not None:
                            _learn(original, fn)
                        _set(registry, name, original, fn)
    return added


def patch(*, fp32: bool = False) -> None:
    """Point verl 0.9.1's log-prob, entropy, fused-kernel, policy-loss and advantage hot path at
    rlkern (see the module docstring for what is replaced and the order rule).

    Args:
        fp32: False (default): each drop-in returns the dtype verl's function returns; True:
            rlkern's float32 (float64 for float64 input) everywhere.

    Calling it again with the same options does nothing; with other options it raises
    ValueError (``unpatch()`` first).
    """
    _checks.flag("patch", "fp32", fp32)
    with _LOCK:
        if _State.patched:
            if _State.fp32 != fp32:
                raise ValueError(f"patch: already patched with fp32={_State.fp32}; call unpatch() first")
            return
        _State.fp32 = fp32
        for name in _EAGER:
            importlib.import_module(name)
        register(override=True)
        _State.patched = True
        for module in _verl_modules():
            _learn_module(module)
        for module in _verl_modules():
            _swap_globals(module)
        _State.hook = _ImportHook()
        sys.meta_path.insert(0, _State.hook)


def unpatch() -> None:
    """Restore every object ``patch()`` / ``register()`` replaced, and remove the import hook and
    the ``rlkern_*`` registry entries."""
    with _LOCK:
        if _State.hook is not None and _State.hook in sys.meta_path:
            sys.meta_path.remove(_State.hook)
        _State.hook = None
        for target, key, original, replacement in reversed(_State.applied):
            current = target.get(key) if isinstance(target, dict) else getattr(target, key, None)
            if current is not replacement:
                continue  # replaced again by someone else since: leave it
            if isinstance(target, dict):
                if original is None:
                    del target[key]
                else:
                    target[key] = original
            else:
                setattr(target, key, original)
        # Modules imported while patched took the drop-ins by name (no swap was recorded for them)
        back = {id(repl): (repl, orig) for orig, repl in _State.originals.values()}
        for module in _verl_modules():
            for key, value in list(vars(module).items()):
                hit = back.get(id(value))
                if hit is not None and hit[0] is value:
                    setattr(module, key, hit[1])
        for registry, key in _State.registered:
            registry.pop(key, None)
        _State.applied.clear()
        _State.registered.clear()
        _State.originals.clear()
        _State.patched = False
        _State.fp32 = False


def is_patched() -> bool:
    return _State.patched


def originals() -> list[object]:
    """verl's objects that ``patch()`` replaced (for tests: none is reachable while patched)."""
    return [orig for orig, _ in _State.originals.values()]
