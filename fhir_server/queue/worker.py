"""QueueWorker: runs registered tasks' jobs from the JobStore inside one process's event loop.

Polling (every `poll_s`, immediately after `wake()`) keeps it engine-agnostic; a job claimed here
holds a lease that a background renewal keeps fresh, so a dead process's jobs are picked up by a
live one once the lease runs out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool

from .registry import JobFailed, TaskDef, TransientError, registry
from .store import JobInfo, JobStore

log = logging.getLogger(__name__)


class QueueWorker:
    def __init__(self, app: Any, store: JobStore, *, poll_s: float = 1.0) -> None:
        self.app = app
        self.store = store
        self.poll_s = poll_s
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._released: set[str] = set()  # jobs given back at shutdown, not failed
        self._claim_failing = False

    def wake(self) -> None:
        """Look for work now (call after enqueueing from this process)."""
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="queue-worker")

    @property
    def alive(self) -> bool:
        """The claiming loop runs (readiness: a dead loop would leave jobs waiting forever)."""
        return self._loop_task is not None and not self._loop_task.done()

    def running_jobs(self) -> list[str]:
        return [key.split("#", 1)[1] for key in self._running]

    def cancel_local(self, job_id: str) -> bool:
        """Stop this process's run of a job now (it was cancelled); False when not running here."""
        for key, task in list(self._running.items()):
            if key.endswith(f"#{job_id}"):
                task.cancel()
                return True
        return False

    async def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM): no new claims; running jobs get `timeout` seconds to finish,
        the rest are handed back to the queue at once (not after their lease) for another worker."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._running:
            keys = dict(self._running)
            _, pending = await asyncio.wait(list(keys.values()), timeout=timeout)
            for key, task in keys.items():
                if task in pending:
                    self._released.add(key.split("#", 1)[1])
                    task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=timeout)

    def _free_slots(self, tasks: dict[str, TaskDef]) -> list[str]:
        busy: dict[str, int] = {}
        for key in self._running:
            name = key.split("#", 1)[0]
            busy[name] = busy.get(name, 0) + 1
        return [name for name, t in tasks.items() if busy.get(name, 0) < t.concurrency]

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                tasks = registry(self.app)
                free = self._free_slots(tasks)
                jobs = await run_in_threadpool(self.store.claim, self.worker_id, free, limit=len(free)) if free else []
                for job in jobs:
                    key = f"{job.task}#{job.id}"
                    self._running[key] = asyncio.create_task(self._run(tasks[job.task], job), name=f"job-{job.id}")
                    self._running[key].add_done_callback(lambda _t, k=key: self._running.pop(k, None))
                if self._claim_failing:
                    log.warning("queue: claiming jobs works again")
                    self._claim_failing = False
                if jobs:
                    continue  # more may be ready
            except asyncio.CancelledError:
                raise
            except Exception:  # database away: keep the loop alive, try again; log it once per outage
                if not self._claim_failing:
                    log.warning("queue: could not claim jobs (retrying every %g s)", self.poll_s, exc_info=True)
                self._claim_failing = True
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            except asyncio.TimeoutError:
                pass

    async def _run(self, task: TaskDef, job: JobInfo) -> None:
        if job.exhausted:
            reason = f"{job.last_error + '; ' if job.last_error else ''}its worker stopped during the last allowed attempt"
            await self._failed(task, job, reason, retry_in_s=None, result=None)
            return
        handler = asyncio.current_task()
        renewer = asyncio.create_task(self._renew(job.id, handler))
        try:
            result = await task.handler(self.app, job.payload)
        except asyncio.CancelledError:
            renewer.cancel()
            if job.id in self._released:  # shutting down: another worker takes it now
                await asyncio.shield(run_in_threadpool(self.store.release, job.id, self.worker_id))
            raise
        except Exception as exc:
            renewer.cancel()
            await self._on_error(task, job, exc)
            return
        renewer.cancel()
        await run_in_threadpool(self.store.complete, job.id, self.worker_id, result)

    async def _on_error(self, task: TaskDef, job: JobInfo, exc: Exception) -> None:
        retry = task.retry_delay(job.attempts)
        if isinstance(exc, TransientError):
            await self._failed(task, job, f"{exc}", retry_in_s=retry, result=exc.result)
        elif isinstance(exc, (OperationalError, InterfaceError)):  # the database went away mid-job
            await self._failed(task, job, f"database unavailable ({type(exc.orig or exc).__name__})",
                               retry_in_s=retry, result=None)
        elif isinstance(exc, JobFailed):
            await self._failed(task, job, f"{exc}", retry_in_s=None, result=exc.result)
        else:
            log.error("queue: job %s (%s) failed", job.id, job.task, exc_info=exc)
            await self._failed(task, job, f"{type(exc).__name__}: {exc}", retry_in_s=None, result=None)

    async def _failed(
        self, task: TaskDef, job: JobInfo, reason: str, *, retry_in_s: float | None, result: dict[str, Any] | None
    ) -> None:
        try:
            status = await run_in_threadpool(
                self.store.fail, job.id, self.worker_id, reason, retry_in_s=retry_in_s, result=result
            )
        except Exception:  # database away: the lease runs out and the job is claimed again
            log.warning("queue: could not record the failure of job %s", job.id, exc_info=True)
            return
        log.info("queue: job %s (%s) attempt %d failed -> %s: %s", job.id, job.task, job.attempts, status, reason)
        if status == "failed" and task.on_failed is not None:
            try:
                await task.on_failed(self.app, job.payload, reason)
            except Exception:
                log.exception("queue: failure hook of job %s (%s) failed", job.id, job.task)

    async def _renew(self, job_id: str, handler: asyncio.Task[Any] | None) -> None:
        interval = max(0.2, min(self.store.lease_s / 3, 10.0))
        while True:
            await asyncio.sleep(interval)
            try:
                if not await run_in_threadpool(self.store.renew, job_id, self.worker_id):
                    # cancelled (maybe from another replica) or taken over: stop working on it
                    if handler is not None:
                        handler.cancel()
                    return
            except Exception:
                log.warning("queue: lease renewal for %s failed", job_id, exc_info=True)
