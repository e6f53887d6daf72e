"""A bounded worker pool for CPU-bound inference, so the event loop stays free for other requests.

`workers` threads run analyses (torch releases the GIL inside its kernels, so threads are enough);
each gets cores // workers intra-op torch threads so the pool as a whole uses the machine without
oversubscribing it. At most `workers + queue` jobs may be admitted at once; beyond that callers get
a 503 `server_busy` immediately instead of piling up memory (each job holds a decoded image).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import torch

from ml.errors import CXRError, ModelUnavailable

if TYPE_CHECKING:
    from ml.pipeline import Analyzer

T = TypeVar("T")


class ServerBusy(CXRError):
    code = "server_busy"
    http_status = 503


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


class InferencePool:
    def __init__(self, workers: int, *, queue: int | None = None) -> None:
        self.workers = max(1, workers)
        self.threads = torch_threads_per_worker(self.workers)
        torch.set_num_threads(self.threads)
        self._executor = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="cxr-infer", initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )
        self._capacity = self.workers + (queue if queue is not None else 4 * self.workers)
        self._admitted = 0

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run fn(*args, **kwargs) in a worker thread; 503 ServerBusy when the queue is full."""
        if self._admitted >= self._capacity:
            raise ServerBusy(
                f"The server is busy ({self._admitted} analyses running or queued); retry shortly."
            )
        self._admitted += 1  # only touched from the event loop thread: no lock needed
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))
        finally:
            self._admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def require_analyzer(state: object) -> Analyzer:
    """app.state.analyzer, or ModelUnavailable (503) with the reason the model failed to load."""
    analyzer = getattr(state, "analyzer", None)
    if analyzer is None or not analyzer.ready:
        reason = getattr(state, "model_error", None) or "The model is not loaded yet."
        raise ModelUnavailable(reason)
    return analyzer
