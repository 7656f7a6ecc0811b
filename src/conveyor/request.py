"""The request context a running task sees as ``self.request`` (Celery's names)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.protocol import Embed


@dataclass(slots=True)
class Request:
    id: str | None = None
    task: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    group: str | None = None
    group_index: int | None = None
    root_id: str | None = None
    parent_id: str | None = None
    origin: str | None = None
    shadow: str | None = None
    hostname: str | None = None
    reply_to: str = ""
    correlation_id: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    timelimit: tuple[float | None, float | None] = (None, None)
    ignore_result: bool | None = None
    acks_late: bool = False
    embed: Embed = field(default_factory=Embed)
    is_eager: bool = False
    called_directly: bool = True
    stamps: dict[str, Any] = field(default_factory=dict)

    @property
    def queue(self) -> str | None:
        value = self.delivery_info.get("routing_key")
        return str(value) if value is not None else None

    @property
    def callbacks(self) -> list[dict[str, Any]] | None:
        return self.embed.callbacks

    @property
    def errbacks(self) -> list[dict[str, Any]] | None:
        return self.embed.errbacks

    def as_meta_source(self) -> dict[str, Any]:
        """What ``backends.meta.build_meta`` reads from a request."""
        return {
            "task": self.task,
            "args": self.args,
            "kwargs": self.kwargs,
            "hostname": self.hostname,
            "retries": self.retries,
            "delivery_info": self.delivery_info,
            "group": self.group,
            "parent_id": self.parent_id,
        }


_EMPTY = Request()
_current: ContextVar[Request | None] = ContextVar("conveyor_request", default=None)


def current_request() -> Request:
    return _current.get() or _EMPTY


@contextmanager
def request_context(request: Request) -> Iterator[Request]:
    token = _current.set(request)
    try:
        yield request
    finally:
        _current.reset(token)
