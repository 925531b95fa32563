"""pytest plugin of inferlink-audit: audit specs collected as test items (README).

``pytest --inferlink-audit audit.yaml`` runs one item per filter, attack and check, writes
``results.json`` and ``report.html``, and fails the run when a check fails. The plugin is a
thin layer over the ``inferlink_audit`` library and imports it (and torch) only when a spec
is collected.
"""

from __future__ import annotations

__all__: list[str] = []
