"""What the broker declares on RabbitMQ, how it connects, and what it refuses to send."""

from __future__ import annotations

import ssl
import time
from typing import Any

import pytest
from tests.amqp.vhosts import rabbitmqctl

from conveyor import Conveyor, testing
from conveyor.brokers.amqp import AmqpBroker
from conveyor.brokers.amqp_delay import LEVELS, DelayChain
from conveyor.brokers.amqp_io import parse_amqp_url
from conveyor.envelope import Envelope
from conveyor.errors import BrokerUnavailable, ConfigurationError, EncodeError
from conveyor.routing import Exchange, Queue


def envelope(body: str, **headers: Any) -> Envelope:
    return Envelope(body.encode(), "application/json", "utf-8", headers, {})


def listing(vhost: str, kind: str, *columns: str) -> dict[str, list[str]]:
    """``rabbitmqctl list_<kind>`` for one vhost, by the first column.

    (list_connections and list_channels ignore ``-p``: a vhost column filters them.)
    """
    node_wide = kind in ("connections", "channels")
    wanted = ("vhost", *columns) if node_wide else columns
    text = rabbitmqctl(f"list_{kind}", "-p", vhost, "--quiet", "--no-table-headers", *wanted)
    rows = [line.split("\t") for line in text.strip().splitlines() if line]
    if node_wide:
        rows = [row[1:] for row in rows if row[0] == vhost]
    return {row[0]: row[1:] for row in rows}


@pytest.fixture
def broker(amqp_url: str) -> Any:
    instance = AmqpBroker(amqp_url)
    yield instance
    instance.close()


def test_url_forms_as_kombu_reads_them() -> None:
    plain = parse_amqp_url("amqp://u:p%40ss@rabbit:5673/prod", {})
    assert (plain.host, plain.port, plain.userid, plain.password, plain.virtual_host) == (
        "rabbit",
        5673,
        "u",
        "p@ss",
        "prod",
    )
    for url in ("amqp://h", "amqp://h/", "pyamqp://h//", "amqp://h/%2F"):
        params = parse_amqp_url(url, {})
        assert (params.virtual_host, params.userid, params.port) == ("/", "guest", 5672)
    secure = parse_amqp_url("amqps://h/v?heartbeat=30", {"ssl": {"ca_certs": "/ca.pem"}})
    assert (secure.port, secure.ssl, secure.heartbeat) == (5671, {"ca_certs": "/ca.pem"}, 30)
    assert parse_amqp_url("amqps://h", {}).ssl is True
    context = ssl.create_default_context()
    assert parse_amqp_url("amqp://h", {"ssl": context}).ssl is context
    with pytest.raises(ConfigurationError):
        parse_amqp_url("redis://h", {})
    with pytest.raises(ConfigurationError, match="unknown AMQP transport options"):
        AmqpBroker("amqp://h", confirm_windw=3)


def test_an_unreachable_broker_is_reported_not_waited_for_forever() -> None:
    broker = AmqpBroker("amqp://guest:guest@127.0.0.1:1//", connect_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="cannot reach RabbitMQ at amqp://guest:"):
            broker.check()
        assert time.monotonic() - started < 5
    finally:
        broker.close()


def test_celerys_default_queue_is_declared_exactly_as_celery_declares_it(
    amqp_url: str, vhost: str
) -> None:
    app = Conveyor("decl", broker=amqp_url, backend=None)
    try:
        app.send_task("decl.anything")
    finally:
        app.close()
    queues = listing(vhost, "queues", "name", "durable", "auto_delete", "exclusive", "arguments")
    assert queues["celery"] == ["true", "false", "false", "[]"]
    exchanges = listing(vhost, "exchanges", "name", "type", "durable", "auto_delete", "arguments")
    assert exchanges["celery"] == ["direct", "true", "false", "[]"]
    bindings = rabbitmqctl(
        "list_bindings",
        "-p",
        vhost,
        "--quiet",
        "--no-table-headers",
        "source_name",
        "destination_name",
        "routing_key",
    )
    assert "celery\tcelery\tcelery" in bindings
    # kombu (what Celery uses) declares the same entities without a 406.
    from kombu import Connection
    from kombu import Exchange as KombuExchange
    from kombu import Queue as KombuQueue

    with Connection(amqp_url) as connection:
        channel = connection.channel()
        KombuQueue("celery", KombuExchange("celery", "direct"), "celery")(channel).declare()
        channel.close()


def test_queue_arguments_priorities_and_quorum_queues(broker: AmqpBroker, vhost: str) -> None:
    broker.declare_queue(Queue("prio", max_priority=9))
    broker.declare_queue(Queue("qq", queue_arguments={"x-queue-type": "quorum"}))
    broker.declare_queue(
        Queue("ttl", Exchange("events", "topic"), "ttl.#", queue_arguments={"x-message-ttl": 60000})
    )
    queues = listing(vhost, "queues", "name", "type", "arguments")
    assert queues["prio"] == ["classic", '[{"x-max-priority",9}]']
    assert queues["qq"][0] == "quorum"
    assert queues["ttl"] == ["classic", '[{"x-message-ttl",60000}]']
    assert listing(vhost, "exchanges", "name", "type")["events"] == ["topic"]
    # Quorum queues refuse channel-wide QoS: their consumer gets a per-consumer limit.
    broker.publish(envelope("q1"), exchange="", routing_key="qq")
    [delivery] = broker.fetch(["qq"], 1, timeout=5)
    broker.reject(delivery, requeue=True)
    [again] = broker.fetch(["qq"], 1, timeout=5)
    assert again.delivery_count == 2  # from x-delivery-count
    assert "x-delivery-count" not in again.envelope.headers
    broker.ack(again)
    with pytest.raises(ConfigurationError, match="quorum queues have no priorities"):
        broker.declare_queue(
            Queue("bad", max_priority=5, queue_arguments={"x-queue-type": "quorum"})
        )


def test_a_conflicting_declaration_is_a_clear_error_and_the_broker_goes_on(
    broker: AmqpBroker,
) -> None:
    broker.declare_queue(Queue("celery"))
    with pytest.raises(ConfigurationError, match="'celery': it exists with other attributes"):
        broker.declare_queue(Queue("celery", max_priority=10))
    broker.publish(envelope("still fine"), exchange="", routing_key="celery")
    [delivery] = broker.fetch(["celery"], 1, timeout=5)
    broker.ack(delivery)


def test_headers_too_big_for_a_frame_are_refused_before_sending(broker: AmqpBroker) -> None:
    with pytest.raises(EncodeError, match="frame_max"):
        broker.publish(envelope("x", argsrepr="y" * 200_000), exchange="", routing_key="q")
    with pytest.raises(EncodeError, match="64-bit"):
        broker.publish(envelope("x", big=2**70), exchange="", routing_key="q")
    broker.publish(envelope("fine", argsrepr="y" * 1000), exchange="", routing_key="q")
    [delivery] = broker.fetch(["q"], 1, timeout=5)
    assert delivery.envelope.body == b"fine"
    broker.ack(delivery)


def test_rejected_messages_are_kept_with_their_reason(broker: AmqpBroker, vhost: str) -> None:
    broker.publish(envelope("poison", id="t-1"), exchange="", routing_key="work")
    [delivery] = broker.fetch(["work"], 1, timeout=5)
    broker.reject(delivery, requeue=False, reason="malformed body")
    [dead] = broker.dead_letters("work")
    assert (dead.envelope.body, dead.reason, dead.queue, dead.delivery_count) == (
        b"poison",
        "malformed body",
        "work",
        1,
    )
    assert listing(vhost, "queues", "name", "messages")["conveyor.dead.work"] == ["1"]
    # A queue with a dead-letter exchange of its own: RabbitMQ dead-letters it natively.
    broker.declare_queue(Queue("parked"))
    broker.declare_queue(
        Queue(
            "native",
            queue_arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "parked"},
        )
    )
    broker.publish(envelope("to park"), exchange="", routing_key="native")
    [delivery] = broker.fetch(["native"], 1, timeout=5)
    broker.reject(delivery, requeue=False, reason="no thanks")
    [parked] = broker.fetch(["parked"], 1, timeout=5)
    assert parked.envelope.body == b"to park"
    assert parked.envelope.headers["x-death"][0]["reason"] == "rejected"
    broker.ack(parked)


def test_the_delay_chain_and_a_delay_through_a_topic_exchange(
    broker: AmqpBroker, vhost: str
) -> None:
    events = Exchange("events", "topic")
    broker.declare_queue(Queue("eu", events, "*.eu"))
    broker.declare_queue(Queue("all", events, "#"))
    sent = time.monotonic()
    broker.publish(envelope("later"), exchange="events", routing_key="order.eu", delay=0.4)
    assert [s.delayed for s in broker.stats(["eu", "all"])] == [1, 1]
    arrived = {name: broker.fetch([name], 1, timeout=5) for name in ("eu", "all")}
    assert time.monotonic() - sent >= 0.4
    assert all(len(got) == 1 and got[0].routing_key == "order.eu" for got in arrived.values())
    assert all("x-death" not in got[0].envelope.headers for got in arrived.values())
    broker.ack_many([got[0] for got in arrived.values()])
    chain = DelayChain()
    queues = listing(vhost, "queues", "name", "durable", "arguments")
    for level in range(LEVELS):
        durable, arguments = queues[chain.level(level)]
        assert durable == "true"
        assert f'{{"x-message-ttl",{2**level}}}' in arguments
    assert listing(vhost, "exchanges", "name", "type")[chain.due] == ["topic"]


def test_one_connection_heartbeats_and_prefetch_from_the_worker_window(
    amqp_url: str, vhost: str
) -> None:
    app = Conveyor("qos", broker=amqp_url, backend=None, broker_transport_options={"heartbeat": 20})

    @app.task(name="qos.noop")
    def noop() -> None:
        return None

    try:
        with testing.running_worker(app, pool="threads", concurrency=2):
            for _ in range(50):
                noop.delay()
            deadline = time.monotonic() + 10
            while app.broker.stats(["celery"])[0].ready:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert app.broker.io.call(lambda conn: conn.heartbeat) == 20
            connections = listing(vhost, "connections", "name", "channels")
            assert len(connections) == 1  # publishing, consuming, declaring: one socket
            assert next(iter(connections.values())) == ["3"]
            channels = listing(
                vhost, "channels", "number", "global_prefetch_count", "consumer_count"
            )
            # concurrency 2 x worker_prefetch_multiplier 4, on the consuming channel
            assert ["8", "1"] in channels.values()
    finally:
        app.close()


def test_an_idle_connection_answers_at_once_after_a_heartbeat(amqp_url: str) -> None:
    # RabbitMQ sends a heartbeat frame every heartbeat/2 s on an idle connection; reading
    # it must not leave the I/O thread waiting for the frame after it.
    broker = AmqpBroker(amqp_url, heartbeat=4)
    try:
        broker.check()
        time.sleep(2.5)  # a heartbeat arrived at ~2 s, the next comes at ~4 s
        started = time.monotonic()
        broker.check()
        broker.publish(envelope("m"), exchange="", routing_key="q")
        [delivery] = broker.fetch(["q"], 1, timeout=5)
        broker.ack(delivery)
        assert time.monotonic() - started < 0.5
    finally:
        broker.close()
