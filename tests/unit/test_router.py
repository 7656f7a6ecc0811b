from __future__ import annotations

from typing import Any

import pytest

from conveyor.config import Settings
from conveyor.errors import RoutingError
from conveyor.router import Router
from conveyor.routing import Exchange, Queue


def router(**settings: Any) -> Router:
    return Router(Settings(**settings))


def test_default_route_is_celery_through_the_nameless_exchange() -> None:
    target = router().resolve("proj.add")
    assert (target.exchange, target.routing_key) == ("", "celery")
    assert target.queue is not None
    assert target.queue.name == "celery"


def test_task_routes_exact_glob_and_callable() -> None:
    def by_args(name: str, args: Any, kwargs: Any, options: Any) -> Any:
        return "big" if args and args[0] > 100 else None

    r = router(task_routes=[by_args, {"proj.add": "math", "proj.reports.*": {"queue": "slow"}}])
    assert r.resolve("proj.add", (1,)).routing_key == "math"
    assert r.resolve("proj.add", (1000,)).routing_key == "big"
    assert r.resolve("proj.reports.daily").routing_key == "slow"
    assert r.resolve("proj.other").routing_key == "celery"


def test_router_taking_only_the_name() -> None:
    r = router(task_routes=lambda name: "only-name" if name.endswith("x") else None)
    assert r.resolve("proj.x").routing_key == "only-name"


def test_explicit_options_win_over_routes() -> None:
    r = router(task_routes={"proj.add": "math"})
    assert r.resolve("proj.add", options={"queue": "urgent"}).routing_key == "urgent"


def test_topic_route_publishes_to_the_exchange() -> None:
    events = Exchange("events", "topic")
    r = router(task_queues=[Queue("audit", events, routing_key="audit.#")],
               task_routes={"proj.audit": {"exchange": events, "routing_key": "audit.login"}})
    target = r.resolve("proj.audit")
    assert (target.exchange, target.routing_key) == ("events", "audit.login")


def test_explicit_exchange_and_routing_key_bypass_the_nameless_exchange() -> None:
    target = router().resolve("proj.add", options={"exchange": "celery",
                                                   "routing_key": "celery"})
    assert (target.exchange, target.routing_key) == ("celery", "celery")


def test_missing_queue_refused_when_creation_is_off() -> None:
    r = router(task_create_missing_queues=False, task_queues=[Queue("known")])
    with pytest.raises(RoutingError, match="not in task_queues"):
        r.resolve("proj.add", options={"queue": "unknown"})


def test_bad_route_value() -> None:
    with pytest.raises(RoutingError, match="routes are queue names or mappings"):
        router(task_routes={"proj.add": 42}).resolve("proj.add")


def test_consumed_queues() -> None:
    assert [q.name for q in router().consumed_queues(None)] == ["celery"]
    assert [q.name for q in router().consumed_queues(["a", "b"])] == ["a", "b"]
    configured = router(task_queues=[Queue("x"), Queue("y")])
    assert [q.name for q in configured.consumed_queues(None)] == ["x", "y"]
