"""Publishing with publisher confirms, without a round trip per message.

Callers hand messages over and go on; the I/O thread writes them to a channel in confirm
mode and RabbitMQ acknowledges them in batches (``multiple=True``). Until its confirm
arrives a message stays in the *outbox*:

* a connection or channel lost before the confirm: the message is sent again once a new
  channel is up (at-least-once; RabbitMQ may then hold it twice);
* a ``basic.nack`` (RabbitMQ could not store it): sent again, three times at most;
* the outbox is bounded (``confirm_window`` messages and ``confirm_window_bytes``): a
  publisher that outruns RabbitMQ waits for confirms instead of filling memory.

A caller that must know (``wait=True``) blocks until its own messages are confirmed; the
broker does that for publishes made while a task runs (the task's message may be acked
the moment it returns) and for dead letters. ``flush`` waits for everything sent so far;
closing the broker flushes. Work that depends on a confirm (acking the original of a
deferred message) runs in the I/O thread when the confirm arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from amqp import spec  # type: ignore[import-untyped]
from conveyor.brokers.amqp_io import AmqpIo
from conveyor.errors import BrokerError, BrokerUnavailable

logger = logging.getLogger("conveyor.broker.amqp")

MAX_ATTEMPTS = 3
SEND_BATCH = 512
GATHER_BYTES = 256 * 1024
"""The frames a turn publishes go to the socket in writes of about this size."""


@dataclass(eq=False, slots=True)
class Outgoing:
    message: Any  # amqp.Message, built by the caller
    exchange: str
    routing_key: str
    size: int
    done: Future[None] | None = None
    on_confirmed: Callable[[], None] | None = None
    """Runs in the I/O thread once RabbitMQ has the message (e.g. ack the original)."""
    still_wanted: Callable[[], bool] | None = None
    """Asked before sending again after a loss: False drops the message (its original
    delivery went back to its queue with the lost channel, so a copy would be extra)."""
    attempts: int = field(default=0)


class Publisher:
    """The publishing channel of a connection, and the outbox of unconfirmed messages."""

    def __init__(
        self, io: AmqpIo, *, window: int = 1000, window_bytes: int = 32 * 1024 * 1024
    ) -> None:
        self.io = io
        self.window = max(1, window)
        self.window_bytes = max(1, window_bytes)
        self.channel: Any = None
        self._queue: deque[Outgoing] = deque()  # handed over, not written yet
        self._outbox: dict[int, Outgoing] = {}  # written, waiting for the confirm
        self._seq = 0
        self._space = threading.Condition()
        self._count = 0
        self._bytes = 0

    # -- callers -----------------------------------------------------------------------------
    def send(
        self, items: Sequence[Outgoing], *, wait: bool = False, timeout: float | None = None
    ) -> None:
        """Hand messages to the I/O thread; with ``wait``, return once all are confirmed."""
        if not items:
            return
        limit = self.io.params.operation_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        size = sum(item.size for item in items)
        if wait:
            for item in items:
                item.done = Future()
        with self._space:
            while self._count and (
                self._count + len(items) > self.window or self._bytes + size > self.window_bytes
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerUnavailable(
                        f"{self._count} published messages still wait for RabbitMQ's "
                        f"confirm after {limit:.0f}s"
                    )
                self._space.wait(left)
            alone = not self._count  # nothing else waits to be written or confirmed
            self._count += len(items)
            self._bytes += size
            self._queue.extend(items)
        if alone:
            # A lone publish (a call, a task's result) goes out from this thread, sooner.
            # In a stream of them the I/O thread writes while this thread makes the next.
            self.io.send_queued()
        else:
            self.io.wake()
        if wait:
            for item in items:
                assert item.done is not None
                try:
                    item.done.result(max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    raise BrokerUnavailable(
                        f"RabbitMQ did not confirm a publish within {limit:.0f}s"
                    ) from None

    def flush(self, timeout: float) -> bool:
        """Wait until every message handed over so far is confirmed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._space:
            while self._count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._space.wait(min(left, 0.5))
        return True

    @property
    def unconfirmed(self) -> int:
        return self._count

    # -- Attachment (I/O thread) ------------------------------------------------------------
    def attach(self, connection: Any) -> None:
        channel = connection.channel()
        self._setup(channel)

    def _setup(self, channel: Any) -> None:
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        self.channel = channel
        self._seq = 0
        self._resend_outbox()

    def detach(self) -> None:
        self.channel = None

    def channel_closed(self, channel: Any, code: int, text: str) -> None:
        if channel is not self.channel:
            return
        logger.error(
            "RabbitMQ closed the publishing channel (%s %s); sending the %d "
            "unconfirmed messages again",
            code,
            text,
            len(self._outbox),
        )
        channel.events["basic_ack"].discard(self._on_ack)
        channel.events["basic_nack"].discard(self._on_nack)
        self._setup(channel)

    def work(self) -> bool:
        channel = self.channel
        if channel is None or not self._queue:
            return False
        sent = 0
        with _GatheredWrites(channel.connection.transport):
            while self._queue and sent < SEND_BATCH:
                item = self._queue.popleft()
                if not _wanted(item):
                    self._drop(item)
                    continue
                try:
                    # basic_publish() without its read before every message: py-amqp
                    # looks for a connection.blocked notice there (two socket timeout
                    # changes and a recv that fails, per message). The I/O thread reads
                    # every frame after each turn; a notice still gets logged then.
                    channel.send_method(
                        spec.Basic.Publish,
                        "Bssbb",
                        (0, item.exchange, item.routing_key, False, False),
                        item.message,
                    )
                except BaseException:
                    self._queue.appendleft(item)  # not confirmed: it goes out again
                    raise
                self._seq += 1
                self._outbox[self._seq] = item
                sent += 1
        return bool(self._queue)

    def after_io(self) -> None:
        pass

    # -- confirms (I/O thread) ------------------------------------------------------------------
    def _take(self, tag: int, multiple: bool) -> list[Outgoing]:
        if not multiple:
            item = self._outbox.pop(tag, None)
            return [] if item is None else [item]
        taken: list[Outgoing] = []
        outbox = self._outbox
        while outbox:
            first = next(iter(outbox))
            if first > tag:
                break
            taken.append(outbox.pop(first))
        return taken

    def _on_ack(self, tag: int, multiple: bool) -> None:
        items = self._take(tag, multiple)
        for item in items:
            if item.on_confirmed is not None:
                try:
                    item.on_confirmed()
                except Exception:  # one callback must not stop the others
                    logger.exception("Error after a publish was confirmed")
            if item.done is not None:
                item.done.set_result(None)
        self._release(items)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        retry: list[Outgoing] = []
        failed: list[Outgoing] = []
        for item in self._take(tag, multiple):
            item.attempts += 1
            (retry if item.attempts < MAX_ATTEMPTS else failed).append(item)
        if retry:
            logger.warning(
                "RabbitMQ refused %d published messages (basic.nack); sending them again",
                len(retry),
            )
            self._queue.extendleft(reversed(retry))
        for item in failed:
            error = BrokerError(
                f"RabbitMQ refused a message for exchange {item.exchange!r} "
                f"(routing key {item.routing_key!r}) {MAX_ATTEMPTS} times"
            )
            if item.done is not None:
                item.done.set_exception(error)
            else:
                logger.error("Message lost: %s", error)
        self._release(failed)

    def _resend_outbox(self) -> None:
        if not self._outbox:
            return
        items = [self._outbox[seq] for seq in sorted(self._outbox)]
        self._outbox.clear()
        kept: list[Outgoing] = []
        for item in items:
            if _wanted(item):
                kept.append(item)
            else:
                self._drop(item)
        if kept:
            logger.warning(
                "Sending %d messages again: their confirms were lost with the connection", len(kept)
            )
            self._queue.extendleft(reversed(kept))

    def _drop(self, item: Outgoing) -> None:
        if item.done is not None:
            item.done.set_exception(BrokerUnavailable("the connection was lost"))
        self._release([item])

    def _release(self, items: Sequence[Outgoing]) -> None:
        if not items:
            return
        with self._space:
            self._count -= len(items)
            self._bytes -= sum(item.size for item in items)
            self._space.notify_all()


class _GatheredWrites:
    """Stands in for a py-amqp transport's socket write while a turn publishes: the
    frames are gathered and written together, ``GATHER_BYTES`` at a time, instead of one
    write per message (each write gives up the GIL, which the threads that publish then
    take and hold). What was gathered is written on the way out, errors or not; a write
    that fails fails as py-amqp's own would (the connection is then lost, and what
    waits for a confirm is sent again on the next one)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.chunks: list[bytes] = []
        self.size = 0
        # TCP: the socket's sendall, set on the instance; TLS: a method of the class.
        self.own = "_write" in vars(transport)
        self.write: Callable[[bytes], Any] | None = getattr(transport, "_write", None)

    def __enter__(self) -> None:
        if self.write is not None:
            self.transport._write = self.gather

    def gather(self, data: Any) -> None:
        self.chunks.append(bytes(data))  # py-amqp hands over a view of a buffer it reuses
        self.size += len(data)
        if self.size >= GATHER_BYTES:
            assert self.write is not None
            self.flush(self.write)  # called by transport.write(), whose handling applies

    def flush(self, write: Callable[[bytes], Any]) -> None:
        if self.chunks:
            data = b"".join(self.chunks)
            self.chunks.clear()
            self.size = 0
            write(data)

    def __exit__(self, *exc: object) -> None:
        if self.write is None:  # a transport of another kind: nothing was gathered
            return
        if self.own:
            self.transport._write = self.write
        else:
            del self.transport._write
        self.flush(self.transport.write)


def _wanted(item: Outgoing) -> bool:
    return item.still_wanted is None or item.still_wanted()
