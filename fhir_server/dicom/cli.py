"""`cxr dicom echo AE@host:port` and `cxr dicom send FILE... --to AE@host:port`: test a PACS or
modality route to (or from) this server without a vendor tool.

    cxr dicom echo CXR@pacs.local:11112
    cxr dicom send study/*.dcm --to CXR@127.0.0.1:11112 [--calling-ae MODALITY1]

`send` proposes, per SOP class, the files' own transfer syntaxes (plus the uncompressed ones), so
compressed files go as they are; it prints one line per file with the C-STORE status and exits
non-zero when any file was not stored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fhir_server.dicom.store_scu import Destination
from fhir_server.dicom.store_scu import parse_destination as _parse_destination

DEFAULT_CALLING_AE = "CXR-SCU"


def parse_destination(text: str) -> Destination:
    """AE@host:port -> Destination (the delivery code's parser); a usage error when malformed."""
    try:
        return _parse_destination(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected AE@host:port (AE title up to 16 characters), got {text!r}") from exc


def _status_text(status: int) -> str:
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

    info = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    return f"{info[0]}: {info[1]}" if info else code_to_category(status)


def _associate(ae, dest: Destination):
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if assoc.is_established:
        return assoc, None
    if assoc.is_rejected:
        return None, "association rejected by the peer (check the called AE title and that our calling AE is allowed)"
    return None, "no association (peer not reachable, or it aborted)"


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context(Verification)
    assoc, error = _associate(ae, args.destination)
    if assoc is None:
        print(f"C-ECHO {args.destination}: FAILED, {error}")
        return 2
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else -1
    if code == 0:
        print(f"C-ECHO {args.destination}: OK (0x0000)")
        return 0
    print(f"C-ECHO {args.destination}: FAILED ({'no answer' if code < 0 else f'0x{code:04X}'})")
    return 1


def _read(path: Path):
    import pydicom

    ds = pydicom.dcmread(path, force=True)
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.TransferSyntaxUID) if meta is not None and meta.get("TransferSyntaxUID") else None
    if ts is None:  # a bare data set (ACR-NEMA style): its parse tells how it is encoded
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, _little = getattr(ds, "original_encoding", (True, True))
        ts = ImplicitVRLittleEndian if implicit is not False else ExplicitVRLittleEndian
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    if not ds.get("SOPClassUID") or not ds.get("SOPInstanceUID"):
        raise ValueError("no SOPClassUID / SOPInstanceUID: not a DICOM instance")
    return ds, str(ts)


def cmd_send(args: argparse.Namespace) -> int:
    from pydicom.uid import UID
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    uncompressed = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    items: list[tuple[Path, object, str]] = []
    failed = 0
    contexts: dict[str, set[str]] = {}
    for path in args.files:
        try:
            ds, ts = _read(path)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other files
            print(f"SKIPPED  {path}: cannot be read as DICOM ({exc})")
            failed += 1
            continue
        items.append((path, ds, ts))
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), set(uncompressed))
        syntaxes.add(ts)
    if not items:
        return 1
    pairs = [(sop, ts) for sop, tss in contexts.items() for ts in sorted(tss)]
    if len(pairs) > 128:
        print(f"too many SOP class / transfer syntax combinations ({len(pairs)} > 128): send fewer files at once")
        return 2
    for sop, ts in pairs:  # one context per pair, so the peer can accept exactly what it decodes
        ae.requested_contexts = [*ae.requested_contexts, build_context(sop, [ts])]
    assoc, error = _associate(ae, args.destination)
    if assoc is None:
        print(f"C-STORE {args.destination}: FAILED, {error}")
        return 2
    stored = 0
    try:
        for path, ds, ts in items:
            if not assoc.is_established:
                print(f"FAILED   {path}: association lost")
                failed += 1
                continue
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for this class / syntax
                print(f"REFUSED  {path}: {UID(str(ds.SOPClassUID)).name} in {UID(ts).name} not accepted ({exc})")
                failed += 1
                continue
            code = int(status.Status) if "Status" in status else -1
            if code == 0:
                stored += 1
                print(f"OK       {path} (0x0000) {ds.SOPInstanceUID}")
            elif code < 0:
                failed += 1
                print(f"FAILED   {path}: no answer (timeout or association aborted)")
            else:
                if code & 0xF000 != 0xB000:  # B000-BFFF are warnings: stored
                    failed += 1
                else:
                    stored += 1
                print(f"{'WARNING' if code & 0xF000 == 0xB000 else 'FAILED':<8} {path} (0x{code:04X} {_status_text(code)})")
    finally:
        if assoc.is_established:
            assoc.release()
    print(f"{stored} stored, {failed} not stored, to {args.destination}")
    return 0 if failed == 0 else 1


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    dicom = sub.add_parser("dicom", help="DICOM networking checks: C-ECHO and C-STORE to an AE@host:port")
    dsub = dicom.add_subparsers(dest="dicom_command", required=True)
    echo = dsub.add_parser("echo", help="C-ECHO (DICOM ping) an AE@host:port")
    echo.add_argument("destination", type=parse_destination, metavar="AE@host:port")
    send = dsub.add_parser("send", help="C-STORE files to an AE@host:port, one status line per file")
    send.add_argument("files", nargs="+", type=Path, metavar="FILE")
    send.add_argument("--to", dest="destination", type=parse_destination, required=True, metavar="AE@host:port")
    for p in (echo, send):
        p.add_argument("--calling-ae", default=DEFAULT_CALLING_AE, help=f"our AE title (default {DEFAULT_CALLING_AE})")
        p.add_argument("--timeout", type=float, default=30.0, help="network / DIMSE timeout in seconds")
    echo.set_defaults(func=cmd_echo)
    send.set_defaults(func=cmd_send)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
