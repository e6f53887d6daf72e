"""C-STORE SCU (pynetdicom): send DICOM objects to `AE@host:port`, one association per batch.

Outcomes are split the way a retrying delivery needs them: StoreUnavailable (cannot connect,
association rejected or aborted, peer out of resources 0xA7xx) is worth retrying; StoreRefused
(the peer answered a failure status for an object, or accepts none of our presentation
contexts) is not, since sending the same bytes again gets the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.presentation import build_context

_DESTINATION = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>\[[0-9a-fA-F:]+\]|[^:@\s]+):(?P<port>\d{1,5})$")


class StoreUnavailable(Exception):
    """The destination could not take the objects now; retry later."""


class StoreRefused(Exception):
    """The destination refused an object for good."""


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(value: str) -> Destination:
    """'AE@host:port' -> Destination; ValueError with the reason when malformed."""
    match = _DESTINATION.match(value.strip())
    if not match or not 0 < int(match["port"]) < 65536 or not match["ae"].strip():
        raise ValueError(f"DICOM destination must look like AE@host:port, got {value!r}")
    return Destination(match["ae"].strip(), match["host"].strip("[]"), int(match["port"]))


@dataclass(frozen=True)
class Stored:
    sop_instance_uid: str
    sop_class_uid: str
    status: int  # 0x0000 success, 0xB000.. warnings (stored with coercion)


def store(destination: Destination, datasets: Sequence[Dataset], *, calling_ae: str, timeout_s: float) -> list[Stored]:
    """C-STORE every dataset over one association (blocking: run it in a thread)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    ae.requested_contexts = [build_context(sop, syntax) for sop, syntax in sorted(contexts)]
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise StoreUnavailable(f"{destination} rejected the association")
        raise StoreUnavailable(f"cannot reach {destination} (no association)")
    results: list[Stored] = []
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for this SOP class
                raise StoreRefused(f"{destination} does not accept {ds.SOPClassUID}: {exc}") from exc
            if not status or "Status" not in status:
                raise StoreUnavailable(f"{destination} did not answer the C-STORE of {uid} (connection lost or timed out)")
            code = int(status.Status)
            if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
                results.append(Stored(uid, str(ds.SOPClassUID), code))
            elif 0xA700 <= code <= 0xA7FF:
                raise StoreUnavailable(f"{destination} is out of resources (0x{code:04X}) for {uid}")
            else:
                comment = status.get("ErrorComment", "")
                raise StoreRefused(f"{destination} refused {uid} with status 0x{code:04X} {comment}".rstrip())
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def echo(destination: Destination, *, calling_ae: str, timeout_s: float) -> int:
    """C-ECHO status (0 = success); StoreUnavailable when no association can be made."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise StoreUnavailable(f"cannot associate with {destination}")
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else -1
    finally:
        assoc.release()
