"""Hostile environments: each case builds an environment, runs a fresh Python in it and checks
one clear message (naming the problem and the fix), a working fallback (token_logprobs equal to
the float64 reference, and the backend that ran), and `rlkern info` saying which path runs.

The environments are built, not mocked: a copy of the package without rlkern._C, a _C that
links against a symbol this torch lacks (compiled here with the C compiler), a corrupt _C, a
``site-packages`` without rlkern's distribution (symlinks to every other entry, run with
``python -S``), triton blocked in ``sys.modules``, a fake old triton first on the path.
rlkern/_backend.py and rlkern/_checkout.py hold the checks these cases exercise.
"""

import importlib.machinery
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # e.g. .cpython-311-x86_64-linux-gnu.so
REBUILD = "pip install --no-build-isolation"

# Imports rlkern, runs token_logprobs on CPU tensors once per RLKERN_BACKEND value of
# PROBE_PHASES, asks which backend a CUDA float32 call would take, and runs `rlkern info`;
# prints what happened (warnings, errors, the backends Kernels.get handed out) as JSON.
PROBE = r'''
import contextlib, io, json, os, sys, warnings

def mine(caught):
    return [f"{w.category.__name__}: {w.message}" for w in caught
            if issubclass(w.category, RuntimeWarning) or "rlkern" in str(w.message)]

result = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        import rlkern
    except ImportError as error:
        result["import_error"] = str(error)
result["import_warnings"] = mine(caught)
if "import_error" not in result:
    import torch
    from rlkern import _backend, cli
    from rlkern.reference.logprobs import logprobs_fwd
    result["rlkern"] = os.path.dirname(rlkern.__file__)
    ran = []
    original = _backend.Kernels.get
    def get(self, backend):
        if self.op == "token_logprobs":
            ran.append(backend)
        return original(self, backend)
    _backend.Kernels.get = get
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 37, generator=g) * 4
    labels = torch.randint(0, 37, (5,), generator=g)
    want = logprobs_fwd(logits.double(), labels, 1.0, 0.0, -100, False)[0]
    device = os.environ.get("PROBE_DEVICE", "cpu")
    logits, labels = logits.to(device), labels.to(device)
    result["phases"] = []
    for forced in json.loads(os.environ.get("PROBE_PHASES", "[null]")):
        if forced is None:
            os.environ.pop("RLKERN_BACKEND", None)
        else:
            os.environ["RLKERN_BACKEND"] = forced
        phase = {"forced": forced}
        ran.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = rlkern.token_logprobs(logits, labels)
                phase["error"] = (got.double().cpu() - want).abs().max().item()
                kernels = _backend.REGISTRY["token_logprobs"]
                phase["cuda_backend"] = kernels.backend_at(torch.device("cuda"), torch.float32)
            except ValueError as error:
                phase["raised"] = str(error)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                phase["info_rc"] = cli.main(["info"])
            phase["info"] = out.getvalue()
        phase["ran"] = list(ran)
        phase["warnings"] = mine(caught)
        result["phases"].append(phase)
print("PROBE " + json.dumps(result))
'''


def _ignore(folder, names):
    return [n for n in names if n == "__pycache__" or n.startswith("_C.") or n.endswith(".egg-info")]


def _copy(tmp_path, layout: str) -> tuple[str, str]:
    """A copy of this rlkern without _C: ``checkout`` (setup.py and kernels/ beside rlkern/, as
    the repository) or ``wheel`` (kernels/ and benches/ inside rlkern/, as setup.py installs).
    Returns (the folder to put on sys.path, the package folder)."""
    top = tmp_path / layout
    package = top / "rlkern"
    shutil.copytree(os.path.join(ROOT, "rlkern"), package, ignore=_ignore)
    where = top if layout == "checkout" else package
    for name in ("kernels", "benches"):
        shutil.copytree(os.path.join(ROOT, name), where / name, ignore=_ignore)
    if layout == "checkout":
        shutil.copy(os.path.join(ROOT, "setup.py"), top / "setup.py")
    return str(top), str(package)


def _bare_site(tmp_path) -> str:
    """This environment's site-packages without any rlkern distribution: symlinks to every other
    entry (torch, triton, ...), for ``python -S`` (which skips site-packages and .pth files)."""
    bare = tmp_path / "bare-site"
    bare.mkdir()
    for folder in site.getsitepackages():
        for name in os.listdir(folder):
            if name.startswith(("rlkern", "__editable__", "_rlkern")) or name.endswith(".pth"):
                continue
            if not (bare / name).exists():
                os.symlink(os.path.join(folder, name), bare / name)
    return str(bare)


def _run(tmp_path, path: list[str], *, bare: bool = False, prelude: str = "", phases=(None,), env=None):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "RLKERN_BACKEND", "TRITON_INTERPRET", "RLKERN_PATCH_TRL")}
    environ.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path), PROBE_PHASES=json.dumps(list(phases)),
                   **(env or {}))
    command = [sys.executable, *(["-S"] if bare else []), "-c", prelude + PROBE]
    out = subprocess.run(command, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("PROBE "))
    result["stderr"] = out.stderr
    return result


def _info_line(info: str, key: str) -> str:
    lines = [line for line in info.splitlines() if line.strip().startswith(key)]
    assert len(lines) == 1, (key, info)
    return lines[0]


def _check_fallback(phase, backend: str):
    """The op ran ``backend`` and returned the float64 reference's number."""
    assert phase["ran"] == [backend], phase
    assert phase["error"] < 1e-5, phase
    assert phase["info_rc"] == 0, phase["info"]


def test_healthy_install_names_its_paths_and_rejects_a_bad_backend(tmp_path):
    """The control: no warning, the C++ kernel runs; then RLKERN_BACKEND=cuda on a machine
    without CUDA (one warning, the default backends) and RLKERN_BACKEND=bogus (a ValueError
    naming the variable and its values, and `rlkern info` exits 2 saying so)."""
    if torch.cuda.is_available():
        pytest.skip("RLKERN_BACKEND=cuda is runnable on this machine")
    result = _run(tmp_path, [ROOT], phases=[None, "cuda", "bogus"])
    assert result["rlkern"] == os.path.join(ROOT, "rlkern") and result["import_warnings"] == []
    healthy, cuda, bogus = result["phases"]
    _check_fallback(healthy, "cpp")
    assert healthy["warnings"] == []
    assert _info_line(healthy["info"], "rlkern._C").startswith("rlkern._C   loaded")
    assert _info_line(healthy["info"], "cpp:").split()[1] == "available"
    assert "unavailable" in _info_line(healthy["info"], "cuda:")
    assert _info_line(healthy["info"], "token_logprobs").split()[1] == "cpp"

    _check_fallback(cuda, "cpp")
    assert len(cuda["warnings"]) == 1, cuda["warnings"]
    assert "RLKERN_BACKEND=cuda cannot run" in cuda["warnings"][0] and "default backend" in cuda["warnings"][0]
    assert "RLKERN_BACKEND=cuda" in _info_line(cuda["info"], "forced")

    assert bogus["raised"].startswith("RLKERN_BACKEND='bogus' is not a backend"), bogus
    assert "torch, triton, cpp, cuda" in bogus["raised"] and bogus["ran"] == []
    assert bogus["info_rc"] == 2 and "invalid" in _info_line(bogus["info"], "forced")


def test_checkout_without_C_over_an_installed_rlkern_refuses_to_import(tmp_path):
    """A source tree without a built _C imported (as the current directory) while rlkern is
    installed as editable from another checkout (whose import hook would lend the copy that
    checkout's _C, C++ kernels built from other sources): an ImportError naming both and the
    fix. tests/test_layout.py checks the same for a regular (wheel) install elsewhere."""
    top, _ = _copy(tmp_path, "checkout")
    import importlib.metadata

    if not list(importlib.metadata.distributions(name="rlkern")):
        pytest.skip("rlkern is not installed in this environment")
    result = _run(tmp_path, [top])
    error = result["import_error"]
    assert f"source checkout {top}" in error and "instead of the installed rlkern in" in error, error
    assert f"{REBUILD} -e {top}" in error and result["import_warnings"] == []


def test_checkout_without_C_and_no_install_warns_once_and_runs_the_reference(tmp_path):
    top, package = _copy(tmp_path, "checkout")
    result = _run(tmp_path, [_bare_site(tmp_path), top], bare=True)
    assert result["rlkern"] == package
    (warning,) = result["import_warnings"]
    assert warning.startswith(f"RuntimeWarning: rlkern._C is not available: it is not built in {package}"), warning
    assert "PyTorch reference" in warning and f"{REBUILD} -e {top}" in warning
    (phase,) = result["phases"]
    _check_fallback(phase, "torch")
    assert phase["warnings"] == []
    assert _info_line(phase["info"], "rlkern._C").startswith(
        "rlkern._C   missing: rlkern._C is not available: it is not built")
    assert _info_line(phase["info"], "cpp:").split()[1] == "unavailable"
    assert _info_line(phase["info"], "token_logprobs").split()[1] == "torch"


def test_wheel_without_C_warns_once_and_names_a_build_for_another_python(tmp_path):
    """A pure-Python install (kernels/ inside the package, no _C for this Python; a _C built for
    another Python beside it, which this one never loads)."""
    _, package = _copy(tmp_path, "wheel")
    other = f"_C.cpython-{39 if sys.version_info[:2] != (3, 9) else 310}-x86_64-linux-gnu.so"
    with open(os.path.join(package, other), "wb") as f:
        f.write(b"\x7fELF built elsewhere")
    result = _run(tmp_path, [_bare_site(tmp_path), os.path.dirname(package)], bare=True)
    (warning,) = result["import_warnings"]
    assert f"it is not built in {package} for this Python (found {other}" in warning, warning
    assert f"{REBUILD} --force-reinstall" in warning
    (phase,) = result["phases"]
    _check_fallback(phase, "torch")
    assert phase["warnings"] == [] and phase["cuda_backend"] == "triton"  # triton is fine here
    assert "rlkern._C   missing" in _info_line(phase["info"], "rlkern._C")


def _mismatched_extension(package: str) -> None:
    """A _C that needs a c10 symbol this torch does not export, as one built against another
    torch does: the dynamic loader refuses it with "undefined symbol"."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the mismatched extension")
    source = os.path.join(os.path.dirname(package), "mismatched.c")
    with open(source, "w") as f:
        f.write(textwrap.dedent("""\
            extern void *_ZN3c1019RlkernHostileTorchOnlyEv(void);
            void *PyInit__C(void) { return _ZN3c1019RlkernHostileTorchOnlyEv(); }
            """))
    subprocess.run([compiler, "-shared", "-fPIC", source, "-o", os.path.join(package, "_C" + SUFFIX)], check=True)


@pytest.mark.parametrize("kind", ["mismatched", "corrupt"])
def test_unloadable_C_warns_once_with_the_rebuild_command(tmp_path, kind):
    """_C built against another torch (the message says so and how to rebuild against this one)
    or a corrupt file (the message says it cannot be loaded): one warning, the reference runs."""
    top, package = _copy(tmp_path, "checkout")
    if kind == "mismatched":
        _mismatched_extension(package)
    else:
        with open(os.path.join(package, "_C" + SUFFIX), "wb") as f:
            f.write(b"this is not a shared object\n" * 8)
    result = _run(tmp_path, [top])  # _C exists: no "checkout over an install" refusal
    (warning,) = result["import_warnings"]
    if kind == "mismatched":
        assert f"it was built against another torch than this process's torch {torch.__version__}" in warning, warning
        assert "undefined symbol" in warning and "RlkernHostileTorchOnly" in warning
    else:
        assert "rlkern._C is not available: it cannot be loaded, a corrupt file" in warning, warning
    assert f"Rebuild it against this torch: {REBUILD} -e {top}" in warning
    (phase,) = result["phases"]
    _check_fallback(phase, "torch")
    assert phase["warnings"] == []
    label = "built against another torch" if kind == "mismatched" else "broken"
    assert _info_line(phase["info"], "rlkern._C").startswith(f"rlkern._C   {label}: ")
    assert _info_line(phase["info"], "cpp:").split()[1] == "unavailable"


TRITON_BLOCKED = "import sys\nsys.modules['triton'] = None  # blocks `import triton` like an absent package\n"


def test_triton_missing_cpu_fine_cuda_falls_back_with_one_warning(tmp_path):
    """Without triton, CPU tensors keep the C++ kernels (no message: CPU never needs triton);
    the first CUDA call that wanted a Triton kernel warns once and takes the reference."""
    result = _run(tmp_path, [ROOT], prelude=TRITON_BLOCKED)
    assert result["import_warnings"] == []
    (phase,) = result["phases"]
    _check_fallback(phase, "cpp")
    assert phase["cuda_backend"] == "torch"
    (warning,) = phase["warnings"]
    assert "triton: not installed, so ops on CUDA tensors run the PyTorch reference" in warning, warning
    assert "pip install 'triton>=3.1'" in warning
    assert _info_line(phase["info"], "triton ").startswith("triton      missing: not installed")
    assert "unavailable (triton: not installed)" in _info_line(phase["info"], "triton:")


@pytest.mark.parametrize("version", ["2.1.0", "3.0.0"])
def test_old_triton_is_refused_with_one_warning(tmp_path, version):
    """A triton older than _backend.MIN_TRITON imports but would fail to compile the kernels:
    refused up front (one warning naming its version and the minimum), CUDA tensors take the
    reference, CPU tensors the C++ kernels. The fake has the modules torch._dynamo and
    torch._inductor import from any triton (triton 3.0's layout; a real triton 2.x lacks
    triton.backends and breaks `import torch._dynamo` before rlkern can say anything)."""
    fake = tmp_path / "old-triton" / "triton"
    for module in ("", "language", "backends", "compiler"):
        (fake / module).mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text(f"__version__ = {version!r}\nfrom triton import backends, compiler, language\n")
    (fake / "language" / "__init__.py").write_text("class dtype:\n    pass\n")
    (fake / "backends" / "__init__.py").write_text("from triton.backends import compiler\n")
    (fake / "backends" / "compiler.py").write_text("")
    (fake / "compiler" / "__init__.py").write_text("from triton.compiler import compiler\n")
    (fake / "compiler" / "compiler.py").write_text("")
    result = _run(tmp_path, [str(fake.parent), ROOT])
    (phase,) = result["phases"]
    _check_fallback(phase, "cpp")
    assert phase["cuda_backend"] == "torch"
    (warning,) = result["import_warnings"] + phase["warnings"]
    assert f"triton {version} is older than 3.1" in warning and "pip install 'triton>=3.1'" in warning, warning
    assert _info_line(phase["info"], "triton ").startswith(f"triton      too old: triton {version} is older than 3.1")
    assert _info_line(phase["info"], "token_logprobs").split()[4] == "torch"  # the CUDA tensors column


@pytest.mark.gpu
def test_triton_missing_on_cuda_tensors_runs_the_reference_with_one_warning(tmp_path):
    """On a GPU: token_logprobs on CUDA tensors without triton takes the PyTorch reference (one
    warning, the float64 reference's numbers), and `rlkern info` names it for CUDA tensors."""
    result = _run(tmp_path, [ROOT], prelude=TRITON_BLOCKED, env={"PROBE_DEVICE": "cuda"})
    (phase,) = result["phases"]
    _check_fallback(phase, "torch")
    (warning,) = result["import_warnings"] + phase["warnings"]
    assert "triton: not installed, so ops on CUDA tensors run the PyTorch reference" in warning, warning
    assert _info_line(phase["info"], "token_logprobs").split()[4] == "torch"


@pytest.mark.parametrize("kind", ["old", "broken"])
def test_triton_unusable_by_torch_itself_is_named_at_import(tmp_path, kind):
    """A bare old triton (2.1.0, no ``triton.backends``) or one that raises on import breaks
    ``import torch._dynamo``, which rlkern's ops need at import: an ImportError that names
    triton's problem and the fix, not torch's error from deep inside its compiler."""
    fake = tmp_path / "bad-triton" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.1.0"\n' if kind == "old" else
                                      'raise RuntimeError("libcuda.so cannot be found by this triton")\n')
    result = _run(tmp_path, [str(fake.parent), ROOT])
    error = result["import_error"]
    assert error.startswith(f"rlkern: torch {torch.__version__} cannot import torch._dynamo"), error
    problem = ("triton 2.1.0 is older than 3.1" if kind == "old" else
               "triton fails to import (RuntimeError: libcuda.so cannot be found by this triton)")
    assert f"The cause is likely {problem}" in error and "pip install 'triton>=3.1'" in error, error
