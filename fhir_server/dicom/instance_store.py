"""Durable receipt of one DICOM instance: an fsync'd Part 10 file, its row, and its study's
settle job, all done before the C-STORE is answered with success.

Order matters: the file is written (temp file, fsync, rename, fsync of the directory) before the
row commits, so a row never points at a file that a crash could lose; a crash in between leaves an
orphan file that the next receipt of the same instance overwrites. An instance re-sent with the
same content only counts the re-send: the study does not change, so nothing is analysed again.
"Same content" is `content_digest`, not the bytes: a PACS that forwards an instance it received
re-encodes it (Orthanc's DICOM stack writes other value/sequence lengths, padding and OB/OW than
dcmtk's for the very same data set), and that must not make a second report, SR and ORU.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from fhir_server.queue import enqueue_in
from fhir_server.queue.tables import QueueJob
from fhir_server.storage import Repository, StorageBusy, VersionConflict

from .tables import DicomInstance, DicomStudy

ANALYZE_TASK = "dicom.analyze_study"
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def valid_uid(uid: str) -> bool:
    # UIDs name files on disk: only digits and dots, at most 64 characters (PS3.5 9.1)
    return bool(uid) and len(uid) <= 64 and bool(UID_RE.match(uid))


@dataclass(frozen=True)
class Receipt:
    sop_uid: str
    study_uid: str
    path: Path
    outcome: str  # "new" | "changed" | "duplicate"


def job_key(study_uid: str, n: int) -> str:
    return f"{ANALYZE_TASK}:{study_uid}:{n}"


def ensure_pending(session: Session, study: DicomStudy, delay_s: float) -> str:
    """Make sure one queued settle job exists for the study (one per study at a time, so a study
    receiving 200 instances does not queue 200 jobs). A running job does not count: it may already
    be past its settle check, so new content needs a job of its own."""
    if study.jobs:
        status = session.execute(
            select(QueueJob.status).where(QueueJob.dedupe_key == job_key(study.study_uid, study.jobs))
        ).scalar()
        if status == "queued":
            return job_key(study.study_uid, study.jobs)
    study.jobs += 1
    session.add(study)
    key = job_key(study.study_uid, study.jobs)
    enqueue_in(session, ANALYZE_TASK, {"study_uid": study.study_uid}, dedupe_key=key, delay_s=delay_s,
               max_attempts=8)
    return key


def _fsync_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)


class InstanceStore:
    def __init__(self, repo: Repository, root: Path, *, settle_s: float) -> None:
        self.repo = repo
        self.root = Path(root).resolve()
        self.settle_s = settle_s

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        return self.root / study_uid / f"{sop_uid}.dcm"

    def save(
        self, data: bytes, *, study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str,
        transfer_syntax: str, calling_ae: str = "", own_output: bool = False, digest: str | None = None,
    ) -> Receipt:
        """Store one Part 10 file durably. Blocking (file + database I/O): call it from a thread.
        `digest`: what decides "the same instance again" (content_digest of the data set); the
        sha256 of `data` when not given."""
        for uid in (study_uid, series_uid, sop_uid):
            if not valid_uid(uid):
                raise ValueError(f"not a valid DICOM UID: {uid!r}")
        digest = digest or hashlib.sha256(data).hexdigest()
        for attempt in range(5):
            try:
                return self._save(data, digest, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
                                  sop_class_uid=sop_class_uid, transfer_syntax=transfer_syntax,
                                  calling_ae=calling_ae, own_output=own_output)
            except (IntegrityError, VersionConflict, StorageBusy):
                # two associations created the same study / instance row at once (PostgreSQL):
                # the row exists now, so the next attempt takes the update path
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _save(self, data: bytes, digest: str, *, study_uid: str, series_uid: str, sop_uid: str,
              sop_class_uid: str, transfer_syntax: str, calling_ae: str, own_output: bool) -> Receipt:
        path = self.path_for(study_uid, sop_uid)
        with self.repo.transaction() as tx:
            session = tx.session
            row = session.get(DicomInstance, sop_uid, with_for_update=True)
            now = utcnow()
            if row is not None and row.sha256 == digest and row.study_uid == study_uid and Path(row.path).exists():
                row.times_received += 1
                session.add(row)
                return Receipt(sop_uid, study_uid, Path(row.path), "duplicate")
            # inside the write transaction: two associations re-sending one SOP instance serialise here
            _fsync_write(path, data)
            outcome = "new" if row is None else "changed"
            if row is not None and row.study_uid != study_uid:
                # the same SOP instance now claims another study: the old study loses it
                old = session.get(DicomStudy, row.study_uid, with_for_update=True)
                if old is not None:
                    old.revision += 1
                    old.last_received = now
                    ensure_pending(session, old, self.settle_s)
                Path(row.path).unlink(missing_ok=True)
            row = row or DicomInstance(sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid,
                                       sop_class_uid=sop_class_uid, transfer_syntax=transfer_syntax,
                                       path=str(path), sha256=digest, received=now)
            row.study_uid, row.series_uid, row.sop_class_uid = study_uid, series_uid, sop_class_uid
            row.transfer_syntax, row.path, row.sha256 = transfer_syntax, str(path), digest
            row.size, row.calling_ae, row.received = len(data), calling_ae[:16], now
            row.own_output = own_output
            if outcome == "changed":
                row.times_received += 1
            session.add(row)
            if own_output:  # our own result coming back must not trigger an analysis of itself
                return Receipt(sop_uid, study_uid, path, outcome)
            # FOR UPDATE (PostgreSQL; SQLite's write transactions are serial anyway): concurrent
            # associations adding to one study must not lose a revision or queue two settle jobs
            study = session.get(DicomStudy, study_uid, with_for_update=True) or DicomStudy(study_uid=study_uid, last_received=now)
            study.revision += 1
            study.last_received = now
            study.state = "receiving"
            session.add(study)
            session.flush()
            ensure_pending(session, study, self.settle_s)
            return Receipt(sop_uid, study_uid, path, outcome)

    def instances(self, study_uid: str) -> list[DicomInstance]:
        with self.repo.transaction(write=False) as tx:
            rows = tx.session.execute(
                select(DicomInstance)
                .where(DicomInstance.study_uid == study_uid, DicomInstance.own_output.is_(False))
                .order_by(DicomInstance.received)
            ).scalars()
            return list(rows)

    def study(self, study_uid: str) -> DicomStudy | None:
        with self.repo.transaction(write=False) as tx:
            return tx.session.get(DicomStudy, study_uid)


def content_digest(ds: Dataset) -> str:
    """sha256 over the data set's elements (tag, VR class, value), independent of how they were
    encoded: explicit/implicit lengths, sequence delimiters, padding, group lengths, OB vs OW.
    File meta (group 0002) is the sender's, not the instance's, and is left out."""
    h = hashlib.sha256()

    def walk(d: Dataset) -> None:
        for elem in d:  # a Dataset iterates in tag order
            if elem.tag.group == 0x0002 or elem.tag.element == 0x0000:
                continue
            h.update(int(elem.tag).to_bytes(4, "big"))
            if elem.VR == "SQ":
                for item in elem.value:
                    h.update(b"\x00item")
                    walk(item)
                h.update(b"\x00end")
                continue
            value = elem.value
            if isinstance(value, (bytes, bytearray)):
                h.update(b"b" + len(value).to_bytes(8, "big") + bytes(value).rstrip(b"\x00 "))
            else:
                text = repr(value).encode("utf-8", "replace")
                h.update(b"v" + len(text).to_bytes(8, "big") + text)

    walk(ds)
    return h.hexdigest()


def settle_remaining(study: DicomStudy, settle_s: float, now: datetime | None = None) -> float:
    """Seconds until the study has been quiet for settle_s (<= 0: settled)."""
    quiet = ((now or utcnow()) - study.last_received).total_seconds()
    return settle_s - quiet


__all__ = [
    "ANALYZE_TASK", "InstanceStore", "Receipt", "content_digest", "ensure_pending", "settle_remaining", "valid_uid",
]
