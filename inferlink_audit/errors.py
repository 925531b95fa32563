"""Errors a user can cause. Each message is one paragraph, shown as is, without a traceback.

Real bugs are never wrapped in these: they keep their traceback. An error knows the spec key
it is about (``model.checkpoint``, ``data.path``) when the code that raises it knows; where
that key sits in the spec file is attached later (:func:`spec_loader.located_errors`), by
the code that knows which spec asked for the work, and shown before the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A key's path in the spec: ("attacks", 1, "eps") is attacks[1].eps.
KeyPath = tuple[str | int, ...]

_MAX_LISTED = 8


def dotted_key(path: KeyPath) -> str:
    """``path`` as the spec writes it: ``filtering.thresholds``, ``attacks[1].eps``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


@dataclass(frozen=True)
class Location:
    """Where in a spec file an error belongs: the file as shown (``""`` for a spec built in
    code) and the line of the key (None when the file does not set it)."""

    file: str
    line: int | None

    def prefix(self, key: KeyPath, message: str) -> str:
        """``spec.yaml:LINE: key: message``, without repeating what ``message`` already says."""
        dotted = dotted_key(key)
        where = self.file + (f":{self.line}" if self.file and self.line is not None else "")
        if self.file and message.startswith(self.file):
            return message
        if message.startswith(dotted) or not dotted:
            return f"{where}: {message}" if where else message
        return f"{where}: {dotted}: {message}" if where else f"{dotted}: {message}"


class AuditError(Exception):
    """Base of every user-facing error: bad spec, unreadable model or data, missing device.

    ``key`` names the spec key responsible, when the raising code knows it; ``location``,
    once set, puts ``spec.yaml:LINE: key:`` before the message.
    """

    def __init__(self, message: str, *, key: KeyPath = ()) -> None:
        super().__init__(message)
        self.key_path: KeyPath = key
        self.location: Location | None = None

    @property
    def key(self) -> str:
        """The key as the spec writes it (``attacks[1].eps``), or ``""`` when none is known."""
        return dotted_key(self.key_path)

    def __str__(self) -> str:
        message = super().__str__()
        return message if self.location is None else self.location.prefix(self.key_path, message)


class SpecError(AuditError):
    """The audit spec is not valid: YAML syntax, unknown key, wrong type, impossible value.

    Its message already reads ``file:line: key: problem``; ``path`` and ``line`` say the same
    for code that inspects it.
    """

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, key: KeyPath = ()
    ) -> None:
        super().__init__(message, key=key)
        self.path = path
        self.line = line


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
