"""The CI skip guard (tests/skip_guard.py) run on a throwaway suite by pytest's own pytester."""

import pathlib

import pytest

pytest_plugins = ["pytester"]

GUARD = pathlib.Path(__file__).with_name("skip_guard.py").read_text()
SUITE = """
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("no frobnicator on this machine")

@pytest.mark.skipif(True, reason="marked skip")
def test_marked():
    pass
"""


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(GUARD)
    pytester.makepyfile(test_suite=SUITE)
    return pytester


@pytest.mark.parametrize("limit", [None, 2, 5])
def test_within_the_limit_the_session_passes(suite, limit):
    args = ["-p", "no:cacheprovider"] + ([] if limit is None else [f"--max-skips={limit}"])
    result = suite.runpytest(*args)
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.OK


def test_more_skips_than_allowed_fail_the_session_and_name_each_skip(suite):
    result = suite.runpytest("-p", "no:cacheprovider", "--max-skips=1")
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "error: 2 tests skipped, more than --max-skips=1:",
        "*test_suite.py::test_skips: Skipped: no frobnicator on this machine",
        "*test_suite.py::test_marked: *marked skip",
    ])


def test_a_failing_session_keeps_its_own_exit_status(suite):
    suite.makepyfile(test_fails="def test_fails():\n    assert False\n")
    result = suite.runpytest("-p", "no:cacheprovider", "--max-skips=0")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
