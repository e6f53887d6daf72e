"""Task definitions: a name, an async handler and its retry policy.

    from fhir_server.queue import TaskDef, TransientError, register_task

    async def deliver_sr(app, payload: dict) -> dict | None: ...   # raise TransientError to retry
    register_task(app, TaskDef("dicom.deliver", deliver_sr, max_attempts=10, backoff_s=5, backoff_max_s=600))

Handlers get the FastAPI app (for app.state.store, app.state.settings, ...) and the JSON payload,
and return an optional JSON-able result stored on the job. Any exception other than TransientError
fails the job at once (a bad payload will not get better by retrying).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Handler = Callable[[Any, dict[str, Any]], Awaitable[dict[str, Any] | None]]


class TransientError(Exception):
    """The job may succeed later (destination down, database busy): retried with back-off.
    `result` (optional, JSON-able) is stored on the job, e.g. the answer to give if no retry is left."""

    def __init__(self, message: str = "", *, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


class JobFailed(Exception):
    """A permanent, expected failure: the job ends `failed` at once with this reason (no retry) and
    `result` (optional, JSON-able: e.g. the HTTP status and OperationOutcome a poll should answer)."""

    def __init__(self, reason: str, *, result: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.result = result


# Called once when a job ends `failed` for good (permanent error, retries exhausted, or its worker
# died during the last allowed attempt): lets the owner record the failure where clients look
# (e.g. the Task resource). Best effort: the job row already says `failed` with the reason.
FailureHook = Callable[[Any, dict[str, Any], str], Awaitable[None]]


@dataclass(frozen=True)
class TaskDef:
    name: str
    handler: Handler
    max_attempts: int = 5
    backoff_s: float = 2.0  # first retry delay; doubles each attempt
    backoff_max_s: float = 300.0
    concurrency: int = 1  # at most this many of these jobs at once in one worker process
    on_failed: FailureHook | None = None

    def retry_delay(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * (2 ** max(0, attempt - 1)))


def registry(app: Any) -> dict[str, TaskDef]:
    tasks = getattr(app.state, "queue_tasks", None)
    if tasks is None:
        tasks = app.state.queue_tasks = {}
    return tasks


def register_task(app: Any, task: TaskDef) -> None:
    registry(app)[task.name] = task
