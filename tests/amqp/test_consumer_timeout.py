"""RabbitMQ's ``consumer_timeout`` and tasks that wait longer than it.

RabbitMQ 3.10 closes a channel whose oldest unacknowledged delivery is older than
``consumer_timeout`` (30 min by default, node-wide, read when the channel opens, checked
on a 60 s tick). These tests give the channels of their private vhost a 1 s timeout and
extra ticks (see ``vhosts.shorten_consumer_timeout``): the first proves the trap is armed,
the others that an eta several times longer than the timeout is neither lost, nor run
twice, nor closes the channel, whether it waits in the delay chain from the start
(Conveyor's producer) or arrives early in the queue (Celery's producer) and is deferred.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.amqp.vhosts import consumer_timeouts, shorten_consumer_timeout

from conveyor import Conveyor, testing
from conveyor.brokers.amqp import AmqpBroker
from conveyor.envelope import Envelope
from conveyor.worker.worker import Worker

pytestmark = pytest.mark.slow

TIMEOUT_MS = 1000
ETA = 4.0  # four times the consumer_timeout


def arm(vhost: str, seconds: float) -> None:
    """A 1 s consumer_timeout on this vhost's channels, checked every 0.2 s for a while."""
    shorten_consumer_timeout(vhost, TIMEOUT_MS, ticks=int(seconds / 0.2) + 1, every_ms=200)
    assert TIMEOUT_MS in consumer_timeouts(vhost)


def test_a_delivery_held_past_the_timeout_closes_its_channel(
    amqp_url: str, vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The trap, armed: an unacked delivery held too long costs the whole channel.
    broker = AmqpBroker(amqp_url)
    try:
        broker.publish(
            Envelope(b"held", "text/plain", "utf-8", {}, {}), exchange="", routing_key="q"
        )
        [held] = broker.fetch(["q"], 1, timeout=5)
        generation = broker.consuming.generation
        arm(vhost, 4)
        deadline = time.monotonic() + 10
        while broker.consuming.generation == generation:
            assert time.monotonic() < deadline, "RabbitMQ did not close the channel"
            time.sleep(0.05)
        assert "consumer_timeout closed the consuming channel" in caplog.text
        [again] = broker.fetch(["q"], 1, timeout=5)  # back in the queue, delivered again
        assert (again.envelope.body, again.redelivered) == (b"held", True)
        broker.ack(held)  # stale: ignored
        broker.ack(again)
    finally:
        broker.close()


def ran(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def worker(conveyor_app: Conveyor, vhost: str) -> Any:
    with testing.running_worker(conveyor_app, ["celery"], pool="threads", concurrency=2) as running:
        deadline = time.monotonic() + 10
        while conveyor_app.broker.consuming.channel is None:  # consuming channel open
            assert time.monotonic() < deadline
            time.sleep(0.02)
        arm(vhost, ETA + 3)
        yield running


def test_an_eta_longer_than_the_timeout_waits_in_the_chain(
    conveyor_app: Conveyor, worker: Worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "ran.log"
    generation = conveyor_app.broker.consuming.generation
    sent = datetime.now(UTC)
    result = conveyor_app.tasks["interop.note"].apply_async(("late", str(log)), countdown=ETA)
    assert result.get(timeout=ETA + 20) == "late"
    assert datetime.fromisoformat(str(result.date_done)) >= sent + timedelta(seconds=ETA - 0.1)
    time.sleep(1.5)  # a redelivery would show up by now
    assert ran(log) == ["late conveyor"]
    assert conveyor_app.broker.consuming.generation == generation  # channel never closed
    assert "consumer_timeout" not in caplog.text


def test_an_eta_arriving_early_from_celery_is_deferred_not_held(
    celery_client: Any,
    conveyor_app: Conveyor,
    worker: Worker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Celery's producer puts the eta message in the queue at once; the worker hands it
    # to the delay chain (publisher-confirmed, then acks it) instead of holding it.
    log = tmp_path / "ran.log"
    generation = conveyor_app.broker.consuming.generation
    sent = datetime.now(UTC)
    result = celery_client.send_task("interop.note", args=("early", str(log)), countdown=ETA)
    assert result.get(timeout=ETA + 20) == "early"
    assert result.date_done >= sent + timedelta(seconds=ETA - 0.1)
    time.sleep(1.5)
    assert ran(log) == ["early conveyor"]
    assert conveyor_app.broker.consuming.generation == generation
    assert "consumer_timeout" not in caplog.text


def test_the_consumer_timeout_option_goes_on_the_consumer_not_the_queue(
    amqp_url: str, vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    # RabbitMQ >= 3.11.15 honours a per-consumer timeout; 3.10 ignores it, and says so.
    from tests.amqp.vhosts import rabbitmqctl

    broker = AmqpBroker(amqp_url, consumer_timeout=7200)
    try:
        assert broker.fetch(["long"], 1, timeout=0) == []
        broker.publish(
            Envelope(b"x", "text/plain", "utf-8", {}, {}), exchange="", routing_key="long"
        )
        [delivery] = broker.fetch(["long"], 1, timeout=5)
        broker.ack(delivery)
        consumers = rabbitmqctl(
            "list_consumers",
            "-p",
            vhost,
            "--quiet",
            "--no-table-headers",
            "queue_name",
            "arguments",
        )
        assert '{"x-consumer-timeout",7200000}' in consumers
        queues = rabbitmqctl(
            "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "arguments"
        )
        assert "long\t[]" in queues
        version = broker.io.call(lambda conn: conn.server_properties["version"])
        if tuple(int(part) for part in version.split(".")[:3]) < (3, 11, 15):
            assert "ignores the consumer_timeout option" in caplog.text
    finally:
        broker.close()
