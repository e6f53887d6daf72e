"""A minimal MLLP client: one message out, its ACK back (HL7 v2 over TCP, PS: MLLP release 2).

Why our own: hl7apy (our HL7 library) ships an MLLP *server* only, and pulling in a second HL7
library for ~30 lines of framing is not worth a dependency. Framing: 0x0B <message> 0x1C 0x0D.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hl7apy.parser import parse_message

START, END = b"\x0b", b"\x1c\x0d"
MAX_ACK_BYTES = 1024 * 1024


class MllpError(Exception):
    """No usable acknowledgement: connection refused or dropped, silence past the timeout, or garbage."""


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1: AA / AE / AR (or CA / CE / CR)
    control_id: str  # MSA-2: the MSH-10 it acknowledges
    text: str  # MSA-3 / ERR, when the receiver says why
    raw: str

    @property
    def accepted(self) -> bool:
        return self.code in ("AA", "CA")


def frame(message: str) -> bytes:
    return START + message.encode("utf-8") + END


def parse_ack(raw: str) -> Ack:
    try:
        msg = parse_message(raw.replace("\n", "\r").strip("\r"), find_groups=False)
        msa = msg.msa
        code = msa.msa_1.value.strip().upper()
        control = msa.msa_2.value.strip()
        text = msa.msa_3.value.strip() if msa.msa_3.value else ""
    except Exception as exc:  # hl7apy raises several types for malformed input
        raise MllpError(f"unreadable acknowledgement: {exc}") from exc
    if not code:
        raise MllpError("acknowledgement without MSA-1")
    return Ack(code, control, text, raw)


async def send(host: str, port: int, message: str, *, timeout_s: float) -> Ack:
    """Send one framed message and wait (at most `timeout_s` in all) for its framed ACK."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        raise MllpError(f"cannot connect to {host}:{port}: {exc or 'timeout'}") from exc
    try:
        writer.write(frame(message))
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.readuntil(END), timeout_s)
        except asyncio.TimeoutError as exc:
            raise MllpError(f"no acknowledgement from {host}:{port} within {timeout_s:g} s") from exc
        except asyncio.IncompleteReadError as exc:
            raise MllpError(f"{host}:{port} closed the connection without an acknowledgement") from exc
        except asyncio.LimitOverrunError as exc:
            raise MllpError(f"acknowledgement from {host}:{port} is too large") from exc
        except OSError as exc:
            raise MllpError(f"connection to {host}:{port} failed: {exc}") from exc
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    start = data.find(START)
    if start < 0:
        raise MllpError("acknowledgement is not MLLP-framed")
    return parse_ack(data[start + 1 : -len(END)].decode("utf-8", errors="replace"))
