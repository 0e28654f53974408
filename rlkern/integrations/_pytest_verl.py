"""pytest plugin: run a test session with verl patched onto rlkern (``-p
rlkern.integrations._pytest_verl``); .ci/peer-tests-verl runs verl's own CPU tests under it.

``patch()`` runs at configure time, before any test module imports verl, so by-name imports in
the tests get rlkern's objects too. At the end the session fails if rlkern was never called (a
patch that silently missed would otherwise pass as verl), and prints the calls per drop-in.
"""

from __future__ import annotations

from rlkern.integrations import verl as rlkern_verl


def pytest_configure(config):
    rlkern_verl.patch()
    rlkern_verl.calls.clear()


def pytest_sessionfinish(session, exitstatus):
    counts = dict(rlkern_verl.calls)
    session.config._rlkern_verl_calls = counts
    if sum(counts.values()) == 0 and session.testscollected:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = getattr(config, "_rlkern_verl_calls", dict(rlkern_verl.calls))
    total = sum(counts.values())
    terminalreporter.section("rlkern.integrations.verl")
    terminalreporter.write_line(f"calls that reached rlkern: {total}")
    for name, n in sorted(counts.items()):
        terminalreporter.write_line(f"  {name}: {n}")
    if total == 0:
        terminalreporter.write_line("FAILED: verl ran without calling rlkern")
