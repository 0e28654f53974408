import importlib
import os
import subprocess
import sys

import torch

# Triton picks interpreter or compiler when a kernel is decorated, so this must be set before
# rlkern.kernels is imported; on a CUDA machine the kernels compile for the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (`-n auto`, the README's test command) each worker gets its share of the
# cores: torch's default of one thread per core in every worker would oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from rlkern import _backend  # noqa: E402

BACKENDS = ["cpp", "triton", "torch"]

# CI sets RLKERN_REQUIRE_PEERS=1: a parity test whose peer is missing fails there instead of
# skipping, so "parity tested" always means the peer's own function ran.
REQUIRE_PEERS = os.environ.get("RLKERN_REQUIRE_PEERS") == "1"


def import_peer(module: str):
    """Import a peer trainer's module for a parity test, or skip (fail in CI) without it."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # peers fail to import in many ways (missing optional deps)
        if REQUIRE_PEERS:
            raise
        pytest.skip(f"{module} not importable: {error}")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run a test once per backend: the C++ kernels, the Triton kernels (interpreted on CPU
    tensors), and the PyTorch reference through the same op layer."""
    name = request.param
    if name == "cpp" and not _backend.has_cpp():
        pytest.fail("rlkern._C did not build")
    if name == "triton" and not _backend.has_triton():
        pytest.fail("triton is not installed (it is in the test extra)")
    if name == "triton" and not _backend.triton_interpreted():
        # These tests use CPU tensors: without the interpreter the dispatcher would quietly run
        # another backend under the "triton" name. GPU runs of the kernels are marked `gpu`.
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.setenv("RLKERN_BACKEND", name)
    return name


@pytest.fixture
def kernels_only(monkeypatch):
    """Fails a test whose ops pick the PyTorch backend (``_backend.Kernels``): for checks that a
    dtype or layout runs a kernel rather than silently the fallback or the reference."""
    from rlkern import _backend

    original = _backend.Kernels.get

    def get(self, backend):
        if backend == "torch":
            raise AssertionError(f"{self.op} ran the PyTorch backend")
        return original(self, backend)

    monkeypatch.setattr(_backend.Kernels, "get", get)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def assert_as_close_as_torch(ours, reference, torch_result, *, floor, factor=1.0, name="value"):
    """Our error against the float64 reference must not exceed PyTorch's own error at the same
    input dtype (CONTRIBUTING.md, Tests), with a floor for cases where PyTorch happens to be exact."""
    reference = reference.double()
    ours_err = (ours.double() - reference).abs().nan_to_num(posinf=float("inf"))
    torch_err = (torch_result.double() - reference).abs().max().item()
    bound = max(torch_err * factor, floor)
    worst = ours_err.max().item() if ours_err.numel() else 0.0
    assert worst <= bound, f"{name}: max error {worst:.3g} > bound {bound:.3g} (torch's own {torch_err:.3g})"


# Compiling Triton kernels to sm_90 cubins needs no GPU, only Triton's compiler and ptxas: the
# interpreter runs the kernels' Python, not the compiler, which is stricter (types, constexpr use).
# A script runs in a fresh interpreter without TRITON_INTERPRET, so the kernels are JITFunctions;
# it starts with SM90_PRELUDE's build(kernel, signature, constexprs, **options).
SM90_PRELUDE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(kernel, signature, constexprs, **options):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"], kernel.__name__
"""


def compile_for_sm90(script: str, **env) -> None:
    """Run SM90_PRELUDE + script (which prints "ok" last); skip where triton has no ptxas."""
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.update(env)
    result = subprocess.run([sys.executable, "-c", SM90_PRELUDE + script], capture_output=True, text=True,
                            env=child_env, timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip(f"this triton install has no ptxas: {result.stderr[-300:]}")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
