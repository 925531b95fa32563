"""pytest-xdist: keep the items that share a sweep on one worker.

Imported only when xdist is installed and specs are configured. Items of one spec, filter
and attack form one work unit (a sweep is the expensive part, and a worker computes it once
for all the checks that read it); model-level checks form one unit per spec and attack-level
checks one per spec and attack. Other tests keep ``LoadScopeScheduling``'s grouping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

__all__ = ["SweepScheduling", "XdistHooks", "sweep_groups"]

# Distribution modes this scheduler replaces; loadfile already keeps a spec on one worker,
# and loadgroup/each are explicit choices the user made.
_REPLACED_MODES = ("load", "loadscope", "worksteal")


def sweep_groups(specs: list[Path]) -> dict[str, str]:
    """``name[check id]`` (a spec item's name) -> its work unit, read from the specs' plans."""
    from inferlink_audit.checks import plan_checks
    from inferlink_audit.errors import AuditError
    from inferlink_audit.spec_loader import load_spec

    groups: dict[str, str] = {}
    for path in specs:
        try:
            spec = load_spec(path)
        except AuditError:
            continue  # its collection error is reported by the workers
        for planned in plan_checks(spec):
            if planned.filter is not None:
                unit = f"{spec.name}|sweep|{planned.filter}|{planned.attack}"
            elif planned.attack is not None:
                unit = f"{spec.name}|attack|{planned.attack}"
            else:
                unit = f"{spec.name}|model"
            groups[f"{spec.name}[{planned.id}]"] = unit
    return groups


class SweepScheduling(LoadScopeScheduling):
    """``LoadScopeScheduling`` whose scope of a spec item is its sweep."""

    def __init__(self, config: pytest.Config, log: Any, groups: dict[str, str]) -> None:
        super().__init__(config, log)
        self._groups = groups

    def _split_scope(self, nodeid: str) -> str:
        head, sep, tail = nodeid.rpartition("::")
        if sep and head.endswith((".yaml", ".yml")):
            unit = self._groups.get(tail)
            if unit is not None:
                return f"{head}::{unit}"
        return super()._split_scope(nodeid)


class XdistHooks:
    """Registered on the controller by ``pytest_configure`` only when xdist is present."""

    def __init__(self, specs: list[Path]) -> None:
        self.specs = specs

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        if config.getoption("dist", "no") not in _REPLACED_MODES:
            return None
        return SweepScheduling(config, log, sweep_groups(self.specs))
