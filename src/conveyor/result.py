"""Results: ``AsyncResult[R]``, a handle on a task's state and return value."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from conveyor import states
from conveyor.backends.meta import decode_exception
from conveyor.errors import ConfigurationError

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.backends.base import Meta, ResultBackend

R = TypeVar("R")

JUST_SENT = 1.0
"""Seconds after sending within which ``get()`` expects no result yet (see
:meth:`~conveyor.backends.base.ResultBackend.wait`)."""


class AsyncResult(Generic[R]):
    """The state and result of one task, read from the app's result backend."""

    def __init__(self, task_id: str, app: Conveyor,
                 parent: AsyncResult[Any] | GroupResult | None = None) -> None:
        self.id = task_id
        self.app = app
        self.parent = parent
        """The result of the step before this one in a chain (or a chord's header)."""
        self._sent_at: float | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def task_id(self) -> str:
        return self.id

    @property
    def backend(self) -> ResultBackend:
        backend = self.app.backend
        if backend is None:
            raise ConfigurationError(
                "no result backend is configured: pass backend=... to Conveyor() "
                "or set result_backend"
            )
        return backend

    def _meta(self) -> Meta:
        return self.backend.get(self.id) or {"status": states.PENDING, "result": None,
                                             "traceback": None, "task_id": self.id}

    @property
    def state(self) -> str:
        return str(self._meta()["status"])

    status = state

    @property
    def info(self) -> Any:
        """The return value, or the exception for failure states."""
        return self._value(self._meta())

    result = info

    @property
    def traceback(self) -> str | None:
        value = self._meta().get("traceback")
        return None if value is None else str(value)

    @property
    def date_done(self) -> str | None:
        value = self._meta().get("date_done")
        return None if value is None else str(value)

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    @staticmethod
    def _value(meta: Meta) -> Any:
        if meta.get("status") in states.EXCEPTION_STATES:
            return decode_exception(meta.get("result"))
        return meta.get("result")

    def _outcome(self, meta: Meta, propagate: bool) -> R:
        value = self._value(meta)
        if propagate and meta.get("status") in states.PROPAGATE_STATES:
            assert isinstance(value, BaseException)
            raise value
        return cast(R, value)

    def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Wait until the task is ready; return its value or re-raise its exception.

        Raises :class:`conveyor.errors.TimeoutError` when ``timeout`` seconds pass first.
        """
        sent_at, self._sent_at = self._sent_at, None
        just_sent = sent_at is not None and time.monotonic() - sent_at < JUST_SENT
        return self._outcome(self.backend.wait(self.id, timeout, just_sent=just_sent),
                             propagate)

    @classmethod
    def sent_now(cls, task_id: str, app: Conveyor) -> AsyncResult[Any]:
        """The result of a task this process has just sent."""
        result: AsyncResult[Any] = cls(task_id, app)
        result._sent_at = time.monotonic()
        return result

    async def aget(self, timeout: float | None = None, propagate: bool = True) -> R:
        meta = await asyncio.to_thread(self.backend.wait, self.id, timeout)
        return self._outcome(meta, propagate)

    def forget(self) -> None:
        """Delete the stored state; the id reads as PENDING afterwards."""
        self.backend.forget(self.id)


class EagerResult(AsyncResult[R]):
    """The result of a task run in-process (``apply()``, ``task_always_eager``)."""

    def __init__(self, task_id: str, app: Conveyor, meta: Meta) -> None:
        super().__init__(task_id, app)
        self._stored = meta

    def _meta(self) -> Meta:
        return self._stored

    def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        return self._outcome(self._stored, propagate)

    async def aget(self, timeout: float | None = None, propagate: bool = True) -> R:
        return self._outcome(self._stored, propagate)

    def forget(self) -> None:
        self._stored = {"status": states.PENDING, "result": None, "traceback": None}


class GroupResult:
    """The results of a group's members, in the group's order."""

    def __init__(self, group_id: str, results: Sequence[AsyncResult[Any] | GroupResult],
                 app: Conveyor) -> None:
        self.id = group_id
        self.results = list(results)
        self.app = app
        self.parent: AsyncResult[Any] | GroupResult | None = None

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} [{', '.join(r.id for r in self.results)}]>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[AsyncResult[Any] | GroupResult]:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult[Any] | GroupResult:
        return self.results[index]

    def _leaves(self) -> list[AsyncResult[Any]]:
        leaves: list[AsyncResult[Any]] = []
        for result in self.results:
            leaves.extend(result._leaves() if isinstance(result, GroupResult) else [result])
        return leaves

    def _states(self) -> list[str]:
        backend = AsyncResult(self.id, self.app).backend
        leaves = self._leaves()
        found = backend.get_many([leaf.id for leaf in leaves])
        return [str(found.get(leaf.id, {}).get("status", states.PENDING)) for leaf in leaves]

    def ready(self) -> bool:
        return all(state in states.READY_STATES for state in self._states())

    def successful(self) -> bool:
        return all(state == states.SUCCESS for state in self._states())

    def failed(self) -> bool:
        return any(state == states.FAILURE for state in self._states())

    def completed_count(self) -> int:
        return sum(state == states.SUCCESS for state in self._states())

    def waiting(self) -> bool:
        return not self.ready()

    def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        """Every member's value in order; waits at most ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values: list[Any] = []
        for result in self.results:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(result.get(timeout=left, propagate=propagate))
        return values

    join = get

    async def aget(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        return await asyncio.to_thread(self.get, timeout, propagate)

    def save(self) -> None:
        """Store the membership so :meth:`restore` can rebuild this from the id alone."""
        AsyncResult(self.id, self.app).backend.save_group(self.id, [r.id for r in self.results])

    @classmethod
    def restore(cls, group_id: str, app: Conveyor) -> GroupResult | None:
        members = AsyncResult(group_id, app).backend.get_group(group_id)
        if members is None:
            return None
        return cls(group_id, [AsyncResult(member, app) for member in members], app)

    def forget(self) -> None:
        backend = AsyncResult(self.id, self.app).backend
        for leaf in self._leaves():
            backend.forget(leaf.id)
        backend.forget_group(self.id)
