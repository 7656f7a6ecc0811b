"""The RabbitMQ publisher writes a turn's frames together (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest

import amqp  # type: ignore[import-untyped]
from conveyor.brokers import amqp_publish
from conveyor.brokers.amqp_publish import Outgoing, Publisher


class Channel:
    """Writes one frame per message through the transport, as py-amqp does."""

    def __init__(self, transport: Any, fail_at: int | None = None) -> None:
        self.connection = type("Connection", (), {"transport": transport})()
        self.published = 0
        self.fail_at = fail_at

    def send_method(self, sig: Any, format: str, args: Any, content: Any) -> None:
        assert (sig, format) == (amqp.spec.Basic.Publish, "Bssbb")
        assert args == (0, "", "q", False, False)  # as basic_publish sends it
        if self.published == self.fail_at:
            raise amqp.exceptions.FrameSyntaxError("cannot encode")
        self.published += 1
        frame = bytearray(f"[{content}]".encode())
        self.connection.transport.write(memoryview(frame))
        frame[:] = b"X" * len(frame)  # py-amqp reuses its buffer


def tcp_transport(written: list[bytes], error: OSError | None = None) -> Any:
    transport = amqp.transport.TCPTransport("127.0.0.1:1")  # never connected

    def write(data: bytes) -> None:
        if error is not None:
            raise error
        written.append(bytes(data))

    transport._write = write
    transport.connected = True
    return transport


def publisher_with(channel: Channel, count: int) -> Publisher:
    publisher = Publisher(io=None)  # type: ignore[arg-type]  # work() needs no I/O object
    publisher.channel = channel
    publisher._queue.extend(Outgoing(f"m{i}", "", "q", 10) for i in range(count))
    publisher._count = count
    return publisher


def test_a_turns_frames_go_out_in_one_write() -> None:
    written: list[bytes] = []
    transport = tcp_transport(written)
    original = transport._write
    publisher = publisher_with(Channel(transport), 5)
    assert publisher.work() is False
    assert written == [b"[m0][m1][m2][m3][m4]"]
    assert transport._write is original
    assert sorted(publisher._outbox) == [1, 2, 3, 4, 5]


def test_big_turns_are_written_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amqp_publish, "GATHER_BYTES", 8)
    written: list[bytes] = []
    publisher = publisher_with(Channel(tcp_transport(written)), 5)
    publisher.work()
    assert written == [b"[m0][m1]", b"[m2][m3]", b"[m4]"]


def test_what_was_gathered_is_written_when_a_publish_fails() -> None:
    written: list[bytes] = []
    publisher = publisher_with(Channel(tcp_transport(written), fail_at=2), 5)
    with pytest.raises(amqp.exceptions.FrameSyntaxError):
        publisher.work()
    assert written == [b"[m0][m1]"]
    assert [item.message for item in publisher._queue] == ["m2", "m3", "m4"]
    assert sorted(publisher._outbox) == [1, 2]


def test_a_failed_write_fails_as_py_amqps_own_write() -> None:
    transport = tcp_transport([], error=ConnectionResetError(104, "reset"))
    publisher = publisher_with(Channel(transport), 3)
    with pytest.raises(ConnectionResetError):
        publisher.work()
    assert transport.connected is False
    assert sorted(publisher._outbox) == [1, 2, 3]  # sent again on the next connection


def test_a_transport_whose_write_is_a_method_gets_it_back() -> None:
    class Transport:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def _write(self, data: bytes) -> None:
            self.written.append(bytes(data))

        def write(self, data: bytes) -> None:
            self._write(data)

    transport = Transport()
    publisher = publisher_with(Channel(transport), 2)
    publisher.work()
    assert transport.written == [b"[m0][m1]"]
    assert "_write" not in vars(transport)
