"""The in-process worker suite (``tests/integration/test_worker_inprocess.py``) and the
workflow suite (``tests/integration/test_canvas.py``) on RabbitMQ.

Their tests are collected here too, so they run with this module's ``app``: the suites'
own app settings, with the broker on a private vhost and results in SQLite (the suites
read results of messages they publish by hand, without a ``reply_to``, and run chords,
which rpc:// does not do; rpc:// has tests of its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tests.integration import test_canvas as canvas_suite
from tests.integration import test_worker_inprocess as worker_suite

from conveyor import Conveyor, states, testing
from conveyor.errors import TaskRevokedError

SUITES = {"worker": worker_suite, "canvas": canvas_suite}

for _suite_name, _suite in SUITES.items():
    for _name in dir(_suite):
        if _name.startswith("test_"):
            globals()[f"test_{_suite_name}_{_name[5:]}"] = getattr(_suite, _name)


@pytest.fixture
def app(request: pytest.FixtureRequest, amqp_url: str, tmp_path: Path) -> Iterator[Conveyor]:
    canvas = request.function.__module__ == canvas_suite.__name__
    instance = Conveyor(
        "w" if canvas else "t",
        broker=amqp_url,
        backend=f"sqlite:///{tmp_path / 'results.db'}",
        broker_transport_options={"visibility_timeout": 5},
    )
    if canvas:
        canvas_suite.register(instance)
        canvas_suite.ERRBACK_CALLS.clear()
    yield instance
    instance.close()


def test_a_task_expiring_while_it_waits_for_its_eta_is_revoked(app: Conveyor) -> None:
    worker_suite.register(app)
    result = app.tasks["t.add"].apply_async(
        (1, 2), countdown=1.0, expires=datetime.now(UTC) + timedelta(seconds=0.3)
    )
    testing.run_until_idle(app, timeout=20)
    assert result.state == states.REVOKED
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=1)


def test_celerys_per_message_ttl_on_request(amqp_url: str) -> None:
    # With per_message_ttl, the expiration Celery derives from ``expires`` is sent: an
    # already expired message may then vanish in RabbitMQ (PROTOCOL.md 7.4).
    from conveyor.brokers.amqp import AmqpBroker
    from conveyor.envelope import Envelope

    expired = Envelope(
        b"[]",
        "application/json",
        "utf-8",
        {"id": "x", "expires": "2000-01-01T00:00:00+00:00"},
        {"expiration": "0"},
    )
    for keep, expected in ((False, [b"[]"]), (True, [])):
        broker = AmqpBroker(amqp_url, per_message_ttl=keep)
        try:
            broker.purge("ttl")
            broker.publish(expired, exchange="", routing_key="ttl")
            got = broker.fetch(["ttl"], 1, timeout=0.5)
            assert [d.envelope.body for d in got] == expected
            assert all("expiration" not in d.envelope.properties for d in got)
            broker.ack_many(got)
        finally:
            broker.close()
