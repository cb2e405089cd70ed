"""The audit log: who changed what, when, and how it ended."""

from __future__ import annotations

import datetime

from sqlalchemy import insert, select

from weir_control.store.db import MAX_SEARCH_TEXT, Database, _decode_token, _encode_token, _page_size, _utc, now
from weir_control.store.schema import AUDIT_EVENTS
from weir_proto.control.v1 import audit_pb2
from weir_proto.errors import InvalidArgumentError


class AuditRecords(Database):
    # --- audit log -------------------------------------------------------------------------------

    def append_audit(self, event: audit_pb2.AuditEvent) -> None:
        with self._transaction() as connection:
            connection.execute(
                insert(AUDIT_EVENTS).values(
                    at=event.at.ToDatetime(datetime.UTC) if event.HasField("at") else now(),
                    actor=event.actor,
                    role=event.role,
                    action=event.action,
                    target=event.target,
                    before=event.before,
                    after=event.after,
                    result=event.result,
                    detail=event.detail,
                    outcome=event.outcome or _outcome_of(event.result),
                    count=max(1, event.count),
                )
            )

    def list_audit(self, request: audit_pb2.ListAuditEventsRequest) -> tuple[list[audit_pb2.AuditEvent], str]:
        limit = _page_size(request.page_size)
        for field in ("actor", "action", "target_prefix", "outcome"):
            if len(getattr(request, field)) > MAX_SEARCH_TEXT:
                raise InvalidArgumentError(
                    f"{field}: expected at most {MAX_SEARCH_TEXT} characters, got {len(getattr(request, field))}"
                )
        columns = AUDIT_EVENTS.c
        query = select(AUDIT_EVENTS).order_by(columns.id.desc()).limit(limit + 1)
        if request.actor:
            query = query.where(columns.actor == request.actor)
        if request.action:
            query = query.where(columns.action == request.action)
        if request.target_prefix:
            query = query.where(columns.target.startswith(request.target_prefix, autoescape=True))
        if request.outcome:
            query = query.where(columns.outcome == request.outcome)
        if request.HasField("since"):
            query = query.where(columns.at >= request.since.ToDatetime(datetime.UTC))
        after = _decode_token(request.page_token)
        if after is not None:
            query = query.where(columns.id < int(after[0]))
        with self._transaction() as connection:
            rows = list(connection.execute(query))
        events = []
        for row in rows[:limit]:
            event = audit_pb2.AuditEvent(
                id=row.id,
                actor=row.actor,
                role=row.role,
                action=row.action,
                target=row.target,
                before=row.before,
                after=row.after,
                result=row.result,
                detail=row.detail,
                outcome=row.outcome or _outcome_of(row.result),
                count=row._mapping["count"],  # not row.count: a Row is a tuple (tuple.count)
            )
            event.at.FromDatetime(_utc(row.at))
            events.append(event)
        return events, _encode_token([rows[limit - 1].id]) if len(rows) > limit else ""


REFUSED_RESULTS = frozenset(
    {
        "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
        "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED",
    }
)  # fmt: skip


def _outcome_of(result: str) -> str:
    """An event's outcome from its result: ok, refused (the caller's request was turned down and
    nothing changed) or failed."""
    if result == "OK":
        return "ok"
    return "refused" if result in REFUSED_RESULTS else "failed"
