"""Errors a user can cause. Each message is one paragraph, shown as is, without a traceback.

Real bugs are never wrapped in these: they keep their traceback.
"""

from __future__ import annotations


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
