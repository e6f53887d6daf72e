"""A loopback MLLP listener (the RIS / EHR side of an ORU^R01) for the delivery tests: records
every message, parses it with hl7apy (the library the server builds with) and answers from a
script: "AA", "AE", "AR", or None (silence past the client's ACK timeout)."""

from __future__ import annotations

import socket
import threading
import time

from hl7apy.core import Message
from hl7apy.parser import parse_message

from fhir_server.hl7v2 import mllp


class Listener:
    """A loopback MLLP server: records every message and answers from a script (AA, AE, or None = silence)."""

    def __init__(self, answers: list[str | None], port: int = 0) -> None:
        self.answers = list(answers)
        self.messages: list[str] = []
        self.answered: list[tuple[str, float]] = []  # (ACK code sent, time.monotonic() when sent)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while not data.endswith(mllp.END):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    continue
                text = data.strip(b"\x0b\x1c\r").decode()
                self.messages.append(text)
                answer = self.answers.pop(0) if self.answers else "AA"
                if answer is None:
                    time.sleep(2.5)  # silence past the client's ACK timeout (2 s)
                    continue
                incoming = parse_message(text, find_groups=False)
                ack = Message("ACK", version="2.5.1")
                ack.msh.msh_9 = "ACK^R01^ACK"
                ack.msh.msh_10 = f"ACK{len(self.messages)}"
                ack.msa.msa_1 = answer
                ack.msa.msa_2 = incoming.msh.msh_10.value
                if answer != "AA":
                    ack.msa.msa_3 = "temporarily unable to file"
                conn.sendall(mllp.frame(ack.to_er7()))
                self.answered.append((answer, time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
