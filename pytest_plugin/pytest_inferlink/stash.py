"""Keys for what the plugin keeps in ``config.stash`` (never in attributes of ``config``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from inferlink_audit.audit import AuditSession

    from .runner import AuditPlugin

__all__ = ["PLUGIN_KEY", "SESSIONS_KEY"]

# The registered plugin object, present only while specs are configured.
PLUGIN_KEY: pytest.StashKey[AuditPlugin] = pytest.StashKey()

# One lazily computed AuditSession per spec file and pytest process (each xdist worker has its own).
SESSIONS_KEY: pytest.StashKey[dict[Path, AuditSession]] = pytest.StashKey()
