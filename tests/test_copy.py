"""Copyable: one script and common/ are all a project needs. Each script is copied with common/ (and nothing else)
into an empty directory and run there from that directory with a tiny budget, so a script that reaches into tests/,
benchmarks/, docs/ or the repository root fails here. The built-in models come from the user cache, as they would
in the reader's own project."""

import os
import shutil
import subprocess
import sys

import pytest

from helpers import TINY_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["ppo.py", "nlpo.py", "ilql.py", "alol.py", "reward_lm.py"])
def test_a_script_and_common_run_alone(script, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(os.path.join(ROOT, script), project / script)
    shutil.copytree(os.path.join(ROOT, "common"), project / "common", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the repository on the path
    result = subprocess.run(
        [sys.executable, script, *TINY_FLAGS[script], "--no-save-model", "--output-dir", str(project / "runs")],
        cwd=project,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    finished = [d for d, _, files in os.walk(project / "runs") if "summary.json" in files]
    assert finished, result.stdout[-2000:]
