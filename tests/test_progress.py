"""Progress of long steps: what the library reports (sweeps, attacks, retraining epochs,
Lipschitz bounds), the command line's tqdm bars, and the pytest plugin's output under a
pseudo-terminal, in CI logs and with ``-q``.

The "few seconds" after which a step shows is the ini key ``inferlink_progress_after``; these
tests set it to 0 (every step) or to an hour (none), never depend on how long a step takes.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass
from pathlib import Path

import pytest
import tqdm  # noqa: F401  (imported once here: pytester's in-process runs undo their imports)
from pytest_inferlink.assemble import assemble_result  # noqa: F401  (the same)
from pytest_inferlink.progress import INI_PROGRESS_AFTER
from pytest_inferlink.runner import STEP_SUMMARY_ENV

from inferlink_audit.audit import run_audit
from inferlink_audit.progress import reset_progress, set_progress
from inferlink_audit.report import render_report  # noqa: F401  (the same)
from inferlink_audit.spec_loader import load_spec

from .specs import digits_spec, write_spec
from .test_plugin import spec_text

pytest_plugins = ["pytester"]

EVERY_STEP = f"{INI_PROGRESS_AFTER}=0"
# The plugin spec (test_plugin.spec_text): 64 digits, two local layers, 5 thresholds, FGSM 0.3.
SWEEP_LINE = re.compile(
    r"^inferlink-audit: tiny sweep (low_pass|pulse) fgsm_eps0\.3: (\d+)/10 variants, "
    r"64 examples, \d+\.\d s$",
    re.M,
)


@dataclass
class Step:
    label: str
    total: int | None
    unit: str
    examples: int | None
    done: int = 0


class Recorder:
    """A ``Progress`` that keeps every finished step, checking that steps nest."""

    def __init__(self) -> None:
        self.running: list[Step] = []
        self.finished: list[Step] = []

    def begin(self, label: str, total: int | None, unit: str, examples: int | None) -> None:
        self.running.append(Step(label, total, unit, examples))

    def advance(self, n: int = 1) -> None:
        self.running[-1].done += n

    def end(self) -> None:
        self.finished.append(self.running.pop())


@pytest.fixture(autouse=True)
def _not_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CI", "BUILD_NUMBER", STEP_SUMMARY_ENV, "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)


def remediation_spec(folder: Path) -> Path:
    data = dict(digits_spec()["data"])  # type: ignore[call-overload]
    data["train"] = {"source": "sklearn_digits", "split": "train", "limit": 96}
    return write_spec(
        folder,
        data=data,
        filtering={"thresholds": 4, "filters": ["pulse"], "scopes": ["local", "global"]},
        remediation={"selective_retrain": {"epochs": 2, "response": "clean"}},
    )


# --------------------------------------------------------------------------- the library
def test_an_audit_reports_each_long_step_with_its_work_done(tmp_path: Path) -> None:
    spec = load_spec(remediation_spec(tmp_path))
    recorder = Recorder()
    token = set_progress(recorder)
    try:
        result, _, session = run_audit(spec, output_dir=tmp_path / "out")
    finally:
        reset_progress(token)
    assert recorder.running == []  # every step ended
    steps = {step.label: step for step in recorder.finished}
    (model,) = result.models
    layers = [layer["name"] for layer in model.layers]
    n, batch = session.prepared.data.n, session.prepared.data.batch_size
    sweep = steps["sweep pulse fgsm_eps0.1"]
    assert (sweep.unit, sweep.examples, sweep.total) == ("variant", n, (len(layers) + 1) * 4)
    assert sweep.done == sum(s.evaluated_variants for s in model.sweeps)
    attack = steps["attack fgsm_eps0.1"]
    assert (attack.unit, attack.examples) == ("batch", n)
    assert attack.done == attack.total == math.ceil(n / batch)
    assert steps["Lipschitz bounds"].done == steps["Lipschitz bounds"].total == len(layers)
    for run in ("selective", "control"):
        epochs = steps[f"retrain {run}"]
        assert (epochs.unit, epochs.done, epochs.total, epochs.examples) == ("epoch", 2, 2, 96)


# --------------------------------------------------------------------------- terminals
def run_in_pty(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal (120 columns) as its stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm"}
    for name in ("CI", "BUILD_NUMBER", STEP_SUMMARY_ENV, "PYTEST_ADDOPTS"):
        env.pop(name, None)
    child = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return child.wait(timeout=600), b"".join(chunks).decode("utf-8", "replace")


def test_the_command_line_draws_a_bar_for_every_long_step(tmp_path: Path) -> None:
    spec = remediation_spec(tmp_path)
    cli = Path(sys.executable).parent / "inferlink-audit"
    code, out = run_in_pty([str(cli), "run", str(spec), "--out", "out"], tmp_path)
    assert code == 0, out
    for bar in (
        r"sweep pulse fgsm_eps0\.1 \(120 examples\): +\d+%\|",
        r"attack fgsm_eps0\.1 \(120 examples\): +\d+%\|",
        r"Lipschitz bounds: +\d+%\|",
        r"retrain selective \(96 examples\): +\d+%\|",
        r"retrain control \(96 examples\): +\d+%\|",
    ):
        assert re.search(bar, out), f"no bar {bar!r} in\n{out}"


def test_pytest_on_a_terminal_shows_live_progress_then_a_line_per_sweep(
    pytester: pytest.Pytester,
) -> None:
    spec = pytester.makefile(".yaml", spec=spec_text())
    argv = [sys.executable, "-m", "pytest", "--inferlink-audit", str(spec), "-o", EVERY_STEP]
    code, out = run_in_pty(
        [*argv, "-p", "no:cacheprovider", "--inferlink-report", "r"], pytester.path
    )
    assert code == 1, out  # three checks of the spec fail on purpose (test_plugin.CHECKS)
    # Live: a tqdm meter rewritten in place (\r), with done/total and the ETA.
    live = re.findall(
        r"\rtiny sweep (low_pass|pulse) fgsm_eps0\.3 \(64 examples\): +\d+%\|[^|]*\| "
        r"(\d+)/10 \[\d\d:\d\d<\d\d:\d\d",
        out,
    )
    assert {filter_name for filter_name, _ in live} == {"low_pass", "pulse"}
    # ... then rewritten into the summary line that a CI log gets.
    lines = [line.rstrip() for line in re.split(r"\r\n|\r|\n", out)]  # erased: space-filled
    summaries = dict(SWEEP_LINE.findall("\n".join(lines)))
    results = json.loads((pytester.path / "r" / "results.json").read_text(encoding="utf-8"))
    evaluated = {f: 0 for f in ("low_pass", "pulse")}
    for sweep in results["models"][0]["sweeps"]:
        evaluated[sweep["filter"]] += sweep["evaluated_variants"]
    assert {f: int(done) for f, done in summaries.items()} == evaluated
    assert "3 failed, 3 passed" in out


# --------------------------------------------------------------------------- logs
def test_ci_logs_get_one_line_per_finished_sweep_and_no_live_output(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    spec = pytester.makefile(".yaml", spec=spec_text())
    result = pytester.runpytest("--inferlink-audit", str(spec), "-o", EVERY_STEP)
    result.assert_outcomes(passed=3, failed=3)
    out = result.stdout.str()
    assert sorted(f for f, _ in SWEEP_LINE.findall(out)) == ["low_pass", "pulse"]
    assert re.search(r"^inferlink-audit: tiny attack fgsm_eps0\.3: 1/1 batches, 64 ex", out, re.M)
    assert "\r" not in out and "%|" not in out


def test_under_xdist_the_controller_writes_the_workers_lines(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    monkeypatch.setenv("CI", "true")
    spec = pytester.makefile(".yaml", spec=spec_text())
    result = pytester.runpytest_subprocess(
        "--inferlink-audit", str(spec), "-o", EVERY_STEP, "-n", "2", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=3, failed=3)
    out = result.stdout.str()
    # Each sweep group runs on one worker, once: one line each, whole, on a line of its own.
    assert sorted(f for f, _ in SWEEP_LINE.findall(out)) == ["low_pass", "pulse"]


def test_q_keeps_it_quiet(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    spec = pytester.makefile(".yaml", spec=spec_text(checks={}, filters="[pulse]"))
    result = pytester.runpytest("--inferlink-audit", str(spec), "-o", EVERY_STEP, "-q")
    result.assert_outcomes(passed=1)
    assert "inferlink-audit: tiny" not in result.stdout.str()


def test_steps_shorter_than_the_threshold_show_nothing(pytester: pytest.Pytester) -> None:
    spec = pytester.makefile(".yaml", spec=spec_text(checks={}, filters="[pulse]"))
    result = pytester.runpytest("--inferlink-audit", str(spec), "-o", f"{INI_PROGRESS_AFTER}=3600")
    result.assert_outcomes(passed=1)
    assert "inferlink-audit: tiny" not in result.stdout.str()


def test_a_threshold_that_is_not_seconds_is_a_usage_error(pytester: pytest.Pytester) -> None:
    spec = pytester.makefile(".yaml", spec=spec_text(checks={}, filters="[pulse]"))
    result = pytester.runpytest("--inferlink-audit", str(spec), "-o", f"{INI_PROGRESS_AFTER}=soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"ERROR: {INI_PROGRESS_AFTER} = 'soon': give the seconds after which a running step*"]
    )


def test_a_sequential_sweeps_bar_counts_each_round_and_never_passes_its_total(
    tmp_path: Path,
) -> None:
    """Under ``statistics.sequential`` every round evaluates the open sweeps' variants again:
    the sweep step's total counts a variant once per round (its most work), and the variants
    done stay within it (one pass's total was overshot as soon as a second round ran)."""
    data = {"source": "sklearn_digits", "batch_size": 360}
    spec = load_spec(
        write_spec(
            tmp_path, data=data, filtering={"thresholds": 5, "filters": ["low_pass"]},
            checks={"max_fragile_fraction": {"value": 0.4}},
            statistics={"resamples": 100, "sequential": {"round": 64}},
        )
    )  # fmt: skip
    recorder = Recorder()
    token = set_progress(recorder)
    try:
        _, _, session = run_audit(spec)
    finally:
        reset_progress(token)
    sweep = next(s for s in recorder.finished if s.label == "sweep low_pass fgsm_eps0.1")
    one_pass = (len(session.prepared.layers) + 1) * 5
    assert session._plan is not None
    assert (sweep.unit, sweep.total) == ("variant round", one_pass * session._plan.rounds)
    assert one_pass < sweep.done <= sweep.total
