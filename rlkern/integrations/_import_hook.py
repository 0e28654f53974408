"""The loader the trainer integrations' import hooks (``sys.meta_path``) put on a module's spec,
so that a module imported after ``patch()`` is patched as its import finishes
(rlkern.integrations.verl, rlkern.integrations.openrlhf)."""

from __future__ import annotations


class PatchingLoader:
    """Runs the wrapped loader, then ``after(module)`` on the module it executed. Every other
    attribute (get_source, is_package, resource readers) is the wrapped loader's."""

    def __init__(self, loader, after):
        self._loader = loader
        self._after = after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._after(module)

    def __getattr__(self, name):
        if name in ("_loader", "_after"):  # not set yet: an unpickled copy (dill pickles module loaders)
            raise AttributeError(name)
        return getattr(self._loader, name)
