"""The pytest plugin's result assembled from one session's items, without running pytest:
one payload per planned check, as the items write them, joined as the controller joins them."""

from __future__ import annotations

import json

from pytest_inferlink.assemble import ItemRun, assemble_result

from inferlink_audit.audit import AuditSession
from inferlink_audit.checks import plan_checks
from inferlink_audit.results import AuditResult


def assembled_from_items(
    session: AuditSession, *, session_id: str = "s", computed: bool = True
) -> AuditResult:
    payloads = [
        json.loads(
            ItemRun(
                spec=session.spec,
                spec_index=0,
                planned=planned,
                plan_index=index,
                session=session,
                result=session.evaluate(planned),
                error=None,
                computed=computed,
                from_cache=False,
                session_id=session_id,
                seq=index,
            ).payload()
        )
        for index, planned in enumerate(plan_checks(session.spec))
    ]
    result = assemble_result(payloads, seconds=0.0)
    assert result is not None
    return result
