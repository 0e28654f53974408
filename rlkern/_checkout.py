"""Where this copy of rlkern was imported from, and the two top-level folders it owns.

setup.py installs the repository's top-level ``kernels/`` (Triton kernels, one module per op
family, imported lazily by rlkern.ops so that rlkern imports without triton) and ``benches/``
(the benchmark suite that ``rlkern bench`` runs) as ``rlkern.kernels`` and ``rlkern.benches``.
Neither folder has an ``__init__.py``: a regular package at the root of the repository would
shadow the installed distribution of the same name (Hugging Face's ``kernels``, which
transformers imports) whenever the root is on ``sys.path`` -- ``python -m``, ``python -c`` and
``python -m pytest`` run there put it first. As folders without ``__init__.py`` they are at
most namespace portions, which any installed package of that name outranks.

In a wheel they are namespace subpackages of rlkern (``site-packages/rlkern/kernels/``). In a
source checkout (an editable install, or the root on ``sys.path``) they sit beside the package
folder, and ``attach_folders`` maps them under rlkern.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(PACKAGE_DIR)
FOLDERS = ("kernels", "benches")


def is_checkout() -> bool:
    """True when this rlkern is a source checkout's ``rlkern/`` (setup.py beside it)."""
    return os.path.isfile(os.path.join(ROOT, "setup.py")) and os.path.isdir(os.path.join(ROOT, "kernels"))


def attach_folders() -> None:
    """In a source checkout, make ``rlkern.kernels`` and ``rlkern.benches`` the top-level folders."""
    if not is_checkout():
        return
    for name in FOLDERS:
        fullname = f"rlkern.{name}"
        if fullname in sys.modules or os.path.isdir(os.path.join(PACKAGE_DIR, name)):
            continue
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [os.path.join(ROOT, name)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[fullname] = module
        setattr(sys.modules["rlkern"], name, module)


def installed_elsewhere() -> str | None:
    """The folder of an installed (non-editable) rlkern when this import comes from another
    copy, e.g. a source checkout that is the current directory; None otherwise."""
    here = os.path.join(PACKAGE_DIR, "__init__.py")
    for dist in importlib.metadata.distributions(name="rlkern"):  # a checkout's egg-info is one of them
        init = str(dist.locate_file("rlkern/__init__.py"))
        if os.path.isfile(init) and not os.path.samefile(init, here):
            return os.path.dirname(init)
    return None


attach_folders()
