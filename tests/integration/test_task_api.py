"""The producer-facing API, checked on the wire and through a worker (memory broker)."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor import Conveyor, states, testing
from conveyor.errors import ConfigurationError, MaxRetriesExceededError, Retry
from conveyor.retry_policy import backoff_countdown


@pytest.fixture
def app() -> Conveyor:
    return testing.memory_app("api")


def fetch_one(app: Conveyor, queue: str = "celery") -> Any:
    deliveries = app.broker.fetch([queue], 1, 1.0)
    assert deliveries, f"nothing in {queue}"
    return deliveries[0]


def test_apply_async_options_reach_the_wire(app: Conveyor) -> None:
    @app.task(name="api.add")
    def add(x: int, y: int) -> int:
        return x + y

    eta = datetime.now(UTC) - timedelta(seconds=1)  # due: visible at once
    result = add.apply_async(
        (1, 2), task_id="fixed-id", queue="math", priority=7, headers={"tenant": "a"},
        acks_late=True, serializer="msgpack", eta=eta, expires=60, time_limit=5,
        soft_time_limit=3)
    assert result.id == "fixed-id"
    delivery = fetch_one(app, "math")
    envelope = delivery.envelope
    assert envelope.content_type == "application/x-msgpack"
    assert envelope.properties["priority"] == 7
    assert envelope.headers["tenant"] == "a"
    assert envelope.headers["acks_late"] is True
    assert envelope.headers["timelimit"] == [5, 3]
    assert envelope.headers["eta"] == eta.isoformat()
    assert envelope.headers["expires"] is not None
    assert delivery.routing_key == "math"


def test_send_task_leaves_ignore_result_unset_and_routes_by_name(app: Conveyor) -> None:
    app.configure(task_routes={"remote.*": "remote"})
    app.send_task("remote.thing", args=[1], kwargs={"k": "v"})
    envelope = fetch_one(app, "remote").envelope
    assert envelope.headers["ignore_result"] is None
    assert json.loads(envelope.body)[:2] == [[1], {"k": "v"}]


def test_unknown_call_and_task_options_are_errors(app: Conveyor) -> None:
    @app.task(name="api.noop")
    def noop() -> None:
        return None

    with pytest.raises(ConfigurationError, match="did you mean 'countdown'"):
        noop.apply_async(countdwn=3)
    with pytest.raises(ConfigurationError, match="unknown task option 'retries_max'"):
        app.task(retries_max=3)(lambda: None)


def test_retry_republishes_with_retries_plus_one_and_an_eta(app: Conveyor) -> None:
    @app.task(name="api.again", bind=True, max_retries=2)
    def again(self: Any) -> None:
        self.retry(countdown=30)

    again.apply_async(task_id="r1")
    with testing.running_worker(app, pool="solo") as worker:
        wait_for(lambda: app.broker.stats(["celery"])[0].delayed == 1
                 and worker.consumer.processed == 1)
    assert app.AsyncResult("r1").state == states.RETRY
    stats = app.broker.stats(["celery"])[0]
    assert (stats.ready, stats.delayed) == (0, 1)


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def test_retried_message_keeps_identity(app: Conveyor) -> None:
    seen: list[dict[str, Any]] = []

    @app.task(name="api.once_more", bind=True, max_retries=1, default_retry_delay=0)
    def once_more(self: Any) -> int:
        seen.append({"id": self.request.id, "retries": self.request.retries,
                     "parent": self.request.parent_id, "root": self.request.root_id})
        if self.request.retries == 0:
            self.retry()
        return self.request.retries

    result = once_more.delay()
    testing.run_until_idle(app, timeout=10)
    assert result.get(timeout=5) == 1
    assert [s["retries"] for s in seen] == [0, 1]
    assert seen[1]["id"] == seen[0]["id"] == result.id
    assert seen[1]["parent"] == result.id  # a retry is its own parent, as in Celery
    assert seen[1]["root"] == result.id


def test_autoretry_for_and_dont_autoretry_for(app: Conveyor) -> None:
    calls: list[str] = []

    @app.task(name="api.auto", autoretry_for=(OSError,), dont_autoretry_for=(
        FileNotFoundError,), retry_backoff=0.01, retry_jitter=False, max_retries=3)
    def auto(kind: str) -> str:
        calls.append(kind)
        if kind == "missing":
            raise FileNotFoundError("gone")
        if calls.count(kind) < 3:
            raise OSError("transient")
        return "ok"

    flaky = auto.delay("flaky")
    missing = auto.delay("missing")
    testing.run_until_idle(app, timeout=10)
    assert flaky.get(timeout=5) == "ok"
    assert calls.count("flaky") == 3
    with pytest.raises(FileNotFoundError):
        missing.get(timeout=5)
    assert calls.count("missing") == 1


def test_retries_exhausted_raise_max_retries_exceeded(app: Conveyor) -> None:
    @app.task(name="api.never", bind=True, max_retries=2, default_retry_delay=0)
    def never(self: Any) -> None:
        self.retry()

    result = never.delay()
    testing.run_until_idle(app, timeout=10)
    with pytest.raises(MaxRetriesExceededError):
        result.get(timeout=5)


def test_backoff_grows_and_caps() -> None:
    assert [backoff_countdown(1, n, 600, jitter=False) for n in range(4)] == [1, 2, 4, 8]
    assert backoff_countdown(1, 20, 600, jitter=False) == 600
    assert all(0 <= backoff_countdown(1, 3, 600) <= 8 for _ in range(50))


def test_states_track_started_received_and_ignore_result(app: Conveyor) -> None:
    observed: list[str] = []
    started_info: list[Any] = []

    @app.task(name="api.tracked", bind=True, track_started=True)
    def tracked(self: Any) -> str:
        observed.append(app.AsyncResult(self.request.id).state)
        started_info.append(app.AsyncResult(self.request.id).info)
        return "done"

    @app.task(name="api.ignored", ignore_result=True)
    def ignored() -> str:
        return "not kept"

    app.configure(task_track_received=True)
    waiting = tracked.delay()
    assert waiting.state == states.PENDING
    quiet = ignored.delay()
    testing.run_until_idle(app, timeout=10)
    assert observed == [states.STARTED]
    assert started_info == [{"pid": os.getpid(), "hostname": started_info[0]["hostname"]}]
    assert waiting.get(timeout=5) == "done"
    assert quiet.state == states.PENDING


def test_failure_keeps_type_message_and_traceback_and_forget(app: Conveyor) -> None:
    class QuotaError(Exception):
        pass

    @app.task(name="api.quota")
    def quota() -> None:
        raise QuotaError("over quota", 42)

    result = quota.delay()
    testing.run_until_idle(app, timeout=10)
    assert result.failed()
    assert not result.successful()
    assert result.ready()
    error = result.result
    assert type(error).__name__ == "QuotaError"
    assert error.args == ("over quota", 42)
    assert result.traceback is not None
    assert "QuotaError" in result.traceback
    result.forget()
    assert result.state == states.PENDING


def test_async_twins(app: Conveyor) -> None:
    @app.task(name="api.twice")
    async def twice(n: int) -> int:
        await asyncio.sleep(0)
        return 2 * n

    async def main() -> int:
        result = await twice.adelay(21)
        await asyncio.to_thread(testing.run_until_idle, app, timeout=10)
        return await result.aget(timeout=5)

    assert asyncio.run(main()) == 42


def test_async_tasks_share_one_loop_per_thread(app: Conveyor) -> None:
    loops: set[int] = set()

    @app.task(name="api.loop_id")
    async def loop_id() -> None:
        loops.add(id(asyncio.get_running_loop()))

    for _ in range(20):
        loop_id.delay()
    testing.run_until_idle(app, timeout=10, pool="solo")
    assert len(loops) == 1


def test_eager_mode_runs_in_the_caller_and_propagates() -> None:
    app = testing.eager_app("eager")

    @app.task(name="eager.add", bind=True, max_retries=2)
    def add(self: Any, x: int, y: int) -> int:
        if self.request.retries < 1:
            self.retry(countdown=100)
        return x + y

    @app.task(name="eager.fail")
    def fail() -> None:
        raise KeyError("k")

    assert add.delay(2, 2).get() == 4
    with pytest.raises(KeyError):
        fail.delay()


def test_retry_outside_a_worker_raises_the_given_exception(app: Conveyor) -> None:
    @app.task(name="api.direct", bind=True)
    def direct(self: Any) -> None:
        self.retry(exc=ValueError("called directly"))

    with pytest.raises(ValueError, match="called directly"):
        direct()
    assert issubclass(Retry, Exception)
