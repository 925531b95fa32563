"""Interruptions and repeat runs of the real command, as CI would see them.

A cancelled CI job sends SIGTERM, a user presses Ctrl-C, a machine dies: the output folder
must then hold either the previous files or the new ones, never half of one. And the same
spec run twice on one machine must give the same numbers, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .specs import EXAMPLES, digits_spec

REPO = Path(__file__).resolve().parents[1]
STARTED = "INFERLINK-TEST: model built"
WRITING = "INFERLINK-TEST: writing"

# A digits CNN that says when it is built and is slowed down, so a full audit (25 thresholds,
# every filter) takes long enough to be interrupted in the middle of its sweeps.
SLOW_NET = f"""
import sys
import time

from example_audits.digits import DigitsCNN


class SlowNet(DigitsCNN):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        print({STARTED!r}, file=sys.stderr, flush=True)

    def forward(self, x):
        time.sleep(0.01)
        return super().forward(x)
"""

# Runs the command with fsync slowed down, so a signal can arrive while results.json is
# being written: the one moment an atomic write has to prove itself.
SLOW_WRITE = f"""
import os, sys, time
real_fsync = os.fsync
def slow_fsync(fd):
    print({WRITING!r}, file=sys.stderr, flush=True)
    time.sleep(60)
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


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_for(proc: subprocess.Popen[str], marker: str, timeout: float = 180.0) -> str:
    """Read stderr until ``marker`` appears; what was read so far is returned."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"{marker!r} never came:\n{seen}"
        line = proc.stderr.readline()
        assert line or proc.poll() is None, f"exited {proc.returncode} before {marker!r}:\n{seen}"
        seen += line
    return seen


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _slow_spec(folder: Path) -> Path:
    (folder / "slow_net.py").write_text(SLOW_NET)
    spec = digits_spec(
        name="slow",
        filtering={"thresholds": 25, "filters": ["low_pass", "high_pass", "pulse"]},
    )
    spec["model"] = {
        "factory": "slow_net.py:SlowNet",
        "kwargs": {"num_classes": 10},
        "checkpoint": str(EXAMPLES / "digits_cnn.safetensors"),
    }
    path = folder / "audit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")],
    ids=["sigterm", "sigint"],
)
def test_signal_mid_run_exits_promptly_and_keeps_the_previous_results(
    tmp_path: Path, sig: signal.Signals, code: int, said: str
) -> None:
    spec = _slow_spec(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(PREVIOUS)
    proc = _start(
        [sys.executable, "-m", "inferlink_audit", "run", str(spec), "--out", "out"], tmp_path
    )
    seen = _wait_for(proc, STARTED)
    time.sleep(1.0)  # into the attacks and sweeps
    assert proc.poll() is None, "the audit finished before it could be interrupted"
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30, "not prompt"
    err = seen + err
    assert proc.returncode == code, err
    assert f"inferlink-audit: {said}" in err and "Traceback" not in err
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
    proc = _start(
        [sys.executable, "-c", SLOW_WRITE, "run", str(spec), "--out", str(out), "--quiet"],
        tmp_path,
    )
    seen = _wait_for(proc, WRITING)
    assert any(p.name.endswith(".tmp") for p in out.iterdir()), "not inside the write"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = seen + err
    assert (out / "results.json").read_text() == PREVIOUS
    assert not (out / "report.html").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err
        assert "Traceback" not in err
        assert _leftovers(out) == []
    else:
        assert proc.returncode == -signal.SIGKILL


def _numbers(results: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in results["meta"].items() if k not in ("started", "seconds", "timings")}
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
    procs = [
        _start(
            [sys.executable, "-m", "inferlink_audit", "run", str(spec), "--out", f"run{i}"],
            tmp_path,
        )
        for i in (1, 2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 1), err
    first, second = (
        json.loads((tmp_path / f"run{i}" / "results.json").read_text()) for i in (1, 2)
    )
    assert _numbers(first) == _numbers(second)
    # The report says what produced the numbers.
    assert first["meta"]["device"] == "cpu"
    assert first["meta"]["deterministic"]["use_deterministic_algorithms"] is True
    assert first["meta"]["seed"] == 0
