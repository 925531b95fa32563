"""The audit plugin object: collects specs, runs their sessions, and reports at the end.

Items measure; the controller reports. Each item attaches what it measured (JSON) to its
call report, the controller gathers those in ``pytest_runtest_logreport`` and, at session
finish, builds one ``AuditResult`` from them. Serial runs and xdist runs take exactly the
same path (on xdist the reports merely travel from the workers first), so both write the
same ``results.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .progress import StepLines, WorkerSteps, progress_after, progress_for, progress_lines
from .stash import PAYLOAD_KEY, SESSIONS_KEY

if TYPE_CHECKING:
    from inferlink_audit.audit import AuditSession
    from inferlink_audit.cache import DiskSweepCache
    from inferlink_audit.results import AuditResult
    from inferlink_audit.shards import Shard
    from inferlink_audit.spec import AuditSpec

    from .assemble import SpecStats

__all__ = ["PROGRESS_ATTR", "REPORT_ATTR", "STEP_SUMMARY_ENV", "AuditPlugin"]

# The report attribute that carries an item's measurements from a worker to the controller.
REPORT_ATTR = "inferlink_payload"
# The summary lines of a worker's long steps, which the controller writes (progress.py).
PROGRESS_ATTR = "inferlink_progress"
STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
CACHE_FOLDER = "inferlink-audit"


def xdist_worker_index(config: pytest.Config) -> int | None:
    """This process's pytest-xdist worker number (``gw3`` -> 3), None on the controller or in
    a serial run; with several GPUs, worker i runs its specs on ``cuda:(i mod count)``."""
    workerinput = getattr(config, "workerinput", None)
    worker_id = workerinput.get("workerid") if workerinput is not None else None
    worker_id = worker_id or os.environ.get("PYTEST_XDIST_WORKER", "")
    digits = str(worker_id).removeprefix("gw")
    return int(digits) if workerinput is not None and digits.isdigit() else None


class AuditPlugin:
    """Registered while specs are configured; one per pytest process (controller or worker).

    It is the ``AuditHost`` that spec files and items find in ``config.stash``; the spec files
    themselves are collected by the entry point, so this module never imports ``items``.
    """

    def __init__(
        self, config: pytest.Config, specs: list[Path], *, report_dir: Path, device: str | None
    ) -> None:
        self.config = config
        self.specs = specs
        self.report_dir = report_dir
        self.device = device
        self.is_worker = hasattr(config, "workerinput")
        self.worker = xdist_worker_index(config)
        self._spec_set = frozenset(specs)
        self._cache: DiskSweepCache | None = None
        self._cache_ready = False
        self._lines: StepLines | WorkerSteps | None = None
        self._progress_after = progress_after(config)
        self._step_lines_ready = False
        self._seq = 0
        self._t0 = time.perf_counter()
        self._payloads: dict[str, str] = {}
        self._collect_errors: dict[str, str] = {}
        self.result: AuditResult | None = None
        self.stats: list[SpecStats] = []
        self.written: list[Path] = []
        self.problems: list[str] = []
        self.shard: Shard | None = None  # --inferlink-shard: write shard files, not a report
        self.shard_notes: dict[str, str] = {}

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        where = "no disk cache" if getattr(config, "cache", None) is None else "sweeps cached"
        count = f"{len(self.specs)} spec{'s' if len(self.specs) != 1 else ''}"
        if self.shard is not None:  # a shard writes its results for merge, no report
            head = f"inferlink-audit: {count}, shard {self.shard}"
            return [f"{head}, results: {self.report_dir} ({where})"]
        return [f"inferlink-audit: {count}, report: {self.report_dir} ({where})"]

    # ----------------------------------------------------------------- collection
    def spec_index(self, path: Path) -> int:
        """Position of a spec in the configured order (fixes the order of models in results)."""
        for index, spec in enumerate(self.specs):
            if spec == path or spec == path.resolve():
                return index
        return len(self.specs)

    def is_spec(self, path: Path) -> bool:
        # Any file named on the command line is a spec; resolving (for symlinked folders) is
        # worth its system call only for files that look like one.
        return path in self._spec_set or (
            path.suffix in (".yaml", ".yml") and path.resolve() in self._spec_set
        )

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed and report.nodeid.endswith((".yaml", ".yml")):
            self._collect_errors[report.nodeid] = str(report.longrepr).strip()

    # ----------------------------------------------------------------- execution
    @property
    def cache(self) -> DiskSweepCache | None:
        """Sweeps on disk in pytest's cache dir; none when the cacheprovider is disabled."""
        if not self._cache_ready:
            self._cache_ready = True
            pytest_cache = getattr(self.config, "cache", None)
            if pytest_cache is not None:
                from inferlink_audit.cache import DiskSweepCache

                self._cache = DiskSweepCache(pytest_cache.mkdir(CACHE_FOLDER))
        return self._cache

    def session_for(self, path: Path, spec: AuditSpec) -> AuditSession:
        """The spec's session in this process, created on the first item that runs."""
        sessions = self.config.stash.setdefault(SESSIONS_KEY, {})
        session = sessions.get(path)
        if session is None:
            from inferlink_audit.audit import AuditSession
            from inferlink_audit.spec_loader import load_spec

            self._share_cores()
            session = AuditSession(
                spec,
                device=self.device,
                cache=self.cache,
                output_dir=self.report_dir,
                worker=self.worker,
            )
            session.progress = progress_for(self._step_lines(), spec.name)
            # compare: share the compared specs' sessions (they are collected as specs too)
            session.peer_factory = lambda peer: self.session_for(peer, load_spec(peer))
            sessions[path] = session
        return session

    def _step_lines(self) -> StepLines | WorkerSteps | None:
        """Where every session of this process shows its long steps (progress.py)."""
        if not self._step_lines_ready:
            self._step_lines_ready = True
            self._lines = progress_lines(self.config, self._progress_after)
        return self._lines

    def _share_cores(self) -> None:
        """On an xdist worker, give torch its share of the cores: N workers each spinning
        os.cpu_count() threads slow a sweep down by orders of magnitude on a small machine."""
        workerinput = getattr(self.config, "workerinput", None)
        if workerinput is None or os.environ.get("OMP_NUM_THREADS"):
            return
        import torch

        workers = int(workerinput.get("workercount", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if call.when == "call":
            payload = item.stash.get(PAYLOAD_KEY, None)
            if payload is not None:
                setattr(report, REPORT_ATTR, payload)
            if isinstance(self._lines, WorkerSteps):
                finished = self._lines.take()
                if finished:
                    setattr(report, PROGRESS_ATTR, finished)
        return report

    # xdist sends reports as dicts; state the payload's passage explicitly rather than rely on
    # pytest copying unknown report attributes.
    @pytest.hookimpl(wrapper=True)
    def pytest_report_to_serializable(
        self, config: pytest.Config, report: pytest.CollectReport | pytest.TestReport
    ) -> Generator[None, dict[str, Any] | None, dict[str, Any] | None]:
        data = yield
        for attr in (REPORT_ATTR, PROGRESS_ATTR):
            value = getattr(report, attr, None)
            if data is not None and value is not None:
                data[attr] = value
        return data

    @pytest.hookimpl(wrapper=True)
    def pytest_report_from_serializable(
        self, config: pytest.Config, data: dict[str, Any]
    ) -> Generator[None, Any, Any]:
        report = yield
        for attr in (REPORT_ATTR, PROGRESS_ATTR):
            if report is not None and data.get(attr) is not None:
                setattr(report, attr, data[attr])
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        payload = getattr(report, REPORT_ATTR, None)
        if payload is not None and not self.is_worker:
            self._payloads[report.nodeid] = payload
        finished: list[str] | None = getattr(report, PROGRESS_ATTR, None)
        if finished and not self.is_worker:
            lines = self._step_lines()
            if isinstance(lines, StepLines):
                lines.show(finished)

    # ----------------------------------------------------------------- reporting
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._t0 = time.perf_counter()

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.is_worker or not self._payloads:
            return
        from inferlink_audit.errors import AuditError
        from inferlink_audit.report import render_report
        from inferlink_audit.results import write_results

        from .assemble import assemble_result, spec_stats
        from .ci import finding_lines, step_summary

        payloads = [json.loads(text) for text in self._payloads.values()]
        self.stats = spec_stats(payloads)
        self.result = assemble_result(payloads, seconds=time.perf_counter() - self._t0)
        self.problems.extend(finding_lines(self.result))
        if self.shard is not None:
            self._write_shards(payloads)
        elif self.result is not None:
            try:
                self.written.append(write_results(self.result, self.report_dir / "results.json"))
                self.written.append(render_report(self.result, self.report_dir))
            except (OSError, AuditError) as exc:
                self.problems.append(f"could not write the report to {self.report_dir}: {exc}")
        summary_path = os.environ.get(STEP_SUMMARY_ENV)
        if summary_path:
            report_path = self.written[-1] if self.written and self.shard is None else None
            text = step_summary(
                self.result, self.stats, report_path, self._collect_errors, self.shard_notes
            )
            try:
                with open(summary_path, "a", encoding="utf-8") as handle:
                    handle.write(text)
            except OSError as exc:
                self.problems.append(f"could not append to ${STEP_SUMMARY_ENV} ({exc})")

    def _write_shards(self, payloads: list[dict[str, Any]]) -> None:
        """A shard writes each spec's part for ``inferlink-audit merge``; a report of a part
        would read as the whole audit's, so merge writes the report."""
        from inferlink_audit.errors import AuditError
        from inferlink_audit.results import write_results

        from .sharding import shard_files

        assert self.shard is not None
        seconds = time.perf_counter() - self._t0
        try:
            parts = shard_files(payloads, self.shard, self.report_dir, seconds=seconds)
            for part in parts:
                self.shard_notes.update(part.notes)
            for part in parts:
                self.written.append(write_results(part.result, part.path))
        except (OSError, AuditError) as exc:
            self.problems.append(f"could not write the shard's results to {self.report_dir}: {exc}")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.is_worker or not (self.stats or self._collect_errors):
            return
        from .ci import terminal_lines

        terminalreporter.write_sep("=", "inferlink-audit")
        lines = terminal_lines(
            self.stats, self._collect_errors, self.written, self.problems, self.shard_notes
        )
        for line in lines:
            terminalreporter.write_line(line)
