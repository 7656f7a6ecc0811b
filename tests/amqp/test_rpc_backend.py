"""The rpc:// result backend: results as messages to the caller's queue (PROTOCOL.md 4.4)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from tests.amqp.test_topology import listing

from conveyor import Conveyor, states, testing
from conveyor.backends.rpc import RpcBackend
from conveyor.brokers.amqp import AmqpBroker
from conveyor.envelope import Envelope
from conveyor.errors import ConfigurationError, NotRegistered
from conveyor.routing import Queue

TIMEOUT = 20


@pytest.fixture
def app(amqp_url: str) -> Iterator[Conveyor]:
    instance = Conveyor("rpc", broker=amqp_url, backend="rpc://", result_expires=600)

    @instance.task(name="rpc.add", track_started=True)
    def add(x: int, y: int) -> int:
        return x + y

    yield instance
    instance.close()


def test_results_travel_in_celerys_format_to_the_reply_to_queue(
    app: Conveyor, amqp_url: str
) -> None:
    reader = AmqpBroker(amqp_url)
    try:
        reader.declare_queue(Queue("my-replies"))
        with testing.running_worker(app, pool="threads"):
            result = app.send_task("rpc.add", (2, 3), reply_to="my-replies")
            replies = []
            while len(replies) < 2:
                replies += reader.fetch(["my-replies"], 2, timeout=TIMEOUT)
        reader.ack_many(replies)
        started, success = replies
        for reply in replies:
            assert reply.envelope.properties == {
                "correlation_id": result.id,
                "delivery_mode": 1,
                "priority": 0,
            }
            assert (reply.envelope.content_type, reply.envelope.content_encoding) == (
                "application/json",
                "utf-8",
            )
            assert reply.envelope.headers == {}
            assert (reply.exchange, reply.routing_key) == ("", "my-replies")
        assert json.loads(started.envelope.body)["status"] == states.STARTED
        meta = json.loads(success.envelope.body)
        assert {
            key: meta[key] for key in ("status", "result", "traceback", "children", "task_id")
        } == {
            "status": "SUCCESS",
            "result": 5,
            "traceback": None,
            "children": [],
            "task_id": result.id,
        }
    finally:
        reader.close()


def test_the_caller_sees_each_state_and_its_reply_queue_is_celerys(
    app: Conveyor, vhost: str
) -> None:
    backend = app.backend
    assert isinstance(backend, RpcBackend)
    with testing.running_worker(app, pool="threads"):
        result = app.tasks["rpc.add"].delay(20, 22)
        assert result.get(timeout=TIMEOUT) == 42
    assert result.state == states.SUCCESS
    queues = listing(vhost, "queues", "name", "durable", "auto_delete", "arguments")
    assert queues[backend.reply_to] == ["true", "false", '[{"x-expires",600000}]']
    backend.forget(result.id)
    assert result.state == states.PENDING


def test_a_refused_task_is_reported_to_the_caller(app: Conveyor) -> None:
    # The worker refuses a task it doesn't know outside any task run: the broker
    # remembered the delivery's reply_to for it.
    with testing.running_worker(app, pool="threads"):
        result = app.send_task("rpc.nobody-has-this")
        with pytest.raises(NotRegistered):
            result.get(timeout=TIMEOUT)


def test_a_success_is_never_replaced(app: Conveyor, amqp_url: str) -> None:
    # A duplicate that ran again after a lost connection must not undo a SUCCESS.
    backend = app.backend
    assert isinstance(backend, RpcBackend)
    sender = AmqpBroker(amqp_url)
    try:
        for status in (states.SUCCESS, states.STARTED):
            body = json.dumps({"status": status, "result": 1, "task_id": "t1"}).encode()
            sender.publish(
                Envelope(
                    body,
                    "application/json",
                    "utf-8",
                    {},
                    {"correlation_id": "t1", "delivery_mode": 1},
                ),
                exchange="",
                routing_key=backend.reply_to,
            )
        sender.publisher.flush(TIMEOUT)
        assert backend.wait("t1", timeout=TIMEOUT)["status"] == states.SUCCESS
        time.sleep(0.2)  # the STARTED message arrives too, and changes nothing
        assert backend.get("t1")["status"] == states.SUCCESS  # type: ignore[index]
    finally:
        sender.close()


def test_storing_without_a_caller_to_answer_sends_nothing(app: Conveyor) -> None:
    backend = app.backend
    assert backend is not None
    backend.store("nobody-asked", {"status": "SUCCESS", "result": 1, "task_id": "x"})
    assert backend.get("nobody-asked") is None


def test_rpc_needs_an_amqp_broker() -> None:
    with pytest.raises(ConfigurationError, match="amqp://"):
        RpcBackend("rpc://", broker_url="redis://localhost/0")
