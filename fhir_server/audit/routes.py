"""AuditEvents are immutable and written by the server only: every write interaction on the type
answers 405 with an OperationOutcome and an Allow header, before the body is even read (as HAPI
and the Microsoft FHIR server do). Reads and searches go through the generic routes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fhir_server.fhir.exceptions import FhirError

router = APIRouter()
_ALLOW = {"Allow": "GET, HEAD"}


async def _refuse(request: Request) -> Response:
    raise FhirError(405, f"AuditEvent is read-only: {request.method} is not allowed (the server writes the audit trail itself)",
                    code="not-supported", headers=_ALLOW)


for _path in ("/AuditEvent", "/AuditEvent/{resource_id}"):
    router.add_api_route(_path, _refuse, methods=["POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
