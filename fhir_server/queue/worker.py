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

from starlette.concurrency import run_in_threadpool

from .registry import TaskDef, TransientError, registry
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

    def wake(self) -> None:
        """Look for work now (call after enqueueing from this process)."""
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="queue-worker")

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._running:
            # jobs still running keep their lease until it expires: another worker resumes them
            _, pending = await asyncio.wait(list(self._running.values()), timeout=timeout)
            for task in pending:
                task.cancel()

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
                if jobs:
                    continue  # more may be ready
            except asyncio.CancelledError:
                raise
            except Exception:  # database briefly away: keep the loop alive, try again
                log.warning("queue: could not claim jobs", exc_info=True)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            except asyncio.TimeoutError:
                pass

    async def _run(self, task: TaskDef, job: JobInfo) -> None:
        renewer = asyncio.create_task(self._renew(job.id))
        try:
            result = await task.handler(self.app, job.payload)
        except asyncio.CancelledError:
            renewer.cancel()
            raise
        except TransientError as exc:
            renewer.cancel()
            status = await run_in_threadpool(
                self.store.fail, job.id, self.worker_id, f"{exc}", retry_in_s=task.retry_delay(job.attempts)
            )
            log.info("queue: job %s (%s) attempt %d failed transiently -> %s", job.id, job.task, job.attempts, status)
            return
        except Exception as exc:
            renewer.cancel()
            log.exception("queue: job %s (%s) failed", job.id, job.task)
            await run_in_threadpool(
                self.store.fail, job.id, self.worker_id, f"{type(exc).__name__}: {exc}", retry_in_s=None
            )
            return
        renewer.cancel()
        await run_in_threadpool(self.store.complete, job.id, self.worker_id, result)

    async def _renew(self, job_id: str) -> None:
        interval = max(1.0, self.store.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                if not await run_in_threadpool(self.store.renew, job_id, self.worker_id):
                    return  # cancelled or taken over: the handler's result will be discarded
            except Exception:
                log.warning("queue: lease renewal for %s failed", job_id, exc_info=True)
