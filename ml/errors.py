"""Typed errors raised by ml/. Each carries a stable code; fhir_server maps codes to HTTP status."""

from __future__ import annotations


class CXRError(Exception):
    """Base class. `code` is stable and machine-readable; the message is for a person."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InputError(CXRError):
    """The caller sent something we cannot use: always a 4xx."""

    code = "invalid_input"
    http_status = 400


class EmptyInput(InputError):
    code = "empty_input"
    http_status = 400


class UnsupportedFormat(InputError):
    """Not DICOM, PNG or JPEG (e.g. a PDF, text, GIF)."""

    code = "unsupported_format"
    http_status = 415


class CorruptImage(InputError):
    """Looks like a supported format but cannot be decoded (truncated, damaged)."""

    code = "corrupt_image"
    http_status = 422


class InputTooLarge(InputError):
    """Over the byte or pixel limit (also decompression bombs, refused before full decode)."""

    code = "input_too_large"
    http_status = 413


class UnsupportedDicom(InputError):
    """Valid DICOM but not a single-frame projection radiograph (SR, CT volume, multi-frame...)."""

    code = "unsupported_dicom"
    http_status = 422


class NotChestXRay(InputError):
    """The out-of-distribution gate refused the image: not a frontal chest radiograph.

    `check` names the check that refused ("metadata", "chest_vs_not", "orientation", "distance") and
    `score` / `threshold` its gate score, so an API answer can say why."""

    code = "not_chest_xray"
    http_status = 422

    def __init__(self, message: str, *, detail: str | None = None, check: str | None = None,
                 score: float | None = None, threshold: float | None = None, compared_copies: bool = False) -> None:
        super().__init__(message, detail=detail)
        self.check = check
        self.score = score
        self.threshold = threshold
        self.compared_copies = compared_copies  # the orientation check ran on the film's turned / inverted copies

    def fields(self) -> dict[str, object]:
        """Machine-readable extras for an API error body (which check refused, with its score)."""
        return {"check": self.check, "score": None if self.score is None else round(self.score, 4),
                "threshold": self.threshold}


class ModelUnavailable(CXRError):
    """The configured model cannot be loaded (weights missing, checksum mismatch)."""

    code = "model_unavailable"
    http_status = 503
