"""Getting pixels for $analyze: Media.content (inline base64, Binary/<id>, http(s) URL) and
ImagingStudy -> Endpoint (dicom-wado-rs) -> QIDO-RS + WADO-RS.

    fetch      SSRF-safe URL fetching (allowlist, size cap, deadline); see its docstring
    media      Media.content -> bytes
    multipart  multipart/related parsing for WADO-RS answers
    dicomweb   ImagingStudy -> the study's CR/DX images
"""

from fhir_server.imaging.dicomweb import (
    InstanceRef,
    StudyFetch,
    StudyImage,
    resolve_endpoint,
    study_images,
    study_uid,
)
from fhir_server.imaging.fetch import Fetched, FetchPolicy, ImagingError, fetch
from fhir_server.imaging.media import decode_base64, media_bytes
from fhir_server.imaging.multipart import parse_multipart_related

__all__ = [
    "FetchPolicy",
    "Fetched",
    "ImagingError",
    "InstanceRef",
    "StudyFetch",
    "StudyImage",
    "decode_base64",
    "fetch",
    "media_bytes",
    "parse_multipart_related",
    "resolve_endpoint",
    "study_images",
    "study_uid",
]
