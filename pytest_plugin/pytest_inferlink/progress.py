"""Progress of long audit steps inside pytest, through pytest's terminal reporter.

A step (a sweep, an attack, retraining epochs, Lipschitz bounds) that has run longer than
``inferlink_progress_after`` seconds (ini; 3 by default) shows a live line on a terminal
(done/total, examples, rate and ETA, drawn by tqdm's formatter) that becomes one summary line
when it ends; in a CI log (``CI`` or ``BUILD_NUMBER`` set, as pytest itself detects CI) or
any output that is not a terminal, only the summary line is written. ``-q`` writes nothing.
pytest does not show what an xdist worker writes: a worker's summary lines travel on the
item's report and the controller writes them (no live line). Output capture is suspended
while a line is written, as pytest's live logging does.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from inferlink_audit.progress import Progress

__all__ = [
    "INI_PROGRESS_AFTER",
    "StepLines",
    "WorkerSteps",
    "progress_after",
    "progress_for",
    "progress_lines",
    "running_on_ci",
]

INI_PROGRESS_AFTER = "inferlink_progress_after"
DEFAULT_PROGRESS_AFTER = 3.0
_REDRAW_S = 0.1  # at most ten live redraws a second


def running_on_ci() -> bool:
    """What pytest itself calls CI (``_pytest.assertion.util.running_on_ci``)."""
    return any(name in os.environ for name in ("CI", "BUILD_NUMBER"))


@dataclass
class _Step:
    label: str
    total: int | None
    unit: str
    examples: int | None
    started: float
    done: int = 0
    drawn: float | None = None  # when the live line was last drawn

    def summary(self, seconds: float) -> str:
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        examples = "" if self.examples is None else f", {self.examples} examples"
        units = self.unit + ("es" if self.unit.endswith(("ch", "s", "x")) else "s")
        return f"inferlink-audit: {self.label}: {count} {units}{examples}, {seconds:.1f} s"


@dataclass
class StepLines:
    """The sink of every spec's session in one pytest process (``Progress``): a stack of
    running steps, the innermost shown."""

    reporter: pytest.TerminalReporter
    capture: object | None  # pytest's CaptureManager, when capturing
    live: bool
    after: float
    clock: Callable[[], float] = time.monotonic
    _steps: list[_Step] = field(default_factory=list)
    _saved_prefix: object = None
    _wrote: bool = False

    def begin(self, label: str, total: int | None, unit: str, examples: int | None) -> None:
        self._steps.append(_Step(label, total, unit, examples, self.clock()))

    def advance(self, n: int = 1) -> None:
        if not self._steps:
            return
        step = self._steps[-1]
        step.done += n
        now = self.clock()
        if not self.live or now - step.started < self.after:
            return
        if step.drawn is None or now - step.drawn >= _REDRAW_S:
            step.drawn = now
            self._write(lambda: self.reporter.rewrite(self._live_line(step, now), erase=True))

    def end(self) -> None:
        if not self._steps:
            return
        step = self._steps.pop()
        seconds = self.clock() - step.started
        if seconds >= self.after:
            self._write(lambda: self._finish(step, seconds))
        if not self._steps and self._wrote:
            self._write(self._restore_prefix)

    def show(self, lines: list[str]) -> None:
        """Summary lines of steps that an xdist worker ran, each on a line of its own."""
        for line in lines:
            writer = getattr(self.reporter, "_tw", None)
            if getattr(writer, "width_of_current_line", 0):
                self.reporter.write("\n")
            self.reporter.write(f"{line}\n")
        self.reporter.currentfspath = None  # the line pytest had open is ended
        self.reporter.flush()

    # ----------------------------------------------------------------- writing
    def _live_line(self, step: _Step, now: float) -> str:
        from tqdm import tqdm

        prefix = step.label if step.examples is None else f"{step.label} ({step.examples} examples)"
        return tqdm.format_meter(
            step.done,
            step.total,
            now - step.started,
            ncols=max(40, shutil.get_terminal_size().columns - 1),
            prefix=prefix,
            unit=step.unit,
        )

    def _finish(self, step: _Step, seconds: float) -> None:
        if step.drawn is not None:  # the live line becomes the summary
            self.reporter.rewrite(step.summary(seconds), erase=True)
            self.reporter.write("\n")
        else:
            self.reporter.write_line(step.summary(seconds))

    def _write(self, action: Callable[[], None]) -> None:
        if not self._wrote:
            # Leave pytest's line (the file and its results so far) as it is, below it ours.
            self._saved_prefix = self.reporter.currentfspath
            self._wrote = True
            self._suspended(self.reporter.ensure_newline)
        self._suspended(action)

    def _restore_prefix(self) -> None:
        """Write pytest's line prefix again, so the item's result lands after it."""
        prefix, self._saved_prefix, self._wrote = self._saved_prefix, None, False
        if isinstance(prefix, Path):
            self.reporter.write(f"{self._relative(prefix)} ")
        elif isinstance(prefix, str):
            self.reporter.write(prefix)
        else:
            return
        self.reporter.currentfspath = prefix
        self.reporter.flush()

    def _relative(self, path: Path) -> str:
        try:
            return os.path.relpath(path, self.reporter.startpath)
        except ValueError:  # another drive (Windows)
            return str(path)

    def _suspended(self, action: Callable[[], None]) -> None:
        disabled = getattr(self.capture, "global_and_fixture_disabled", None)
        if disabled is None:
            action()
            return
        with disabled():
            action()
        self.reporter.flush()


@dataclass
class _SpecSteps:
    """One spec's view of the shared sink: its name before each step's label."""

    lines: StepLines | WorkerSteps
    name: str

    def begin(self, label: str, total: int | None, unit: str, examples: int | None) -> None:
        self.lines.begin(f"{self.name} {label}", total, unit, examples)

    def advance(self, n: int = 1) -> None:
        self.lines.advance(n)

    def end(self) -> None:
        self.lines.end()


def progress_after(config: pytest.Config) -> float:
    """The ini key's seconds (checked when the run starts: a typo is a usage error)."""
    raw = str(config.getini(INI_PROGRESS_AFTER) or "").strip()
    try:
        after = float(raw) if raw else DEFAULT_PROGRESS_AFTER
    except ValueError:
        after = -1.0
    if not after >= 0:  # also NaN
        raise pytest.UsageError(
            f"{INI_PROGRESS_AFTER} = {raw!r}: give the seconds after which a running step "
            "shows its progress, e.g. 3 (0: every step)."
        )
    return after


@dataclass
class WorkerSteps:
    """An xdist worker's sink: pytest shows nothing a worker writes, so the summary lines of
    its long steps travel on the item's report and the controller writes them
    (``StepLines.show``): one line per finished step, as in a CI log."""

    after: float
    clock: Callable[[], float] = time.monotonic
    _steps: list[_Step] = field(default_factory=list)
    _finished: list[str] = field(default_factory=list)

    def begin(self, label: str, total: int | None, unit: str, examples: int | None) -> None:
        self._steps.append(_Step(label, total, unit, examples, self.clock()))

    def advance(self, n: int = 1) -> None:
        if self._steps:
            self._steps[-1].done += n

    def end(self) -> None:
        if self._steps:
            step = self._steps.pop()
            seconds = self.clock() - step.started
            if seconds >= self.after:
                self._finished.append(step.summary(seconds))

    def take(self) -> list[str]:
        """The summary lines of the steps finished since the last call."""
        lines, self._finished = self._finished, []
        return lines


def progress_lines(config: pytest.Config, after: float) -> StepLines | WorkerSteps | None:
    """The process's sink, or None where nothing is shown (``-q``, no terminal reporter)."""
    if config.get_verbosity() < 0:
        return None
    if hasattr(config, "workerinput"):
        return WorkerSteps(after)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return None
    live = bool(reporter.isatty()) and not running_on_ci()
    capture = config.pluginmanager.get_plugin("capturemanager")
    return StepLines(reporter, capture, live=live, after=after)


def progress_for(lines: StepLines | WorkerSteps | None, name: str) -> Progress | None:
    """What a spec's session reports its steps to."""
    return None if lines is None else _SpecSteps(lines, name)
