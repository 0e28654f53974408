"""Which backend runs an op, decided per call from the tensors' device.

    CUDA tensors -> "cuda" (CUDA kernels in rlkern._C) where the op has one, else "triton"
    CPU tensors  -> "cpp"  (C++ kernels in rlkern._C) where the op has one, else "torch"
    anything     -> "torch" (rlkern.reference) as the fallback, and for float64 inputs to
                    the families whose kernels do not take float64 yet (``choose(fp64=...)``)

``RLKERN_BACKEND=torch|triton|cpp|cuda`` forces a backend for every op that has it (ops
without it keep their default); the tests use ``RLKERN_BACKEND=triton`` with
``TRITON_INTERPRET=1`` to run the Triton kernels on CPU tensors. ``RLKERN_VALIDATE=1`` turns on
checks that need a host sync on GPU tensors (label ranges). ``RLKERN_DETERMINISTIC=1`` turns on
``deterministic=True`` in every op that takes it (``deterministic``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")

try:
    importlib.import_module("rlkern._C")  # registers torch.ops.rlkern.*

    _C_ERROR = None
except ImportError as error:  # a pure-Python install, or a build that failed
    from rlkern import _checkout

    _installed = _checkout.installed_elsewhere()
    if _installed is not None:  # never run a source checkout without kernels over a built install
        raise ImportError(
            f"rlkern is being imported from the source checkout {_checkout.ROOT} (it is on sys.path, e.g. as the "
            f"current directory of `python -m` / `python -c`), which has no compiled rlkern._C, instead of the "
            f"installed rlkern in {_installed}. Run Python from another directory, or install the checkout in "
            f"place: pip install --no-build-isolation -e {_checkout.ROOT}"
        ) from error
    _C_ERROR = error
    warnings.warn(
        f"rlkern._C is not available ({error}); CPU ops use the PyTorch reference. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpp() -> bool:
    return _C_ERROR is None


@functools.cache
def has_cuda_ext() -> bool:
    return has_cpp() and bool(torch.ops.rlkern._built_with_cuda())


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def forced() -> str | None:
    name = os.environ.get("RLKERN_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"RLKERN_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def validate_enabled() -> bool:
    return os.environ.get("RLKERN_VALIDATE", "") not in ("", "0")


def deterministic(flag: bool) -> bool:
    """An op's ``deterministic`` argument, or ``RLKERN_DETERMINISTIC=1`` for every op that takes it.

    The environment variable turns the flag on (it never turns an explicit ``True`` off), so a
    trainer that does not pass ``deterministic`` gets the fixed-order kernels without a code change.
    """
    return bool(flag) or os.environ.get("RLKERN_DETERMINISTIC", "") not in ("", "0")


def choose(device: torch.device, kernels: tuple[str, ...], dtype: torch.dtype | None = None, *,
           fp64: tuple[str, ...] = ()) -> str:
    """Pick the backend for one call.

    Args:
        device: device of the op's main input.
        kernels: the backends the op has besides "torch" (a subset of "triton", "cpp", "cuda").
        dtype: main input dtype.
        fp64: the backends among ``kernels`` that take float64 input (and return float64);
            float64 runs the reference where the chosen backend is not one of them.
    """
    usable = {"torch"}
    if "cpp" in kernels and has_cpp():
        usable.add("cpp")
    if "cuda" in kernels and has_cuda_ext() and device.type == "cuda":
        usable.add("cuda")
    if "triton" in kernels and has_triton() and (device.type == "cuda" or triton_interpreted()):
        usable.add("triton")
    if dtype == torch.float64:
        usable &= {"torch", *fp64}
    wanted = forced()
    if wanted in usable and (wanted != "cpp" or device.type == "cpu"):
        return wanted
    if device.type == "cuda":
        return "cuda" if "cuda" in usable else "triton" if "triton" in usable else "torch"
    if device.type == "cpu" and "cpp" in usable:
        return "cpp"
    return "torch"


def available() -> dict[str, bool]:
    """What this install can run, for ``rlkern info``."""
    return {
        "torch": True,
        "cpp": has_cpp(),
        "cuda": has_cuda_ext(),
        "triton": has_triton() and (torch.cuda.is_available() or triton_interpreted()),
    }


REGISTRY: dict[str, "Kernels"] = {}  # op name -> its Kernels, for `rlkern info` and the benches


class Kernels:
    """The implementations of one op, one per backend, and the rule that picks one per call.

    Every op family dispatches through one of these (docs/architecture.md, Dispatch)::

        _GAE = _backend.Kernels("gae", cpp="cpp_gae", triton="advantages.gae", torch=fallback.gae,
                                fp64=("cpp", "triton"))
        advantages, returns = _GAE.pick(rewards)(rewards, values, mask, ...)

    Every backend of an op takes the same arguments and returns the same outputs.

    Args:
        op: the op's name (for messages).
        torch: the PyTorch implementation (the reference, or the family's fallback module).
        cpp: name of the C++ kernel under ``torch.ops.rlkern`` (CPU tensors), or a function
            that converts the arguments and calls it.
        triton: ``"module.function"`` under ``rlkern.kernels`` (CUDA tensors; CPU tensors
            under ``TRITON_INTERPRET=1`` with ``RLKERN_BACKEND=triton``), or such a function.
        cuda: name of a CUDA kernel under ``torch.ops.rlkern`` (CUDA tensors).
        fp64: the backends that take float64 input (computing in double, returning float64).
    """

    def __init__(self, op: str, *, torch, cpp=None, triton=None, cuda=None, fp64: tuple[str, ...] = ()):
        self.op = op
        self._names = {"cpp": cpp, "triton": triton, "cuda": cuda}
        self._resolved = {"torch": torch}
        self.kernels = tuple(name for name, where in self._names.items() if where is not None)
        unknown = set(fp64) - set(self.kernels) - {"torch"}
        if unknown:
            raise ValueError(f"Kernels({op!r}): fp64 names backends it has not: {sorted(unknown)}")
        self.fp64 = tuple(fp64)
        REGISTRY.setdefault(op, self)  # the first (forward) registration names the op's backends

    def backend(self, tensor: torch.Tensor) -> str:
        """The backend a call whose main input is ``tensor`` runs on."""
        return self.backend_at(tensor.device, tensor.dtype)

    def backend_at(self, device: torch.device, dtype: torch.dtype) -> str:
        """The backend for a main input on ``device`` computed in ``dtype``."""
        return choose(device, self.kernels, dtype, fp64=self.fp64)

    def get(self, backend: str):
        """The implementation of ``backend`` (imported on first use)."""
        if backend not in self._resolved:
            where = self._names[backend]
            if callable(where):  # an adapter (argument conversion) in front of the kernel
                impl = where
            elif backend == "triton":
                module, function = where.rsplit(".", 1)
                impl = getattr(importlib.import_module(f"rlkern.kernels.{module}"), function)
            else:
                impl = getattr(torch.ops.rlkern, where)
            self._resolved[backend] = impl
        return self._resolved[backend]

    def pick(self, tensor: torch.Tensor):
        """The implementation for a call whose main input is ``tensor``."""
        return self.get(self.backend(tensor))
