"""A pytest plugin: ``--max-test-seconds S`` fails every test whose set-up and call take longer than S
seconds (tests marked ``exhaustive`` are exempt), so that ``make test`` stays fast: a test that grows
slow is made faster or moved to ``make test-all`` deliberately, not noticed when CI runs out of time.

S holds on a host that multiplies fp32 matrices at ``REF_GFLOPS`` or faster; a slower host (measured
once per session, before any xdist worker starts, which reads the factor from the environment: a
512×640 by 640×4096 product for about a third of a second) gets S times how much slower it is, so that
the guard catches tests that grew slow, not slow hosts. The limits were set on 2-core Xeon hosts; on a
2-core AMD EPYC host whose fp32 products ran at 58 GFLOP/s the whole suite took about 2.7× longer and
three correct tests passed 60 s (REF_GFLOPS = 150 is that host's speed times 2.6).
``LQKIT_TEST_HOST_FACTOR=F`` sets the factor instead (1: no scaling)."""

from __future__ import annotations

import os
import time

import pytest

_SETUP = pytest.StashKey[float]()
REF_GFLOPS = 150.0  # at or above this, a test gets the plain limit
_FACTOR: dict[str, tuple[float, float | None]] = {}
ENV = "LQKIT_TEST_HOST_FACTOR"


def pytest_addoption(parser):
    parser.addoption("--max-test-seconds", type=float, default=float(os.environ.get("LQKIT_MAX_TEST_SECONDS", 0)),
                     help="fail any test whose set-up and call take longer (0: no limit), scaled up on hosts "
                          "with slower fp32 products (see tests/timeguard.py); tests marked exhaustive are "
                          "exempt. `make test` sets 60.")


def fp32_gflops(seconds: float = 0.3) -> float:
    """This host's speed at a mid-sized fp32 matrix product (torch's default threads)."""
    import torch

    a, b = torch.randn(512, 640), torch.randn(640, 4096)
    a @ b  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512 * 640 * 4096 * n / (time.perf_counter() - t0) / 1e9


def host_factor() -> tuple[float, float | None]:
    """(factor ≥ 1 the limit is multiplied by, measured GFLOP/s or None when set by the environment)."""
    if "f" not in _FACTOR:
        env = os.environ.get(ENV)
        if env:
            try:
                _FACTOR["f"] = (max(1.0, float(env)), None)
            except ValueError:
                raise pytest.UsageError(f"{ENV}={env!r} is not a number; give e.g. {ENV}=1 (no scaling)") from None
        else:
            g = fp32_gflops()
            _FACTOR["f"] = (max(1.0, REF_GFLOPS / g), g)
    return _FACTOR["f"]


def pytest_configure(config):
    """Measure once, in the main process, and hand the factor to xdist's workers (which would otherwise
    each measure while the others run tests, and see a slower host)."""
    if config.getoption("--max-test-seconds") and not hasattr(config, "workerinput"):
        os.environ[ENV] = repr(host_factor()[0])


def _limit(config) -> float:
    base = config.getoption("--max-test-seconds")
    return base * host_factor()[0] if base else 0.0


def _describe(config) -> str:
    f, g = host_factor()
    how = f"fp32 products at {g:.0f} GFLOP/s" if g is not None else ENV
    return f"time guard: {_limit(config):.0f} s a test (--max-test-seconds × {f:.2f}; {how})"


def pytest_report_header(config):
    return _describe(config) if config.getoption("--max-test-seconds") else None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Also at the end (``make test`` runs with -q, which hides the header)."""
    if config.getoption("--max-test-seconds"):
        terminalreporter.write_line(_describe(config))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not item.config.getoption("--max-test-seconds") or item.get_closest_marker("exhaustive") is not None:
        return
    if report.when == "setup":
        item.stash[_SETUP] = report.duration
    elif report.when == "call" and report.passed:
        took = report.duration + item.stash.get(_SETUP, 0.0)
        limit = _limit(item.config)
        if took > limit:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} took {took:.0f} s (set-up and call), over the {limit:.0f} s that "
                               "`make test` allows a test on this host: make it faster, or mark it exhaustive (run "
                               "by `make test-all`) if its coverage is kept elsewhere")
