"""OpenRLHF 0.11.2 runs rlkern: ``import rlkern.integrations.openrlhf as ro; ro.patch()``.

``patch()`` replaces, in every OpenRLHF module, the objects OpenRLHF computes its RL hot path
with, by the twins of :mod:`rlkern.algos.openrlhf` (same signatures, same outputs, OpenRLHF's
dtypes):

- ``openrlhf.models.utils``: ``log_probs_from_logits``, ``compute_entropy``,
  ``compute_approx_kl``;
- ``openrlhf.models.loss``: ``PolicyLoss``, ``ValueLoss``, and the preference losses ``DPOLoss``
  (DPO, cDPO label smoothing, IPO: ``rlkern.preference_loss``), ``PairWiseLoss`` and
  ``LogExpLoss`` (the reward model's losses, with PairWiseLoss's margin);
- every module that imports one of them by name (``openrlhf.models``, ``models.actor``,
  ``trainer.ray.ppo_actor``, ``trainer.ray.ppo_critic``, ``trainer.ppo_utils.experience_maker``,
  ``trainer.dpo_trainer``, ``trainer.rm_trainer``).

An OpenRLHF module is recognised by its file (inside the installed ``openrlhf`` package, whatever
the module's name): the ones already imported are patched at once; an import hook
(``sys.meta_path``) patches the ones imported later, whatever the import order. Call ``patch()``
before OpenRLHF builds its actor and loss modules (``PolicyLoss(...)`` objects made before keep
OpenRLHF's class). A module loaded straight from its file
(``importlib.util.spec_from_file_location(...).loader.exec_module``) bypasses every import hook:
pass its spec through :func:`wrap_spec` first, or call :func:`patch_module` on it (the pytest
plugin ``rlkern.integrations._pytest_openrlhf`` does the former for OpenRLHF's own tests).

``patch(fp32=True)`` returns rlkern's float32 results (float64 for float64 inputs) instead of
OpenRLHF's dtypes (the twins' ``out_dtype``). ``patch()`` again with the same options does
nothing; with other options it raises (``unpatch()`` first). ``unpatch()`` puts every original
back (the same objects) and removes the hook. :data:`calls` (a ``collections.Counter``) counts
the calls that went to rlkern, per name; ``calls.clear()`` resets it. The same API as
``rlkern.integrations.trl`` and ``rlkern.integrations.verl``.

Not covered: ``aggregate_loss`` / ``masked_mean`` (cheap reductions OpenRLHF keeps), the SFT
losses (``GPTLMLoss``, ``SFTLoss``). OpenRLHF 0.11.2 has no KTO trainer or loss: the ``KTOLoss``
of 0.1.10 to 0.9.5 is :class:`rlkern.algos.openrlhf.KTOLoss`, a class to use directly (there is
nothing in 0.11.2 to patch). The DPO trainer's sequence log-prob sums (its
``_get_batch_logps``) stay OpenRLHF's; their token log-probs come from the patched
``log_probs_from_logits``.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import inspect
import os
import sys

from rlkern.algos import openrlhf as twins
from rlkern.integrations._import_hook import PatchingLoader
from rlkern.ops import _checks
from rlkern.ops._layout import out_dtype as wide_of

NAMES = ("PolicyLoss", "ValueLoss", "log_probs_from_logits", "compute_entropy", "compute_approx_kl", "DPOLoss",
         "PairWiseLoss", "LogExpLoss")
_CLASSES = ("PolicyLoss", "ValueLoss", "DPOLoss", "PairWiseLoss", "LogExpLoss")

calls: collections.Counter = collections.Counter()
"""Calls that ran rlkern, per name in ``NAMES`` (``PolicyLoss`` / ``ValueLoss``: forward calls)."""

_state = {"root": None, "fp32": False, "finder": None}
_replacements: dict[int, tuple[object, object]] = {}  # id(original) -> (original, replacement)


def _find_root() -> str:
    spec = importlib.util.find_spec("openrlhf")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("rlkern.integrations.openrlhf: openrlhf is not installed (pip install openrlhf==0.11.2)")
    return os.path.realpath(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=8192)
def _real(path: str) -> str:
    return os.path.realpath(path)


def _inside(path) -> bool:
    root = _state["root"]
    if root is None or not isinstance(path, str):
        return False
    real = _real(path)
    return real == root or real.startswith(root + os.sep)


def _code_file(obj) -> str | None:
    if isinstance(obj, type):
        obj = vars(obj).get("forward")
    code = getattr(inspect.unwrap(obj), "__code__", None) if callable(obj) else None
    return code.co_filename if code is not None else None


def _original_of(obj):
    return getattr(obj, "__dict__", {}).get("_rlkern_original")


def _is_original(name: str, obj) -> bool:
    if _original_of(obj) is not None or (name in _CLASSES) != isinstance(obj, type):
        return False
    return _inside(_code_file(obj))


def _function(name: str, original, fp32: bool):
    twin = getattr(twins, name)
    # OpenRLHF's exact signatures (the twins' out_dtype set by patch(fp32=...): None is OpenRLHF's
    # dtype, fp32 rlkern's unrounded float32 / float64)
    if name == "log_probs_from_logits":
        def replacement(logits, labels, temperature=1.0):
            calls[name] += 1
            return twin(logits, labels, temperature, out_dtype=wide_of(logits) if fp32 else None)
    elif name == "compute_entropy":
        def replacement(logits):
            calls[name] += 1
            return twin(logits, out_dtype=wide_of(logits) if fp32 else None)
    else:
        def replacement(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False):
            calls[name] += 1
            return twin(log_probs, log_probs_base, log_probs_old, kl_estimator, unbiased_gradient)
    replacement.__name__ = replacement.__qualname__ = name
    replacement.__module__, replacement.__doc__ = original.__module__, twin.__doc__
    return replacement


def _class(name: str, original, fp32: bool):
    twin = getattr(twins, name)

    def __init__(self, *args, **kwargs):
        twin.__init__(self, *args, **kwargs)

    def forward(self, *args, **kwargs):
        calls[name] += 1
        return twin.forward(self, *args, **kwargs)

    def _out_dtype(self, wide):
        return wide  # patch(fp32=True): rlkern's unrounded dtype for each call's inputs

    # OpenRLHF's constructor signature (the twins add only the keyword-only out_dtype; PairWiseLoss
    # and LogExpLoss have nn.Module's)
    __init__.__signature__ = inspect.signature(original.__init__)
    forward.__signature__ = inspect.signature(twin.forward)
    body = {"__init__": __init__, "forward": forward, "__module__": original.__module__,
            "__qualname__": original.__qualname__, "__doc__": twin.__doc__}
    if fp32:
        body["_out_dtype"] = _out_dtype
    return type(name, (twin,), body)


def _replacement(name: str, original):
    entry = _replacements.get(id(original))
    if entry is None:
        make = _class if name in _CLASSES else _function
        replacement = make(name, original, _state["fp32"])
        replacement._rlkern_original = original
        entry = _replacements[id(original)] = (original, replacement)
    return entry[1]


def patch_module(module) -> int:
    """Replace OpenRLHF's objects (``NAMES``) in ``module``'s namespace; returns how many.

    Only objects defined in OpenRLHF's files are replaced; does nothing unless patched.
    """
    if _state["finder"] is None:
        return 0
    namespace, count = vars(module), 0
    for name in NAMES:
        obj = namespace.get(name)
        if obj is not None and _is_original(name, obj):
            namespace[name] = _replacement(name, obj)
            count += 1
    return count


def _restore_module(module) -> None:
    namespace = vars(module)
    for name in NAMES:
        original = _original_of(namespace.get(name))
        if original is not None:
            namespace[name] = original


def _openrlhf_modules() -> list:
    return [m for m in list(sys.modules.values()) if _inside(getattr(m, "__file__", None))]



def wrap_spec(spec):
    """Make ``spec``'s loader patch the module once executed, when ``spec`` is an OpenRLHF file."""
    if (spec is not None and _inside(spec.origin) and hasattr(spec.loader, "exec_module")
            and not (isinstance(spec.loader, PatchingLoader) and spec.loader._after is patch_module)):
        spec.loader = PatchingLoader(spec.loader, patch_module)
    return spec


class _Finder:
    """``sys.meta_path`` hook: the spec the other finders give, its loader wrapped for OpenRLHF files."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] != "openrlhf" and not (path and any(_inside(p) for p in path)):
            return None
        for finder in list(sys.meta_path):
            if isinstance(finder, _Finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return wrap_spec(spec)
        return None

    def invalidate_caches(self):
        pass


def patch(*, fp32: bool = False) -> None:
    """Route OpenRLHF's log-probs, entropy, KL estimate, policy, value, DPO and reward-model losses
    through rlkern.

    Args:
        fp32: outputs in float32 (float64 for float64 inputs), rlkern's convention, instead of
            OpenRLHF's dtypes (which follow its inputs: bfloat16 logits give bfloat16 log-probs).

    Raises ImportError when openrlhf is not installed. Calling it again with the same options does
    nothing; with other options it raises ValueError (``unpatch()`` first).
    """
    _checks.flag("patch", "fp32", fp32)
    if _state["finder"] is not None:
        if _state["fp32"] != fp32:
            raise ValueError(f"patch: already patched with fp32={_state['fp32']}; call unpatch() first")
        return
    _state["root"], _state["fp32"] = _find_root(), fp32
    _state["finder"] = _Finder()
    sys.meta_path.insert(0, _state["finder"])
    for module in _openrlhf_modules():
        patch_module(module)


def unpatch() -> None:
    """Put every original back in every OpenRLHF module and remove the import hook."""
    finder = _state["finder"]
    if finder is None:
        return
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)
    _state["finder"] = None
    for module in _openrlhf_modules():
        _restore_module(module)
    _replacements.clear()
    _state["fp32"] = False


def is_patched() -> bool:
    return _state["finder"] is not None
