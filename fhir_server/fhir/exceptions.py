"""FhirError: an error the FHIR routes answer with an OperationOutcome."""

from __future__ import annotations

from typing import Any

from fhir_server.errors import operation_outcome


class FhirError(Exception):
    def __init__(
        self,
        status_code: int,
        diagnostics: str,
        *,
        code: str | None = None,
        expression: list[str] | str | None = None,
        headers: dict[str, str] | None = None,
        outcome: dict[str, Any] | None = None,
    ):
        super().__init__(diagnostics)
        self.status_code = status_code
        self.diagnostics = diagnostics
        self.code = code
        self.expression = expression
        self.headers = headers
        self._outcome = outcome  # several issues (validation) already assembled

    def outcome(self) -> dict[str, Any]:
        if self._outcome is not None:
            return self._outcome
        return operation_outcome(self.status_code, self.code, self.diagnostics, self.expression)
