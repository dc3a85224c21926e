"""`--max-skips=N`: the session fails when more than N tests are skipped.

CI passes the number of skips it expects (.ci/run), so a test that starts skipping (a dependency
missing on a fresh machine, a fixture that cannot set up) turns CI red instead of passing silently.
Each skip is listed with its reason. Loaded by tests/conftest.py.
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--max-skips", type=int, default=None,
                     help="Fail the session when more than this many tests are skipped.")


def pytest_sessionfinish(session, exitstatus):
    limit = session.config.getoption("--max-skips")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if limit is None or reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if len(skipped) <= limit:
        return
    reporter.write_line("")
    reporter.write_line(f"error: {len(skipped)} tests skipped, more than --max-skips={limit}:", red=True)
    for r in skipped:
        reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else r.longrepr
        reporter.write_line(f"  {r.nodeid}: {reason}")
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
