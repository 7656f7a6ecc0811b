"""One AMQP connection, owned by one thread, used from any thread.

py-amqp connections are not thread-safe, so a single I/O thread does everything that
touches the socket: it runs work other threads hand it (:meth:`AmqpIo.call`), reads frames
when the socket is readable (deliveries and publisher confirms reach callbacks here), sends
heartbeats, and reconnects with backoff when the connection drops. The parts of a broker
that own channels are :class:`Attachment` objects: the I/O thread attaches them to every new
connection, detaches them when it is lost, and tells them when RabbitMQ closes one of their
channels (a failed declaration, a ``consumer_timeout``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import amqp  # type: ignore[import-untyped]
from amqp import exceptions as amqp_errors
from conveyor.brokers.amqp_transport import BufferedTcpTransport
from conveyor.errors import BrokerUnavailable, ConfigurationError
from conveyor.urls import redact_url

logger = logging.getLogger("conveyor.broker.amqp")

T = TypeVar("T")

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    amqp_errors.ConnectionError,
    amqp_errors.RecoverableConnectionError,
    amqp_errors.IrrecoverableConnectionError,
    OSError,  # socket errors, including timeouts
)
CHANNEL_ERRORS: tuple[type[BaseException], ...] = (amqp_errors.ChannelError,)

FRAMES_PER_TURN = 256
"""Frames read before queued work gets its turn again (acks must not starve)."""


@dataclass(frozen=True, slots=True)
class ConnectionParams:
    host: str
    port: int
    userid: str
    password: str
    virtual_host: str
    ssl: bool | dict[str, Any] | ssl.SSLContext = False
    heartbeat: float = 60.0
    connect_timeout: float = 4.0
    operation_timeout: float = 60.0
    reconnect_max_delay: float = 10.0
    client_properties: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_amqp_url(url: str, options: Mapping[str, Any]) -> ConnectionParams:
    """``amqp://user:pass@host:port/vhost`` (also ``pyamqp://``, ``amqps://``) as kombu reads it.

    An empty path and ``//`` both name the vhost ``/``. Query parameters ``heartbeat`` and
    ``connect_timeout`` are read; transport options win over them.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in {"amqp", "amqps", "pyamqp"}:
        raise ConfigurationError(f"not an AMQP URL: {redact_url(url)!r}")
    query = dict(parse_qsl(parts.query))
    tls: bool | dict[str, Any] | ssl.SSLContext = options.get("ssl", scheme == "amqps")
    if scheme == "amqps" and tls is False:
        tls = True
    try:
        port = parts.port or (5671 if tls else 5672)
    except ValueError as exc:
        raise ConfigurationError(f"bad port in {redact_url(url)!r}: {exc}") from exc
    path = parts.path
    vhost = unquote(path[1:]) if len(path) > 1 else "/"

    def number(name: str, default: float) -> float:
        value = options.get(name, query.get(name, default))
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{name} must be a number, not {value!r}") from exc

    return ConnectionParams(
        host=parts.hostname or "localhost",
        port=port,
        userid=unquote(parts.username) if parts.username else "guest",
        password=unquote(parts.password) if parts.password else "guest",
        virtual_host=vhost,
        ssl=tls,
        heartbeat=number("heartbeat", 60.0),
        connect_timeout=number("connect_timeout", 4.0),
        operation_timeout=number("operation_timeout", 60.0),
        reconnect_max_delay=number("reconnect_max_delay", 10.0),
        client_properties=dict(options.get("client_properties") or {}),
    )


class Channel(amqp.Channel):  # type: ignore[misc]  # py-amqp has no type hints
    """A channel that remembers why RabbitMQ closed it.

    py-amqp reopens a channel the server closed (same number, fresh state: no consumers,
    no QoS, no confirm mode) and raises the error from whatever call was reading frames,
    which need not be a call on this channel. The owner learns which channel it was here.
    Bodies stay bytes: a broker never decodes them.
    """

    def __init__(
        self,
        connection: Any,
        channel_id: int | None = None,
        auto_decode: bool = False,
        on_open: Any = None,
    ) -> None:
        super().__init__(connection, channel_id, auto_decode=False, on_open=on_open)
        self.closed_by_broker: tuple[int, str] | None = None

    def _on_close(self, reply_code: int, reply_text: str, class_id: int, method_id: int) -> None:
        self.closed_by_broker = (reply_code, reply_text)
        super()._on_close(reply_code, reply_text, class_id, method_id)


class Connection(amqp.Connection):  # type: ignore[misc]  # py-amqp has no type hints
    Channel = Channel

    def Transport(  # noqa: N802 - py-amqp's name for the transport factory
        self,
        host: str,
        connect_timeout: float | None,
        ssl: Any = False,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        socket_settings: Any = None,
        **kwargs: Any,
    ) -> Any:
        options = {"read_timeout": read_timeout, "write_timeout": write_timeout,
                   "socket_settings": socket_settings, **kwargs}
        if ssl:
            return super().Transport(host, connect_timeout, ssl, **options)
        return BufferedTcpTransport(host, connect_timeout=connect_timeout, **options)


class Attachment(Protocol):
    """A part of a broker that keeps channels on the connection."""

    def attach(self, connection: Any) -> None:
        """A connection is up (the first one, or after a loss): open channels, resume."""

    def detach(self) -> None:
        """The connection is gone; its channels and delivery tags mean nothing now."""

    def channel_closed(self, channel: Any, code: int, text: str) -> None:
        """RabbitMQ closed ``channel`` (py-amqp already reopened it, empty)."""

    def work(self) -> bool:
        """Send what other threads queued; True if some is left for the next turn."""

    def after_io(self) -> None:
        """Frames were read: hand what arrived to the threads waiting for it."""


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


class AmqpIo:
    """The I/O thread of one connection. Sync callers block on futures, never on the socket."""

    def __init__(self, params: ConnectionParams, *, url: str, name: str) -> None:
        self.params = params
        self.url = redact_url(url)
        self.attachments: list[Attachment] = []
        self._name = name
        self._pid = os.getpid()
        self._commands: deque[tuple[Callable[[Any], Any], Future[Any]]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        # Held by whichever thread uses the connection: the I/O thread, except while it
        # waits in select() or sleeps, or a caller sending its own queued work meanwhile.
        self._io_lock = threading.Lock()
        self._state = threading.Condition()
        self._conn: Any = None
        self._connected = False
        self._closing = False
        self._last_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._next_heartbeat = 0.0
        self.connections = 0
        """How many connections were established so far (tests watch reconnects)."""

    # -- lifecycle (any thread) ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def closing(self) -> bool:
        return self._closing

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def frame_max(self) -> int:
        conn = self._conn
        return int(getattr(conn, "frame_max", 0) or 0) if conn is not None else 0

    def in_io_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def wait_connected(self, timeout: float | None = None) -> None:
        """Block until connected; raise BrokerUnavailable after ``timeout`` (connect_timeout)."""
        limit = self.params.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._state:
            while not self._connected:
                if self._closing:
                    raise BrokerUnavailable(f"the connection to {self.url} is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = describe(self._last_error) if self._last_error else "timed out"
                    raise BrokerUnavailable(f"cannot reach RabbitMQ at {self.url}: {reason}")
                self._state.wait(left)

    def close(self, timeout: float = 10.0) -> None:
        if os.getpid() != self._pid:
            return  # a forked child: the socket and the thread belong to the parent
        with self._state:
            if self._closing:
                return
            self._closing = True
            self._state.notify_all()
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- handing work to the I/O thread ------------------------------------------------------
    def wake(self) -> None:
        """Make the I/O thread look at queued work now (cheap when already woken)."""
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        # OSError: closed, or the pipe is full (the thread is awake either way).
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    def send_queued(self) -> None:
        """Send what callers queued for the attachments (acks, publishes): from this
        thread if the I/O thread is waiting for the socket, else by waking it.

        Sending here spares the hand-over: the wake-up's write gives up the GIL, the
        woken I/O thread takes it, and this thread then waits for it to be done. A
        failure here is left to the I/O thread, which meets the same broken connection
        on its next turn (what was not sent stays queued, or is delivered again)."""
        if os.getpid() != self._pid or not self._io_lock.acquire(blocking=False):
            self.wake()
            return
        try:
            conn = self._conn
            if not self._connected or conn is None:
                more = True
            else:
                more = self._work()
                # A synchronous method in the work (a new prefetch's basic.qos) reads
                # frames here: hand over what they carried, as after any read, and leave
                # what is still buffered to the I/O thread, whose select() can't see it.
                self._hand_over()
                more = more or self._frame_ready(conn) or self._buffered(conn)
        except Exception as exc:
            logger.debug("Sending from the calling thread failed (%s); the I/O thread "
                         "takes over", describe(exc))
            more = True
        finally:
            self._io_lock.release()
        if more:
            self.wake()

    def call(self, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        """Run ``fn(connection)`` in the I/O thread and return its result (or raise its error)."""
        if self.in_io_thread():
            return fn(self._conn)
        self.wait_connected()
        future: Future[T] = Future()
        self._commands.append((fn, future))
        self.wake()
        limit = self.params.operation_timeout if timeout is None else timeout
        try:
            return future.result(limit)
        except FutureTimeout:
            raise BrokerUnavailable(
                f"RabbitMQ at {self.url} did not answer within {limit:.0f}s"
            ) from None

    # -- the I/O thread --------------------------------------------------------------------
    def _run(self) -> None:
        # Held throughout but while waiting (in select() or asleep): a caller may then
        # send its queued work itself (send_queued).
        with self._io_lock:
            self._serve()

    def _serve(self) -> None:
        delay = 0.5
        while not self.closing():
            if self._conn is None:
                try:
                    self._open()
                except Exception as exc:  # any failure means "retry later"
                    self._last_error = exc
                    self._drop_connection()
                    self._fail_commands(exc)
                    if self.closing():
                        break
                    logger.warning(
                        "Cannot connect to RabbitMQ at %s (%s); retrying in %.1fs",
                        self.url,
                        describe(exc),
                        delay,
                    )
                    self._sleep(delay)
                    delay = min(delay * 2, self.params.reconnect_max_delay)
                    continue
                delay = 0.5
            try:
                self._turn()
            except CHANNEL_ERRORS as exc:
                self._channel_error(exc)
            except CONNECTION_ERRORS as exc:
                if self.closing():
                    break
                self._lost(exc, delay)
                self._sleep(delay)
        self._shutdown()

    def _open(self) -> None:
        params = self.params
        conn = Connection(
            host=params.address,
            userid=params.userid,
            password=params.password,
            virtual_host=params.virtual_host,
            ssl=params.ssl,
            heartbeat=params.heartbeat,
            connect_timeout=params.connect_timeout,
            # A read that waits this long with no frame at all (heartbeats included)
            # means the peer is gone.
            read_timeout=max(params.heartbeat * 2, params.operation_timeout),
            write_timeout=params.operation_timeout,
            client_properties={"connection_name": self._name, **params.client_properties},
            on_blocked=lambda reason: logger.warning(
                "RabbitMQ blocked this connection (%s): publishing waits", reason
            ),
            on_unblocked=lambda: logger.warning("RabbitMQ unblocked this connection"),
        )
        self._conn = conn
        conn.connect()
        if self.connections:
            logger.warning("Reconnected to RabbitMQ at %s", self.url)
        for attachment in self.attachments:
            attachment.attach(conn)
        self._next_heartbeat = time.monotonic()
        self.connections += 1
        with self._state:
            self._connected = True
            self._last_error = None
            self._state.notify_all()

    def _turn(self) -> None:
        conn = self._conn
        more = self._work()
        self._run_commands(conn)
        sock = conn.sock
        pending = more or self._commands or self._frame_ready(conn) or self._buffered(conn)
        timeout = 0.0 if pending else self._idle_wait()
        self._io_lock.release()  # (no context manager: this runs for every turn)
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], timeout)
        finally:
            self._io_lock.acquire()
        if self._wake_r in readable:
            self._drain_wake_pipe()
        frames = 0
        while frames < FRAMES_PER_TURN:
            # One frame at a time: py-amqp's drain_events() goes on reading after a
            # heartbeat frame, so it would sit here until the next frame (30 s on an idle
            # connection) while callers wait.
            if self._frame_ready(conn):
                conn.blocking_read(timeout=None)  # no system call: the frame is here
            elif self._buffered(conn) or self._readable(sock):
                conn.blocking_read(timeout=self.params.operation_timeout)
            else:
                break
            frames += 1
        self._hand_over()
        self._heartbeat(conn)

    def _hand_over(self) -> None:
        """Frames were read: the attachments pass on what arrived."""
        for attachment in self.attachments:
            attachment.after_io()

    def _idle_wait(self) -> float:
        if self.params.heartbeat <= 0:
            return 1.0
        return max(0.0, min(1.0, self._next_heartbeat - time.monotonic()))

    def _heartbeat(self, conn: Any) -> None:
        if self.params.heartbeat <= 0:
            return
        now = time.monotonic()
        if now >= self._next_heartbeat:
            conn.heartbeat_tick(rate=2)
            self._next_heartbeat = now + min(1.0, self.params.heartbeat / 4)

    @staticmethod
    def _frame_ready(conn: Any) -> bool:
        transport = conn.transport
        return isinstance(transport, BufferedTcpTransport) and transport.frame_ready()

    @staticmethod
    def _buffered(conn: Any) -> bool:
        # Bytes py-amqp (or TLS) already read past the last frame: select() can't see
        # them. (Ours keeps its own buffer, asked by _frame_ready; a part of a frame there
        # is not news: the socket says when the rest comes.)
        transport = conn.transport
        if getattr(transport, "_read_buffer", b""):
            return True
        sock = conn.sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    @staticmethod
    def _readable(sock: socket.socket) -> bool:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    def _drain_wake_pipe(self) -> None:
        # Empty the pipe first, then allow new wake-ups to write: the other order can
        # swallow a byte while the flag still says "written", and the thread would sleep
        # through work queued meanwhile.
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass
        with self._wake_lock:
            self._wake_pending = False

    def _work(self) -> bool:
        return any([attachment.work() for attachment in self.attachments])  # noqa: C419 - all

    def _run_commands(self, conn: Any) -> None:
        while self._commands:
            fn, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                # What a thread queued (acks, publishes) before it asked for this command
                # goes out first: the command must see it.
                self._work()
                result = fn(conn)
            except CHANNEL_ERRORS as exc:
                future.set_exception(exc)
                self._channel_error(exc)
            except CONNECTION_ERRORS as exc:
                future.set_exception(
                    BrokerUnavailable(f"lost the connection to {self.url}: {describe(exc)}")
                )
                raise
            except BaseException as exc:  # the caller gets its own error
                future.set_exception(exc)
            else:
                future.set_result(result)

    def _channel_error(self, exc: BaseException) -> None:
        conn = self._conn
        if conn is None or not conn.channels:
            return
        for channel in list(conn.channels.values()):
            closed = getattr(channel, "closed_by_broker", None)
            if closed is None:
                continue
            channel.closed_by_broker = None
            for attachment in self.attachments:
                attachment.channel_closed(channel, closed[0], closed[1])

    def _lost(self, exc: BaseException, delay: float) -> None:
        self._last_error = exc
        logger.warning("Broker connection lost (%s); reconnecting in %.1fs", describe(exc), delay)
        self._drop_connection()
        self._fail_commands(exc)

    def _drop_connection(self) -> None:
        with self._state:
            self._connected = False
            self._state.notify_all()
        conn, self._conn = self._conn, None
        if conn is not None:
            # Release the socket without talking to a dead peer; it is gone either way.
            with contextlib.suppress(Exception):
                conn.collect()
        for attachment in self.attachments:
            attachment.detach()

    def _fail_commands(self, exc: BaseException) -> None:
        while self._commands:
            _, future = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(
                    BrokerUnavailable(f"lost the connection to {self.url}: {describe(exc)}")
                )

    def _sleep(self, seconds: float) -> None:
        self._io_lock.release()
        try:
            with self._state:
                self._state.wait_for(lambda: self._closing, timeout=seconds)
        finally:
            self._io_lock.acquire()

    def _shutdown(self) -> None:
        conn = self._conn
        if conn is not None:
            # What callers queued before closing (a retiring process's last acks) would
            # otherwise wait for a turn that never comes: RabbitMQ would deliver those
            # messages again.
            try:
                self._work()
            except Exception as exc:
                logger.warning(
                    "Closing the connection to %s without sending what was queued (%s): "
                    "RabbitMQ delivers the messages it was acknowledging again",
                    self.url,
                    describe(exc),
                )
            try:
                conn.close()
            except Exception:  # closing a broken connection
                with contextlib.suppress(Exception):
                    conn.collect()
        self._conn = None
        with self._state:
            self._connected = False
            self._state.notify_all()
        for attachment in self.attachments:
            attachment.detach()
        self._fail_commands(BrokerUnavailable("connection closed"))
