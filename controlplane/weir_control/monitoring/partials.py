"""Drift windows across several control-plane replicas.

Data planes attach to any replica, so each replica sees a share of an endpoint's records. Every
replica counts its share into its own open windows (aligned on the request's time, so the replicas'
windows of one endpoint start at the same instants). When a window closes, a replica that does not
hold the singleton lease hands it in: one ``drift_partials`` row with its mergeable profile (sketches,
exact bin counts, category counts) and its feedback-label counts. The lease holder waits
``MERGE_DELAY_SECONDS`` more, then, in one transaction fenced by the lease, merges its own window with
every partial of that window, stores the judged window, deletes the partials and reserves the window's
action. A window is judged once: a holder that lost the lease fails the fence and rolls back (its own
share is then handed in for the next holder), and a partial that comes after its window was judged is
deleted and counted late.

What a handover loses: the records a replica holds in memory and has not handed in. Every replica hands
in what its open windows took every ``HAND_IN_SECONDS`` (on PostgreSQL), so a replica that dies (the
holder or another) loses the records of its last second or so, plus what its data planes had sampled
and not shipped yet (they ship about twice a second); the other replicas' shares are in the database or
in their memory, and the next holder judges the windows from them. ``bench/drift_handover.py``
measures it (without the periodic hand-in, a dying replica lost its whole open windows: up to
window + grace + merge delay of its records).

Feedback labels come to any replica too, and a label counts where its request's prediction is
remembered: the replica that took the record. A label the replica that got it cannot match is posted
to ``drift_labels``; every replica reads the posted labels (``LabelMailbox``) and holds them like its own
(a label may come before its record); the one that remembers the request claims the row (deletes it)
and counts it, so a label counts once. The holder counts the rows nobody claimed within the hold
period as unmatched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import Connection, and_, delete, func, insert, or_, select

from weir_control.store.schema import DRIFT_LABELS, DRIFT_PARTIALS, DRIFT_WINDOWS

log = logging.getLogger(__name__)

# A holder judges a window this long after it closed, so the other replicas (which hand in on their
# 0.5 s tick, or at their next record) have handed their shares in.
MERGE_DELAY_SECONDS = 2.0
# Every replica also hands in what its open windows took so far this often (see DriftMonitor._checkpoint):
# what a dying replica loses is about this long of its records, not its whole open windows.
HAND_IN_SECONDS = 1.0
# An id below the highest read may still commit (PostgreSQL sequences hand ids out before commit): it
# is looked for this long before it is taken for a rolled-back insert.
LABEL_GAP_SECONDS = 10.0
MAX_LABEL_GAPS = 1000  # ids looked for at most (a larger gap: the ones nearest the highest read)
MAX_LABELS_READ = 20_000  # per read: the rest on the next tick


@dataclass
class Partial:
    replica: str
    records: int
    correct: int
    labelled: int
    ddm_state: str
    profile: bytes


def hand_in(connection: Connection, endpoint: str, start: float, due_at: float, partial: Partial) -> None:
    """One replica's share of a closed window (the caller's transaction)."""
    connection.execute(
        insert(DRIFT_PARTIALS).values(
            endpoint=endpoint,
            start=start,
            due_at=due_at,
            replica=partial.replica,
            records=partial.records,
            correct=partial.correct,
            labelled=partial.labelled,
            ddm_state=partial.ddm_state,
            profile=partial.profile,
        )
    )


def take(connection: Connection, endpoint: str, start: float) -> list[Partial]:
    """Every partial handed in for the window, removed (they commit or roll back with the caller's
    transaction, which is fenced: only the holder takes them)."""
    columns = DRIFT_PARTIALS.c
    where = and_(columns.endpoint == endpoint, columns.start == start)
    rows = connection.execute(
        select(
            columns.id, columns.replica, columns.records, columns.correct, columns.labelled, columns.ddm_state,
            columns.profile,
        ).where(where).order_by(columns.id)
    ).all()  # fmt: skip
    if rows:
        connection.execute(delete(DRIFT_PARTIALS).where(columns.id.in_([row.id for row in rows])))
    return [
        Partial(row.replica, int(row.records), int(row.correct), int(row.labelled), row.ddm_state, row.profile)
        for row in rows
    ]


def due(connection: Connection, closed_before: float) -> list[tuple[str, float]]:
    """(endpoint, start) of the windows with partials handed in before ``closed_before``, oldest first."""
    columns = DRIFT_PARTIALS.c
    query = (
        select(columns.endpoint, columns.start)
        .where(columns.due_at <= closed_before)
        .group_by(columns.endpoint, columns.start)
        .order_by(columns.start, columns.endpoint)
    )
    return [(row.endpoint, float(row.start)) for row in connection.execute(query)]


def judged(connection: Connection, endpoint: str, start_at: object) -> bool:
    """Whether a window of the endpoint starting at ``start_at`` (a datetime) is stored already."""
    columns = DRIFT_WINDOWS.c
    query = select(columns.id).where(columns.endpoint == endpoint, columns.start == start_at).limit(1)
    return connection.execute(query).first() is not None


def late_records(partials: list[Partial]) -> Iterator[tuple[str, int]]:
    """(replica, records) of partials that came after their window was judged: their records are logged,
    not counted (their labels are: ``ReplicatedWindows._late_labels``)."""
    for partial in partials:
        if partial.records:
            log.warning(
                "drift records came after their window was judged: not counted",
                extra={"replica": partial.replica, "records": partial.records},
            )
        yield partial.replica, partial.records


@dataclass
class PostedLabel:
    id: int
    endpoint: str
    request_id: str
    label: str


def post_labels(connection: Connection, endpoint: str, labels: list[tuple[str, str]], at: float) -> dict[str, int]:
    """(request id, label) pairs this replica could not match, for every replica to read; request id ->
    its row."""
    rows = [{"endpoint": endpoint, "request_id": request, "label": label, "at": at} for request, label in labels]
    if not rows:
        return {}
    posted = connection.execute(insert(DRIFT_LABELS).returning(DRIFT_LABELS.c.id, DRIFT_LABELS.c.request_id), rows)
    return {row.request_id: int(row.id) for row in posted}


def claim_label(connection: Connection, label_id: int) -> bool:
    """Whether this replica took the label (it was still there): the only one that counts it."""
    return bool(connection.execute(delete(DRIFT_LABELS).where(DRIFT_LABELS.c.id == label_id)).rowcount)


def expire_labels(connection: Connection, before: float) -> dict[str, int]:
    """Per endpoint, the posted labels nobody claimed since ``before``, removed."""
    columns = DRIFT_LABELS.c
    query = select(columns.endpoint, func.count()).where(columns.at < before).group_by(columns.endpoint)
    counts = {row[0]: int(row[1]) for row in connection.execute(query)}
    if counts:
        connection.execute(delete(DRIFT_LABELS).where(columns.at < before))
    return counts


@dataclass
class LabelMailbox:
    """This replica's reading position in ``drift_labels``: the highest id read, and the ids below it
    not seen yet (an insert that commits after a later one), each looked for until it is too old."""

    after: int = -1  # none read yet: the first read takes every posted label
    missing: dict[int, float] = field(default_factory=dict)

    def read(self, connection: Connection) -> list[PostedLabel]:
        columns = DRIFT_LABELS.c
        now = time.monotonic()
        self.missing = {gap: since for gap, since in self.missing.items() if now - since < LABEL_GAP_SECONDS}
        where = columns.id > self.after
        if self.missing:
            where = or_(where, columns.id.in_(sorted(self.missing)))
        query = (
            select(columns.id, columns.endpoint, columns.request_id, columns.label)
            .where(where)
            .order_by(columns.id)
            .limit(MAX_LABELS_READ)
        )
        rows = [PostedLabel(int(row.id), row.endpoint, row.request_id, row.label) for row in connection.execute(query)]
        for row in rows:
            self.missing.pop(row.id, None)
            if row.id > self.after:
                if self.after >= 0:
                    gaps = range(max(self.after + 1, row.id - MAX_LABEL_GAPS), row.id)
                    self.missing.update((gap, now) for gap in gaps)
                self.after = row.id
        return rows
