"""queue_lifespan: app.state.queue (JobStore on the FHIR store's engine) and, unless this process
is API-only, app.state.queue_worker running the registered tasks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .store import JobStore
from .worker import QueueWorker


@asynccontextmanager
async def queue_lifespan(app: Any) -> AsyncIterator[None]:
    settings = app.state.settings
    store = JobStore(app.state.store.engine, lease_s=settings.queue_lease_s)
    app.state.queue = store
    worker = None
    if settings.queue_worker:
        worker = QueueWorker(app, store, poll_s=settings.queue_poll_s)
        worker.start()
    app.state.queue_worker = worker
    try:
        yield
    finally:
        if worker is not None:
            await worker.stop(timeout=settings.queue_shutdown_grace_s)
        app.state.queue_worker = None
