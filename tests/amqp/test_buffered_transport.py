"""The AMQP transport reads what the socket holds and cuts whole frames out of it."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from amqp.exceptions import UnexpectedFrame

import amqp
from conveyor.brokers.amqp_io import Connection, parse_amqp_url
from conveyor.brokers.amqp_transport import BufferedTcpTransport


def frame(frame_type: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


@pytest.fixture
def wired() -> Iterator[tuple[BufferedTcpTransport, socket.socket]]:
    """A transport reading one end of a real socket pair; the test writes the other."""
    ours, theirs = socket.socketpair()
    transport = BufferedTcpTransport("127.0.0.1:5672")
    transport.sock = ours
    transport._setup_transport()
    yield transport, theirs
    ours.close()
    theirs.close()


def test_frames_sent_together_are_read_apart_and_in_order(
    wired: tuple[BufferedTcpTransport, socket.socket],
) -> None:
    transport, peer = wired
    assert not transport.frame_ready()
    peer.sendall(frame(1, 1, b"method") + frame(2, 1, b"h" * 300) + frame(3, 1, b""))
    assert transport.read_frame() == (1, 1, b"method")
    assert transport.frame_ready()  # the rest came with the first read
    assert transport.read_frame() == (2, 1, b"h" * 300)
    assert transport.read_frame() == (3, 1, b"")
    assert not transport.frame_ready()


def test_a_read_that_times_out_half_way_keeps_the_frame_whole(
    wired: tuple[BufferedTcpTransport, socket.socket],
) -> None:
    transport, peer = wired
    whole = frame(3, 7, bytes(range(256)) * 10)
    peer.sendall(whole[:5])  # not even the whole header
    with transport.having_timeout(0.05), pytest.raises(TimeoutError):
        transport.read_frame()
    peer.sendall(whole[5:1000])
    assert not transport.frame_ready()
    with transport.having_timeout(0.05), pytest.raises(TimeoutError):
        transport.read_frame()
    peer.sendall(whole[1000:] + frame(8, 0, b""))
    assert transport.read_frame() == (3, 7, bytes(range(256)) * 10)
    assert transport.read_frame() == (8, 0, b"")


def test_a_read_of_so_many_bytes_takes_them_from_the_same_buffer(
    wired: tuple[BufferedTcpTransport, socket.socket],
) -> None:
    # py-amqp reads whole frames through read_frame(); a read of its own must still not
    # go around the buffer, or the frames after it would be cut at the wrong place.
    transport, peer = wired
    second = frame(1, 0, b"start")
    peer.sendall(frame(8, 0, b"") + second + frame(3, 1, b"body"))
    assert transport.read_frame() == (8, 0, b"")  # the other two are buffered now
    with transport.having_timeout(0.05):
        assert transport._read(len(second)) == second
    assert transport.read_frame() == (3, 1, b"body")


def test_a_frame_without_its_end_octet_is_refused(
    wired: tuple[BufferedTcpTransport, socket.socket],
) -> None:
    transport, peer = wired
    peer.sendall(frame(1, 1, b"method", end=0x00))
    with pytest.raises(UnexpectedFrame, match="0x00"):
        transport.read_frame()


def test_a_peer_that_closes_mid_frame_marks_the_transport_disconnected(
    wired: tuple[BufferedTcpTransport, socket.socket],
) -> None:
    transport, peer = wired
    transport.connected = True
    peer.sendall(frame(1, 1, b"method")[:9])
    peer.close()
    with pytest.raises(OSError, match="unexpectedly closed"):
        transport.read_frame()
    assert transport.connected is False


def test_a_burst_of_deliveries_costs_a_few_receives_not_three_per_frame(
    amqp_url: str,
) -> None:
    params = parse_amqp_url(amqp_url, {})
    connection = Connection(host=params.address, userid=params.userid,
                            password=params.password, virtual_host=params.virtual_host)
    connection.connect()
    try:
        transport = connection.transport
        assert isinstance(transport, BufferedTcpTransport)
        channel = connection.channel()
        queue, _, _ = channel.queue_declare("", exclusive=True)
        bodies = [f"message {n} ".encode() * 20 for n in range(200)]
        for body in bodies:
            channel.basic_publish(amqp.Message(body), exchange="", routing_key=queue)
        received: list[bytes] = []
        channel.basic_consume(queue, no_ack=True,
                              callback=lambda message: received.append(message.body))
        receives = 0
        recv = transport._quick_recv

        def counted(size: int) -> Any:
            nonlocal receives
            receives += 1
            return recv(size)

        transport._quick_recv = counted
        while len(received) < len(bodies):
            connection.drain_events(timeout=5)
        assert received == bodies
        # 600 frames: py-amqp's own transport makes three receives for each.
        assert receives < 100
    finally:
        connection.close()

