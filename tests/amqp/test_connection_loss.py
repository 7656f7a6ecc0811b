"""Connections RabbitMQ closes (``rabbitmqctl close_all_connections``, as an operator or a
network blip would): workers, producers and result waiters reconnect, declare again and go
on; late-ack tasks in flight are delivered again, never lost."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.amqp.conftest import ProcessWorker, start_conveyor_worker
from tests.amqp.vhosts import close_connections

from conveyor import Conveyor, testing
from conveyor.brokers.amqp import AmqpBroker
from conveyor.brokers.amqp_io import AmqpIo, parse_amqp_url
from conveyor.envelope import Envelope
from conveyor.errors import BrokerUnavailable
from conveyor.routing import Queue

TIMEOUT = 30


def envelope(body: str) -> Envelope:
    return Envelope(body.encode(), "application/json", "utf-8", {}, {})


def wait_for(predicate: object, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.05)


def recorded(log: Path) -> Counter[int]:
    if not log.exists():
        return Counter()
    return Counter(int(line.split()[0]) for line in log.read_text().splitlines())


@pytest.mark.slow
def test_worker_reconnects_keeps_consuming_and_loses_no_late_ack_task(
    interop: dict[str, str],
    vhost: str,
    conveyor_app: Conveyor,
    processes: list[ProcessWorker],
    tmp_path: Path,
) -> None:
    log = tmp_path / "record.log"
    worker = start_conveyor_worker(
        interop, tmp_path / "w.log", "-Q", "celery", "-P", "prefork", "-c", "2"
    )
    processes.append(worker)
    late = conveyor_app.tasks["interop.late_record"]
    for n in range(20):
        late.apply_async((str(log), n, 0.2), ignore_result=True)
    wait_for(lambda: len(recorded(log)) >= 3, what="tasks running")
    close_connections(vhost)  # every connection: the worker's, and this producer's
    worker.wait_for("Broker connection lost")
    worker.wait_for("Reconnected to RabbitMQ")
    worker.wait_for("Consuming from celery again")
    for n in range(20, 30):  # sent after the outage, through a reconnected producer
        late.apply_async((str(log), n, 0.0), ignore_result=True)
    wait_for(lambda: set(recorded(log)) == set(range(30)), what="every task ran")
    assert worker.process.poll() is None
    # At-least-once: a task that was running when the connection went may run twice.
    assert all(times <= 2 for times in recorded(log).values())
    assert worker.stop() == 0, worker.text()


def test_unconfirmed_messages_are_sent_again_after_a_lost_connection(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="conveyor.broker.amqp")
    broker = AmqpBroker(amqp_url)
    try:
        broker.declare_queue(Queue("outbox"))
        sent = [str(n) for n in range(300)]
        broker.publish_many([(envelope(body), "", "outbox") for body in sent])

        def cut(conn: object) -> None:
            # Whatever is written is not confirmed yet: the socket dies before any
            # confirm is read (as on a network failure).
            conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]

        broker.io.call(cut)
        wait_for(lambda: broker.io.connections >= 2, what="reconnected")
        assert broker.publisher.flush(TIMEOUT)
        received: list[str] = []
        while deliveries := broker.fetch(["outbox"], 100, timeout=1):
            received += [d.envelope.body.decode() for d in deliveries]
            broker.ack_many(deliveries)
        assert set(received) == set(sent)  # each at least once; a few maybe twice
        assert "Broker connection lost" in caplog.text
        assert "again: their confirms were lost with the connection" in caplog.text
    finally:
        broker.close()


def test_a_blocked_fetch_reports_the_outage_then_consuming_resumes(
    amqp_url: str, vhost: str
) -> None:
    consumer, producer = AmqpBroker(amqp_url), AmqpBroker(amqp_url)
    try:
        consumer.declare_queue(Queue("q"))
        assert consumer.fetch(["q"], 1, timeout=0) == []
        outcome: dict[str, object] = {}

        def blocked_fetch() -> None:
            try:
                outcome["value"] = consumer.fetch(["q"], 1, timeout=20)
            except BrokerUnavailable as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=blocked_fetch)
        thread.start()
        time.sleep(0.2)
        close_connections(vhost)
        thread.join(TIMEOUT)
        assert isinstance(outcome.get("error"), BrokerUnavailable)
        wait_for(lambda: consumer.io.connected, what="consumer reconnected")
        producer.publish(envelope("after"), exchange="", routing_key="q")
        deliveries = consumer.fetch(["q"], 1, timeout=10)
        assert [d.envelope.body for d in deliveries] == [b"after"]
        consumer.ack(deliveries[0])
    finally:
        consumer.close()
        producer.close()


def test_a_channel_rabbitmq_closes_is_replaced_and_its_deliveries_come_back(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = AmqpBroker(amqp_url)
    try:
        broker.publish_many([(envelope(str(n)), "", "q") for n in range(3)])
        first = broker.fetch(["q"], 3, timeout=5)
        assert len(first) == 3
        generation = first[0].broker_data[0]
        # Acking a tag the channel never issued makes RabbitMQ close the channel (406).
        broker.consuming.settle("ack", 10_000, generation)
        wait_for(lambda: broker.consuming.generation > generation, what="a new channel")
        broker.ack_many(first)  # stale: ignored, the messages come back instead
        again = []
        while len(again) < 3:
            batch = broker.fetch(["q"], 3, timeout=5)
            assert batch, "the deliveries of the closed channel did not come back"
            again += batch
        assert sorted(d.envelope.body for d in again) == [b"0", b"1", b"2"]
        assert all(d.redelivered and d.delivery_count >= 2 for d in again)
        broker.ack_many(again)
        assert "closed the consuming channel" in caplog.text
    finally:
        broker.close()


def test_a_result_wait_spans_a_lost_connection(amqp_url: str, vhost: str) -> None:
    app = Conveyor("loss", broker=amqp_url, backend="rpc://")

    @app.task(name="loss.slow_add")
    def slow_add(x: int, y: int) -> int:
        time.sleep(1.0)
        return x + y

    try:
        with testing.running_worker(app, pool="threads", concurrency=1) as worker:
            result = slow_add.delay(20, 22)
            wait_for(lambda: worker.consumer.running, what="task started")
            close_connections(vhost)
            assert result.get(timeout=TIMEOUT) == 42
    finally:
        app.close()


class _FailsAtClose:
    """An attachment whose last send fails, as a connection dropped at that moment."""

    def __init__(self, io: AmqpIo) -> None:
        self.io = io

    def attach(self, connection: Any) -> None:
        pass

    def detach(self) -> None:
        pass

    def channel_closed(self, channel: Any, code: int, text: str) -> None:
        pass

    def work(self) -> bool:
        if self.io.closing():
            raise ConnectionResetError("connection reset by peer")
        return False

    def after_io(self) -> None:
        pass


def test_a_send_that_fails_while_closing_is_logged_with_its_reason(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    io = AmqpIo(parse_amqp_url(amqp_url, {}), url=amqp_url, name="conveyor-test-close")
    io.attachments.append(_FailsAtClose(io))
    io.start()
    io.wait_connected()
    with caplog.at_level(logging.WARNING, logger="conveyor.broker.amqp"):
        io.close()
    assert any("without sending what was queued (connection reset by peer)" in r.getMessage()
               for r in caplog.records)
