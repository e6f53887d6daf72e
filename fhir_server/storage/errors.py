"""Typed storage errors. Each carries the HTTP status and OperationOutcome issue code the REST
layer answers with, so routes never need to guess."""

from __future__ import annotations


class StorageError(Exception):
    http_status = 500
    issue_code = "exception"

    def __init__(self, message: str, *, expression: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.expression = expression


class UnsupportedResourceType(StorageError):
    http_status = 404
    issue_code = "not-supported"


class InvalidResource(StorageError):
    """Bad id, missing resourceType and the like (the REST layer validates content itself)."""

    http_status = 400
    issue_code = "invalid"


class ResourceNotFound(StorageError):
    http_status = 404
    issue_code = "not-found"


class ResourceGone(StorageError):
    """The resource existed and was deleted (read -> 410)."""

    http_status = 410
    issue_code = "deleted"

    def __init__(self, message: str, *, version_id: int | None = None):
        super().__init__(message)
        self.version_id = version_id


class ResourceExists(StorageError):
    http_status = 409
    issue_code = "duplicate"


class VersionConflict(StorageError):
    """Another writer changed the resource first (concurrent update)."""

    http_status = 409
    issue_code = "conflict"


class PreconditionFailed(StorageError):
    """If-Match did not match, or conditional criteria matched more than one resource."""

    http_status = 412
    issue_code = "conflict"


class InvalidSearch(StorageError):
    """Unknown/invalid search parameter, modifier, prefix or value."""

    http_status = 400
    issue_code = "invalid"


class StorageBusy(StorageError):
    """The database stayed locked past the busy timeout (SQLite under heavy write load)."""

    http_status = 503
    issue_code = "transient"


class ReadOnlyType(StorageError):
    """A write to a type only the server appends to (AuditEvent): 405, as HAPI answers."""

    http_status = 405
    issue_code = "not-supported"
