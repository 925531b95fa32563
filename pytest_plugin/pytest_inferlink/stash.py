"""What the plugin keeps in ``config.stash`` and ``item.stash`` (never in attributes of ``config``).

This module is the bottom of the plugin's imports: it holds only the keys and the
``AuditHost`` protocol, the part of the registered plugin object that collection and items
use. ``runner`` implements it, ``items`` reads it from the stash, and neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

if TYPE_CHECKING:
    from inferlink_audit.audit import AuditSession
    from inferlink_audit.shards import Shard
    from inferlink_audit.spec import AuditSpec

__all__ = ["PAYLOAD_KEY", "PLUGIN_KEY", "SESSIONS_KEY", "AuditHost"]


class AuditHost(Protocol):
    """The registered plugin object, as the spec files and their items see it."""

    # ``--inferlink-shard``: items then carry what a merge needs (per-example outcomes).
    shard: Shard | None

    def is_spec(self, path: Path) -> bool:
        """Whether ``path`` is one of the configured audit specs."""
        ...

    def spec_index(self, path: Path) -> int:
        """Position of a spec in the configured order (fixes the order of models in results)."""
        ...

    def session_for(self, path: Path, spec: AuditSpec) -> AuditSession:
        """The spec's lazily computed session in this process."""
        ...

    def next_seq(self) -> int:
        """A number that orders this process's item payloads."""
        ...


# The registered plugin object, present only while specs are configured.
PLUGIN_KEY: pytest.StashKey[AuditHost] = pytest.StashKey()

# One lazily computed AuditSession per spec file and pytest process (each xdist worker has its own).
SESSIONS_KEY: pytest.StashKey[dict[Path, AuditSession]] = pytest.StashKey()

# What an item measured, as JSON, until ``pytest_runtest_makereport`` moves it onto the report.
PAYLOAD_KEY: pytest.StashKey[str] = pytest.StashKey()
