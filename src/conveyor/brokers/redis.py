"""The Redis broker: kombu's key layout and envelope, so Celery clients share its queues.

Celery producers and workers and Conveyor producers and workers can use the same Redis at
once (key layout in :mod:`conveyor.brokers.redis_layout`). Where it is safe, it does
better than kombu:

* **Atomic fetch.** One Lua script pops up to ``max_messages`` from the queues' priority
  lists (Celery's order) and records each in ``unacked``/``unacked_index`` plus a lease
  of its own; no crash or dropped connection can lose a message in between.
* **Leases, not guesses.** A lease lapses ``visibility_timeout`` after the fetch unless
  renewed (``extend``, which the worker does while it holds a message). Renewing also
  moves the ``unacked_index`` score, so Celery workers, which restore what was delivered
  more than *their* ``visibility_timeout`` ago, never restore a message a live Conveyor
  worker holds; a dead worker's messages still come back. Lapsed leases of the queues a
  fetch reads are restored by that fetch, a bounded number per call; deliveries Celery
  workers took and never settled are restored by kombu's rule under ``unacked_mutex``,
  at most ``unacked_restore_limit`` per scan.
* **Eta in Redis, not in memory.** A Conveyor producer LPUSHes eta/countdown tasks into
  the queue list as Celery does, so Celery workers can take them. A Conveyor worker that
  receives an early eta calls ``defer``, which moves it (one script) to a delayed zset
  Conveyor fetches move back when due: far etas wait in Redis, never in a worker.
  So ``publish(delay=...)`` of a message whose headers carry an ``eta`` makes it
  *visible and deferred*, not invisible as the base contract says; a message without an
  ``eta`` header waits invisible in the delayed zset (Celery cannot see it until due).
* **No polling floor.** An idle fetch sleeps until Redis reports a change to one of its
  lists (client tracking; :mod:`conveyor.brokers.redis_wakeup`), a delay or lease falls
  due, or ``wake()``.

Priorities are Celery's on Redis: the property (0-9) maps to ``priority_steps``
(default 0, 3, 6, 9) and **lower steps are served first**; within a step, FIFO. So
``supports_priority`` is False: the contract's "9 first" does not hold here, by design.
Fanout exchanges: a message goes to the lists of the bound queues Conveyor consumes
(durable, acked like any other) and is PUBLISHed on kombu's ``/<db>.<exchange>`` channel
for Celery consumers; a Conveyor fetch also takes what Celery publishes there.
Messages requeued or restored by Conveyor keep their envelope unchanged (their count is
kept in ``_conveyor.deliveries``); only restores of Celery's deliveries set kombu's
``redelivered`` flags.

Limits: a deferred message becomes visible again only through a Conveyor fetch of its
queue (Celery workers never look in the delayed zsets). The small count record of a
message Conveyor gave back to a list stays behind if a Celery worker (or a purge) is what
finally removes it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import time
from binascii import b2a_base64
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _string
from threading import Lock
from typing import Any, cast

import redis
from conveyor.brokers import redis_scripts as scripts
from conveyor.brokers.base import Broker, QueueStats, RidingAcks
from conveyor.brokers.idle_gate import IdleGate
from conveyor.brokers.redis_layout import check_queue_name, decode_envelope
from conveyor.brokers.redis_restore import ForeignRestorer
from conveyor.brokers.redis_routing import RedisTopology, Route, new_delivery_tag
from conveyor.brokers.redis_settings import BrokerSettings
from conveyor.brokers.redis_wakeup import IdleWaiter, minimal_prefixes
from conveyor.brokers.virtual import (
    DeadLetter,
    Doorbell,
    WakeRequests,
    priority_of,
    unique_queue_names,
)
from conveyor.envelope import Delivery, Envelope
from conveyor.errors import BrokerError, BrokerUnavailable
from conveyor.protocol import new_id
from conveyor.redis_connection import (
    RedisClients,
    as_bytes,
    as_text,
    run_command,
    run_script,
    send,
    transaction_in_parts,
    translated,
)
from conveyor.routing import DEFAULT_EXCHANGE, Binding, Exchange, Queue

logger = logging.getLogger("conveyor.brokers.redis")

SCRIPTS = (
    "FETCH",
    "ACK",
    "EXTEND",
    "DEFER",
    "REQUEUE",
    "RELEASE_FETCH",
    "DEAD_LETTER",
    "RECORD",
    "RESTORE_FOREIGN",
    "PURGE",
    "RELEASE_LOCK",
)
FANOUT_BUFFER = 10_000
"""Celery fanout messages kept per queue until a fetch takes them (oldest dropped)."""
PUSH_LIMIT = 10_002
"""Arguments of one LPUSH (10,000 messages): a bigger batch is several, in a transaction."""
PUBLISH_PART = 256
"""Messages of a bigger batch written to Redis at a time (see ``transaction_in_parts``).
On the harness's bulk enqueue (groups of 1,000) this took Conveyor from about 80,000 to
90,000 tasks/s: Redis reads a part while the next is made, and no part is one big copy."""


def delivery_info_json(exchange: str, routing_key: str) -> str:
    return json.dumps({"exchange": exchange, "routing_key": routing_key})


_PROPERTY_NAMES = ["correlation_id", "reply_to", "delivery_mode", "priority"]


def kombu_json(envelope: Envelope, body_b64: str, delivery_info: str, tag: str) -> str | None:
    """What :func:`~conveyor.brokers.redis_layout.encode_envelope` writes, for a task
    message whose headers come rendered (``headers_json``) and whose properties are the
    usual four, without the general JSON encoder; None for any other envelope.

    ``body_b64`` is the base64 text of the body, ``delivery_info`` the JSON of
    ``{"exchange": ..., "routing_key": ...}``.
    """
    headers = envelope.headers_json
    properties = envelope.properties
    if headers is None or list(properties) != _PROPERTY_NAMES:
        return None
    correlation_id = properties["correlation_id"]
    reply_to = properties["reply_to"]
    delivery_mode = properties["delivery_mode"]
    priority = properties["priority"]
    content_type = envelope.content_type
    content_encoding = envelope.content_encoding
    if not (type(correlation_id) is str and type(reply_to) is str
            and type(delivery_mode) is int and type(priority) is int
            and type(content_type) is str and type(content_encoding) is str
            and type(tag) is str):
        return None
    return (
        f'{{"body": "{body_b64}", "content-encoding": {_string(content_encoding)}, '
        f'"content-type": {_string(content_type)}, "headers": {headers}, "properties": '
        f'{{"correlation_id": {_string(correlation_id)}, "reply_to": {_string(reply_to)}, '
        f'"delivery_mode": {delivery_mode}, "priority": {priority}, "delivery_info": '
        f'{delivery_info}, "body_encoding": "base64", "delivery_tag": {_string(tag)}}}}}'
    )


def _held(delivery: Delivery) -> tuple[str, str]:
    """What ack/reject/extend/defer need of a delivery this broker issued: its delivery
    tag and queue.

    A plain tuple: a prefork process pickles it into its record on every job it starts
    and with every fetch, and a named tuple pickles through a method written in Python
    (about 1 µs a record more)."""
    data = delivery.broker_data
    if not (type(data) is tuple and len(data) == 2
            and type(data[0]) is str and type(data[1]) is str):
        raise BrokerError(f"delivery {delivery.tag!r} was not issued by a Redis broker")
    return data


@dataclass(frozen=True, slots=True)
class _Ahead:
    """A fetch script sent on ``connection`` whose reply is still to be read."""

    connection: Any
    names: list[str]
    prefix: str
    riders: RidingAcks | None
    """Acks sent in the same write, just before the fetch: their reply comes first."""


class RedisBroker(Broker):
    """Queues in Redis, laid out as kombu lays them out."""

    scheme = "redis"
    supports_priority = False
    fetches_ahead = True

    def __init__(
        self, url: str, *, visibility_timeout: float = 3600.0, **transport_options: Any
    ) -> None:
        super().__init__(url, visibility_timeout=visibility_timeout)
        self._clients = RedisClients(url, transport_options)
        self._where = self._clients.target.safe_url
        self.settings = BrokerSettings.from_options(
            self._clients.target.query,
            transport_options,
            visibility_timeout=visibility_timeout,
            db=self._clients.db,
        )
        self.layout = self.settings.layout
        self.client = self._clients.client
        self._scripts = {
            name: self.client.register_script(getattr(scripts, name)) for name in SCRIPTS
        }
        self.topology = RedisTopology(self.client, self.layout)
        self._restorer = ForeignRestorer(
            self.client, self.settings, self.topology, self._scripts, visibility_timeout
        )
        self._doorbell = Doorbell()
        self._wake_requests = WakeRequests(self._doorbell)
        self._fanout_lock = Lock()
        self._fanout_buffer: dict[str, deque[bytes]] = defaultdict(
            lambda: deque(maxlen=FANOUT_BUFFER)
        )
        self._turn = itertools.count()
        self._start_process_state()

    def _start_process_state(self) -> None:
        self._pid = os.getpid()
        self._ahead_lock = Lock()
        self._ahead: _Ahead | None = None  # a fetch sent ahead, its reply unread
        # Fetches sent ahead go on a connection of their own: taking one from the pool
        # and giving it back cost about 6 µs a fetch in redis-py's bookkeeping.
        self._ahead_connection: Any = None
        self._waiter = IdleWaiter(self._clients, self.settings.polling_interval)

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            # A forked child must not read its parent's sockets or pipe.
            self._start_process_state()

    @contextmanager
    def _redis(self) -> Iterator[None]:
        with translated(BrokerUnavailable, BrokerError, self._where):
            yield

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        with self._redis():
            return run_script(self._scripts[name], list(keys), list(args))

    # -- topology -----------------------------------------------------------------------
    def declare_exchange(self, exchange: Exchange) -> None:
        with self._redis():
            self.topology.declare_exchange(exchange)

    def declare_queue(self, queue: Queue) -> None:
        check_queue_name(queue.name)
        with self._redis():
            self.topology.declare_queue(queue)

    def bind(self, binding: Binding) -> None:
        check_queue_name(binding.queue)
        with self._redis():
            self.topology.bind(binding)

    # -- producing ----------------------------------------------------------------------
    def publish(
        self, envelope: Envelope, *, exchange: str, routing_key: str, delay: float | None = None
    ) -> None:
        self.publish_many([(envelope, exchange, routing_key)], delay=delay)

    def publish_many(
        self, items: Sequence[tuple[Envelope, str, str]], *, delay: float | None = None
    ) -> None:
        try:
            if len(items) > PUBLISH_PART and self._publish_in_parts(items, delay):
                return
            commands, fresh = self._publish_commands(items, delay)
            if len(commands) == 1:
                # One command is atomic by itself, without MULTI/EXEC (or a pipeline).
                run_command(self.client, *commands[0])
            elif commands:
                with self.client.pipeline(transaction=True) as pipe:  # all or nothing
                    for command in commands:
                        cast(Any, pipe).execute_command(*command)
                    pipe.execute()
        except redis.RedisError:
            with self._redis():
                raise
        self.topology.remember_queues(fresh)

    def _publish_in_parts(
        self, items: Sequence[tuple[Envelope, str, str]], delay: float | None
    ) -> bool:
        """Publish a big batch as one transaction written in parts; False if the
        connection failed, when nothing of it (or all of it) ran: the caller publishes it
        the usual way, with redis-py's retry, as for any command whose connection fails."""
        fresh: dict[str, None] = {}

        def parts() -> Iterator[list[list[Any]]]:
            for start in range(0, len(items), PUBLISH_PART):
                commands, new = self._publish_commands(items[start:start + PUBLISH_PART], delay)
                fresh.update(dict.fromkeys(new))
                yield commands

        if transaction_in_parts(self.client, parts()) is None:
            return False
        self.topology.remember_queues(list(fresh))
        return True

    def _publish_commands(
        self, items: Sequence[tuple[Envelope, str, str]], delay: float | None
    ) -> tuple[list[list[Any]], list[str]]:
        """The commands that publish ``items``, and the queues not known to be listed in
        ``_conveyor.queues`` yet. Raises RoutingError, EncodeError, redis errors."""
        layout = self.layout
        topology = self.topology
        now = time.time()
        commands: list[list[Any]] = []
        push: list[Any] | None = None  # the last command, while it is an LPUSH
        touched: set[str] = set()
        direct: dict[str, Route] = {}  # the nameless exchange routes by key alone
        steps: dict[Any, int] = {}
        infos: dict[tuple[str, str], str] = {}
        last_body, last_b64 = b"", ""
        # Nothing is sent before every message is routed and written: an unknown
        # exchange, or a message that can't be written, fails the whole batch.
        for envelope, exchange, key in items:
            route = direct.get(key) if exchange == DEFAULT_EXCHANGE else None
            if route is None:
                route = topology.destinations(exchange, key, envelope.headers)
                if exchange == DEFAULT_EXCHANGE:
                    direct[key] = route
            priority = envelope.properties.get("priority")
            step = steps.get(priority) if type(priority) is int else None
            if step is None:
                step = layout.step_of(priority_of(envelope))
                if type(priority) is int:
                    steps[priority] = step
            # A task's eta travels in its headers: such a message goes in the list now,
            # so Celery workers see it too (ours defer it). Anything else waits unseen.
            hidden = delay is not None and delay > 0 and not envelope.headers.get("eta")
            for queue in route.queues:
                # A delayed message's tag orders it among those due at the same time; a
                # listed one's only has to be unique: a random UUID, as kombu's.
                tag = new_delivery_tag() if hidden else new_id()
                payload = None
                if envelope.headers_json is not None:
                    info = infos.get((exchange, key))
                    if info is None:
                        info = infos[(exchange, key)] = delivery_info_json(exchange, key)
                    body = envelope.body
                    if body is not last_body:
                        last_body, last_b64 = body, b2a_base64(body, newline=False).decode()
                    payload = kombu_json(envelope, last_b64, info, tag)
                if payload is None:
                    payload = topology.encode(envelope, exchange, key, tag)
                list_key = layout.list_key(queue, step)
                if hidden:
                    assert delay is not None
                    record = json.dumps({"n": 0, "t": "", "q": list_key})
                    commands += [
                        ["ZADD", layout.delayed(queue), repr(now + delay), tag],
                        ["HSET", layout.delayed_messages(queue), tag, payload],
                        ["HSET", layout.deliveries, tag, record],
                    ]
                    push = None
                elif push is not None and push[1] == list_key and len(push) < PUSH_LIMIT:
                    # LPUSH of several values = as many LPUSHes of one, in order.
                    push.append(payload)
                else:
                    push = ["LPUSH", list_key, payload]
                    commands.append(push)
                touched.add(queue)
            if route.fanout_channel is not None:
                payload = topology.encode(envelope, exchange, key, new_delivery_tag(), listed=True)
                commands.append(["PUBLISH", route.fanout_channel, payload])
                push = None
        fresh = topology.unknown_queues(touched)
        if fresh:
            commands.append(["SADD", layout.queues, *fresh])
        return commands, fresh

    # -- consuming ----------------------------------------------------------------------
    def fetch(self, queues: Sequence[str], max_messages: int, timeout: float) -> list[Delivery]:
        ahead, more = self._take_ahead()
        if ahead:
            self._waiter.quiet(busy=more)
            return ahead
        names = unique_queue_names(queues, max_messages)
        self._check_pid()
        deadline = time.monotonic() + max(0.0, timeout)
        with self._doorbell.condition:
            wake_mark = self._wake_requests.mark()
        turn = next(self._turn) % len(names)
        names = names[turn:] + names[:turn]  # round robin between fetches, as kombu
        watched = frozenset(key.encode() for name in names for key in self.layout.list_keys(name))
        prefixes = minimal_prefixes(self.layout.list_key(name) for name in names)
        fanout = self.topology.fanout_patterns(names)
        while True:
            try:
                with self._redis():
                    self._restorer.maybe_scan()
                    if fanout:
                        self._buffer_fanout(self._waiter.collect(fanout, watched))
                deliveries, next_due, more = self._take(names, max_messages)
            except BrokerError:
                self._waiter.forget()  # its sockets are likely as dead as this one was
                raise
            if deliveries:
                self._waiter.quiet(busy=more)
                return deliveries
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []  # a poll that would not block leaves a wake for one that would
            with self._doorbell.condition:
                if self._wake_requests.consume(wake_mark):
                    return []
            if next_due is not None:
                remaining = min(remaining, max(0.0, next_due - time.time()) + 0.001)
            remaining = min(remaining, max(0.0, self._restorer.next_scan - time.time()))
            with self._redis():
                self._buffer_fanout(self._waiter.sleep(watched, prefixes, remaining))

    def _take(
        self, names: list[str], max_messages: int
    ) -> tuple[list[Delivery], float | None, bool]:
        """What one look takes, when the next delayed message falls due, and whether
        more is waiting."""
        deliveries = self._take_fanout(names, max_messages)
        room = max_messages - len(deliveries)
        if room <= 0:
            return deliveries, None, True
        keys, args = self._fetch_call(names, room, secrets.token_hex(6) + ":")
        return self._read_fetch_reply(names, self._run("FETCH", keys, args), deliveries)

    def _fetch_call(self, names: list[str], room: int, prefix: str) -> tuple[list[str], list[Any]]:
        """The keys and arguments of the fetch script; ``prefix`` starts its lease tokens."""
        layout = self.layout
        keys = [layout.unacked, layout.unacked_index, layout.deliveries]
        for name in names:
            keys += layout.queue_keys(name)
        keys += [key for _, key in layout.fetch_order(names)]
        now = time.time()
        return keys, [
            repr(now),
            repr(now + self.visibility_timeout),
            room,
            prefix,
            len(names),
            self.settings.scan_limit,
            self.settings.dead_letter_limit,
        ]

    def _read_fetch_reply(
        self, names: list[str], reply: Any, deliveries: list[Delivery]
    ) -> tuple[list[Delivery], float | None, bool]:
        """``deliveries`` and those of the fetch script's ``reply``, when the next
        delayed message falls due, and whether its lists held more."""
        next_due = float(reply[0]) if reply[0] else None
        if reply[1]:
            logger.error(
                "Dead-lettered %d messages from %s that are not kombu envelopes",
                reply[1],
                ",".join(names),
            )
        for index in range(3, len(reply), 5):
            queue_index, payload, tag, count, token = reply[index : index + 5]
            deliveries.append(
                self._delivery(
                    names[int(queue_index) - 1], payload, tag.decode(), int(count), token.decode()
                )
            )
        return deliveries, next_due, bool(reply[2])

    # -- fetching ahead -------------------------------------------------------------------
    def fetch_ahead(
        self, queues: Sequence[str], max_messages: int, note: Callable[[str], None],
        riders: RidingAcks | None = None,
    ) -> bool:
        names = unique_queue_names(queues, max_messages)
        self._check_pid()
        if self.topology.fanout_patterns(names):
            return False  # Celery's fanout messages wait in a buffer the usual fetch reads
        with self._ahead_lock:
            if self._ahead is not None:
                return False
            prefix = secrets.token_hex(6) + ":"
            keys, args = self._fetch_call(names, max_messages, prefix)
            commands = [("EVALSHA", self._scripts["FETCH"].sha, len(keys), *keys, *args)]
            if riders is not None:
                try:
                    ack_keys, ack_args = self._ack_call(riders.deliveries)
                except BrokerError:
                    return False  # not ours to ack here; the usual way says why
                commands.insert(0, ("EVALSHA", self._scripts["ACK"].sha, len(ack_keys),
                                    *ack_keys, *ack_args))
            connection = self._ahead_connection
            if connection is None:
                try:
                    connection = self._ahead_connection = self._clients.dedicated()
                except redis.RedisError:
                    return False  # the usual fetch will meet the trouble and report it
            note(prefix)
            try:
                send(connection, *commands)
            except redis.RedisError as exc:
                # Whether Redis ran it or not, nobody will read the reply: what it may
                # have taken goes back now. The connection opens again on its next use.
                connection.disconnect()
                self._release_lost_fetch(names, prefix, exc)
                return False
            self._ahead = _Ahead(connection, names, prefix, riders)
            return True

    def take_ahead(self) -> list[Delivery]:
        return self._take_ahead()[0]

    def _take_ahead(self) -> tuple[list[Delivery], bool]:
        """The deliveries of a fetch sent ahead, and whether its lists held more."""
        self._check_pid()  # a forked child starts with no fetch of its own pending
        with self._ahead_lock:
            ahead, self._ahead = self._ahead, None
            if ahead is None:
                return [], False
            try:
                if ahead.riders is not None:
                    self._read_riders(ahead.connection, ahead.riders)
                reply = ahead.connection.read_response()
            except redis.exceptions.NoScriptError:
                return [], False  # it did not run; the usual fetch loads the script
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                ahead.connection.disconnect()
                self._release_lost_fetch(ahead.names, ahead.prefix, exc)
                return [], False
            except redis.RedisError:
                with self._redis():
                    raise
        deliveries, _, more = self._read_fetch_reply(ahead.names, reply, [])
        return deliveries, more

    @staticmethod
    def _read_riders(connection: Any, riders: RidingAcks) -> None:
        """Read the reply of the acks sent before a fetch, and tell their sender."""
        try:
            connection.read_response()
        except redis.ResponseError:
            riders.done(False)  # not run (a script Redis lost): they go the usual way
        except (redis.ConnectionError, redis.TimeoutError):
            riders.done(False)  # whether they arrived is unknown
            raise
        except BaseException as exc:
            riders.done(False)
            # The fetch's reply must not be read as the next command's: the connection
            # goes, and what the fetch took goes back as if it had broken.
            connection.disconnect()
            if isinstance(exc, redis.RedisError):
                raise redis.ConnectionError(f"unreadable reply to acks: {exc}") from exc
            raise
        else:
            riders.done(True)

    def _release_lost_fetch(self, names: list[str], prefix: str, exc: Exception) -> None:
        """The reply of a fetch sent ahead was lost with its connection: give back what
        it took now (on a new connection), not when the leases lapse."""
        try:
            released = self.release_unread(names, prefix)
        except BrokerError as again:
            logger.warning("Lost the reply of a fetch sent ahead (%s) and could not give "
                           "back what it took (%s); it comes back when its leases lapse",
                           exc, again)
            return
        logger.warning("Lost the reply of a fetch sent ahead (%s); gave back the %d "
                       "messages it took", exc, released)

    def release_unread(self, queues: Sequence[str], fetch_id: str) -> int:
        layout = self.layout
        keys = [layout.unacked, layout.unacked_index, layout.deliveries]
        keys += [layout.leased(name) for name in dict.fromkeys(queues)]
        return int(self._run("RELEASE_FETCH", keys, [fetch_id]))

    @staticmethod
    def _delivery(queue: str, payload: bytes, tag: str, count: int, token: str) -> Delivery:
        stored = decode_envelope(payload)
        return Delivery(
            envelope=stored.envelope,
            queue=queue,
            tag=token,
            exchange=stored.exchange,
            routing_key=stored.routing_key,
            redelivered=count > 1 or stored.redelivered,
            delivery_count=count,
            broker_data=(tag, queue),
        )

    def _take_fanout(self, names: list[str], max_messages: int) -> list[Delivery]:
        """Record and hand out what Celery published to fanout queues we consume."""
        taken: list[tuple[str, bytes]] = []
        with self._fanout_lock:
            for name in names:
                buffered = self._fanout_buffer.get(name)
                while buffered and len(taken) < max_messages:
                    taken.append((name, buffered.popleft()))
        deliveries = []
        layout = self.layout
        for name, payload in taken:
            stored = decode_envelope(payload)
            tag, token = new_delivery_tag(), secrets.token_hex(8)
            now = time.time()
            step = layout.step_of(priority_of(stored.envelope))
            count = self._run(
                "RECORD",
                [layout.unacked, layout.unacked_index, layout.deliveries, layout.leased(name)],
                [
                    tag,
                    payload,
                    json.dumps(stored.exchange),
                    json.dumps(stored.routing_key),
                    layout.list_key(name, step),
                    repr(now),
                    repr(now + self.visibility_timeout),
                    token,
                ],
            )
            deliveries.append(self._delivery(name, payload, tag, int(count), token))
        return deliveries

    def _buffer_fanout(self, messages: list[tuple[bytes, bytes]]) -> None:
        if not messages:
            return
        with self._fanout_lock:
            for pattern, payload in messages:
                for queue in self.topology.queues_for_pattern(pattern.decode()):
                    if not self.topology.listed_copy(payload):
                        self._fanout_buffer[queue].append(payload)

    # -- settling -----------------------------------------------------------------------
    def ack(self, delivery: Delivery) -> None:
        self.ack_many([delivery])

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            self._run("ACK", *self._ack_call(deliveries))

    def _ack_call(self, deliveries: Sequence[Delivery]) -> tuple[list[str], list[str]]:
        """The keys and arguments of the ack script for ``deliveries``."""
        layout = self.layout
        keys = [layout.unacked, layout.unacked_index, layout.deliveries]
        args: list[str] = []
        for delivery in deliveries:
            delivery_tag, queue = _held(delivery)
            keys.append(layout.leased(queue))
            args += [delivery_tag, delivery.tag]
        return keys, args

    def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        (delivery_tag, queue), layout = _held(delivery), self.layout
        keys = [layout.unacked, layout.unacked_index, layout.deliveries, layout.leased(queue)]
        if requeue:
            self._run("REQUEUE", keys, [delivery_tag, delivery.tag])
        else:
            self._run(
                "DEAD_LETTER",
                [*keys, layout.dead(queue)],
                [
                    delivery_tag,
                    delivery.tag,
                    reason,
                    repr(time.time()),
                    self.settings.dead_letter_limit,
                ],
            )

    def extend(self, deliveries: Sequence[Delivery], seconds: float | None = None) -> None:
        if not deliveries:
            return
        layout = self.layout
        keys = [layout.unacked_index, layout.deliveries]
        now = time.time()
        args: list[Any] = [
            repr(now),
            repr(now + (self.visibility_timeout if seconds is None else seconds)),
        ]
        for delivery in deliveries:
            delivery_tag, queue = _held(delivery)
            keys.append(layout.leased(queue))
            args += [delivery_tag, delivery.tag]
        self._run("EXTEND", keys, args)

    def defer(self, delivery: Delivery, until: float) -> None:
        (delivery_tag, queue), layout = _held(delivery), self.layout
        self._run(
            "DEFER",
            [
                layout.unacked,
                layout.unacked_index,
                layout.deliveries,
                layout.leased(queue),
                layout.delayed(queue),
                layout.delayed_messages(queue),
            ],
            [delivery_tag, delivery.tag, repr(until)],
        )

    # -- administration -----------------------------------------------------------------
    def purge(self, queue: str) -> int:
        layout = self.layout
        purged = self._run(
            "PURGE",
            [
                layout.deliveries,
                layout.delayed(queue),
                layout.delayed_messages(queue),
                *layout.list_keys(queue),
            ],
            [],
        )
        return int(purged)

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        layout = self.layout
        with self._redis():
            if queues is None:
                names = sorted(as_text(m) for m in self.client.smembers(layout.queues))
            else:
                names = list(queues)
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                for key in layout.list_keys(name):
                    pipe.llen(key)
                pipe.zcard(layout.delayed(name))
                pipe.zcard(layout.leased(name))
                pipe.llen(layout.dead(name))
            counts = pipe.execute()
        steps, result = len(layout.steps), []
        for index, name in enumerate(names):
            row = counts[index * (steps + 3) : (index + 1) * (steps + 3)]
            result.append(QueueStats(name, sum(row[:steps]), *row[steps:]))
        return result

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` kept dead letters of ``queue`` (newest are kept when the
        ``dead_letter_limit`` cap is reached)."""
        with self._redis():
            raw = self.client.lrange(self.layout.dead(queue), -limit, -1)
        letters = []
        for item in reversed(raw):
            record = json.loads(as_bytes(item).decode("utf-8", "replace"))
            stored = decode_envelope(
                str(record.get("payload", "")).encode("utf-8", "surrogateescape")
            )
            letters.append(
                DeadLetter(
                    stored.envelope,
                    queue,
                    stored.exchange,
                    stored.routing_key,
                    int(record.get("delivery_count", 1)),
                    str(record.get("reason", "")),
                    float(record.get("dead_at", 0.0)),
                )
            )
        return letters

    def check(self) -> None:
        try:
            with self._redis():
                self.client.ping()
        except BrokerError as exc:
            raise BrokerUnavailable(str(exc)) from exc

    def wake(self) -> None:
        self._wake_requests.request()
        self._waiter.pipe.ring()

    def share_idle_wait(self, gate: IdleGate) -> None:
        self._waiter.gate = gate

    def idle_wait_kept_until(self) -> float | None:
        return self._waiter.kept_until

    def hand_over_idle_wait(self) -> None:
        self._waiter.hand_over()

    def close(self) -> None:
        """Close every connection; the object stays usable (it reconnects on use)."""
        self.wake()
        if self._pid == os.getpid():
            self._waiter.close()
            with self._ahead_lock:
                connection, self._ahead_connection = self._ahead_connection, None
                if connection is not None and self._ahead is None:
                    with suppress(redis.RedisError):
                        self._clients.give_back(connection)
        with suppress(redis.RedisError):
            self._clients.close()

    def __del__(self) -> None:
        waiter = getattr(self, "_waiter", None)
        if waiter is not None and getattr(self, "_pid", None) == os.getpid():
            waiter.pipe.close()
