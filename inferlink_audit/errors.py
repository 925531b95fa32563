"""Errors a user can cause. Each message is one paragraph, shown as is, without a traceback.

Real bugs are never wrapped in these: they keep their traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

_MAX_LISTED = 8


class AuditError(Exception):
    """Base of every user-facing error: bad spec, unreadable model or data, missing device."""


class SpecError(AuditError):
    """The audit spec is not valid: YAML syntax, unknown key, wrong type, impossible value."""

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, key: str = ""
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.key = key


class ModelLoadError(AuditError):
    """The model cannot be built, or its checkpoint cannot be read or does not fit it."""


class UnsafeFileError(ModelLoadError):
    """A file would run code when loaded (a pickle, a TorchScript archive) and was not trusted."""


class DataError(AuditError):
    """The test or training data cannot be read, or does not fit the model."""


class DeviceError(AuditError):
    """The requested device is not available here."""


class UnsupportedError(AuditError):
    """The spec is valid but asks for something this version cannot run yet."""


class IntegrityError(AuditError):
    """The model in memory was not restored bit-exactly after filtering: results are void."""


class ResourceError(AuditError):
    """The audit does not fit the machine: a batch runs out of memory on the device."""


class OutputError(AuditError):
    """The report folder cannot be written: it is a file, or read-only."""


# --------------------------------------------------------------------------- message parts
def one_line(exc: BaseException) -> str:
    """The informative line of an exception's message, so the error stays one paragraph.

    Usually the first line; torch's ``Error(s) in loading state_dict for Net:`` puts the
    detail on the next ones, and its weights-only refusal on the line naming the opcode.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    detail = [line for line in lines if line.startswith("Unsupported operand")]
    first = detail[0] if detail else lines[0]
    if first.endswith(":") and len(lines) > 1:
        first = " ".join([first, *lines[1:3]])
    return first if len(first) <= 300 else first[:297] + "..."


def listing(values: Sequence[str]) -> str:
    """At most eight names, then how many more, so a message stays one paragraph."""
    shown = ", ".join(values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return f"{shown}, … and {more} more" if more > 0 else shown
