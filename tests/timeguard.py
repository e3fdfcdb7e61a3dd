"""A pytest plugin: ``--max-test-seconds S`` fails every test whose set-up and call take longer than S
seconds (tests marked ``exhaustive`` are exempt), so that ``make test`` stays fast: a test that grows
slow is made faster or moved to ``make test-all`` deliberately, not noticed when CI runs out of time."""

from __future__ import annotations

import os

import pytest

_SETUP = pytest.StashKey[float]()


def pytest_addoption(parser):
    parser.addoption("--max-test-seconds", type=float, default=float(os.environ.get("LQKIT_MAX_TEST_SECONDS", 0)),
                     help="fail any test whose set-up and call take longer (0: no limit); tests marked "
                          "exhaustive are exempt. `make test` sets 60.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    limit = item.config.getoption("--max-test-seconds")
    if not limit or item.get_closest_marker("exhaustive") is not None:
        return
    if report.when == "setup":
        item.stash[_SETUP] = report.duration
    elif report.when == "call" and report.passed:
        took = report.duration + item.stash.get(_SETUP, 0.0)
        if took > limit:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} took {took:.0f} s (set-up and call), over the {limit:.0f} s that "
                               "`make test` allows a test: make it faster, or mark it exhaustive (run by "
                               "`make test-all`) if its coverage is kept elsewhere")
