"""Every exception Conveyor raises, in one tree.

    ConveyorError
    ├── ConfigurationError          bad setting, unknown option, missing extra
    ├── ImproperlyConfigured        (alias kept for Celery users' muscle memory)
    ├── SerializationError
    │   ├── EncodeError             a value the serializer cannot encode (nothing is sent)
    │   ├── DecodeError             bytes that do not decode
    │   └── ContentDisallowed       content type not in ``accept_content``
    ├── MessageError                a message that is not a valid task message
    ├── RoutingError                a route that names no queue or an unknown exchange
    ├── BrokerError
    │   └── BrokerUnavailable       the broker cannot be reached
    ├── BackendError
    │   └── BackendUnavailable
    ├── NotRegistered               a task name the app does not know
    ├── TimeoutError                ``result.get(timeout=...)`` ran out
    ├── TaskPredicate               raised inside tasks to steer the worker
    │   ├── Retry                   the task asked to be retried
    │   ├── Ignore                  ack, store nothing
    │   └── Reject                  reject (optionally requeue)
    ├── MaxRetriesExceededError
    ├── TaskRevokedError
    ├── SoftTimeLimitExceeded
    ├── TimeLimitExceeded
    ├── WorkerLostError
    └── ChordError

The names of the exceptions that travel on the wire match Celery's (``exc_type``), and
``WIRE_MODULES`` says which module Celery files them under, so a Celery client re-raises
them as its own types and we re-raise Celery's as ours.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any


class ConveyorError(Exception):
    """Base class of every Conveyor exception."""


class ConfigurationError(ConveyorError):
    """A setting, option or URL that cannot be used as given."""


ImproperlyConfigured = ConfigurationError


class SerializationError(ConveyorError):
    """A value could not be serialized or deserialized."""


class EncodeError(SerializationError):
    """A value the chosen serializer cannot encode."""


class DecodeError(SerializationError):
    """Bytes that do not decode with their declared content type."""


class ContentDisallowed(SerializationError):
    """A content type that is not in the accept-list."""


class MessageError(ConveyorError):
    """A broker message that is not a valid task message."""


class RoutingError(ConveyorError):
    """A route that cannot be resolved to an exchange and routing key."""


class BrokerError(ConveyorError):
    """The broker failed an operation."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached."""


class BackendError(ConveyorError):
    """The result backend failed an operation."""


class BackendUnavailable(BackendError):
    """The result backend cannot be reached."""


class NotRegistered(ConveyorError, KeyError):
    """A task name that is not registered with the app."""

    def __str__(self) -> str:
        return repr(self.args[0]) if self.args else "NotRegistered"


class TimeoutError(ConveyorError, builtins.TimeoutError):
    """Waiting for a result took longer than the timeout."""


class TaskPredicate(ConveyorError):
    """Raised inside a task to tell the worker what to do with the message."""


class Retry(TaskPredicate):
    """The task is to be retried; raised by ``Task.retry``."""

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | None = None,
        when: float | datetime | None = None,
    ) -> None:
        self.message = message
        self.exc = exc
        self.when = when
        self.state_stored = False
        """True once the worker stored RETRY for this retry (Task.retry does it first)."""
        super().__init__(message, exc, when)

    def humanize(self) -> str:
        if isinstance(self.when, (int, float)):
            return f"in {self.when}s"
        return f"at {self.when}"

    def __str__(self) -> str:
        if self.message:
            return self.message
        if self.exc is not None:
            return f"Retry {self.humanize()}: {self.exc!r}"
        return f"Retry {self.humanize()}"


class Ignore(TaskPredicate):
    """Acknowledge the message and store no state."""


class Reject(TaskPredicate):
    """Reject the message; requeue it when ``requeue`` is true."""

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)


class MaxRetriesExceededError(ConveyorError):
    """The task was retried more than ``max_retries`` times."""


class TaskRevokedError(ConveyorError):
    """The task was revoked or expired and did not run."""


class SoftTimeLimitExceeded(ConveyorError):
    """The soft time limit passed; raised inside the running task."""


class TimeLimitExceeded(ConveyorError):
    """The hard time limit passed; the process running the task was killed."""


class WorkerLostError(ConveyorError):
    """The process running the task died before it finished."""


class ChordError(ConveyorError):
    """A part of a chord's header failed."""


WIRE_MODULES: dict[str, str] = {
    "MaxRetriesExceededError": "celery.exceptions",
    "TaskRevokedError": "celery.exceptions",
    "NotRegistered": "celery.exceptions",
    "ChordError": "celery.exceptions",
    "Retry": "celery.exceptions",
    "Ignore": "celery.exceptions",
    "Reject": "celery.exceptions",
    "TimeoutError": "celery.exceptions",
    "SoftTimeLimitExceeded": "billiard.exceptions",
    "TimeLimitExceeded": "billiard.exceptions",
    "WorkerLostError": "billiard.exceptions",
}
"""Where Celery files the exceptions that travel on the wire (``exc_module``)."""
