"""Conveyor: a distributed task queue for Python that speaks Celery's wire protocol."""

from __future__ import annotations

from conveyor.app import Conveyor
from conveyor.errors import (
    ConfigurationError,
    ConveyorError,
    Ignore,
    MaxRetriesExceededError,
    NotRegistered,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TaskRevokedError,
    TimeLimitExceeded,
    TimeoutError,
    WorkerLostError,
)
from conveyor.request import Request
from conveyor.result import AsyncResult, EagerResult
from conveyor.routing import Binding, Exchange, Queue
from conveyor.task import AsyncTask, BaseTask, Task

__all__ = [
    "AsyncResult",
    "AsyncTask",
    "BaseTask",
    "Binding",
    "ConfigurationError",
    "Conveyor",
    "ConveyorError",
    "EagerResult",
    "Exchange",
    "Ignore",
    "MaxRetriesExceededError",
    "NotRegistered",
    "Queue",
    "Reject",
    "Request",
    "Retry",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "TimeoutError",
    "WorkerLostError",
]

__version__ = "0.1.0"
