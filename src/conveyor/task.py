"""Tasks: a decorated function plus its options, typed by its signature.

``Task[P, R]`` carries the function's parameters ``P`` and result ``R``, so
``add.delay(1, "x")`` is a type error for ``def add(x: int, y: int)`` and
``add.delay(1, 2).get()`` is an ``int``. ``AsyncTask[P, R]`` is the same for
``async def`` functions (``R`` is what the coroutine returns).
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypeVar, cast

from conveyor.errors import ConfigurationError, MaxRetriesExceededError, Retry
from conveyor.request import Request, current_request, request_context

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.canvas import Signature
    from conveyor.result import AsyncResult

P = ParamSpec("P")
R = TypeVar("R")

TASK_OPTIONS: dict[str, Any] = {
    "name": None,
    "bind": False,
    "acks_late": None,
    "acks_on_failure_or_timeout": None,
    "reject_on_worker_lost": None,
    "autoretry_for": (),
    "dont_autoretry_for": (),
    "retry_backoff": False,
    "retry_backoff_max": 600.0,
    "retry_jitter": True,
    "retry_kwargs": None,
    "max_retries": "default",
    "default_retry_delay": None,
    "ignore_result": None,
    "store_errors_even_if_ignored": None,
    "track_started": None,
    "track_received": None,
    "time_limit": None,
    "soft_time_limit": None,
    "serializer": None,
    "compression": None,
    "queue": None,
    "exchange": None,
    "routing_key": None,
    "priority": None,
    "expires": None,
    "shadow": None,
}
"""Options ``@app.task(...)`` accepts, with their defaults (None: the app's setting)."""

CALL_OPTIONS = frozenset({
    "countdown", "eta", "expires", "queue", "exchange", "exchange_type", "routing_key",
    "priority", "serializer", "compression", "headers", "task_id", "acks_late",
    "time_limit", "soft_time_limit", "ignore_result", "shadow", "reply_to", "link",
    "link_error", "retries", "root_id", "parent_id", "group_id", "group_index",
    "delivery_mode", "origin", "chain", "chord",
})
"""Options ``apply_async`` and ``send_task`` accept."""


def check_options(given: Mapping[str, Any], known: Any, what: str) -> None:
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(f"unknown {what} {name!r}{hint}")


def as_datetime(value: datetime | str | float | None, *, relative: bool) -> datetime | None:
    """An eta/expires option as an aware datetime; numbers are seconds from now."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if relative and isinstance(value, (int, float)):
        return datetime.now(UTC) + timedelta(seconds=float(value))
    raise ConfigurationError(f"expected a datetime, ISO string or seconds, got {value!r}")


_SIGNATURE: list[type[Signature]] = []


def _signature_class() -> type[Signature]:
    if not _SIGNATURE:  # imported on first use: conveyor.canvas imports this module
        from conveyor.canvas import Signature

        _SIGNATURE.append(Signature)
    return _SIGNATURE[0]


class BaseTask(Generic[P, R]):
    """What sync and async tasks share: options, sending, retrying."""

    def __init__(self, app: Conveyor, fun: Callable[..., Any], options: Mapping[str, Any]) -> None:
        check_options(options, TASK_OPTIONS, "task option")
        merged = {**TASK_OPTIONS, **options}
        self.app = app
        self.fun = fun
        self.name: str = merged["name"] or app.task_name_for(fun)
        self.bind: bool = bool(merged["bind"])
        self.autoretry_for: tuple[type[BaseException], ...] = tuple(merged["autoretry_for"])
        self.dont_autoretry_for: tuple[type[BaseException], ...] = tuple(
            merged["dont_autoretry_for"])
        self.retry_backoff: bool | float = merged["retry_backoff"]
        self.retry_backoff_max: float = float(merged["retry_backoff_max"])
        self.retry_jitter: bool = bool(merged["retry_jitter"])
        self.retry_kwargs: dict[str, Any] = dict(merged["retry_kwargs"] or {})
        max_retries = merged["max_retries"]
        self.max_retries: int | None = (
            app.conf.task_max_retries if max_retries == "default" else max_retries)
        self._options = merged
        self._defaults: tuple[Any, dict[str, Any]] | None = None
        self.is_async = inspect.iscoroutinefunction(fun)
        self.__doc__ = fun.__doc__
        self.__name__ = getattr(fun, "__name__", self.name)
        self.__wrapped__ = fun

    # -- options resolved against the app's settings -------------------------------------
    def _setting(self, option: str, setting: str) -> Any:
        value = self._options[option]
        return getattr(self.app.conf, setting) if value is None else value

    @property
    def acks_late(self) -> bool:
        return bool(self._setting("acks_late", "task_acks_late"))

    @property
    def acks_on_failure_or_timeout(self) -> bool:
        return bool(self._setting("acks_on_failure_or_timeout", "task_acks_on_failure_or_timeout"))

    @property
    def reject_on_worker_lost(self) -> bool:
        return bool(self._setting("reject_on_worker_lost", "task_reject_on_worker_lost"))

    @property
    def ignore_result(self) -> bool:
        return bool(self._setting("ignore_result", "task_ignore_result"))

    @property
    def store_errors_even_if_ignored(self) -> bool:
        return bool(self._setting("store_errors_even_if_ignored",
                                  "task_store_errors_even_if_ignored"))

    @property
    def track_started(self) -> bool:
        return bool(self._setting("track_started", "task_track_started"))

    @property
    def track_received(self) -> bool:
        """Store RECEIVED when a worker takes the message, so a queued task (PENDING)
        can be told apart from one a worker holds."""
        return bool(self._setting("track_received", "task_track_received"))

    @property
    def time_limit(self) -> float | None:
        value = self._setting("time_limit", "task_time_limit")
        return None if value is None else float(value)

    @property
    def soft_time_limit(self) -> float | None:
        value = self._setting("soft_time_limit", "task_soft_time_limit")
        return None if value is None else float(value)

    @property
    def default_retry_delay(self) -> float:
        return float(self._setting("default_retry_delay", "task_default_retry_delay"))

    @property
    def request(self) -> Request:
        return current_request()

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # -- sending -------------------------------------------------------------------------
    def _call_defaults(self) -> dict[str, Any]:
        """The options every call starts from (read-only: it is kept per settings)."""
        conf = self.app.conf
        cached = self._defaults
        if cached is not None and cached[0] is conf:
            return cached[1]
        defaults: dict[str, Any] = {"ignore_result": self.ignore_result}
        for key in ("queue", "exchange", "routing_key", "priority", "serializer",
                    "compression", "time_limit", "soft_time_limit", "expires", "shadow"):
            if self._options[key] is not None:
                defaults[key] = self._options[key]
        self._defaults = (conf, defaults)
        return defaults

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[R]:
        """Send the task with Celery's call options (``countdown``, ``queue``, ...)."""
        if not options.keys() <= CALL_OPTIONS:
            check_options(options, CALL_OPTIONS, "apply_async option")
        merged = {**self._call_defaults(), **options} if options else self._call_defaults()
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, task_id=merged.get("task_id"))
        return cast("AsyncResult[R]", self.app.send_task(self.name, args, kwargs, **merged))

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task with these arguments and the task's default options."""
        return self.apply_async(args, kwargs)

    async def aapply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[R]:
        return await asyncio.to_thread(self.apply_async, args, kwargs, **options)

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        return await self.aapply_async(args, kwargs)

    def apply(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
    ) -> AsyncResult[R]:
        """Run the task here and now, as a worker would, and return its result."""
        from conveyor.eager import run_eagerly

        return run_eagerly(self, list(args or ()), dict(kwargs or {}), task_id=task_id)

    # -- signatures ----------------------------------------------------------------------
    def signature(self, args: tuple[Any, ...] | list[Any] | None = None,
                  kwargs: Mapping[str, Any] | None = None, **options: Any) -> Signature:
        if not options.keys() <= CALL_OPTIONS:
            check_options(options, CALL_OPTIONS, "signature option")
        return _signature_class()(self.name, args or (), kwargs, options, app=self.app)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this call: ``add.s(2)`` is add with 2 as its first argument."""
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: a parent's result is not prepended to its args."""
        sig = self.signature(args, kwargs)
        sig.set_immutable(True)
        return sig

    def map(self, items: Iterable[Any]) -> Signature:
        """One task that calls this task's function on each item in turn."""
        from conveyor.canvas import xmap

        return xmap(self.s(), items)

    def starmap(self, items: Iterable[Sequence[Any]]) -> Signature:
        from conveyor.canvas import xstarmap

        return xstarmap(self.s(), items)

    def chunks(self, items: Iterable[Sequence[Any]], size: int) -> Signature:
        """Split argument tuples into tasks of ``size`` calls each (a group of starmaps)."""
        from conveyor.canvas import chunks

        return chunks(self.s(), items, size)

    # -- running -------------------------------------------------------------------------
    def run_with(self, request: Request, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Call the function in ``request``'s context; a coroutine for async tasks."""
        if self.is_async:
            return self._run_async(request, args, kwargs)
        with request_context(request):
            if self.bind:
                return self.fun(self, *args, **kwargs)
            return self.fun(*args, **kwargs)

    async def _run_async(self, request: Request, args: list[Any], kwargs: dict[str, Any]) -> Any:
        # The context must be entered inside the coroutine: it runs later, on a loop.
        with request_context(request):
            if self.bind:
                return await self.fun(self, *args, **kwargs)
            return await self.fun(*args, **kwargs)

    def retry(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> NoReturn:
        """Send this call again later and stop the current run (raises :class:`Retry`).

        The copy keeps the task id and counts ``retries + 1``; once ``max_retries`` is
        reached, ``exc`` (or :class:`MaxRetriesExceededError`) is raised instead.
        """
        request = self.request
        if request.called_directly:
            if exc is not None:
                raise exc
            raise RuntimeError(f"{self.name}.retry() called outside a task run")
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{tuple(request.args)} "
                f"kwargs:{request.kwargs}")
        if eta is None:
            countdown = self.default_retry_delay if countdown is None else countdown
        when: float | datetime = eta if eta is not None else cast(float, countdown)
        signal = Retry(exc=exc, when=when)
        if request.is_eager:
            raise signal
        # RETRY is stored before the copy is sent: stored after, it could land on top of
        # what the copy's own (quick) run stored.
        from conveyor.execution import store_retry

        signal.state_stored = store_retry(self, request, signal)
        self.app.send_retry(self, request, args=args, kwargs=kwargs, eta=eta,
                            countdown=countdown, options=options)
        raise signal


class Task(BaseTask[P, R]):
    """A task whose function is a plain (sync) function."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function locally, in this process, right now."""
        request = Request(called_directly=True, args=list(args), kwargs=dict(kwargs))
        return cast(R, self.run_with(request, list(args), dict(kwargs)))


class AsyncTask(BaseTask[P, R]):
    """A task whose function is ``async def``; it runs on the worker's event loop."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        request = Request(called_directly=True, args=list(args), kwargs=dict(kwargs))
        return cast(Coroutine[Any, Any, R], self.run_with(request, list(args), dict(kwargs)))
