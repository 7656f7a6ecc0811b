"""The RPC result backend (``rpc://``): results are messages back to the caller, as Celery does.

The producer names a reply queue of its own (its *oid*) in ``reply_to`` on every task it
sends; the worker publishes each state it stores (STARTED, RETRY, the final one) to that
queue through the default exchange, with ``correlation_id`` = the task's correlation id
(its id), Celery's result document as JSON, ``delivery_mode`` 1 (2 with
``persistent``) and no headers (PROTOCOL.md 4.4). The producer consumes its queue and keeps
the latest state per task in memory, so ``get``/``wait`` only work in the process that
sent the task (as with Celery), and only for its tasks. Chords need another backend.

The reply queue is durable with ``x-expires`` = ``result_expires`` as in Celery 5.7, but
not auto-delete: results sent while the caller reconnects wait in it (nobody but the
caller declares it, so the flag is ours to choose). The connection comes from the broker URL
(``rpc://`` says nothing of its own): :func:`conveyor.backends.backend_from_url` passes the
app's ``broker_url``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import amqp  # type: ignore[import-untyped]
from conveyor import states
from conveyor.backends.base import Meta, ResultBackend
from conveyor.brokers.amqp_delay import QueueSpec
from conveyor.brokers.amqp_io import AmqpIo, parse_amqp_url
from conveyor.brokers.amqp_message import reply_address
from conveyor.brokers.amqp_publish import Outgoing, Publisher
from conveyor.brokers.amqp_topology import Topology
from conveyor.errors import ConfigurationError, DecodeError, SerializationError, TimeoutError
from conveyor.request import current_request

logger = logging.getLogger("conveyor.backend.rpc")

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
KEEP_RESULTS = 50_000
"""Results kept per process; the oldest are forgotten first (a sender that never reads)."""


class _Replies:
    """The consumer of this process's reply queue (no acks: a result is read once)."""

    def __init__(self, backend: RpcBackend) -> None:
        self.backend = backend
        self.channel: Any = None
        self.active = False

    def attach(self, connection: Any) -> None:
        if self.active:
            self._consume(connection)

    def _consume(self, connection: Any) -> None:
        self.channel = connection.channel()
        self.channel.basic_consume(self.backend.oid, no_ack=True, callback=self.backend.received)
        self.active = True

    def start(self, connection: Any) -> None:
        if self.channel is None:
            self._consume(connection)

    def detach(self) -> None:
        self.channel = None

    def channel_closed(self, channel: Any, code: int, text: str) -> None:
        if channel is self.channel:
            logger.warning(
                "RabbitMQ closed the result channel (%s %s); consuming again", code, text
            )
            channel.basic_consume(self.backend.oid, no_ack=True, callback=self.backend.received)

    def work(self) -> bool:
        return False

    def after_io(self) -> None:
        pass


class RpcBackend(ResultBackend):
    scheme = "rpc"

    def __init__(
        self,
        url: str,
        *,
        serializer: str = "json",
        accept: Iterable[str] = ("json",),
        expires: float | None = 86400.0,
        broker_url: str | None = None,
        persistent: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(url, serializer=serializer, accept=accept, expires=expires)
        connection_url = broker_url
        if url.split("://", 1)[0].lower() in AMQP_SCHEMES:
            connection_url = url
        if not connection_url or connection_url.split("://", 1)[0].lower() not in AMQP_SCHEMES:
            raise ConfigurationError(
                "the rpc:// result backend sends results through RabbitMQ: use an amqp:// "
                f"broker_url (got {connection_url!r})"
            )
        self.persistent = persistent
        self.oid = str(uuid.uuid4())
        self.io = AmqpIo(
            parse_amqp_url(connection_url, options),
            url=connection_url,
            name=f"conveyor-rpc-{id(self):x}",
        )
        self.topology = Topology()
        self.publisher = Publisher(self.io)
        self._replies = _Replies(self)
        self.io.attachments.extend([self.topology, self.publisher, self._replies])
        self._results: OrderedDict[str, Meta] = OrderedDict()
        self._cond = threading.Condition()
        self._declared = False
        self._closed = False
        self._pid = os.getpid()
        self.io.start()

    # -- the producer's side ------------------------------------------------------------------
    @property
    def reply_to(self) -> str:
        """This process's reply queue: declared and consumed before the first task is sent."""
        if not self._declared:
            self._listen()
        return self.oid

    def _listen(self) -> None:
        arguments: dict[str, Any] = {}
        if self.expires:
            arguments["x-expires"] = int(self.expires * 1000)
        # Not auto-delete (Celery 5.7's queue is): a reconnect must not delete the queue
        # and the results sent meanwhile. Unused, RabbitMQ deletes it after x-expires.
        spec = QueueSpec(self.oid, durable=True, auto_delete=False, arguments=arguments)

        def declare(conn: Any) -> None:
            self.topology.apply(spec)
            self._replies.start(conn)

        self.io.call(declare)
        self._declared = True

    def received(self, message: Any) -> None:
        """A result message (I/O thread)."""
        properties = message.properties
        try:
            meta = self.decode(
                bytes(message.body),
                properties.get("content_type"),
                properties.get("content_encoding"),
            )
        except (DecodeError, SerializationError) as exc:
            logger.error("Dropped an unreadable result message: %s", exc)
            return
        task_id = properties.get("correlation_id") or meta.get("task_id")
        if not isinstance(task_id, str):
            return
        with self._cond:
            previous = self._results.get(task_id)
            if previous is not None and previous.get("status") == states.SUCCESS:
                return  # a stored SUCCESS is never replaced (a redelivered duplicate)
            self._results[task_id] = meta
            self._results.move_to_end(task_id)
            while len(self._results) > KEEP_RESULTS:
                self._results.popitem(last=False)
            self._cond.notify_all()

    def get(self, task_id: str) -> Meta | None:
        with self._cond:
            meta = self._results.get(task_id)
        return dict(meta) if meta is not None else None

    def wait(self, task_id: str, timeout: float | None = None, *,
             just_sent: bool = False) -> Meta:
        if not self._declared:
            self._listen()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                meta = self._results.get(task_id)
                if meta is not None and meta.get("status") in states.READY_STATES:
                    return dict(meta)
                if deadline is None:
                    self._cond.wait(1.0)
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"task {task_id} not ready after {timeout}s")
                self._cond.wait(left)

    def forget(self, task_id: str) -> None:
        with self._cond:
            self._results.pop(task_id, None)

    def cleanup(self) -> int:
        return 0  # results are messages: the reply queue's x-expires removes what is left

    # -- the worker's side --------------------------------------------------------------------
    def store(self, task_id: str, meta: Mapping[str, Any]) -> None:
        """Send the state to the caller's reply queue; nothing if the task had no reply_to."""
        request = current_request()
        if request.id == task_id and request.reply_to:
            address: tuple[str, str] | None = (request.reply_to, request.correlation_id or task_id)
        else:
            address = reply_address(task_id)
        if address is None:
            return
        reply_to, correlation_id = address
        body, content_type, content_encoding = self.encode(meta)
        message = amqp.Message(
            body,
            content_type=content_type,
            content_encoding=content_encoding,
            application_headers={},
            delivery_mode=2 if self.persistent else 1,
            priority=0,
            correlation_id=correlation_id,
        )
        self.io.wait_connected()
        # Confirmed before returning: the task's message may be acked right after.
        self.publisher.send([Outgoing(message, "", reply_to, len(body) + 256)], wait=True)

    # -- life ------------------------------------------------------------------------------
    def check(self) -> None:
        self.io.wait_connected()

    def close(self) -> None:
        if self._closed or os.getpid() != self._pid:
            return  # closed already, or a forked child's copy: the parent's to close
        self._closed = True
        if self.io.connected:
            self.publisher.flush(10.0)
        self.io.close()
