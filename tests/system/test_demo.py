"""The README's demo job end to end: torchrun, SIGKILL mid-run, resume, bit-identical result."""

import os
import subprocess
import sys

import pytest

from tests.support import REPO, jobs


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--mode", "chief", "--async-save", "--save-every", "7"],
        ["--async-save", "--snapshot", "overlap", "--save-every", "7"],
    ],
    ids=["sharded", "chief-async", "sharded-async-overlap"],
)
def test_demo_kill_and_resume_matches_uninterrupted_run(tmp_path, extra):
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "demo.py"),
        "--workdir",
        str(tmp_path / "demo"),
        "--steps",
        "80",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "OK: the resumed run is bit-identical" in proc.stdout
    assert "killed with SIGKILL (exit -9)" in proc.stdout  # the status of the kill, not of a reaped process
    resumed = jobs.RESUMED.findall(proc.stdout)
    assert resumed and int(resumed[-1]) < 80  # it really resumed mid-run
