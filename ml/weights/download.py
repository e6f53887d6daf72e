"""Fetch one release file over HTTP(S) into a partial file, resuming with HTTP Range.

The partial file is never used as weights: store.install_release_file checks its size and sha256
first. A transfer cut short (connection closed before Content-Length, timeout) is resumed from the
bytes already on disk, in this call (a few retries) or in the next `cxr models pull`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

CHUNK = 1 << 16


class DownloadError(Exception):
    pass


def download(
    url: str, partial: Path, *, expected_size: int | None, progress: bool = True, retries: int = 3,
    timeout_s: float = 60.0,
) -> Path:
    """Download `url` into `partial` (appending to what is there). Returns `partial` when the server
    says the transfer is complete (and, when known, it has `expected_size` bytes)."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _ in range(retries + 1):
        try:
            if _fetch(url, partial, expected_size=expected_size, progress=progress, timeout_s=timeout_s):
                return partial
        except (httpx.TransportError, httpx.RemoteProtocolError) as exc:  # cut short: resume from disk
            last_error = exc
    have = partial.stat().st_size if partial.exists() else 0
    raise DownloadError(
        f"download of {url} interrupted after {have} bytes ({type(last_error).__name__}: {last_error}); "
        "run the same command again to resume"
    )


def _fetch(url: str, partial: Path, *, expected_size: int | None, progress: bool, timeout_s: float) -> bool:
    have = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and have > expected_size:  # not a prefix of the file we want
        partial.unlink()
        have = 0
    if expected_size is not None and have == expected_size:
        return True
    headers = {"Range": f"bytes={have}-"} if have else {}
    with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout_s) as response:
        if response.status_code == 416 and have:  # nothing left past what we have
            return True
        if response.status_code == 200:
            mode, have = "wb", 0  # the server ignored Range (or fresh start): start over
        elif response.status_code == 206 and response.headers.get("content-range", "").startswith(f"bytes {have}-"):
            mode = "ab"
        elif response.status_code == 206:
            raise DownloadError(f"{url}: server resumed at the wrong offset ({response.headers.get('content-range')})")
        else:
            raise DownloadError(f"{url}: HTTP {response.status_code}")
        length = response.headers.get("content-length")
        total = have + int(length) if length and length.isdigit() else expected_size
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{url}: the server offers {total} bytes, the catalog says {expected_size}")
        bar = _bar(total, have, partial.name, progress)
        try:
            with partial.open(mode) as out:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    have += len(chunk)
                    if expected_size is not None and have > expected_size:
                        raise DownloadError(f"{url}: more than the catalog's {expected_size} bytes")
                    bar.update(len(chunk))
        finally:
            bar.close()
    return total is None or have == total


def _bar(total: int | None, initial: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                file=sys.stderr, disable=not enabled, leave=True)
