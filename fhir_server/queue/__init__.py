"""Durable job queue: jobs survive restarts and crashes, spread over replicas, retry with back-off.

    from fhir_server.queue import TaskDef, TransientError, register_task, enqueue_in

    # at startup (a lifespan hook that runs after queue_lifespan, or before: registration is lazy)
    register_task(app, TaskDef("dicom.deliver", handler, max_attempts=10, backoff_s=5))

    # enqueue in the same transaction as the resources the job is about (outbox pattern):
    with repo.transaction() as tx:
        report = tx.create(...)
        enqueue_in(tx.session, "dicom.deliver", {"report": report.id}, dedupe_key=f"sr:{report.id}")
    app.state.queue_worker.wake()          # optional: start now instead of at the next poll

    # or on its own:
    app.state.queue.enqueue("dicom.deliver", {...}, dedupe_key=...)
    app.state.queue.get(job_id) / .list(task=..., status=...) / .cancel(job_id) / .depth()

Jobs: queued -> running -> done | failed | cancelled. TransientError (or the database going away)
-> queued again after back-off while attempts remain; JobFailed(reason, result=...) or any other
exception -> failed with the reason; `TaskDef.on_failed` then runs once. Handlers must be
idempotent: a job whose worker died mid-run is run again by another worker. A graceful stop
(SIGTERM) hands unfinished jobs back at once; a kill -9 leaves them to the lease.

Why this table runner and not procrastinate (evaluated, 3.10, for the PostgreSQL backend): it can
defer inside our transaction (`procrastinate_defer_jobs_v1` is plain SQL), cancels, retries with
back-off and finds stalled workers by heartbeat -- but (1) its `queueing_lock` is unique only
`WHERE status = 'todo'` (schema.sql, procrastinate_jobs_queueing_lock_idx_v1) and raises
AlreadyEnqueued, so once a job runs or is done the same business key enqueues a second job: our
`dedupe_key` (deliver a report once, ever) cannot be expressed; (2) its job row has no result and
no error text (procrastinate_jobs has neither column; events carry only a type), so "failed, with
the reason" and a poll's answer would need a second table of ours anyway; (3) job ids are its
bigserial, assigned at insert, while a Task id must equal the job id chosen before the 202;
(4) stalled jobs are never retried by the worker itself (JobManager.get_stalled_jobs +
retry_job must be scheduled by the application); (5) it does not run on SQLite, so the embedded
default would need this runner regardless, and two engines would behave differently. The table
runner gives identical behaviour on both engines, with SKIP LOCKED claims on PostgreSQL.
"""

from .lifespan import queue_lifespan
from .registry import JobFailed, TaskDef, TransientError, register_task, registry
from .store import JobInfo, JobStore, cancel_in, enqueue_in



def wake(app) -> None:
    """Tell this process's worker (if it runs one) to look for jobs now."""
    worker = getattr(app.state, "queue_worker", None)
    if worker is not None:
        worker.wake()


__all__ = [
    "JobFailed", "JobInfo", "JobStore", "TaskDef", "TransientError", "cancel_in", "enqueue_in", "queue_lifespan",
    "register_task", "registry", "wake",
]
