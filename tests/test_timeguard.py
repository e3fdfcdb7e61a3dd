"""The time guard of ``make test`` (tests/timeguard.py) fails slow tests and exempts exhaustive ones."""

import subprocess
import sys
from pathlib import Path


def test_slow_tests_fail_unless_exhaustive(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import time, pytest\n"
        "def test_fast():\n    pass\n"
        "def test_slow():\n    time.sleep(1.2)\n"
        "@pytest.mark.exhaustive\ndef test_slow_but_exhaustive():\n    time.sleep(1.2)\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "timeguard", "-p", "no:cacheprovider",
                        "-W", "ignore::pytest.PytestUnknownMarkWarning", "--max-test-seconds", "1", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(Path(__file__).parent), "PATH": ""})
    assert "1 failed, 2 passed" in r.stdout, r.stdout
    assert "test_slow took 1 s" in r.stdout and "mark it exhaustive" in r.stdout
