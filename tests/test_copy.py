"""Copyable: one script and common/ are all a project needs. Each script is copied with common/ (and nothing else)
into an empty directory and run there from that directory with a tiny budget, so a script that reaches into tests/,
benchmarks/, docs/ or the repository root fails here. The built-in models come from the user cache, as they would
in the reader's own project. And common/ itself stays layered: its modules import one another without a cycle."""

import ast
import glob
import graphlib
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


def common_imports() -> dict[str, set[str]]:
    """common/<module>.py -> the modules of common/ it imports, at the top or inside a function (a lazy import
    is still a dependency: it runs, and can find its target half-initialised, whenever the function is called).
    Imports under `if TYPE_CHECKING:` never run and are left out."""
    graph = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "common", "*.py"))):
        name = os.path.basename(path)[: -len(".py")]
        tree = ast.parse(open(path).read())
        type_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
            for statement in node.body
            for inner in ast.walk(statement)
        }
        imported = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("common.")}
            elif isinstance(node, ast.ImportFrom):
                module = node.module
                if node.level:  # relative: from . import wordle, from .models import Policy
                    module = f"common.{node.module}" if node.module else "common"
                if module == "common":  # from common import wordle; from . import wordle
                    imported |= {a.name for a in node.names}
                elif module and module.startswith("common."):
                    imported.add(module.split(".")[1])
        graph[name] = imported - {name}
    return graph


def test_common_imports_have_no_cycle():
    graph = common_imports()
    assert {"models", "tasks", "utils", "wordle"} <= set(graph)
    assert set().union(*graph.values()) <= set(graph), "an import names no module of common/"
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        raise AssertionError(f"common/ imports in a cycle: {' -> '.join(error.args[1])}") from None
