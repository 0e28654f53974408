"""Builds rlkern._C from csrc/; installs kernels/ as rlkern.kernels and benches/ as rlkern.benches.

C++ sources always; .cu sources only when the installed torch has CUDA and nvcc is found
(RLKERN_WITH_CUDA is then defined for the .cpp wrappers). Without torch in the build
environment the wheel is pure Python: rlkern then warns once and uses the reference path.
Set MAX_JOBS to bound parallel compiles (CI uses 2).
RLKERN_SANITIZE=address,undefined (any -fsanitize= list) builds the C++ extension instrumented
(-O1 -g, frame pointers kept) for benches/sanitize_cpu.sh; never for a release wheel.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# kernels/ and benches/ live at the top level of the repository (one folder per layer) and are
# installed inside the package, so `rlkern bench` works from a wheel. They have no __init__.py
# (rlkern/_checkout.py says why: a regular package there would shadow Hugging Face's `kernels`).
PACKAGES = find_packages(include=["rlkern", "rlkern.*"]) + ["rlkern.kernels", "rlkern.benches"]
PACKAGE_DIR = {"rlkern.kernels": "kernels", "rlkern.benches": "benches"}


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: building rlkern without rlkern._C")
        return [], {}
    if os.environ.get("RLKERN_NO_EXT") == "1":
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    # -fopenmp: at::parallel_for is inline and runs serially in an extension built without it.
    cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp"]
    link_flags = []
    sanitize = os.environ.get("RLKERN_SANITIZE", "").strip()
    if sanitize:
        # -O1 keeps the instrumented build usable in speed while keeping stack traces readable;
        # the later -O1 overrides the -O3 above (gcc takes the last -O). The sanitizer runtimes
        # are not linked into python itself, so the test run LD_PRELOADs them
        # (benches/sanitize_cpu.sh).
        san = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g", "-O1"]
        if "undefined" in sanitize.split(","):
            san.append("-fno-sanitize-recover=undefined")  # a UB report fails the run, not just prints
        cxx_flags = cxx_flags + san
        link_flags = [f"-fsanitize={sanitize}"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(cu)
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "rlkern._C",
            cpp + cu,
            define_macros=[("RLKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "rlkern._C", cpp, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
