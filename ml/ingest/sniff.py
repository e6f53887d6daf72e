"""Format detection from magic bytes. The filename is never trusted on its own."""

from __future__ import annotations

from typing import Literal

from ml.errors import UnsupportedFormat

Format = Literal["dicom", "png", "jpeg", "dicom?"]

ACCEPTED = (
    "Accepted formats: DICOM (a single-frame CR/DX/secondary-capture chest radiograph), "
    "PNG or JPEG."
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"

# Groups that can start a DICOM dataset written without preamble and file meta (old ACR-NEMA
# style files, or raw datasets pulled from a PACS): file meta, identifying, patient, acquisition,
# relationship and image pixel module groups, little endian.
_DATASET_START_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}

# (magic test, what a person should be told it is). Order matters only for overlapping tests.
_KNOWN_OTHER: tuple[tuple[object, str], ...] = (
    (lambda d: d.startswith(b"%PDF"), "a PDF document"),
    (lambda d: d[:6] in (b"GIF87a", b"GIF89a"), "a GIF image"),
    (lambda d: d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), "a TIFF image"),
    (lambda d: d.startswith(b"BM") and len(d) > 14, "a BMP image"),
    (lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", "a WebP image"),
    (lambda d: d[4:8] == b"ftyp" and d[8:12] in (b"heic", b"heix", b"mif1", b"msf1"), "a HEIC/HEIF image"),
    (lambda d: d[4:8] == b"ftyp" and d[8:12] in (b"avif", b"avis"), "an AVIF image"),
    (lambda d: d[4:8] == b"ftyp", "an MP4/QuickTime (ISO media) file"),
    (lambda d: d.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"), "a JPEG 2000 file (only accepted inside DICOM)"),
    (lambda d: d.startswith(b"\xff\x4f\xff\x51"), "a JPEG 2000 codestream (only accepted inside DICOM)"),
    (lambda d: d.startswith(b"\xff\x0a") or d.startswith(b"\x00\x00\x00\x0cJXL "), "a JPEG XL image"),
    (lambda d: d.startswith(b"PK\x03\x04"), "a ZIP archive (or Office document)"),
    (lambda d: d.startswith(b"\x1f\x8b"), "a gzip archive"),
    (lambda d: d.startswith(b"7z\xbc\xaf\x27\x1c"), "a 7-Zip archive"),
    (lambda d: d[:4] == b"\x00\x00\x01\x00", "an ICO icon"),
    (lambda d: d[344:348] in (b"n+1\x00", b"ni1\x00"), "a NIfTI volume"),
    (lambda d: d.startswith(b"\x7fELF") or d.startswith(b"MZ"), "an executable"),
)


def _looks_like_text(head: bytes) -> str | None:
    """Name a text payload (JSON, XML, HTML, SVG, plain text), or None if it is binary."""
    if not head:
        return None
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sample is still text.
        try:
            text = head[:-4].decode("utf-8")
        except UnicodeDecodeError:
            return None
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    if printable < 0.95 * max(len(text), 1):
        return None
    stripped = text.lstrip("\ufeff \r\n\t").lower()
    if stripped.startswith("<svg") or ("<svg" in stripped[:1000] and stripped.startswith("<?xml")):
        return "an SVG drawing"
    if stripped.startswith(("<!doctype html", "<html")):
        return "an HTML page"
    if stripped.startswith("<?xml") or stripped.startswith("<"):
        return "an XML document"
    if stripped.startswith(("{", "[")):
        return "JSON text"
    if stripped.startswith("data:image"):
        return "a base64 data URL (send the decoded bytes instead)"
    return "plain text"


def could_be_bare_dicom(data: bytes) -> bool:
    """True when the bytes start like a DICOM dataset written without the 128-byte preamble."""
    if len(data) < 8:
        return False
    group = int.from_bytes(data[0:2], "little")
    return group in _DATASET_START_GROUPS


def sniff(data: bytes, filename: str | None = None) -> Format:
    """Return the container format, or raise UnsupportedFormat naming what was found.

    "dicom?" means: no DICM marker, but the bytes may be a preamble-less DICOM dataset; the DICOM
    reader decides (and raises UnsupportedFormat if the parse does not look like DICOM).
    """
    if (len(data) >= 132 and data[128:132] == b"DICM") or data.startswith(b"DICM"):
        return "dicom"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SOI):
        return "jpeg"
    for test, name in _KNOWN_OTHER:
        if test(data):  # type: ignore[operator]
            raise UnsupportedFormat(f"The upload is {name}{_named(filename)}. {ACCEPTED}")
    text = _looks_like_text(data[:4096])
    if text is not None:
        raise UnsupportedFormat(f"The upload is {text}{_named(filename)}, not an image. {ACCEPTED}")
    if could_be_bare_dicom(data):
        return "dicom?"
    raise UnsupportedFormat(describe_unknown(data, filename))


def describe_unknown(data: bytes, filename: str | None) -> str:
    return (
        f"Unrecognised file format{_named(filename)} (first bytes {data[:8].hex(' ')}). {ACCEPTED}"
    )


def _named(filename: str | None) -> str:
    return f" ('{filename}')" if filename else ""
