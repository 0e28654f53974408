"""pytest plugin: a test session with rlkern patched into OpenRLHF.

``python -m pytest -p rlkern.integrations._pytest_openrlhf [--rlkern-expect NAME,NAME] ...``

- patches (``rlkern.integrations.openrlhf.patch()``) before collection, so test modules that
  import OpenRLHF's functions by name get rlkern's;
- OpenRLHF's own tests load its files straight from disk (``importlib.util.spec_from_file_location``
  and ``loader.exec_module``, which no import hook sees): for the session, the specs that
  function returns for OpenRLHF files execute through ``wrap_spec``;
- fails the session when rlkern was never called, or when a name given to ``--rlkern-expect``
  was never called; the per-name call counts go in the terminal summary.
"""

from __future__ import annotations

import importlib.util

import pytest

from rlkern.integrations import openrlhf as ro

_saved = {}


def pytest_addoption(parser):
    parser.addoption("--rlkern-expect", default="",
                     help="comma-separated rlkern.integrations.openrlhf.NAMES that must have run rlkern")


def pytest_configure(config):
    ro.patch()
    original = _saved["spec_from_file_location"] = importlib.util.spec_from_file_location

    def spec_from_file_location(*args, **kwargs):
        return ro.wrap_spec(original(*args, **kwargs))

    importlib.util.spec_from_file_location = spec_from_file_location


def pytest_unconfigure(config):
    if "spec_from_file_location" in _saved:
        importlib.util.spec_from_file_location = _saved.pop("spec_from_file_location")
    ro.unpatch()


def _missing(config) -> list[str]:
    expected = [n.strip() for n in config.getoption("--rlkern-expect").split(",") if n.strip()]
    unknown = [n for n in expected if n not in ro.NAMES]
    if unknown:
        raise pytest.UsageError(f"--rlkern-expect: unknown names {unknown}, expected some of {ro.NAMES}")
    if not expected:
        return [] if sum(ro.calls.values()) else ["(any)"]
    return [n for n in expected if not ro.calls[n]]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if session.config.option.collectonly:
        return
    if _missing(session.config) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = ", ".join(f"{name}={ro.calls[name]}" for name in ro.NAMES)
    terminalreporter.write_line(f"rlkern calls from OpenRLHF: {counts}")
    missing = _missing(config)
    if missing and not config.option.collectonly:
        terminalreporter.write_line(f"FAILED: rlkern was never called for {', '.join(missing)}", red=True)
