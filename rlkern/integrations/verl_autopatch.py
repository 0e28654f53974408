"""Importing this module runs ``rlkern.integrations.verl.patch()`` (default options: verl's dtypes),
unless the process already patched verl (then its options stay: ``patch()`` would raise on other
options).

For processes you do not start yourself (verl's Ray workers): verl imports the modules listed in
``VERL_USE_EXTERNAL_MODULES`` when ``verl`` itself is imported, in every process, so
``VERL_USE_EXTERNAL_MODULES=rlkern.integrations.verl_autopatch`` (in the environment of the
workers, e.g. Ray's ``runtime_env.env_vars``) patches each of them before it builds an engine.
"""

from rlkern.integrations.verl import is_patched, patch

if not is_patched():
    patch()
