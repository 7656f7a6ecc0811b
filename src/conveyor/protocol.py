"""Task messages <-> Celery protocol v2 envelopes (PROTOCOL.md section 1). Pure: no I/O.

The producer builds a :class:`TaskMessage` and turns it into an :class:`Envelope` with
:func:`encode_task`. The worker reads the headers first with :func:`read_headers` (cheap:
no body decoding, enough to decide whether and when to run), and the body later, where the
task runs, with :func:`decode_body`. Protocol v1 messages (everything in the body) are
read too.
"""

from __future__ import annotations

import json
import os
import socket
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from conveyor import serialization
from conveyor.envelope import Envelope, new_envelope
from conveyor.errors import ConfigurationError, EncodeError, MessageError, SerializationError
from conveyor.serialization.json_codec import json_text

REPR_LIMIT = 1024
"""Celery truncates argsrepr/kwargsrepr; AMQP header frames must stay small."""

EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")

_KNOWN_HEADERS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin",
    "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps", "compression",
    "redelivered", "meth",
})


_ID_BATCH = 128
_UUID_DASHES = (8, 13, 18, 23)
# The hex digit of a UUID's 16 bytes that each character of its text shows (dashes apart).
_UUID_DIGITS = [(place, place - sum(dash < place for dash in _UUID_DASHES))
                for place in range(36) if place not in _UUID_DASHES]
# Version 4 and the RFC 4122 variant, in each UUID of a batch: the version nibble is 4, and
# the two high bits of byte 8 are 10.
_UUID_KEEP = (~((0xF << 76) | (0xC << 60))) & ((1 << 128) - 1)
_UUID_SET = (0x4 << 76) | (0x8 << 60)
_BATCH_KEEP = int.from_bytes(_UUID_KEEP.to_bytes(16, "big") * _ID_BATCH, "big")
_BATCH_SET = int.from_bytes(_UUID_SET.to_bytes(16, "big") * _ID_BATCH, "big")
_ids: deque[str] = deque()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.clear)  # a child must not reuse its parent's


def _fresh_ids() -> list[str]:
    """``_ID_BATCH`` random UUIDs (version 4) as text, from one read of the OS's random
    source. Like ``uuid.uuid4()``: 122 random bits, the version and variant bits set.

    Each character place of the texts is filled for the whole batch at once (a strided
    copy), which is several times faster than formatting the ids one by one."""
    raw = (int.from_bytes(os.urandom(16 * _ID_BATCH), "big") & _BATCH_KEEP) | _BATCH_SET
    digits = raw.to_bytes(16 * _ID_BATCH, "big").hex().encode("ascii")
    text = bytearray(b"-" * 36 + b" ") * _ID_BATCH
    for place, digit in _UUID_DIGITS:
        text[place::37] = digits[digit::32]
    return text.decode("ascii").split()


def new_id() -> str:
    """A new task id: the text of a random UUID, as ``str(uuid.uuid4())`` gives.

    Ids are made in batches: one system call per batch instead of one per id, each of
    which also gives up the GIL (costly when another thread, the RabbitMQ I/O thread
    for one, is busy). Thread-safe: a deque pops atomically.
    """
    while True:
        try:
            return _ids.popleft()
        except IndexError:
            _ids.extend(_fresh_ids())


_process_origin: list[tuple[str, str]] = []  # origin_name() of this process and its JSON
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_process_origin.clear)  # a child has its own pid


def _origin() -> tuple[str, str]:
    if not _process_origin:
        name = f"gen{os.getpid()}@{socket.gethostname()}"
        _process_origin.append((name, encode_basestring_ascii(name)))
    return _process_origin[0]


def origin_name() -> str:
    """``gen<pid>@<host>``, Celery's node name for a client process (cached per process:
    asking for the pid is a system call, which showed in profiles of bulk sends)."""
    return _origin()[0]


@dataclass(frozen=True, slots=True)
class Embed:
    """The third body element: what runs after this task (canvas)."""

    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "callbacks": self.callbacks,
            "errbacks": self.errbacks,
            "chain": self.chain,
            "chord": self.chord,
        }

    @classmethod
    def from_value(cls, value: Any) -> Embed:
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise MessageError(f"embed must be a mapping or null, not {type(value).__name__}")
        return cls(
            callbacks=value.get("callbacks"),
            errbacks=value.get("errbacks"),
            chain=value.get("chain"),
            chord=value.get("chord"),
        )


@dataclass(frozen=True, slots=True)
class TaskHeaders:
    """What a worker needs to decide about a message before decoding its body."""

    id: str
    task: str
    eta: datetime | None = None
    expires: datetime | None = None
    retries: int = 0
    group: str | None = None
    group_index: int | None = None
    root_id: str | None = None
    parent_id: str | None = None
    shadow: str | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    origin: str | None = None
    ignore_result: bool | None = None
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    replaced_task_nesting: int = 0
    stamped_headers: list[str] | None = None
    stamps: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    protocol: int = 2


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """A task call: everything that travels, in one frozen value."""

    headers: TaskHeaders
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    embed: Embed = field(default_factory=Embed)
    reply_to: str = ""
    correlation_id: str | None = None
    priority: int | None = None
    delivery_mode: int = 2

    @property
    def id(self) -> str:
        return self.headers.id

    @property
    def task(self) -> str:
        return self.headers.task


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def parse_time(value: Any, field_name: str) -> datetime | None:
    """Read an eta/expires header; naive values are UTC (the app timezone default)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise MessageError(f"header {field_name!r} is not an ISO-8601 time: {value!r}") from exc
    elif isinstance(value, (int, float)):
        parsed = datetime.fromtimestamp(value, UTC)
    else:
        raise MessageError(f"header {field_name!r} has type {type(value).__name__}")
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."


def encode_task(
    message: TaskMessage,
    *,
    serializer: str = "json",
    compression: str | None = None,
    argsrepr: str | None = None,
    kwargsrepr: str | None = None,
) -> Envelope:
    """Build the envelope Celery 5 would send for this call. Raises EncodeError."""
    h = message.headers
    body, content_type, content_encoding = serialization.dumps(
        [list(message.args), dict(message.kwargs), message.embed.as_dict()], serializer
    )
    headers: dict[str, Any] = {
        "lang": "py",
        "task": h.task,
        "id": h.id,
        "shadow": h.shadow,
        "eta": _iso(h.eta),
        "expires": _iso(h.expires),
        "group": h.group,
        "group_index": h.group_index,
        "retries": h.retries,
        "timelimit": [h.time_limit, h.soft_time_limit],
        "root_id": h.root_id or h.id,
        "parent_id": h.parent_id,
        "argsrepr": argsrepr if argsrepr is not None else short_repr(tuple(message.args)),
        "kwargsrepr": kwargsrepr if kwargsrepr is not None else short_repr(dict(message.kwargs)),
        "origin": h.origin or origin_name(),
        "ignore_result": h.ignore_result,
        "replaced_task_nesting": h.replaced_task_nesting,
        "stamped_headers": h.stamped_headers,
        "stamps": h.stamps,
    }
    for key, value in h.extra.items():
        headers.setdefault(key, value)
    if compression:
        body, headers["compression"] = serialization.compress(body, compression)
    properties: dict[str, Any] = {
        "correlation_id": message.correlation_id or h.id,
        "reply_to": message.reply_to,
        "delivery_mode": message.delivery_mode,
        "priority": message.priority if message.priority is not None else 0,
    }
    if h.expires is not None:
        expires = h.expires if h.expires.tzinfo else h.expires.replace(tzinfo=UTC)
        left_ms = int((expires - datetime.now(UTC)).total_seconds() * 1000)
        properties["expiration"] = str(max(0, left_ms))
    return Envelope(body, content_type, content_encoding, headers, properties)


EMBED_JSON = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
"""The embed of a call without callbacks, chain or chord, as kombu's JSON writes it."""

_EMPTY_CALL_BODY = f"[[], {{}}, {EMBED_JSON}]".encode()
_JSON = json.JSONEncoder()  # json.dumps' own settings: how JSON brokers write headers


def header_json(value: Any) -> str | None:
    """``value`` as ``json.dumps`` writes it, for what headers usually hold (str, None,
    bool, int, float, lists of those); None for anything else."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is float:
        return _JSON.encode(value)  # NaN and infinities as json.dumps writes them
    if kind is list:
        items = []
        for item in value:
            text = header_json(item)
            if text is None:
                return None
            items.append(text)
        return "[" + ", ".join(items) + "]"
    return None


class CallTemplate:
    """The messages of one task sent with the same options, written from parts made once.

    :meth:`encode` returns what :func:`encode_task` returns for such a call, as long as it
    is protocol 2 in JSON (the built-in codec) without eta, expiry, callbacks, chain,
    chord, stamps, extra headers or compression: the caller checks that. What every call
    shares is kept ready, headers as JSON text included, and a call without arguments
    has a fixed body. Headers of other types than :func:`header_json` covers are still
    right in the dict; the envelope then has no ``headers_json``.
    """

    __slots__ = ("_head", "_headers", "_ignore_result", "_last_group", "_origin",
                 "_origin_json", "_retries", "_shadow", "_soft_time_limit", "_task",
                 "_time_limit", "_timing")

    def __init__(
        self,
        task: str,
        *,
        shadow: str | None = None,
        retries: int = 0,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        origin: str | None = None,
        ignore_result: bool | None = None,
    ) -> None:
        self._task = task
        self._shadow = shadow
        self._retries = retries
        self._time_limit = time_limit
        self._soft_time_limit = soft_time_limit
        self._origin = origin or None
        self._ignore_result = ignore_result
        # Every call's headers start as a copy of these (in the order Celery writes them):
        # copying a dict is cheaper than writing one out. None marks what each call sets.
        self._headers: dict[str, Any] = {
            "lang": "py",
            "task": task,
            "id": None,
            "shadow": shadow,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": retries,
            "timelimit": None,
            "root_id": None,
            "parent_id": None,
            "argsrepr": None,
            "kwargsrepr": None,
            "origin": None,
            "ignore_result": ignore_result,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": None,
        }
        fixed = [header_json(value) for value in (
            task, shadow, retries, [time_limit, soft_time_limit], ignore_result)]
        self._origin_json = header_json(origin) if origin else ""
        self._head: tuple[str, str, str] | None = None
        self._timing = ""
        # The members of a group share its id (text): its JSON is made once for them all.
        self._last_group: tuple[str | None, str] = (None, "null")
        if None not in fixed and self._origin_json is not None:
            task_json, shadow_json, retries_json, limits_json, ignore_json = fixed
            self._head = (
                f'{{"lang": "py", "task": {task_json}, "id": ',
                f', "shadow": {shadow_json}, "eta": null, "expires": null, "group": ',
                f', "ignore_result": {ignore_json}, "replaced_task_nesting": 0, '
                '"stamped_headers": null, "stamps": {}}',
            )
            self._timing = f', "retries": {retries_json}, "timelimit": {limits_json}, "root_id": '

    def encode(
        self,
        task_id: Any,
        args: Any,
        kwargs: Mapping[str, Any] | None,
        group: Any,
        group_index: Any,
        root_id: Any,
        parent_id: Any,
        reply_to: str,
        priority: int | None,
        delivery_mode: int,
    ) -> Envelope:
        """The envelope of one call. Raises EncodeError as ``encode_task`` does."""
        if args or kwargs:
            arglist = list(args) if args else []
            kwdict = dict(kwargs) if kwargs else {}
            try:
                text = f"[{json_text(arglist)}, {json_text(kwdict)}, {EMBED_JSON}]"
            except (SerializationError, ConfigurationError):
                raise
            except Exception as exc:  # as serialization.dumps reports it
                raise EncodeError(f"json cannot encode the value: {exc}") from exc
            body = text.encode("utf-8")
            argsrepr = short_repr(tuple(arglist))
            kwargsrepr = short_repr(kwdict)
            reprs_json = (f'{encode_basestring_ascii(argsrepr)}, "kwargsrepr": '
                          f'{encode_basestring_ascii(kwargsrepr)}')
        else:
            body, argsrepr, kwargsrepr = _EMPTY_CALL_BODY, "()", "{}"
            reprs_json = '"()", "kwargsrepr": "{}"'
        root_id = root_id or task_id
        origin, origin_json = (self._origin, self._origin_json) if self._origin else _origin()
        headers = self._headers.copy()
        headers["id"] = task_id
        headers["group"] = group
        headers["group_index"] = group_index
        # Values that can be changed in place are new for each message.
        headers["timelimit"] = [self._time_limit, self._soft_time_limit]
        headers["root_id"] = root_id
        headers["parent_id"] = parent_id
        headers["argsrepr"] = argsrepr
        headers["kwargsrepr"] = kwargsrepr
        headers["origin"] = origin
        headers["stamps"] = {}
        rendered = None
        head = self._head
        if head is not None:
            # header_json(), with the usual types first.
            id_json = (encode_basestring_ascii(task_id) if type(task_id) is str
                       else header_json(task_id))
            root_json = id_json if root_id is task_id else header_json(root_id)
            last_group = self._last_group
            if group is last_group[0]:
                group_json: str | None = last_group[1]
            elif type(group) is str:
                group_json = encode_basestring_ascii(group)
                self._last_group = (group, group_json)
            else:
                group_json = header_json(group)
            index_json = ("null" if group_index is None else int.__repr__(group_index)
                          if type(group_index) is int else header_json(group_index))
            parent_json = "null" if parent_id is None else header_json(parent_id)
            if not (id_json is None or root_json is None or group_json is None
                    or index_json is None or parent_json is None):
                start, shadow, end = head
                rendered = (
                    f'{start}{id_json}{shadow}{group_json}, "group_index": {index_json}'
                    f'{self._timing}{root_json}, "parent_id": {parent_json}, "argsrepr": '
                    f'{reprs_json}, "origin": {origin_json}{end}'
                )
        properties = {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "delivery_mode": delivery_mode,
            "priority": priority if priority is not None else 0,
        }
        return new_envelope(body, "application/json", "utf-8", headers, properties, rendered)


def _time_limits(value: Any) -> tuple[float | None, float | None]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None, None
    hard, soft = value
    return (
        float(hard) if isinstance(hard, (int, float)) else None,
        float(soft) if isinstance(soft, (int, float)) else None,
    )


def headers_from_mapping(source: Mapping[str, Any], protocol: int) -> TaskHeaders:
    # Read for every message a worker takes: each header is looked up once, and the
    # usual values (None, text, a dict) are taken without a call.
    get = source.get
    task = get("task")
    task_id = get("id")
    if not isinstance(task, str) or not task:
        raise MessageError("message has no task name")
    if not isinstance(task_id, str) or not task_id:
        raise MessageError(f"message for {task!r} has no task id")
    retries = get("retries") or 0
    group = source["group"] if "group" in source else get("taskset")
    group_index = get("group_index")
    timelimit = get("timelimit")
    hard, soft = (None, None) if timelimit is None else _time_limits(timelimit)
    eta, expires = get("eta"), get("expires")
    ignore_result = get("ignore_result")
    stamps = get("stamps")
    root_id, parent_id, shadow = get("root_id"), get("parent_id"), get("shadow")
    origin, argsrepr, kwargsrepr = get("origin"), get("argsrepr"), get("kwargsrepr")
    return TaskHeaders(
        id=task_id,
        task=task,
        eta=None if eta is None else parse_time(eta, "eta"),
        expires=None if expires is None else parse_time(expires, "expires"),
        retries=int(retries) if isinstance(retries, (int, float)) else 0,
        group=group if group is None or type(group) is str else str(group),
        group_index=int(group_index) if isinstance(group_index, int) else None,
        root_id=root_id if root_id is None or type(root_id) is str else str(root_id),
        parent_id=parent_id if parent_id is None or type(parent_id) is str else str(parent_id),
        shadow=shadow if shadow is None or type(shadow) is str else str(shadow),
        time_limit=hard,
        soft_time_limit=soft,
        origin=origin if origin is None or type(origin) is str else str(origin),
        ignore_result=ignore_result if isinstance(ignore_result, bool) else None,
        argsrepr=argsrepr if argsrepr is None or type(argsrepr) is str else str(argsrepr),
        kwargsrepr=(kwargsrepr if kwargsrepr is None or type(kwargsrepr) is str
                    else str(kwargsrepr)),
        replaced_task_nesting=int(get("replaced_task_nesting") or 0),
        stamped_headers=get("stamped_headers"),
        stamps=dict(stamps) if type(stamps) is dict or isinstance(stamps, Mapping) else {},
        extra={k: v for k, v in source.items() if k not in _KNOWN_HEADERS},
        protocol=protocol,
    )


def _decoded_payload(envelope: Envelope, accept: frozenset[str]) -> Any:
    body = envelope.body
    headers = envelope.headers
    compression = headers.get("compression") if type(headers) is dict or isinstance(
        headers, Mapping) else None
    if compression:
        body = serialization.decompress(body, str(compression))
    return serialization.loads(body, envelope.content_type, envelope.content_encoding, accept)


def read_headers(envelope: Envelope, accept: frozenset[str]) -> TaskHeaders:
    """Task metadata of a message; protocol v1 (metadata in the body) is read too.

    Raises MessageError for what is not a task message, and the serialization errors
    (ContentDisallowed, DecodeError) for a v1 body that can't be read.
    """
    headers = envelope.headers
    if type(headers) is not dict and not isinstance(headers, Mapping):
        raise MessageError("unknown message: headers are not a mapping")
    if "task" in headers:
        return headers_from_mapping(headers, protocol=2)
    payload = _decoded_payload(envelope, accept)
    if isinstance(payload, Mapping) and "task" in payload:
        return headers_from_mapping(payload, protocol=1)
    raise MessageError("unknown message: no task name in headers or body")


def decode_body(
    envelope: Envelope, accept: frozenset[str], protocol: int = 2
) -> tuple[list[Any], dict[str, Any], Embed]:
    """``(args, kwargs, embed)`` of a task message. Raises MessageError / DecodeError."""
    payload = _decoded_payload(envelope, accept)
    if protocol == 1 or (type(payload) is not list and isinstance(payload, Mapping)):
        if not isinstance(payload, Mapping):
            raise MessageError("protocol 1 body is not a mapping")
        args, kwargs = payload.get("args", []), payload.get("kwargs", {})
        embed = Embed(callbacks=payload.get("callbacks"), errbacks=payload.get("errbacks"),
                      chord=payload.get("chord"))
    else:
        if not isinstance(payload, (list, tuple)) or len(payload) != 3:
            raise MessageError("body must be a 3-element array [args, kwargs, embed]")
        args, kwargs, raw_embed = payload
        embed = Embed.from_value(raw_embed)
    if not isinstance(args, (list, tuple)):
        raise MessageError(f"args must be an array, not {type(args).__name__}")
    if type(kwargs) is not dict and not isinstance(kwargs, Mapping):
        raise MessageError(f"kwargs must be an object, not {type(kwargs).__name__}")
    return list(args), dict(kwargs), embed
