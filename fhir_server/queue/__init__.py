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

Jobs: queued -> running -> done | failed | cancelled. TransientError -> queued again after
back-off while attempts remain; any other exception -> failed with the reason. Handlers must be
idempotent: a job whose worker died mid-run is run again by another worker.
"""

from .lifespan import queue_lifespan
from .registry import TaskDef, TransientError, register_task, registry
from .store import JobInfo, JobStore, enqueue_in



def wake(app) -> None:
    """Tell this process's worker (if it runs one) to look for jobs now."""
    worker = getattr(app.state, "queue_worker", None)
    if worker is not None:
        worker.wake()


__all__ = [
    "JobInfo", "JobStore", "TaskDef", "TransientError", "enqueue_in", "queue_lifespan", "register_task", "registry", "wake",
]
