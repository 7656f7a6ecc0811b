"""The application: owns settings, the task registry, the router, broker and backend."""

from __future__ import annotations

import dataclasses
import inspect
import os
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, overload

from conveyor.backends import backend_from_url
from conveyor.backends.base import ResultBackend
from conveyor.brokers import broker_from_url
from conveyor.brokers.base import Broker
from conveyor.builtins import register_builtins
from conveyor.config import Settings, build_settings, from_object
from conveyor.envelope import Envelope
from conveyor.errors import NotRegistered
from conveyor.producer import PER_CALL_OPTIONS, Producer
from conveyor.request import Request
from conveyor.result import AsyncResult
from conveyor.router import Router, Target
from conveyor.task import CALL_OPTIONS, AsyncTask, BaseTask, Task, check_options

P = ParamSpec("P")
R = TypeVar("R")


class TaskDecorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fun: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, fun: Callable[P, R], /) -> Task[P, R]: ...


class BoundTaskDecorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fun: Callable[..., Coroutine[Any, Any, R]], /
    ) -> AsyncTask[..., R]: ...
    @overload
    def __call__(self, fun: Callable[..., R], /) -> Task[..., R]: ...


def _planned_once(shared: Mapping[str, Any]) -> bool:
    """Whether options given once for many calls can be planned once for all of them:
    not if they delay the calls (each then goes on its own), need checking (each call's
    merged options are checked) or are per call (a root or parent id: each call's
    options must carry it)."""
    keys = shared.keys()
    return (keys <= CALL_OPTIONS and keys.isdisjoint(PER_CALL_OPTIONS)
            and shared.get("countdown") is None and shared.get("eta") is None)


_pid_now = os.getpid()
"""This process's id, kept current by a fork hook: read on every broker and backend
access, where a system call each time showed in profiles."""


def _note_fork() -> None:
    global _pid_now
    _pid_now = os.getpid()


os.register_at_fork(after_in_child=_note_fork)


class Conveyor:
    """A Conveyor application.

    ``Conveyor("proj", broker="sqlite:///conveyor.db")`` — with no broker, messages and
    results go to ``./.conveyor/conveyor.db``. Settings are Celery's names, given as
    keyword arguments, ``CONVEYOR_*`` variables or through :meth:`config_from_object`.
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | None = None,
        backend: str | None = None,
        **settings: Any,
    ) -> None:
        self.main = main
        overrides = dict(settings)
        if broker is not None:
            overrides["broker_url"] = broker
        if backend is not None:
            overrides["result_backend"] = backend
        self._overrides = overrides
        self._settings = build_settings(overrides=overrides)
        self.tasks: dict[str, BaseTask[Any, Any]] = {}
        self._lock = threading.RLock()
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._pid = os.getpid()
        self._router: Router | None = None
        self.producer = Producer(self)
        register_builtins(self)

    def __repr__(self) -> str:
        return f"<Conveyor {self.main or '__main__'}>"

    # -- configuration ------------------------------------------------------------------
    @property
    def conf(self) -> Settings:
        return self._settings

    def config_from_object(self, source: Any) -> None:
        """Load settings from a module, dotted name, object or mapping.

        Keyword arguments given to ``Conveyor(...)`` and ``CONVEYOR_*`` variables still
        win over what the object says.
        """
        base = Settings().replace(**from_object(source))
        self._settings = build_settings(base=base, overrides=self._overrides)
        self._reset_connections()

    def configure(self, **settings: Any) -> None:
        """Change settings in code (tests, scripts)."""
        self._overrides.update(settings)
        self._settings = self._settings.replace(**settings)
        self._reset_connections()

    @property
    def router(self) -> Router:
        if self._router is None or self._router.settings is not self._settings:
            self._router = Router(self._settings)
        return self._router

    # -- connections (one per process: children never reuse a parent's sockets) ----------
    def _reset_connections(self) -> None:
        with self._lock:
            if self._broker is not None:
                self._broker.close()
            if self._backend is not None:
                self._backend.close()
            self._broker = None
            self._backend = None

    def _check_pid(self) -> None:
        if self._pid != _pid_now:
            self._pid = _pid_now
            self._broker = None  # the parent's objects belong to the parent
            self._backend = None
            self.producer = Producer(self)

    @property
    def broker(self) -> Broker:
        self._check_pid()
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    conf = self._settings
                    self._broker = broker_from_url(
                        conf.broker_url,
                        transport_options=conf.broker_transport_options,
                        visibility_timeout=conf.visibility_timeout,
                    )
        return self._broker

    @property
    def backend(self) -> ResultBackend | None:
        self._check_pid()
        conf = self._settings
        if self._backend is None and conf.result_backend:
            with self._lock:
                if self._backend is None:
                    self._backend = backend_from_url(
                        conf.result_backend,
                        serializer=conf.result_serializer,
                        accept=conf.effective_result_accept,
                        expires=conf.result_expires,
                        transport_options=conf.result_backend_transport_options,
                        broker_url=conf.broker_url,
                    )
        return self._backend

    def close(self) -> None:
        self._reset_connections()

    # -- tasks --------------------------------------------------------------------------
    def task_name_for(self, fun: Callable[..., Any]) -> str:
        module = getattr(fun, "__module__", None) or "__main__"
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{fun.__qualname__}"

    @overload
    def task(  # type: ignore[overload-overlap]
        self, fun: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def task(self, fun: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(self, /, *, bind: Literal[True], **options: Any) -> BoundTaskDecorator: ...
    @overload
    def task(self, /, *, bind: Literal[False] = ..., **options: Any) -> TaskDecorator: ...

    def task(
        self, fun: Callable[..., Any] | None = None, /, *, bind: bool = False, **options: Any
    ) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(bind=True, ...)``."""
        options["bind"] = bind
        def register(function: Callable[..., Any]) -> BaseTask[Any, Any]:
            cls = AsyncTask if inspect.iscoroutinefunction(function) else Task
            created: BaseTask[Any, Any] = cls(self, function, options)
            self.tasks[created.name] = created
            return created

        if fun is not None:
            return register(fun)
        return register

    def get_task(self, name: str) -> BaseTask[Any, Any]:
        try:
            return self.tasks[name]
        except KeyError:
            raise NotRegistered(name) from None

    # -- sending ------------------------------------------------------------------------
    def send_task(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Send a task by name; the task need not be registered in this process."""
        if not options.keys() <= CALL_OPTIONS:
            check_options(options, CALL_OPTIONS, "send_task option")
        producer = self.producer
        plan = producer.plan(name, options)
        if plan is not None:
            task_id = producer.send_plain(plan, name, args, kwargs, options)
            return AsyncResult.sent_now(task_id, self)
        message = producer.build(name, args, kwargs, options)
        target = self.router.resolve(name, args, kwargs, options)
        if target.priority is not None and options.get("priority") is None:
            message = dataclasses.replace(message, priority=target.priority)
        self.producer.publish(message, target, options)
        return AsyncResult.sent_now(message.id, self)

    def send_many(
        self,
        calls: Sequence[tuple[str, Sequence[Any], Mapping[str, Any], Mapping[str, Any]]],
    ) -> list[AsyncResult[Any]]:
        """Send many ``(name, args, kwargs, options)`` calls in one broker operation.

        Calls with a countdown or eta are sent one by one (each waits its own time);
        the rest go together: that is how a group of a thousand costs one round trip.
        """
        return [AsyncResult(task_id, self) for task_id in self.send_calls(calls)]

    def send_calls(
        self,
        calls: Iterable[tuple[str, Sequence[Any], Mapping[str, Any], Mapping[str, Any]]],
        shared: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """:meth:`send_many`, returning the task ids (groups need no result objects).

        ``shared``: options of every call, over each call's own (a group's ``queue=``).
        Calls whose own options are all per call (ids, group) then share one plan."""
        producer = self.producer
        items: list[tuple[Envelope, str, str]] = []
        targets: list[Target] = []
        ids: list[str] = []
        hoisted = shared if shared and _planned_once(shared) else None
        merged = shared if shared and hoisted is None else None
        last_name, last_plan = None, None  # for calls whose options are all per call
        for name, args, kwargs, own in calls:
            options = own if merged is None else {**own, **merged}
            keys = options.keys()
            if keys <= PER_CALL_OPTIONS:
                if name != last_name:
                    last_name = name
                    last_plan = producer.plan(
                        name, {**options, **hoisted} if hoisted is not None else options)
                plan = last_plan
                if hoisted is not None and (plan is None or plan.target is None):
                    options = {**options, **hoisted}  # routed or built from every option
            else:
                if hoisted is not None:
                    options = {**options, **hoisted}
                    keys = options.keys()
                if not keys <= CALL_OPTIONS:
                    check_options(options, CALL_OPTIONS, "send_task option")
                if options.get("countdown") is not None or options.get("eta") is not None:
                    ids.append(self.send_task(name, list(args), kwargs, **options).id)
                    continue
                plan = producer.plan(name, options)
            if plan is not None:
                envelope, target = producer.plain(plan, name, args, kwargs, options)
                ids.append(envelope.headers["id"])
            else:
                message = producer.build(name, args, kwargs, options)
                target = self.router.resolve(name, args, kwargs, options)
                if target.priority is not None and options.get("priority") is None:
                    message = dataclasses.replace(message, priority=target.priority)
                envelope = producer.encode(message, options)
                ids.append(message.id)
            if not targets or target is not targets[-1]:
                targets.append(target)
            items.append((envelope, target.exchange, target.routing_key))
        if items:
            producer.publish_envelopes(items, targets)
        return ids

    def send_group_calls(
        self,
        name: str,
        calls: Sequence[Mapping[str, Any]],
        group_id: str,
        shared: Mapping[str, Any],
    ) -> list[str] | None:
        """Send ``calls`` of task ``name`` (signatures with no options of their own) as
        members 0, 1... of group ``group_id``, with ``shared`` options, in one broker
        operation; returns their task ids.

        What :meth:`send_calls` does with such calls (a group of ``task.s(...)``), with
        the plan and route looked up once for all. None, with nothing sent, when the
        options need each call planned (or checked, or delayed) on its own."""
        if not _planned_once(shared):
            return None
        producer = self.producer
        plan = producer.plan(name, shared)
        if plan is None or plan.target is None:
            return None
        target = plan.target
        envelopes = producer.plain_members(plan, calls, group_id)
        exchange, routing_key = target.exchange, target.routing_key
        producer.publish_envelopes([(envelope, exchange, routing_key) for envelope in envelopes],
                                   [target])
        return [envelope.headers["id"] for envelope in envelopes]

    async def asend_task(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        import asyncio

        return await asyncio.to_thread(self.send_task, name, args, kwargs, **options)

    def send_retry(
        self,
        task: BaseTask[Any, Any],
        request: Request,
        *,
        args: Any,
        kwargs: Any,
        eta: datetime | None,
        countdown: float | None,
        options: Mapping[str, Any],
    ) -> None:
        """Publish the copy of a running call that ``Task.retry`` asks for (PROTOCOL 1.6)."""
        queue = request.delivery_info.get("routing_key") or None
        retry_options: dict[str, Any] = {
            "task_id": request.id,
            "retries": request.retries + 1,
            "root_id": request.root_id,
            "parent_id": request.id,
            "origin": request.origin,
            "group_id": request.group,
            "group_index": request.group_index,
            "reply_to": request.reply_to,
            "ignore_result": request.ignore_result
            if request.ignore_result is not None else task.ignore_result,
            "time_limit": request.timelimit[0],
            "soft_time_limit": request.timelimit[1],
            "headers": dict(request.headers.items()),
            "priority": request.delivery_info.get("priority"),
        }
        if eta is not None:
            retry_options["eta"] = eta
        else:
            retry_options["countdown"] = countdown
        retry_options.update(options)
        message = self.producer.build(
            task.name,
            request.args if args is None else args,
            request.kwargs if kwargs is None else kwargs,
            retry_options,
        )
        message = dataclasses.replace(message, embed=request.embed)
        if queue and request.delivery_info.get("exchange", "") == "":
            target = self.router.resolve(task.name, options={"queue": queue})
        else:
            target = self.router.resolve(task.name, options=retry_options)
        self.producer.publish(message, target, retry_options)

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:  # noqa: N802 - Celery's name
        return AsyncResult(task_id, self)
