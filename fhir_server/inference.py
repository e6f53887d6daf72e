"""A bounded worker pool for CPU-bound inference, with micro-batching and backpressure.

Workers: `workers` threads run analyses (torch and ONNX Runtime release the GIL inside their
kernels, so threads are enough); each gets cores // workers intra-op threads (torch, and the ONNX
Runtime session that thread owns) so that workers x threads = cores: oversubscribed OpenMP threads
collapse throughput on a small machine.

Micro-batching (`analyze`): a request waits at most `batch_max_wait_ms` for others to join it, up
to `batch_max_size`, and the group is one `Analyzer.analyze_many` call (one forward pass). When
every worker is busy, requests keep joining the waiting batch until a worker frees up, so batches
grow exactly when the machine is saturated and a lone request pays no more than the wait.

Backpressure: at most `capacity` jobs (running + waiting) are admitted; beyond that callers get a
503 `server_busy` with Retry-After immediately instead of piling up memory (each job holds an
upload) or hanging. Only image analyses (and model loading) run here: health checks, metadata and
FHIR reads run on the event loop / Starlette's own thread pool and never queue behind images.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import torch

from ml.errors import CXRError, ModelUnavailable

if TYPE_CHECKING:
    from ml.analysis import Analysis
    from ml.pipeline import Analyzer

T = TypeVar("T")


class ServerBusy(CXRError):
    code = "server_busy"
    http_status = 503

    def __init__(self, message: str, *, retry_after: int = 1, detail: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.retry_after = max(1, int(retry_after))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def torch_threads_per_worker(workers: int) -> int:
    """cores // workers, but never more than OMP_NUM_THREADS when the operator set it."""
    threads = max(1, available_cores() // max(1, workers))
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        threads = min(threads, int(env))
    return threads


def resolve_workers(workers: int) -> int:
    """0 = one worker per core (each single-threaded); otherwise as configured."""
    return available_cores() if workers <= 0 else workers


def _analyze_with_threads(analyzer: Analyzer, requests: list, threads: int | None) -> list:
    from ml.engine import intra_op_threads

    with intra_op_threads(threads):
        return analyzer.analyze_many(requests)


@dataclass
class _Job:
    data: bytes
    heatmaps: bool
    filename: str | None
    future: asyncio.Future


class InferencePool:
    def __init__(
        self,
        workers: int,
        *,
        queue: int | None = None,
        batch_max_size: int = 1,
        batch_max_wait_ms: float = 0.0,
        lone_batch_all_cores: bool = False,
    ) -> None:
        self.workers = max(1, resolve_workers(workers))
        self.threads = torch_threads_per_worker(self.workers)
        # a batch that starts while every other worker idles and nothing else waits runs its ONNX
        # forward passes on every core (issue 11: single-request latency), others on cores // workers
        self.lone_threads = min(available_cores(), self.threads * self.workers) if lone_batch_all_cores else None
        torch.set_num_threads(self.threads)
        self._executor = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="cxr-infer", initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )
        self.batch_max_size = max(1, batch_max_size)
        self.batch_max_wait_s = max(0.0, batch_max_wait_ms) / 1000.0
        default_queue = max(4 * self.workers, 2 * self.workers * self.batch_max_size)
        self._capacity = self.workers + (queue if queue is not None else default_queue)
        self._admitted = 0  # only touched from the event loop thread: no lock needed
        self._free_workers: asyncio.Semaphore | None = None  # created on the running loop
        self._pending: dict[int, list[_Job]] = {}  # id(analyzer) -> jobs waiting for a batch
        self._collectors: dict[int, asyncio.Task] = {}
        self._arrived: dict[int, asyncio.Event] = {}
        self._running: set[asyncio.Task] = set()
        self._idle = self.workers  # workers not running a batch (run() jobs are not counted)
        self._seconds_per_job = 0.2  # running estimate for Retry-After
        # optional hooks (fhir_server.metrics): on_batch(size), on_result(model name, Analysis | exception)
        self.observer: object | None = None

    def _observe(self, analyzer: object, results: list[object]) -> None:
        observer = self.observer
        if observer is None:
            return
        name = getattr(getattr(analyzer, "model_info", None), "name", None) or "unknown"
        observer.on_batch(len(results))  # type: ignore[attr-defined]
        for result in results:
            observer.on_result(name, result)  # type: ignore[attr-defined]

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def admitted(self) -> int:
        return self._admitted

    def _admit(self) -> None:
        if self._admitted >= self._capacity:
            # roughly when a slot frees up: the backlog divided by the pool's rate
            wait = self._admitted * self._seconds_per_job / self.workers
            raise ServerBusy(
                f"The server is busy ({self._admitted} analyses running or queued); retry shortly.",
                retry_after=math.ceil(min(60.0, max(1.0, wait))),
            )
        self._admitted += 1

    def _workers_sem(self) -> asyncio.Semaphore:
        if self._free_workers is None:
            self._free_workers = asyncio.Semaphore(self.workers)
        return self._free_workers

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run fn(*args, **kwargs) in a worker thread; 503 ServerBusy when the queue is full."""
        self._admit()
        try:
            async with self._workers_sem():
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))
        finally:
            self._admitted -= 1

    async def analyze(
        self, analyzer: Analyzer, data: bytes, *, heatmaps: bool = False, filename: str | None = None
    ) -> Analysis:
        """analyzer.analyze_bytes(...) through the micro-batcher; 503 ServerBusy when full."""
        if not callable(getattr(analyzer, "analyze_many", None)):  # an analyzer-like object without batching
            try:
                result = await self.run(analyzer.analyze_bytes, data, heatmaps=heatmaps, filename=filename)
            except Exception as exc:
                self._observe(analyzer, [exc])
                raise
            self._observe(analyzer, [result])
            return result
        self._admit()
        loop = asyncio.get_running_loop()
        job = _Job(data, heatmaps, filename, loop.create_future())
        # The slot is held until the analysis itself ends, even when the caller goes away first
        # (a disconnected client must not let more work in than the pool can hold).
        job.future.add_done_callback(self._release_slot)
        key = id(analyzer)
        self._pending.setdefault(key, []).append(job)
        if key in self._arrived:
            self._arrived[key].set()
        if key not in self._collectors:
            self._collectors[key] = loop.create_task(self._collect(analyzer, key))
        return await asyncio.shield(job.future)

    def _release_slot(self, _future: asyncio.Future) -> None:
        self._admitted -= 1

    async def _collect(self, analyzer: Analyzer, key: int) -> None:
        """Form batches for one analyzer while jobs are pending; each batch goes to a free worker."""
        loop = asyncio.get_running_loop()
        sem = self._workers_sem()
        try:
            while self._pending.get(key):
                deadline = loop.time() + self.batch_max_wait_s
                arrived = self._arrived.setdefault(key, asyncio.Event())
                while len(self._pending[key]) < self.batch_max_size and loop.time() < deadline:
                    arrived.clear()
                    try:  # woken by the next arrival, or the wait ends
                        await asyncio.wait_for(arrived.wait(), deadline - loop.time())
                    except TimeoutError:
                        break
                idle = self._idle  # before this batch takes a worker
                await sem.acquire()  # while all workers are busy, the batch keeps growing
                # Spread the waiting jobs over the idle workers rather than loading one of them with
                # everything: closed-loop clients that all resubmit at once would otherwise keep
                # landing in one batch on one core while the other cores idle.
                share = math.ceil(len(self._pending[key]) / max(1, idle))
                jobs = self._pending[key][: min(self.batch_max_size, share)]
                del self._pending[key][: len(jobs)]
                lone = idle == self.workers and not self._pending[key]  # no other batch runs or waits
                threads = self.lone_threads if lone and self.lone_threads and self.lone_threads > self.threads else None
                self._idle -= 1
                task = loop.create_task(self._run_batch(analyzer, jobs, sem, threads))
                self._running.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self._running.discard)
        finally:
            self._collectors.pop(key, None)
            if not self._pending.get(key):
                self._pending.pop(key, None)

    async def _run_batch(self, analyzer: Analyzer, jobs: list[_Job], sem: asyncio.Semaphore,
                         threads: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            requests = [(j.data, j.heatmaps, j.filename) for j in jobs]
            results = await loop.run_in_executor(self._executor, _analyze_with_threads, analyzer, requests, threads)
        except BaseException as exc:  # noqa: BLE001 - the whole batch failed: every caller hears it
            results = [exc] * len(jobs)
        finally:
            self._idle += 1
            sem.release()
        elapsed = (loop.time() - start) / max(1, len(jobs))
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed
        self._observe(analyzer, results)
        for job, result in zip(jobs, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def shutdown(self) -> None:
        for task in self._collectors.values():
            task.cancel()
        for jobs in self._pending.values():
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(ModelUnavailable("The server is shutting down."))
        self._executor.shutdown(wait=True, cancel_futures=True)


def require_analyzer(state: object) -> Analyzer:
    """app.state.analyzer, or ModelUnavailable (503) with the reason the model failed to load."""
    analyzer = getattr(state, "analyzer", None)
    if analyzer is None or not analyzer.ready:
        reason = getattr(state, "model_error", None) or "The model is not loaded yet."
        raise ModelUnavailable(reason)
    return analyzer
