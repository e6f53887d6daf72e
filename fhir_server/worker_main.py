"""`cxr worker`: a process that runs only the durable job queue -- no HTTP -- so inference scales
apart from the API (API replicas set CXR_QUEUE_WORKER=false; `cxr serve` runs both by default).

It builds the same application as `cxr serve` and runs its lifespan (model, database, queue,
task registration) without a server: the same code claims and runs the same jobs. $analyze jobs
need the Analyzer, so the model is loaded at start; a worker whose model cannot load exits with
status 2 rather than idle (an orchestrator shows the crash and the reason). SIGTERM / SIGINT stop
it gracefully: no new claims, running jobs get CXR_QUEUE_SHUTDOWN_GRACE_S to finish, the rest go
back to the queue at once for another worker. A kill -9 is covered by the lease instead.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from fhir_server.settings import Settings

log = logging.getLogger(__name__)


async def run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> int:
    from fhir_server.app import create_app

    app = create_app(settings.model_copy(update={"queue_worker": True}))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests): the event is enough
            pass
    async with app.router.lifespan_context(app):
        if app.state.analyzer is None:
            log.error("cxr worker: no model, no $analyze jobs can run: %s", app.state.model_error)
            return 2
        worker = app.state.queue_worker
        log.info("cxr worker %s running queued jobs (model %s)", worker.worker_id, settings.model)
        await stop.wait()
        log.info("cxr worker: stopping (jobs not finished within %g s go back to the queue)",
                 settings.queue_shutdown_grace_s)
    return 0


def main(settings: Settings) -> int:
    return asyncio.run(run_worker(settings))
