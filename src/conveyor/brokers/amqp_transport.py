"""A py-amqp TCP transport that reads what the socket holds, not one field at a time.

py-amqp's own transport receives exactly the bytes it needs next: a frame's 7-byte header,
then its payload, then its end octet. A delivery is three frames, so every message costs
nine ``recv`` calls, each behind a ``poll`` when a read timeout is set. On a busy consumer
that is most of the I/O thread's time, and every call hands the GIL over.

This transport receives up to :data:`READ_CHUNK` bytes at once and cuts frames out of
that buffer; :meth:`BufferedTcpTransport.frame_ready` tells the I/O thread when a whole
frame is already there, so it reads it without asking the socket. A frame is taken from
the buffer only once all of it has arrived: a read that times out half-way leaves it
whole for the next read, as py-amqp's own transport does.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

from amqp.exceptions import UnexpectedFrame  # type: ignore[import-untyped]
from amqp.transport import TCPTransport  # type: ignore[import-untyped]

READ_CHUNK = 65536
FRAME_HEADER = struct.Struct(">BHI")
FRAME_END = 0xCE
_NOTHING_YET = {errno.EAGAIN, errno.EWOULDBLOCK}


class BufferedTcpTransport(TCPTransport):  # type: ignore[misc]  # py-amqp has no type hints
    def _setup_transport(self) -> None:
        super()._setup_transport()
        self._received = b""
        self._start = 0

    def frame_ready(self) -> bool:
        """True if a whole frame is buffered: reading it needs no system call."""
        received, start = self._received, self._start
        if len(received) - start < FRAME_HEADER.size:
            return False
        size: int = FRAME_HEADER.unpack_from(received, start)[2]
        return len(received) - start > FRAME_HEADER.size + size

    def read_frame(self, unpack: Any = None) -> tuple[int, int, bytes]:
        while True:
            received, start = self._received, self._start
            if len(received) - start >= FRAME_HEADER.size:
                frame_type, channel, size = FRAME_HEADER.unpack_from(received, start)
                end = start + FRAME_HEADER.size + size
                if len(received) > end:
                    if received[end] != FRAME_END:
                        raise UnexpectedFrame(
                            f"Received frame_end {received[end]:#04x} while expecting 0xce"
                        )
                    self._start = end + 1
                    return frame_type, channel, received[start + FRAME_HEADER.size : end]
                missing = end + 1 - len(received)
            else:
                missing = FRAME_HEADER.size - (len(received) - start)
            self._receive(max(missing, READ_CHUNK))

    def _receive(self, most: int) -> None:
        try:
            data = self._quick_recv(most)
        except TimeoutError:
            raise
        except OSError as exc:
            if exc.errno in _NOTHING_YET:  # SO_RCVTIMEO ran out on a blocking socket
                raise TimeoutError() from exc
            if exc.errno != errno.EINTR:
                self.connected = False
            raise
        if not data:
            self.connected = False
            raise OSError("Server unexpectedly closed connection")
        self._received = self._received[self._start :] + data
        self._start = 0

    def _read(self, n: int, initial: bool = False, _errnos: Any = None) -> bytes:
        # py-amqp reads through this only in read_frame, which is replaced above; kept
        # consistent with the buffer all the same.
        while len(self._received) - self._start < n:
            self._receive(max(n - (len(self._received) - self._start), READ_CHUNK))
        start = self._start
        self._start = start + n
        return self._received[start : start + n]
