"""multipart/related (RFC 2046 / 2387) bodies, as WADO-RS returns them, split into parts."""

from __future__ import annotations

from email.message import Message


def parse_multipart_related(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related body (RFC 2046 / 2387) into (headers, payload) parts.

    Written here rather than borrowed from dicomweb-client: its decoder is a method of
    DICOMwebClient bound to its requests session, and we need the parts of a body we already
    streamed under our own limits. Binary payloads are never decoded as text.
    """
    msg = Message()
    msg["content-type"] = content_type
    if msg.get_content_type() != "multipart/related":
        raise ValueError(f"expected multipart/related, got {content_type!r}")
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise ValueError("multipart/related response without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    # The first delimiter may start the body or follow a preamble line.
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        idx = body.find(b"\r\n" + delimiter)
        if idx < 0:
            raise ValueError("multipart body does not contain its boundary")
        pos = idx + 2 + len(delimiter)
    parts: list[tuple[dict[str, str], bytes]] = []
    while True:
        if body[pos : pos + 2] == b"--":
            return parts  # close delimiter
        # transport padding (spaces/tabs) is allowed after a delimiter, then CRLF
        while body[pos : pos + 1] in (b" ", b"\t"):
            pos += 1
        if body[pos : pos + 2] != b"\r\n":
            raise ValueError("malformed multipart delimiter line")
        pos += 2
        end = body.find(b"\r\n" + delimiter, pos)
        if end < 0:
            raise ValueError("multipart body is truncated (no closing boundary)")
        raw_part = body[pos:end]
        if raw_part.startswith(b"\r\n"):
            headers_blob, payload = b"", raw_part[2:]
        else:
            sep = raw_part.find(b"\r\n\r\n")
            if sep < 0:
                raise ValueError("multipart part without a header/body separator")
            headers_blob, payload = raw_part[:sep], raw_part[sep + 4 :]
        headers: dict[str, str] = {}
        for line in headers_blob.decode("latin-1").split("\r\n"):
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload))
        pos = end + 2 + len(delimiter)
