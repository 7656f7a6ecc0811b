"""The worker's decisions, with a real broker and backend, in this process."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conveyor import Conveyor, Exchange, Queue, states, testing
from conveyor.envelope import Envelope
from conveyor.errors import (
    ContentDisallowed,
    EncodeError,
    NotRegistered,
    RoutingError,
    TaskRevokedError,
)


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Conveyor]:
    if request.param == "memory":
        instance = testing.memory_app("t")
    else:
        url = f"sqlite:///{tmp_path / 'broker.db'}"
        instance = Conveyor("t", broker=url, backend=url,
                            broker_transport_options={"visibility_timeout": 5})
    yield instance
    instance.close()


def register(app: Conveyor) -> None:
    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.flaky", bind=True, max_retries=3, default_retry_delay=0.05)
    def flaky(self, n: int) -> int:  # type: ignore[no-untyped-def]
        if self.request.retries < 2:
            self.retry()
        return n * self.request.retries

    @app.task(name="t.hopeless", bind=True, max_retries=1, default_retry_delay=0.01)
    def hopeless(self) -> None:  # type: ignore[no-untyped-def]
        self.retry(exc=OSError("still down"))

    @app.task(name="t.double")
    async def double(n: int) -> int:
        return n * 2


def raw(app: Conveyor, body: bytes, headers: dict[str, object],
        content_type: str = "application/json") -> None:
    app.broker.declare_queue(Queue("celery"))
    app.broker.publish(Envelope(body, content_type, "utf-8", headers, {}),
                       exchange="", routing_key="celery")


def test_results_retries_and_async(app: Conveyor) -> None:
    register(app)
    add, flaky, double = app.tasks["t.add"], app.tasks["t.flaky"], app.tasks["t.double"]
    results = [add.delay(2, 3), flaky.delay(5), double.delay(21)]
    testing.run_until_idle(app, timeout=20)
    assert [r.get(timeout=5) for r in results] == [5, 10, 42]


def test_max_retries_raises_the_given_exception(app: Conveyor) -> None:
    register(app)
    result = app.tasks["t.hopeless"].delay()
    testing.run_until_idle(app, timeout=20)
    with pytest.raises(OSError, match="still down"):
        result.get(timeout=5)


def test_bad_input_is_refused_and_the_worker_keeps_serving(
    app: Conveyor, caplog: pytest.LogCaptureFixture
) -> None:
    register(app)
    caplog.set_level(logging.ERROR, logger="conveyor.worker")
    raw(app, b"[1, 2", {"task": "t.add", "id": "malformed"})
    raw(app, b"[[1], {}, null]", {"task": "t.nope", "id": "unknown"})
    raw(app, b"\x80\x04K\x01.", {"task": "t.add", "id": "pickled"},
        "application/x-python-serialize")
    raw(app, b"[[], {}, null]", {"id": "no-task-name"})
    good = app.tasks["t.add"].delay(1, 1)
    testing.run_until_idle(app, timeout=20)
    assert good.get(timeout=5) == 2
    with pytest.raises(NotRegistered):
        app.AsyncResult("unknown").get(timeout=1)
    with pytest.raises(ContentDisallowed):
        app.AsyncResult("pickled").get(timeout=1)
    assert app.AsyncResult("malformed").state == states.FAILURE
    text = caplog.text
    assert "unknown task 't.nope'" in text
    assert "not accepted" in text
    assert "invalid body" in text
    assert "not a task message" in text
    dead = sum(s.dead for s in app.broker.stats(["celery"]))
    assert dead == 4


def test_unserializable_argument_fails_at_delay_and_sends_nothing(app: Conveyor) -> None:
    register(app)
    with pytest.raises(EncodeError):
        app.tasks["t.add"].delay(object(), 1)
    assert sum(s.ready for s in app.broker.stats(["celery"])) == 0


def test_invalid_routing_is_a_clear_error(app: Conveyor) -> None:
    register(app)
    with pytest.raises(RoutingError, match="no-such-exchange"):
        app.tasks["t.add"].apply_async((1, 2), exchange="no-such-exchange",
                                       routing_key="x")


def test_expired_task_is_revoked_not_run(app: Conveyor) -> None:
    register(app)
    result = app.tasks["t.add"].apply_async((1, 2), expires=datetime.now(UTC)
                                            - timedelta(seconds=1))
    testing.run_until_idle(app, timeout=20)
    assert result.state == states.REVOKED
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=1)


def test_countdown_waits_in_the_broker(app: Conveyor) -> None:
    register(app)
    sent = time.monotonic()
    result = app.tasks["t.add"].apply_async((2, 2), countdown=0.6)
    stats = app.broker.stats(["celery"])[0]
    assert (stats.ready, stats.delayed) == (0, 1)
    testing.run_until_idle(app, timeout=20)
    assert result.get(timeout=5) == 4
    assert time.monotonic() - sent >= 0.55


def test_routing_through_exchanges_reaches_the_right_queues(app: Conveyor) -> None:
    topic = Exchange("events", "topic")
    fanout = Exchange("broadcast", "fanout")
    headers = Exchange("by-headers", "headers")
    app.configure(task_queues=[
        Queue("audit", topic, routing_key="audit.#"),
        Queue("metrics", topic, routing_key="*.metric"),
        Queue("fan-a", fanout), Queue("fan-b", fanout),
        Queue("pdf", headers, binding_arguments={"x-match": "all", "format": "pdf"}),
    ])
    register(app)
    add = app.tasks["t.add"]
    add.apply_async((1, 1), exchange=topic, routing_key="audit.user.login")
    add.apply_async((1, 1), exchange=topic, routing_key="cpu.metric")
    add.apply_async((1, 1), exchange=fanout, routing_key="")
    add.apply_async((1, 1), exchange=headers, routing_key="", headers={"format": "pdf"})
    add.apply_async((1, 1), exchange=headers, routing_key="", headers={"format": "png"})
    depth = {s.name: s.ready for s in app.broker.stats(
        ["audit", "metrics", "fan-a", "fan-b", "pdf"])}
    assert depth == {"audit": 1, "metrics": 1, "fan-a": 1, "fan-b": 1, "pdf": 1}


def test_warm_stop_gives_prefetched_messages_back(app: Conveyor) -> None:
    @app.task
    def slow() -> str:
        time.sleep(0.3)
        return "done"

    results = [slow.delay() for _ in range(6)]
    with testing.running_worker(app, pool="solo") as worker:
        deadline = time.monotonic() + 10
        while worker.consumer.processed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finished = [r for r in results if r.state == states.SUCCESS]
    assert 1 <= len(finished) < 6
    stats = app.broker.stats(["celery"])[0]
    assert stats.ready == 6 - len(finished)
    assert stats.leased == 0
    testing.run_until_idle(app, timeout=20)
    assert all(r.get(timeout=5) == "done" for r in results)


def test_late_ack_failure_policy(app: Conveyor) -> None:
    @app.task(acks_late=True, acks_on_failure_or_timeout=False)
    def fails() -> None:
        raise RuntimeError("no ack for me")

    result = fails.delay()
    testing.run_until_idle(app, timeout=20)
    assert result.state == states.FAILURE
    assert app.broker.stats(["celery"])[0].dead == 1


def test_asyncio_pool_runs_many_async_tasks_at_once(app: Conveyor) -> None:
    import asyncio
    import threading

    active = 0
    peak = 0
    guard = threading.Lock()

    @app.task(name="t.wait_io")
    async def wait_io(n: int) -> int:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        await asyncio.sleep(0.2)
        with guard:
            active -= 1
        return n

    @app.task(name="t.blocking")
    def blocking(n: int) -> int:
        time.sleep(0.01)
        return -n

    results = [wait_io.delay(i) for i in range(40)] + [blocking.delay(1)]
    testing.run_until_idle(app, timeout=30, pool="asyncio", concurrency=50)
    assert [r.get(timeout=5) for r in results] == [*range(40), -1]
    assert peak >= 20  # concurrent on one loop, not one at a time
