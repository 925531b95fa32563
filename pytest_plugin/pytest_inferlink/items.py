"""Collection and execution: an audit spec is a ``pytest.File``, each planned check an ``Item``.

The skeleton is pytest's non-Python test example (``doc/en/example/nonpython``): ``collect``
turns a spec into items, a user's mistake becomes ``CollectError`` (one message, no
traceback), and ``repr_failure`` shows what a failing check measured instead of plugin code.
Only a real bug keeps its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from inferlink_audit.errors import AuditError

from .stash import PAYLOAD_KEY, PLUGIN_KEY

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr

    from inferlink_audit.checks import PlannedCheck
    from inferlink_audit.results import CheckResult
    from inferlink_audit.spec import AuditSpec

__all__ = ["MARKER", "CheckFailed", "CheckItem", "SpecFile"]

MARKER = "inferlink"


class CheckFailed(Exception):
    """A check's limit was not met; carries the result and the lines its failure shows."""

    def __init__(self, result: CheckResult, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.result = result
        self.lines = lines


class SpecFile(pytest.File):
    """One audit spec. Loading and planning are cheap (no torch): nothing runs at collection."""

    spec: AuditSpec
    spec_index: int

    def collect(self) -> Iterator[CheckItem]:
        from inferlink_audit.checks import plan_checks
        from inferlink_audit.spec_loader import load_spec

        try:
            spec = load_spec(self.path)
            planned = plan_checks(spec)
        except AuditError as exc:
            # The message already reads `file:line: key: problem`; a traceback would bury it.
            raise self.CollectError(str(exc)) from None
        self.spec = spec
        self.spec_index = self.config.stash[PLUGIN_KEY].spec_index(self.path)
        for index, check in enumerate(planned):
            name = f"{spec.name}[{check.id}]"
            item = CheckItem.from_parent(
                self,
                name=name,
                # Spelled out so pytest reads the bracket as parameters, as it does when it
                # parses a stored id: otherwise --lf / --ff do not recognise these items.
                nodeid=f"{self.nodeid}::{name}",
                planned=check,
                plan_index=index,
            )
            item.add_marker(MARKER)
            yield item


class CheckItem(pytest.Item):
    """One check of one spec (per filter and attack where it applies)."""

    def __init__(self, *, planned: PlannedCheck, plan_index: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.planned = planned
        self.plan_index = plan_index

    @property
    def spec_file(self) -> SpecFile:
        return cast(SpecFile, self.parent)

    def runtest(self) -> None:
        from inferlink_audit.cache import DiskSweepCache

        from .assemble import ItemRun, check_properties, error_check, failure_lines

        plugin = self.config.stash[PLUGIN_KEY]
        spec_file = self.spec_file
        session = plugin.session_for(spec_file.path, spec_file.spec)
        cache = session.cache if isinstance(session.cache, DiskSweepCache) else None
        computed_before = session.computed_sweeps
        hits_before = cache.hits if cache is not None else 0
        result: CheckResult | None = None
        error: BaseException | None = None
        try:
            result = session.evaluate(self.planned)
        except Exception as exc:
            error = exc
            self.user_properties.extend(
                check_properties(self.planned, error_check(self.planned, exc), session)
            )
            raise
        finally:
            if result is not None or error is not None:  # not on KeyboardInterrupt
                self.stash[PAYLOAD_KEY] = ItemRun(
                    spec=spec_file.spec,
                    spec_index=spec_file.spec_index,
                    planned=self.planned,
                    plan_index=self.plan_index,
                    session=session,
                    result=result,
                    error=error,
                    computed=session.computed_sweeps > computed_before,
                    from_cache=cache is not None and cache.hits > hits_before,
                    session_id=f"{os.getpid()}:{spec_file.spec_index}",
                    seq=plugin.next_seq(),
                    sharded=plugin.shard is not None,
                ).payload()
        self.user_properties.extend(check_properties(self.planned, result, session))
        if not result.passed:
            raise CheckFailed(result, failure_lines(result, self.planned, spec_file.spec, session))

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> str | TerminalRepr:
        exc = excinfo.value
        if isinstance(exc, CheckFailed):
            return message_repr(exc.lines, self.path, self.planned.line)
        if isinstance(exc, AuditError):
            lines = str(exc).splitlines() or [type(exc).__name__]
            return message_repr(lines, self.path, self.planned.line)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[os.PathLike[str] | str, int | None, str]:
        line = self.planned.line
        return self.path, (line - 1 if line else None), self.name


def message_repr(lines: list[str], path: Path, line: int | None) -> str | TerminalRepr:
    """The lines as the failure's whole text, with the first as its one-line message.

    A plain string would show the same text, but pytest's short summary (``FAILED id - …``)
    and JUnit's ``<failure message=…>`` read only ``longrepr.reprcrash``; these classes are
    what pytest itself builds for ``pytest.fail(pytrace=False)`` and they survive xdist's
    serialisation, so the one-line message reaches the controller too.
    """
    try:
        from _pytest._code.code import (
            ReprEntry,
            ReprExceptionInfo,
            ReprFileLocation,
            ReprTraceback,
        )

        entry = ReprEntry(lines, None, None, None, "value")
        return ReprExceptionInfo(
            reprtraceback=ReprTraceback([entry], None, "value"),
            reprcrash=ReprFileLocation(str(path), line or 0, lines[0]),
        )
    except (ImportError, TypeError):  # a pytest whose internals moved: the text still shows
        return "\n".join(lines)
