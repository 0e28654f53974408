"""Which backend runs an op, decided per call from the tensors' device.

    CUDA tensors -> "cuda" (CUDA kernels in rlkern._C) where the op has one, else "triton"
    CPU tensors  -> "cpp"  (C++ kernels in rlkern._C) where the op has one, else "torch"
    anything     -> "torch" (rlkern.reference) as the fallback, and for float64 inputs to
                    the families whose kernels do not take float64 yet (``choose(fp64=...)``)

``RLKERN_BACKEND=torch|triton|cpp|cuda`` forces a backend for every op that has it (ops
without it keep their default); the tests use ``RLKERN_BACKEND=triton`` with
``TRITON_INTERPRET=1`` to run the Triton kernels on CPU tensors. Any other value is a
ValueError at the first op; a backend this process cannot run at all (``cuda`` without a CUDA
device, ``cpp`` without rlkern._C) gives one RuntimeWarning and the default backends.
``RLKERN_VALIDATE=1`` turns on checks that need a host sync on GPU tensors (label ranges).
``RLKERN_DETERMINISTIC=1`` turns on ``deterministic=True`` in every op that takes it (``deterministic``).

A fallback to the PyTorch reference that is not by design is never silent: rlkern._C missing
or unloadable (built against another torch) warns once at import; triton missing warns once at
the first op on CUDA tensors that wanted a Triton kernel; triton older than MIN_TRITON or
failing to import warns once when first asked for. `rlkern info` prints the state of each.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")

# The oldest triton the kernels in kernels/ compile with: they use ``tl.maximum(...,
# propagate_nan=tl.PropagateNan.ALL)`` and reverse scans (``tl.cumsum(..., reverse=True)``,
# ``tl.associative_scan(..., reverse=True)``), which triton 3.0 added, and the test extra in
# pyproject.toml pins triton>=3.1, the oldest version the suite runs. An older triton imports
# fine and fails only when a kernel compiles, deep inside a training step: has_triton() refuses
# it up front (one warning) and CUDA tensors run the PyTorch reference instead.
MIN_TRITON = (3, 1)

# What became of ``import rlkern._C`` in this process: "loaded"; "missing" (not built: a
# pure-Python install or a checkout never built in place); "mismatched" (it exists but links
# against symbols this torch does not export: built against another torch); "broken" (it exists
# but cannot be loaded at all: a corrupt file, another platform). C_REASON says why, for
# `rlkern info` and the one warning.
C_STATUS = "loaded"
C_REASON = ""
_C_ERROR: BaseException | None = None

_WARNED: set[str] = set()  # the keys of the one-time warnings already given in this process
_QUIET = False  # `rlkern info` asks what CUDA tensors would run without warning about it


def _warn_once(key: str, message: str) -> None:
    if _QUIET or key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _rebuild_command() -> str:
    from rlkern import _checkout

    # --no-build-isolation: build against the torch installed here; an isolated build installs
    # the newest torch from the index into a throw-away environment and links _C against that
    # one, which is how a _C "built against another torch" usually comes about.
    if _checkout.is_checkout():
        return f"pip install --no-build-isolation -e {_checkout.ROOT}"
    return "pip install --no-build-isolation --force-reinstall --no-deps <rlkern source tree>"


def _other_builds() -> list[str]:
    """``_C`` files beside the package that this Python does not load (built for another Python)."""
    from rlkern import _checkout

    return sorted(name for name in os.listdir(_checkout.PACKAGE_DIR)
                  if name.startswith("_C.") and name.endswith((".so", ".pyd")))


def _shadowing_message(installed: str, detail: str = "") -> str:
    from rlkern import _checkout

    where = f"the source checkout {_checkout.ROOT}" if _checkout.is_checkout() else _checkout.PACKAGE_DIR
    fix = f"pip install --no-build-isolation -e {_checkout.ROOT}" if _checkout.is_checkout() else \
        "remove this copy from sys.path"
    return (f"rlkern is being imported from {where} (it is on sys.path, e.g. as the current directory of "
            f"`python -m` / `python -c`), which has no compiled rlkern._C, instead of the installed rlkern in "
            f"{installed}{detail}. Run Python from another directory, or build this copy in place: {fix}")


def _load_extension() -> None:
    global C_STATUS, C_REASON, _C_ERROR
    from rlkern import _checkout

    try:
        module = importlib.import_module("rlkern._C")  # registers torch.ops.rlkern.*
    except ModuleNotFoundError as error:
        if error.name != "rlkern._C":  # _C exists but needs a module that is missing
            C_STATUS, _C_ERROR = "broken", error
        else:
            C_STATUS, _C_ERROR = "missing", error
    except (ImportError, OSError) as error:
        text = str(error)
        # the loader's words for an unresolved symbol on Linux, macOS and Windows
        linked = ("undefined symbol", "Symbol not found", "specified procedure could not be found")
        C_STATUS = "mismatched" if any(word in text for word in linked) else "broken"
        _C_ERROR = error
    else:
        loaded = os.path.dirname(os.path.abspath(getattr(module, "__file__", None) or _checkout.PACKAGE_DIR))
        if not os.path.samefile(loaded, _checkout.PACKAGE_DIR):
            # An editable install's import hook serves rlkern.* from its own checkout when this
            # copy has no _C: C++ kernels built from other sources than these Python files.
            raise ImportError(_shadowing_message(loaded, f" (its import hook loaded {module.__file__})"))
        return
    if C_STATUS == "missing":
        installed = _checkout.installed_elsewhere()
        if installed is not None:  # never run a source checkout without kernels over a built install
            raise ImportError(_shadowing_message(installed)) from _C_ERROR
        others = _other_builds()
        C_REASON = (f"rlkern._C is not available: it is not built in {_checkout.PACKAGE_DIR}"
                    + (f" for this Python (found {', '.join(others)}, built for another Python)" if others else ""))
    elif C_STATUS == "mismatched":
        C_REASON = (f"rlkern._C is not available: it was built against another torch than this process's "
                    f"torch {torch.__version__} (loading it failed: {_C_ERROR})")
    else:
        C_REASON = (f"rlkern._C is not available: it cannot be loaded, a corrupt file or a build for another "
                    f"platform ({type(_C_ERROR).__name__}: {_C_ERROR})")
    _warn_once("_C", f"{C_REASON}. CPU ops run on the PyTorch reference, slower than the C++ kernels. "
                     f"Rebuild it against this torch: {_rebuild_command()}")


_load_extension()


def has_cpp() -> bool:
    return C_STATUS == "loaded"


@functools.cache
def has_cuda_ext() -> bool:
    return has_cpp() and bool(torch.ops.rlkern._built_with_cuda())


def _version_tuple(version: str) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match[1]), int(match[2])) if match else None


@functools.cache
def triton_status() -> tuple[str | None, str | None]:
    """``(version, problem)`` of the triton this process imports: problem is None when the
    kernels can use it, else why not ("not installed", too old, fails to import)."""
    try:
        import triton
    except ModuleNotFoundError as error:
        if error.name == "triton" or error.name is None:
            return None, "not installed"
        return None, f"triton fails to import ({type(error).__name__}: {error})"
    except Exception as error:  # a broken install raises anything from its own imports
        return None, f"triton fails to import ({type(error).__name__}: {error})"
    version = str(getattr(triton, "__version__", "") or "")
    parsed = _version_tuple(version)
    minimum = ".".join(map(str, MIN_TRITON))
    if parsed is None or parsed < MIN_TRITON:
        return version or None, (f"triton {version or '(no version)'} is older than {minimum}, the oldest "
                                 f"rlkern's Triton kernels support")
    return version, None


@functools.cache
def has_triton() -> bool:
    version, problem = triton_status()
    if problem is not None and problem != "not installed":
        _warn_once("triton", f"{problem}; ops on CUDA tensors run the PyTorch reference (or rlkern._C's CUDA "
                             f"kernels where an op has one) instead. Fix: pip install 'triton>="
                             f"{'.'.join(map(str, MIN_TRITON))}'")
    return problem is None


def _check_torch_compiler() -> None:
    """rlkern's ops wrap functions in ``torch.compiler.disable`` at import, which imports
    torch._dynamo, which imports triton when it is installed: a triton too old for this torch
    (2.x has no ``triton.backends``) fails there, deep inside torch. Say what is wrong instead."""
    try:
        importlib.import_module("torch._dynamo")
    except Exception as error:
        version, problem = triton_status()
        hint = (f" The cause is likely {problem}: pip install 'triton>={'.'.join(map(str, MIN_TRITON))}'"
                if problem is not None and problem != "not installed" else "")
        raise ImportError(f"rlkern: torch {torch.__version__} cannot import torch._dynamo, which rlkern's ops use "
                          f"({type(error).__name__}: {error}).{hint}") from error


_check_torch_compiler()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def forced() -> str | None:
    raw = os.environ.get("RLKERN_BACKEND", "")
    name = raw.strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"RLKERN_BACKEND={raw!r} is not a backend: set it to one of {', '.join(BACKENDS)}, "
                         f"or unset it to let each op pick")
    return name


def unavailable(backend: str) -> str | None:
    """Why no op in this process can run ``backend`` (None when some tensor can)."""
    if backend == "torch":
        return None
    short = {"missing": "rlkern._C is not built", "mismatched": "rlkern._C was built against another torch",
             "broken": "rlkern._C cannot be loaded"}.get(C_STATUS)  # C_REASON has the details
    if backend == "cpp":
        return short
    if backend == "cuda":
        if short is not None:
            return short
        if not has_cuda_ext():
            return "rlkern._C was built without CUDA kernels"
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if backend == "triton":
        if not has_triton():
            problem = triton_status()[1]
            return problem if problem.startswith("triton") else f"triton: {problem}"
        if torch.cuda.is_available() or triton_interpreted():
            return None
        return "torch sees no CUDA device and TRITON_INTERPRET is not 1"
    raise ValueError(f"unavailable: backend {backend!r} is not one of {BACKENDS}")


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
    if wanted is not None:
        reason = unavailable(wanted)  # forced to a backend no tensor of this process can run: say so once
        if reason is not None:
            _warn_once(f"forced-{wanted}", f"RLKERN_BACKEND={wanted} cannot run in this process ({reason}); "
                                           "every op runs its default backend instead (see `rlkern info`)")
    if device.type == "cuda":
        if "cuda" in usable:
            return "cuda"
        if "triton" in usable:
            return "triton"
        if "triton" in kernels and not has_triton():  # not the float64 rule: the Triton path is missing
            _warn_once("triton", f"triton: {triton_status()[1]}, so ops on CUDA tensors run the PyTorch "
                                 f"reference, slower than rlkern's Triton kernels. Fix: pip install "
                                 f"'triton>={'.'.join(map(str, MIN_TRITON))}'")
        return "torch"
    if device.type == "cpu" and "cpp" in usable:
        return "cpp"
    return "torch"


def available() -> dict[str, bool]:
    """What this install can run, for ``rlkern info``."""
    return {name: unavailable(name) is None for name in BACKENDS}


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
        atomics: its GPU path (Triton, or PyTorch on CUDA tensors) adds floats with atomics, in
            an order that changes run to run. Under ``RLKERN_DETERMINISTIC=1`` such a call runs
            the C++ kernel on CPU copies of its arguments instead (fixed order; the group ops'
            inputs are ``[N]`` per-sample vectors, so the copies are small) and moves the
            outputs back.
    """

    def __init__(self, op: str, *, torch, cpp=None, triton=None, cuda=None, fp64: tuple[str, ...] = (),
                 atomics: bool = False):
        self.op = op
        self.atomics = atomics
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
        backend = self.backend(tensor)
        if (self.atomics and deterministic(False) and "cpp" in self.kernels and has_cpp()
                and (backend == "triton" or (backend == "torch" and tensor.device.type != "cpu"))):
            return functools.partial(_on_cpu, self.get("cpp"))
        return self.get(backend)


def _on_cpu(fn, *args):
    """``fn`` (a C++ kernel) on CPU copies of the tensor arguments, its outputs moved back to the
    device of the first tensor argument."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    out = fn(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    if isinstance(out, torch.Tensor):
        return out.to(device)
    return type(out)(*(o.to(device) if isinstance(o, torch.Tensor) else o for o in out)) if hasattr(out, "_fields") \
        else type(out)(o.to(device) if isinstance(o, torch.Tensor) else o for o in out)
