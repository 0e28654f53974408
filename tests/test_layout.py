"""The repository's folders never shadow an installed distribution, from any working directory.

kernels/ and benches/ are installed as rlkern.kernels / rlkern.benches; as regular packages at
the root they shadowed Hugging Face's ``kernels`` (which transformers imports) whenever the root
was on sys.path: ``python -m``, ``python -c`` and ``python -m pytest`` run there put it first.
rlkern/_checkout.py explains the layout.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys

from conftest import import_peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run from the repository root: which kernels / rlkern does this interpreter import?
PROBE = """
import importlib.util, os, sys
import kernels, rlkern, rlkern._C
root = {root!r}
real = os.path.realpath(kernels.__file__)
assert not real.startswith(os.path.join(root, "kernels") + os.sep), f"kernels shadowed by the checkout: {{real}}"
from kernels import {hf_name}  # Hugging Face's kernels, as transformers imports it
spec = importlib.util.find_spec("rlkern.kernels.logprobs")
assert spec is not None and os.path.isfile(spec.origin), spec
assert rlkern._backend.has_cpp()
print("real kernels:", real, "| rlkern:", rlkern.__file__, "| rlkern.kernels.logprobs:", spec.origin)
"""


def _hf_kernels_name() -> str:
    """A name Hugging Face's kernels exports (so the probe imports from the real package)."""
    assert hasattr(import_peer("kernels"), "get_kernel")
    return "get_kernel"


def _env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_top_level_folders_are_not_packages():
    """Only rlkern/ is a regular package at the root: any other folder with an __init__.py would
    shadow an installed distribution of its name when the root is on sys.path."""
    packages = sorted(name for name in os.listdir(ROOT) if not name.startswith(".")
                      and os.path.isfile(os.path.join(ROOT, name, "__init__.py")))
    assert packages == ["rlkern"]
    top_level = importlib.metadata.packages_distributions()
    shadowable = {name for name in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, name))} & set(top_level)
    assert "kernels" in shadowable  # Hugging Face's kernels is installed: the check below means something
    for name in sorted(shadowable - {"rlkern"}):
        out = subprocess.run([sys.executable, "-c", f"import {name}, os; print(os.path.realpath({name}.__file__))"],
                             cwd=ROOT, capture_output=True, text=True, env=_env())
        assert out.returncode == 0, out.stderr[-2000:]
        assert not out.stdout.strip().startswith(os.path.join(os.path.realpath(ROOT), name) + os.sep), out.stdout


def test_python_m_and_pytest_from_the_root_import_the_real_kernels(tmp_path):
    probe = PROBE.format(root=os.path.realpath(ROOT), hf_name=_hf_kernels_name())
    # `python -c` and `python -m` from the root: the root is sys.path[0]
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    (tmp_path / "probe_mod.py").write_text(probe)
    out = subprocess.run([sys.executable, "-m", "probe_mod"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(_env(), PYTHONPATH=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    # `python -m pytest` and `pytest` from the root, on a test module that runs the probe
    (tmp_path / "test_probe.py").write_text("def test_probe():\n" + "".join(
        f"    {line}\n" for line in probe.strip().splitlines()))
    pytest_bin = os.path.join(os.path.dirname(sys.executable), "pytest")
    for command in ([sys.executable, "-m", "pytest"], [pytest_bin]):
        out = subprocess.run([*command, "-q", "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
                             cwd=ROOT, capture_output=True, text=True, env=_env())
        assert out.returncode == 0, (command, out.stdout[-3000:])


def test_a_checkout_without_its_extension_over_an_install_fails_loudly(tmp_path):
    """`python -c "import rlkern"` in a checkout that has no compiled rlkern._C, while rlkern is
    installed (not editable) elsewhere: an ImportError that names the fix, never the slow path."""
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    for name in ("rlkern", "kernels", "benches"):
        shutil.copytree(os.path.join(ROOT, name), checkout / name, ignore=ignore)
    shutil.copy(os.path.join(ROOT, "setup.py"), checkout / "setup.py")
    # a regular install of rlkern in another folder on sys.path: its package and dist-info
    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "rlkern"), site / "rlkern", ignore=ignore)
    info = site / "rlkern-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rlkern\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("rlkern/__init__.py,,\n")
    env = dict(_env(), PYTHONPATH=str(site))
    # this test's own rlkern is an editable install, whose import hook would lend the checkout
    # the repository's rlkern._C: drop it, as on a machine where rlkern is installed from a wheel
    no_editable = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                   "if '__editable__' not in getattr(f, '__module__', '')]; ")
    out = subprocess.run([sys.executable, "-c", no_editable + "import rlkern"], cwd=checkout, capture_output=True,
                         text=True, env=env)
    assert out.returncode != 0
    assert "source checkout" in out.stderr and "pip install --no-build-isolation -e" in out.stderr, out.stderr
    # the same checkout with nothing installed elsewhere keeps its documented pure-Python path
    out = subprocess.run([sys.executable, "-c", no_editable + "import rlkern, rlkern.benches.common"],
                         cwd=checkout, capture_output=True, text=True, env=dict(env, PYTHONPATH=""))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rlkern._C is not available" in out.stderr


def test_rlkern_bench_from_the_root(tmp_path):
    """`rlkern bench FAMILY --out DIR` from the repository root, as a newcomer runs it: it starts
    itself again with OMP_WAIT_POLICY set, shows progress, writes JSON, markdown and a PNG, and
    gives every peer a row (a CUDA-only peer: "not run" with the reason)."""
    env = _env()
    env.pop("OMP_WAIT_POLICY", None)
    rlkern_bin = os.path.join(os.path.dirname(sys.executable), "rlkern")
    out = subprocess.run([rlkern_bin, "bench", "policy_loss", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[policy_loss] ppo B=16 T=2048" in out.stderr  # progress: family, bench, shape
    for name in ("policy_loss.json", "policy_loss.md", "policy_loss_from_logits.json", "policy_loss.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "policy_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    results = json.loads((tmp_path / "policy_loss.json").read_text())
    assert results["omp_wait_policy"] == "PASSIVE"
    impls = {r["impl"] for r in results["rows"]}
    assert {"rlkern", "verl", "eager (TRL formula)"} <= impls
    liger = [r for r in json.loads((tmp_path / "policy_loss_from_logits.json").read_text())["rows"]
             if r["impl"] == "liger triton_grpo_loss"]
    assert len(liger) == 1 and liger[0]["median_ms"] is None and "CUDA" in liger[0]["extra"]["not run"]
