"""benchmarks/bench_decide.py runs end to end at its --quick size and prints its closing line
with every decision of bf16+confirm and of the sequential run equal to exact fp32's. Nothing
here is timed: the speedups are the full-size benchmark's business."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inferlink_audit.devices import bf16_unsupported_reason

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decide.py"
DECIDE_LINE = re.compile(
    r"^decide: \d+\.\d\dx bf16\+confirm, \d+\.\d\dx sequential\+bf16, (\d+) decisions differ$"
)


@pytest.mark.skipif(
    bf16_unsupported_reason(torch.device("cpu")) is not None,
    reason="bench_decide runs bf16, which this CPU does not run natively",
)
def test_quick_decide_benchmark_prints_its_line_with_decisions_agreeing() -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    match = DECIDE_LINE.match(lines[-1])
    assert match is not None, lines[-1]
    assert match.group(1) == "0", completed.stdout
    assert "differs:" not in completed.stdout
    for mode in ("exact fp32", "bf16+confirm", "sequential+bf16+confirm"):
        assert any(line.startswith(mode) and "x" in line for line in lines), mode
