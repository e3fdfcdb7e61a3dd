"""The time guard of ``make test`` (tests/timeguard.py) fails slow tests and exempts exhaustive ones;
on slower hosts its limit grows with the host's measured fp32 speed."""

import subprocess
import sys
from pathlib import Path

import timeguard

SLOW = ("import time, pytest\n"
        "def test_fast():\n    pass\n"
        "def test_slow():\n    time.sleep(1.2)\n"
        "@pytest.mark.exhaustive\ndef test_slow_but_exhaustive():\n    time.sleep(1.2)\n")


def _run(tmp_path, factor: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_x.py").write_text(SLOW)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "timeguard", "-p", "no:cacheprovider",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", "--max-test-seconds", "1", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(Path(__file__).parent), "PATH": "",
                               "LQKIT_TEST_HOST_FACTOR": factor})


def test_slow_tests_fail_unless_exhaustive(tmp_path):
    r = _run(tmp_path, "1")
    assert "1 failed, 2 passed" in r.stdout, r.stdout
    assert "test_slow took 1 s" in r.stdout and "mark it exhaustive" in r.stdout
    assert "time guard: 1 s a test (--max-test-seconds × 1.00; LQKIT_TEST_HOST_FACTOR)" in r.stdout


def test_slower_hosts_get_a_longer_limit(tmp_path):
    r = _run(tmp_path, "2")  # as on a host half as fast: 2 s, and the 1.2 s test passes
    assert "3 passed" in r.stdout, r.stdout
    assert "time guard: 2 s a test" in r.stdout


def test_host_factor_follows_the_measured_speed(monkeypatch):
    monkeypatch.delenv("LQKIT_TEST_HOST_FACTOR", raising=False)
    monkeypatch.setattr(timeguard, "_FACTOR", {})
    monkeypatch.setattr(timeguard, "fp32_gflops", lambda: timeguard.REF_GFLOPS / 2.5)
    assert timeguard.host_factor() == (2.5, timeguard.REF_GFLOPS / 2.5)
    monkeypatch.setattr(timeguard, "_FACTOR", {})
    monkeypatch.setattr(timeguard, "fp32_gflops", lambda: timeguard.REF_GFLOPS * 3)
    assert timeguard.host_factor()[0] == 1.0  # faster hosts keep the plain limit


def test_fp32_gflops_is_a_speed():
    assert 1 < timeguard.fp32_gflops(0.05) < 1e5
