"""What only the Redis result backend promises: Celery's keys and channels, one shared
listener, no subscription left behind, groups Celery can read."""

from __future__ import annotations

import json
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from tests.redis.scratch import ScratchRedisBackend

import redis
from conveyor import states
from conveyor.backends.meta import build_meta
from conveyor.backends.redis import RedisBackend
from conveyor.errors import TimeoutError

PATIENCE = 10.0


@pytest.fixture
def backend(redis_url: str, prefix: str) -> Iterator[RedisBackend]:
    made = ScratchRedisBackend(redis_url, global_keyprefix=prefix)
    yield made
    made.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, protocol=2)
    yield client
    client.close()


def success(task_id: str, value: Any = 42) -> dict[str, Any]:
    return build_meta(task_id, states.SUCCESS, value)


def test_documents_are_celerys_keys_with_expiry_and_a_publish(
    backend: RedisBackend, raw: redis.Redis, prefix: str
) -> None:
    task_id = str(uuid.uuid4())
    key = f"{prefix}celery-task-meta-{task_id}"
    listener = raw.pubsub()
    listener.subscribe(key)  # as a Celery client waiting in AsyncResult.get()
    try:
        assert listener.get_message(timeout=2)["type"] == "subscribe"
        backend.store(task_id, success(task_id, "héllo"))
        published = listener.get_message(timeout=PATIENCE)
    finally:
        listener.close()
    assert published is not None
    assert published["data"] == raw.get(key)
    document = json.loads(raw.get(key))
    assert (document["status"], document["result"], document["task_id"]) == (
        "SUCCESS",
        "héllo",
        task_id,
    )
    assert 86000 < raw.ttl(key) <= 86400


def test_celerys_prefix_rule(redis_url: str, raw: redis.Redis) -> None:
    name = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(redis_url, global_keyprefix=name)
    try:
        backend.store("t", success("t"))
        assert raw.exists(f"{name}_celery-task-meta-t")  # "_" added, as Celery does
    finally:
        backend.close()
        raw.delete(f"{name}_celery-task-meta-t")


def test_a_success_written_by_celery_is_not_replaced(
    backend: RedisBackend, raw: redis.Redis, prefix: str
) -> None:
    task_id = str(uuid.uuid4())
    celery_document = json.dumps(
        {
            "status": "SUCCESS",
            "result": 1,
            "traceback": None,
            "children": [],
            "date_done": "2026-01-01T00:00:00+00:00",
            "task_id": task_id,
        }
    )
    raw.set(f"{prefix}celery-task-meta-{task_id}", celery_document)
    backend.store(task_id, build_meta(task_id, states.FAILURE, ValueError("late duplicate")))
    assert raw.get(f"{prefix}celery-task-meta-{task_id}") == celery_document.encode()


def subscriber_connections(raw: redis.Redis) -> int:
    return sum(
        1
        for client in raw.client_list()
        if int(client.get("sub", 0)) > 0
        and client.get("db") == str(raw.connection_pool.connection_kwargs["db"])
    )


def test_many_waiters_share_one_listener_and_leave_nothing_subscribed(
    backend: RedisBackend, raw: redis.Redis, prefix: str
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(20)]
    results: dict[str, Any] = {}

    def wait(task_id: str) -> None:
        results[task_id] = backend.wait(task_id, timeout=PATIENCE)["result"]

    threads = [threading.Thread(target=wait, args=(task_id,)) for task_id in ids]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    channels = [f"{prefix}celery-task-meta-{task_id}" for task_id in ids]
    assert all(count == 1 for _, count in raw.pubsub_numsub(*channels))
    for task_id in ids:
        backend.store(task_id, success(task_id, task_id))
    for thread in threads:
        thread.join(PATIENCE)
    assert results == {task_id: task_id for task_id in ids}
    for _ in range(5):  # waits that time out unsubscribe too
        with pytest.raises(TimeoutError):
            backend.wait(str(uuid.uuid4()), timeout=0.05)
    deadline = time.monotonic() + PATIENCE
    while raw.pubsub_numpat() + sum(n for _, n in raw.pubsub_numsub(*channels)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert not list(raw.pubsub_channels(f"{prefix}*"))


def test_wait_returns_within_milliseconds_of_the_store(backend: RedisBackend) -> None:
    delays = []
    for _ in range(20):
        task_id = str(uuid.uuid4())
        stored_at: list[float] = []

        def store(task_id: str = task_id, stored_at: list[float] = stored_at) -> None:
            time.sleep(0.02)
            stored_at.append(time.monotonic())
            backend.store(task_id, success(task_id))

        threading.Thread(target=store).start()
        backend.wait(task_id, timeout=PATIENCE)
        delays.append(time.monotonic() - stored_at[0])
    delays.sort()
    assert delays[len(delays) // 2] < 0.05  # the median, generous on a shared machine


def test_groups_are_celerys_documents(
    backend: RedisBackend, celery_client: Any, raw: redis.Redis, prefix: str
) -> None:
    from celery.result import GroupResult

    members = [str(uuid.uuid4()) for _ in range(3)]
    backend.save_group("g-1", members)
    restored = GroupResult.restore("g-1", app=celery_client)
    assert [result.id for result in restored.results] == members
    assert json.loads(raw.get(f"{prefix}celery-taskset-meta-g-1")) == {
        "result": [["g-1", None], [[[m, None], None] for m in members]]
    }
    saved = celery_client.GroupResult("g-2", [celery_client.AsyncResult(m) for m in members])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Celery's SETEX, in redis-py 8
        saved.save()
    assert backend.get_group("g-2") == members
    backend.forget_group("g-1")
    assert backend.get_group("g-1") is None


def test_result_extended_fields_from_a_celery_reader(
    interop: dict[str, str], celery_client: Any
) -> None:
    from tests.redis.conveyor_app import make_app

    from conveyor import testing

    app = make_app()
    try:
        result = app.send_task("interop.add", (2, 3))
        testing.run_until_idle(app, timeout=PATIENCE)
        celery_result = celery_client.AsyncResult(result.id)
        assert celery_result.get(timeout=PATIENCE) == 5
        assert celery_result.name == "interop.add"
        assert celery_result.args == [2, 3]
        assert celery_result.queue == "celery"
    finally:
        app.close()


def counting_reads(backend: RedisBackend) -> list[int]:
    reads = [0]
    read = backend.get

    def counted(task_id: str) -> Any:
        reads[0] += 1
        return read(task_id)

    backend.get = counted  # type: ignore[method-assign]
    return reads


def test_get_right_after_sending_reads_once_after_subscribing(
    redis_url: str, prefix: str
) -> None:
    from conveyor import Conveyor

    app = Conveyor("t", broker="memory://", backend=f"{redis_url}?global_keyprefix={prefix}")
    try:
        reads = counting_reads(app.backend)  # type: ignore[arg-type]
        sent = app.send_task("anything")  # nobody runs it: the test stores its result
        threading.Timer(0.2, app.backend.store, (sent.id, success(sent.id, "late"))).start()
        assert sent.get(timeout=10) == "late"
        # No read before subscribing (it would find nothing), one after (it may not).
        assert reads == [1]
        reads[0] = 0
        assert app.AsyncResult(sent.id).get(timeout=10) == "late"
        assert reads == [1]  # a result not just sent is read first, and found
        again = app.send_task("anything")
        app.backend.store(again.id, success(again.id, "early"))
        assert again.get(timeout=10) == "early"  # done already: the read after subscribing
    finally:
        app.close()
