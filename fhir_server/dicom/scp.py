"""The DICOM listener: a pynetdicom Storage SCP in its own thread (C-ECHO, C-STORE).

Negotiation accepts every storage SOP class in the transfer syntaxes our ingest can decode, so an
object we do not analyse is refused by a C-STORE status the sender logs (0x0122 SOP class not
supported), never by a dropped association or an unexplained missing context. Radiographs (CR, DX
for presentation / processing, secondary capture) are stored durably (instance_store) before
success (0x0000) is answered. Calling AE titles outside CXR_DICOM_ALLOWED_AES are rejected at
association time (A-ASSOCIATE-RJ, "calling AE title not recognised"), and so is a peer calling
another AE title than ours.

pynetdicom runs one thread per association; the handlers do their blocking file and database I/O
there and only hand the "work is waiting" signal over to the app's event loop (the queue worker).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification
from pynetdicom.presentation import AllStoragePresentationContexts

from ml.ingest.dicom_checks import ACCEPTED_SOP_CLASSES

from .instance_store import InstanceStore, content_digest, valid_uid

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
OWN_MANUFACTURER = "CXR-FHIR"  # our own SR / SC results routed back to us are kept, never re-analysed


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes ml.ingest can turn into pixels with the pydicom plugins installed here
    (uncompressed always; JPEG, JPEG-LS, JPEG 2000, RLE when a decoder is available). Deflate is
    left out because ingest refuses it (a zip-bomb vector)."""
    from pydicom.pixels import get_decoder

    out = []
    for ts in ALL_TRANSFER_SYNTAXES:
        uid = UID(ts)
        if uid == DeflatedExplicitVRLittleEndian:
            continue
        if not uid.is_compressed:
            out.append(ts)
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(ts)
        except (NotImplementedError, ValueError):
            continue
    return out


@dataclass(frozen=True)
class ScpConfig:
    host: str
    port: int
    ae_title: str
    allowed_aes: tuple[str, ...] = ()
    max_instance_bytes: int = 256 * 1024 * 1024


class StorageSCP:
    def __init__(self, config: ScpConfig, store: InstanceStore, *, on_stored: Callable[[], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.on_stored = on_stored or (lambda: None)
        self.ae = AE(ae_title=config.ae_title)
        self.ae.require_called_aet = True
        self.ae.require_calling_aet = list(config.allowed_aes)
        self.ae.maximum_pdu_size = 0  # unlimited: whatever the peer proposes
        self.ae.network_timeout = 60
        self.ae.dimse_timeout = 60
        self.ae.acse_timeout = 30
        syntaxes = decodable_transfer_syntaxes()
        self.ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for ctx in AllStoragePresentationContexts:
            self.ae.add_supported_context(ctx.abstract_syntax, syntaxes)
        self._server = None

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store)]
        self._server = self.ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        log.info("DICOM listener %s on %s:%d (calling AEs: %s)", self.config.ae_title, self.config.host, self.port,
                 ", ".join(self.config.allowed_aes) or "any")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # ---- handlers (pynetdicom's association threads) --------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        sop_class = str(event.context.abstract_syntax)
        try:
            return self._store(event, calling, sop_class)
        except Exception:  # noqa: BLE001 - a bug must answer a failure status, not kill the association
            log.exception("DICOM C-STORE from %s failed", calling)
            return OUT_OF_RESOURCES

    def _store(self, event: evt.Event, calling: str, sop_class: str) -> int:
        if sop_class not in ACCEPTED_SOP_CLASSES:
            log.info("DICOM: refused %s from %s: SOP class not analysed here", UID(sop_class).name, calling)
            return SOP_CLASS_NOT_SUPPORTED
        size = event.request.DataSet.getbuffer().nbytes
        if size > self.config.max_instance_bytes:
            log.warning("DICOM: refused a %d-byte instance from %s (limit %d)", size, calling, self.config.max_instance_bytes)
            return OUT_OF_RESOURCES
        try:
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID") or "").strip()
            series_uid = str(ds.get("SeriesInstanceUID") or "").strip()
            sop_uid = str(ds.get("SOPInstanceUID") or "").strip()
            ds_class = str(ds.get("SOPClassUID") or "").strip()
            manufacturer = str(ds.get("Manufacturer") or "").strip()
        except Exception as exc:  # noqa: BLE001 - an unparseable data set
            log.info("DICOM: cannot parse the data set from %s: %s", calling, exc)
            return CANNOT_UNDERSTAND
        if not all(valid_uid(u) for u in (study_uid, series_uid, sop_uid)):
            log.info("DICOM: instance from %s lacks valid Study/Series/SOP Instance UIDs", calling)
            return CANNOT_UNDERSTAND
        if ds_class != sop_class or sop_uid != str(event.request.AffectedSOPInstanceUID):
            log.info("DICOM: instance %s from %s does not match its C-STORE request", sop_uid, calling)
            return DATASET_DOES_NOT_MATCH
        try:
            digest: str | None = content_digest(ds)
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert: then the bytes decide
            digest = None
        receipt = self.store.save(
            event.encoded_dataset(include_meta=True),
            study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, sop_class_uid=sop_class,
            transfer_syntax=str(event.context.transfer_syntax), calling_ae=calling,
            own_output=manufacturer == OWN_MANUFACTURER, digest=digest,
        )
        log.info("DICOM: stored %s of study %s from %s (%s)", sop_uid, study_uid, calling, receipt.outcome)
        if receipt.outcome != "duplicate":
            self.on_stored()
        return SUCCESS


def loop_waker(loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> Callable[[], None]:
    """A callable for the association threads that runs `wake` on the app's event loop."""

    def call() -> None:
        try:
            loop.call_soon_threadsafe(wake)
        except RuntimeError:  # the loop closed: shutting down
            pass

    return call
