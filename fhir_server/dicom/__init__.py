"""The DICOM node, receiving side: studies from the PACS / modality, analysed on arrival.

    scp             pynetdicom Storage SCP (C-ECHO, C-STORE) in its own thread
    instance_store  fsync'd Part 10 files + dicom_instance / dicom_study rows + the settle job
    intake          the "dicom.analyze_study" queue task: settle, FHIR side, analysis, hand-off
    fhir_side       DICOM headers -> Patient + ImagingStudy (matched or created)
    cli             `cxr dicom echo` / `cxr dicom send` for integration engineers

`dicom_lifespan` (in app.LIFESPAN_HOOKS after the queue) creates the tables, registers the task
(always: jobs queued before a restart still run even when the listener is now off) and starts the
listener when CXR_DICOM_PORT is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.concurrency import run_in_threadpool

from fhir_server.queue import wake

from . import intake
from .instance_store import InstanceStore
from .tables import create_dicom_tables


@asynccontextmanager
async def dicom_lifespan(app: Any) -> AsyncIterator[None]:
    settings = app.state.settings
    repo = app.state.store
    await run_in_threadpool(create_dicom_tables, repo.engine)
    store = InstanceStore(repo, settings.dicom_dir, settle_s=settings.dicom_study_settle_s)
    app.state.dicom_store = store
    intake.register(app)
    scp = None
    if settings.dicom_port is not None:
        from .scp import ScpConfig, StorageSCP, loop_waker

        config = ScpConfig(
            host=settings.dicom_host or settings.host, port=settings.dicom_port, ae_title=settings.dicom_ae_title,
            allowed_aes=tuple(a.strip() for a in settings.dicom_allowed_aes if a.strip()),
            max_instance_bytes=settings.dicom_max_instance_bytes,
        )
        scp = StorageSCP(config, store, on_stored=loop_waker(asyncio.get_running_loop(), lambda: wake(app)))
        await run_in_threadpool(scp.start)
    app.state.dicom_scp = scp
    try:
        yield
    finally:
        if scp is not None:
            await run_in_threadpool(scp.stop)
        app.state.dicom_scp = None


__all__ = ["dicom_lifespan"]
