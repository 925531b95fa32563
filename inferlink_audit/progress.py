"""Progress of an audit's long steps (sweeps, attacks, remediation epochs, Lipschitz bounds).

The library says what it is doing through a ``Progress`` object that its caller gives it;
how that shows is the caller's business: the command line draws tqdm bars, the pytest plugin
writes through pytest's terminal reporter (live on a terminal, one line per finished step in
CI logs). Steps may nest (a sweep whose examples are crafted once, on the unfiltered network,
runs that attack inside it); a sink shows the innermost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = [
    "Progress",
    "TqdmProgress",
    "current_progress",
    "progress_step",
    "reset_progress",
    "set_progress",
    "tracked",
]

T = TypeVar("T")


class Progress(Protocol):
    """Where an audit reports the steps it runs: ``begin``, ``advance`` as work is done, ``end``."""

    def begin(self, label: str, total: int | None, unit: str, examples: int | None) -> None:
        """A step starts: ``total`` units of work (None: not known ahead) over ``examples``."""
        ...

    def advance(self, n: int = 1) -> None:
        """``n`` more units of the innermost step are done."""
        ...

    def end(self) -> None:
        """The innermost step is finished (or was interrupted)."""
        ...


# The sink sessions created from now on in this context report to (``AuditSession.progress``),
# so a caller reaches the sessions that ``run_audit`` and compared specs create inside.
_CURRENT: ContextVar[Progress | None] = ContextVar("inferlink_audit_progress", default=None)


def current_progress() -> Progress | None:
    """The sink set by ``set_progress`` in this context, if any."""
    return _CURRENT.get()


def set_progress(progress: Progress | None) -> Token[Progress | None]:
    """Make ``progress`` the sink of the sessions created from now on; ``reset_progress``
    with the returned token restores the previous one."""
    return _CURRENT.set(progress)


def reset_progress(token: Token[Progress | None]) -> None:
    _CURRENT.reset(token)


class TqdmProgress:
    """The command line's bars: one tqdm bar per running step, nested steps below their
    parent, each removed when its step ends (on stderr; ``disable`` draws nothing)."""

    def __init__(self, *, disable: bool, first_position: int = 0) -> None:
        self.disable = disable
        self.first_position = first_position
        self._bars: list[tqdm[None]] = []

    def begin(self, label: str, total: int | None, unit: str, examples: int | None) -> None:
        from tqdm.auto import tqdm

        desc = label if examples is None else f"{label} ({examples} examples)"
        position = self.first_position + len(self._bars)
        bar = tqdm(
            desc=desc, total=total, unit=unit, leave=False, disable=self.disable, position=position
        )
        self._bars.append(bar)

    def advance(self, n: int = 1) -> None:
        if self._bars:
            self._bars[-1].update(n)

    def end(self) -> None:
        if self._bars:
            self._bars.pop().close()

    def close(self) -> None:
        """Remove every bar still shown (a run that stopped on an error)."""
        while self._bars:
            self.end()


@contextmanager
def progress_step(
    progress: Progress | None,
    label: str,
    total: int | None,
    unit: str,
    examples: int | None = None,
) -> Iterator[None]:
    """One step reported to ``progress`` (nothing when it is None), ended also on an error."""
    if progress is None:
        yield
        return
    progress.begin(label, total, unit, examples)
    try:
        yield
    finally:
        progress.end()


def tracked(
    progress: Progress | None,
    items: Iterable[T],
    label: str,
    total: int | None,
    unit: str,
    examples: int | None = None,
) -> Iterator[T]:
    """``items`` as a step: one unit advanced as each item's work is done (when the next is
    asked for, or the loop ends)."""
    if progress is None:
        yield from items
        return
    with progress_step(progress, label, total, unit, examples):
        for item in items:
            yield item
            progress.advance()
