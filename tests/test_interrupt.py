"""Interruptions and repeat runs of the real command, as CI would see them.

A cancelled CI job sends SIGTERM, a user presses Ctrl-C, a machine dies: the output folder
must then hold either the previous files or the new ones, never half of one. And the same
spec run twice on one machine must give the same numbers, bit for bit.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from .specs import RUN_DEPENDENT_META, digits_spec

REPO = Path(__file__).resolve().parents[1]
IN_SWEEP = "INFERLINK-TEST: inside the sweep"
WRITING = "INFERLINK-TEST: writing"
# Only a guard against a child that hangs, so a broken build fails instead of stalling CI;
# no test measures time.
HANG_GUARD_S = 600

# Runs the command with a progress hook (the one the progress bar uses) that says when the
# first filtered variant has been evaluated and then holds the audit there, inside its
# sweeps, until the test's signal arrives: the signal cannot come too early or too late.
IN_SWEEP_RUN = f"""
import sys, time
import inferlink_audit.audit as audit
real_run_audit = audit.run_audit
def run_audit(*args, on_variant=None, **kwargs):
    def each_variant(where):
        if on_variant is not None:
            on_variant(where)
        print({IN_SWEEP!r}, where, file=sys.stderr, flush=True)
        time.sleep(3600)
    return real_run_audit(*args, on_variant=each_variant, **kwargs)
audit.run_audit = run_audit
from inferlink_audit.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Runs the command with fsync held, so a signal arrives while results.json is being
# written: the one moment an atomic write has to prove itself.
SLOW_WRITE = f"""
import os, sys, time
real_fsync = os.fsync
def slow_fsync(fd):
    print({WRITING!r}, file=sys.stderr, flush=True)
    time.sleep(3600)
    real_fsync(fd)
os.fsync = slow_fsync
from inferlink_audit.cli import main
sys.exit(main(sys.argv[1:]))
"""

PREVIOUS = '{"schema": "inferlink-audit/results/v1", "meta": {"previous": true}, "models": []}\n'


def _env() -> dict[str, str]:
    # One torch thread per process: several audits share CI's two cores, and torch's
    # spinning worker threads slow each other down many times over when oversubscribed.
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _default_sigint() -> None:
    # A child inherits an ignored SIGINT (background jobs, some CI runners); Python only
    # turns SIGINT into KeyboardInterrupt when it starts with the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """A running command whose stderr is read line by line on a thread, so the test can wait
    for a line the child prints without polling or sleeping."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )
        self.err = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, marker: str) -> None:
        """Block until the child prints ``marker``; fail if it exits first."""
        while marker not in self.err:
            try:
                line = self._lines.get(timeout=HANG_GUARD_S)
            except queue.Empty:
                pytest.fail(f"hung: {marker!r} never came:\n{self.err}")
            if line is None:
                pytest.fail(f"exited {self.proc.wait()} before {marker!r}:\n{self.err}")
            self.err += line

    def finish(self) -> int:
        """Wait for the exit; all of stderr is then in ``err``."""
        code = self.proc.wait(timeout=HANG_GUARD_S)
        self._reader.join(timeout=HANG_GUARD_S)
        while (line := self._lines.get_nowait()) is not None:
            self.err += line
        return code


@contextmanager
def running(args: list[str], cwd: Path) -> Iterator[Child]:
    """A child that is killed and reaped however the test ends."""
    child = Child(args, cwd)
    try:
        yield child
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait()
        if child.proc.stderr is not None:
            child.proc.stderr.close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")],
    ids=["sigterm", "sigint"],
)
def test_signal_inside_the_sweep_exits_with_its_code_and_keeps_the_previous_results(
    tmp_path: Path, sig: signal.Signals, code: int, said: str
) -> None:
    spec = tmp_path / "audit.yaml"
    spec.write_text(yaml.safe_dump(digits_spec(name="held"), sort_keys=False))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(PREVIOUS)
    args = [sys.executable, "-c", IN_SWEEP_RUN, "run", str(spec), "--out", "out"]
    with running(args, tmp_path) as child:
        child.wait_for(IN_SWEEP)
        assert child.proc.poll() is None, child.err
        child.proc.send_signal(sig)
        assert child.finish() == code, child.err
    assert f"inferlink-audit: {said}" in child.err and "Traceback" not in child.err
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == PREVIOUS


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_signal_while_writing_results_leaves_the_previous_file_whole(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Stopped inside the write of results.json: the previous file is untouched.

    SIGTERM also removes the temporary file; after SIGKILL nothing can run, so a hidden
    ``.results.json.*.tmp`` may stay behind, but ``results.json`` itself is still whole.
    """
    spec = tmp_path / "audit.yaml"
    spec.write_text(
        yaml.safe_dump(
            digits_spec(
                data={"source": "sklearn_digits", "limit": 32, "batch_size": 32},
                filtering={"thresholds": 3, "filters": ["pulse"], "scopes": ["global"]},
            ),
            sort_keys=False,
        )
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(PREVIOUS)
    args = [sys.executable, "-c", SLOW_WRITE, "run", str(spec), "--out", str(out), "--quiet"]
    with running(args, tmp_path) as child:
        child.wait_for(WRITING)
        assert any(p.name.endswith(".tmp") for p in out.iterdir()), "not inside the write"
        child.proc.send_signal(sig)
        returncode = child.finish()
    assert (out / "results.json").read_text() == PREVIOUS
    assert not (out / "report.html").exists()
    if sig == signal.SIGTERM:
        assert returncode == 143, child.err
        assert "Traceback" not in child.err
        assert _leftovers(out) == []
    else:
        assert returncode == -signal.SIGKILL


def _numbers(results: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in results["meta"].items() if k not in RUN_DEPENDENT_META}
    return {**results, "meta": meta}


def test_two_runs_of_the_command_give_identical_numbers(tmp_path: Path) -> None:
    spec = tmp_path / "audit.yaml"
    spec.write_text(
        yaml.safe_dump(
            digits_spec(
                data={
                    "source": "sklearn_digits",
                    "limit": 48,
                    "batch_size": 20,
                    "normalize": {"mean": [0.5], "std": [0.5]},
                },
                filtering={"thresholds": 3, "filters": ["pulse"]},
                attacks=[{"fgsm": {"eps": 0.1}}, {"gaussian": {"sigma": 0.2}}],
            ),
            sort_keys=False,
        )
    )
    run = [sys.executable, "-m", "inferlink_audit", "run", str(spec), "--out"]
    with running([*run, "run1"], tmp_path) as one, running([*run, "run2"], tmp_path) as two:
        for child in (one, two):
            assert child.finish() in (0, 1), child.err
    first, second = (
        json.loads((tmp_path / f"run{i}" / "results.json").read_text()) for i in (1, 2)
    )
    assert _numbers(first) == _numbers(second)
    # The report says what produced the numbers.
    assert first["meta"]["device"] == "cpu"
    assert first["meta"]["deterministic"]["use_deterministic_algorithms"] is True
    assert first["meta"]["seed"] == 0
