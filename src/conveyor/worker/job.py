"""What the worker hands a pool (a Job) and what comes back (a JobResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conveyor import protocol
from conveyor.envelope import Envelope
from conveyor.protocol import TaskHeaders


@dataclass(slots=True)
class Job:
    seq: int
    envelope: Envelope
    headers: TaskHeaders
    delivery_info: dict[str, Any]
    hostname: str
    acks_late: bool
    time_limit: float | None = None
    soft_time_limit: float | None = None
    body: tuple[list[Any], dict[str, Any], protocol.Embed] | None = None
    """The decoded body, when the consumer already decoded it to check it."""

    @property
    def task_id(self) -> str:
        return self.headers.id

    @property
    def task_name(self) -> str:
        return self.headers.task


@dataclass(slots=True)
class JobResult:
    seq: int
    state: str
    requeue: bool = False
    invalid: bool = False
    reason: str = ""
    runtime: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
