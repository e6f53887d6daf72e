"""JobStore: enqueue, claim, finish and inspect durable jobs (synchronous; call it from a thread).

Claiming is safe with any number of processes on PostgreSQL (`FOR UPDATE SKIP LOCKED`: two
workers never take the same row) and within one process on SQLite (the write transaction is
`BEGIN IMMEDIATE`, so claims serialise). A claimed job carries a lease; a worker renews it while
the handler runs. When a worker dies (kill -9), its lease runs out and another worker, or the same
server after a restart, takes the job over: an accepted job is never silently dropped. Handlers
must therefore be idempotent (deliveries key on the message id, analyses on the input's hash).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel

from .tables import QueueJob

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class JobInfo:
    id: str
    task: str
    payload: dict[str, Any]
    status: str
    attempts: int
    max_attempts: int
    dedupe_key: str | None
    run_after: datetime
    last_error: str | None
    result: dict[str, Any] | None
    created: datetime
    updated: datetime
    # claimed only to be failed: its worker died during the last allowed attempt
    exhausted: bool = False

    @classmethod
    def of(cls, row: QueueJob, *, exhausted: bool = False) -> "JobInfo":
        return cls(
            id=row.id, task=row.task, payload=json.loads(row.payload), status=row.status,
            attempts=row.attempts, max_attempts=row.max_attempts, dedupe_key=row.dedupe_key,
            run_after=row.run_after, last_error=row.last_error,
            result=json.loads(row.result) if row.result else None, created=row.created, updated=row.updated,
            exhausted=exhausted,
        )


def create_queue_table(engine: Engine) -> None:
    SQLModel.metadata.create_all(engine, tables=[QueueJob.__table__])


def enqueue_in(
    session: Session,
    task: str,
    payload: dict[str, Any],
    *,
    dedupe_key: str | None = None,
    delay_s: float = 0.0,
    max_attempts: int = 5,
    job_id: str | None = None,
) -> str:
    """Add a job inside the caller's transaction (commits or rolls back with it). With a
    `dedupe_key` already present, the existing job's id is returned and nothing is added."""
    if dedupe_key is not None:
        existing = session.execute(select(QueueJob.id).where(QueueJob.dedupe_key == dedupe_key)).scalar()
        if existing is not None:
            return existing
    now = _utcnow()
    row = QueueJob(
        id=job_id or uuid.uuid4().hex, task=task, payload=json.dumps(payload, separators=(",", ":")),
        status="queued", attempts=0, max_attempts=max_attempts, dedupe_key=dedupe_key,
        run_after=now + timedelta(seconds=max(0.0, delay_s)), created=now, updated=now,
    )
    session.add(row)
    session.flush()
    return row.id


def cancel_in(session: Session, job_id: str, reason: str = "cancelled") -> bool:
    """Cancel a job that has not finished, inside the caller's transaction (e.g. together with the
    Task resource that tracks it). A running handler notices at its next lease renewal."""
    res = session.execute(
        update(QueueJob)
        .where(QueueJob.id == job_id, QueueJob.status.in_(ACTIVE))
        .values(status="cancelled", last_error=reason, locked_by=None, lease_until=None, updated=_utcnow())
    )
    return res.rowcount == 1


class JobStore:
    def __init__(self, engine: Engine, *, lease_s: float = 60.0) -> None:
        self.engine = engine
        self.lease_s = lease_s
        create_queue_table(engine)

    def _session(self, write: bool = True) -> Session:
        bind = self.engine
        if write and engine_is_sqlite(self.engine):
            from fhir_server.storage.engine import WRITE_OPTION

            bind = self.engine.execution_options(**{WRITE_OPTION: True})
        return Session(bind, expire_on_commit=False)

    # ---- producing ------------------------------------------------------------------------
    def enqueue(self, task: str, payload: dict[str, Any], **kwargs: Any) -> str:
        with self._session() as session:
            try:
                job_id = enqueue_in(session, task, payload, **kwargs)
                session.commit()
                return job_id
            except IntegrityError:  # a concurrent twin with the same dedupe key won
                session.rollback()
                found = session.execute(
                    select(QueueJob.id).where(QueueJob.dedupe_key == kwargs.get("dedupe_key"))
                ).scalar()
                if found is None:
                    raise
                return found

    # ---- consuming ------------------------------------------------------------------------
    def claim(self, worker_id: str, tasks: list[str], *, limit: int = 1) -> list[JobInfo]:
        """Take up to `limit` ready jobs of these tasks (queued and due, or running with an
        expired lease) and lease them to `worker_id`. Each claim counts as one attempt, except a
        job whose worker died during its last allowed attempt: it comes back `exhausted`, for the
        worker to fail (and call the task's failure hook) instead of running it again."""
        if not tasks or limit <= 0:
            return []
        now = _utcnow()
        with self._session() as session:
            stmt = (
                select(QueueJob)
                .where(
                    QueueJob.task.in_(tasks),
                    or_(
                        and_(QueueJob.status == "queued", QueueJob.run_after <= now),
                        and_(QueueJob.status == "running", QueueJob.lease_until < now),
                    ),
                )
                .order_by(QueueJob.run_after)
                .limit(limit)
            )
            if self.engine.dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            rows = list(session.execute(stmt).scalars())
            claimed = []
            for row in rows:
                # its worker died during the last allowed attempt: leased to this worker only to be
                # failed (with its failure hook), rather than run again or looped over forever
                exhausted = row.status == "running" and row.attempts >= row.max_attempts
                row.status, row.locked_by = "running", worker_id
                row.lease_until = now + timedelta(seconds=self.lease_s)
                row.attempts += 0 if exhausted else 1
                row.updated = now
                claimed.append((row, exhausted))
            session.commit()
            return [JobInfo.of(r, exhausted=e) for r, e in claimed]

    def renew(self, job_id: str, worker_id: str) -> bool:
        """Extend the lease; False when the job is no longer ours (taken over or cancelled)."""
        now = _utcnow()
        with self._session() as session:
            result = session.execute(
                update(QueueJob)
                .where(QueueJob.id == job_id, QueueJob.locked_by == worker_id, QueueJob.status == "running")
                .values(lease_until=now + timedelta(seconds=self.lease_s), updated=now)
            )
            session.commit()
            return result.rowcount == 1

    def complete(self, job_id: str, worker_id: str, result: dict[str, Any] | None = None) -> bool:
        return self._finish(job_id, worker_id, status="done", result=result)

    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a running job back unfinished (graceful shutdown): queued again at once for any
        worker, and the interrupted attempt is not counted."""
        now = _utcnow()
        with self._session() as session:
            res = session.execute(
                update(QueueJob)
                .where(QueueJob.id == job_id, QueueJob.locked_by == worker_id, QueueJob.status == "running")
                .values(status="queued", run_after=now, attempts=case((QueueJob.attempts > 0, QueueJob.attempts - 1), else_=0),
                        locked_by=None, lease_until=None, updated=now)
            )
            session.commit()
            return res.rowcount == 1

    def fail(
        self, job_id: str, worker_id: str, error: str, *, retry_in_s: float | None,
        result: dict[str, Any] | None = None,
    ) -> str:
        """Record a failed attempt: back to `queued` after `retry_in_s` while attempts remain,
        else `failed`. `result` (optional) is stored on the job. Returns the new status ('' when
        the job was no longer ours)."""
        now = _utcnow()
        with self._session() as session:
            row = session.get(QueueJob, job_id)
            if row is None or row.locked_by != worker_id or row.status != "running":
                return ""
            if retry_in_s is not None and row.attempts < row.max_attempts:
                row.status, row.run_after = "queued", now + timedelta(seconds=retry_in_s)
            else:
                row.status = "failed"
            row.last_error, row.locked_by, row.lease_until, row.updated = error[:4000], None, None, now
            if result is not None:
                row.result = json.dumps(result)
            session.commit()
            return row.status

    def _finish(self, job_id: str, worker_id: str, *, status: str, result: dict[str, Any] | None) -> bool:
        now = _utcnow()
        with self._session() as session:
            res = session.execute(
                update(QueueJob)
                .where(QueueJob.id == job_id, QueueJob.locked_by == worker_id, QueueJob.status == "running")
                .values(status=status, locked_by=None, lease_until=None, updated=now,
                        result=json.dumps(result) if result is not None else None)
            )
            session.commit()
            return res.rowcount == 1

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Cancel a job that has not finished. A running handler notices at its next renew."""
        with self._session() as session:
            done = cancel_in(session, job_id, reason)
            session.commit()
            return done

    # ---- inspecting -----------------------------------------------------------------------
    def get(self, job_id: str) -> JobInfo | None:
        with self._session(write=False) as session:
            row = session.get(QueueJob, job_id)
            return JobInfo.of(row) if row is not None else None

    def find(self, dedupe_key: str) -> JobInfo | None:
        with self._session(write=False) as session:
            row = session.execute(select(QueueJob).where(QueueJob.dedupe_key == dedupe_key)).scalar()
            return JobInfo.of(row) if row is not None else None

    def list(self, *, task: str | None = None, status: str | None = None, limit: int = 100) -> list[JobInfo]:
        with self._session(write=False) as session:
            stmt = select(QueueJob).order_by(QueueJob.created.desc()).limit(limit)
            if task:
                stmt = stmt.where(QueueJob.task == task)
            if status:
                stmt = stmt.where(QueueJob.status == status)
            return [JobInfo.of(r) for r in session.execute(stmt).scalars()]

    def depth(self) -> dict[str, tuple[int, float]]:
        """Per task: (jobs waiting or running, age in seconds of the oldest one)."""
        now = _utcnow()
        with self._session(write=False) as session:
            rows = session.execute(
                select(QueueJob.task, func.count(), func.min(QueueJob.created))
                .where(QueueJob.status.in_(ACTIVE))
                .group_by(QueueJob.task)
            ).all()
        return {task: (count, (now - oldest).total_seconds() if oldest else 0.0) for task, count, oldest in rows}


def engine_is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
