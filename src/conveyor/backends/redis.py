"""The Redis result backend, compatible with Celery's.

Each task's document is the string ``celery-task-meta-<id>`` (after the
``global_keyprefix`` transport option, to which an ``_`` is added as Celery does), written
with its expiry (``result_expires``) and PUBLISHed on a channel of the same name in one
script, so a Celery client waiting with ``AsyncResult.get()`` wakes at once, and so does
ours: a single listener thread per backend and process subscribes for every waiting
``wait()`` (and unsubscribes when the last one for an id leaves), and a waiter reads the
key after its subscription is confirmed, so a result stored just before is not missed.

A stored SUCCESS is never replaced (Celery's rule, checked here inside the same script
that writes). Groups are Celery's ``celery-taskset-meta-<gid>`` documents; chord counters
are ``conveyor-counter-<key>`` integers (INCRBY with PEXPIRE).

The value carries no content type, so reading sniffs it: JSON, pickle, msgpack or YAML
(and Celery's ``\\x00celery-compressed\\x00`` marker); the accept-list still decides what
may be decoded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import redis
from conveyor import serialization, states
from conveyor.backends.base import Meta, ResultBackend, group_members
from conveyor.backends.redis_chord import RedisChords
from conveyor.backends.redis_listener import ResultListener
from conveyor.errors import BackendError, BackendUnavailable, TimeoutError
from conveyor.redis_connection import (
    RedisClients,
    as_bytes,
    run_command,
    run_script,
    translated,
)

TASK_KEYPREFIX = "celery-task-meta-"
GROUP_KEYPREFIX = "celery-taskset-meta-"
COUNTER_KEYPREFIX = "conveyor-counter-"
COMPRESSED_MARKER = b"\x00celery-compressed\x00"
_IDS_PER_MGET = 1000

# KEYS: the document.  ARGV: value, expiry in ms (0: none), status of the value.
# Returns 1 stored, 0 kept (a SUCCESS is there), -1 unreadable here (caller checks).
_STORE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, doc
  if string.sub(current, 1, 1) == '{' then
    ok, doc = pcall(cjson.decode, current)
  else
    ok, doc = pcall(cmsgpack.unpack, current)
  end
  local status = ok and type(doc) == 'table' and doc.status
  if status == 'SUCCESS' then return 0 end
  if type(status) ~= 'string' then return -1 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""

_CONTENT_TYPES = {
    "json": ("application/json", "utf-8"),
    "pickle": ("application/x-python-serialize", "binary"),
    "msgpack": ("application/x-msgpack", "binary"),
    "yaml": ("application/x-yaml", "utf-8"),
}


def sniff(data: bytes) -> tuple[bytes, str, str]:
    """``(payload, content_type, content_encoding)`` of a stored value."""
    if data.startswith(COMPRESSED_MARKER):
        mime, _, payload = data[len(COMPRESSED_MARKER) :].partition(b"\x00")
        data = serialization.decompress(payload, mime.decode("ascii", "replace"))
    head = data.lstrip()[:1]
    if head in (b"{", b"["):
        kind = "json"
    elif data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        kind = "pickle"
    elif data[:1] and (0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF)):
        kind = "msgpack"
    else:
        kind = "yaml"
    return (data, *_CONTENT_TYPES[kind])


def key_prefix(global_keyprefix: str | None) -> str:
    """Celery's rule: an ``_`` follows the prefix unless it ends in one of ``:_-.``."""
    prefix = global_keyprefix or ""
    if prefix and prefix[-1] not in ":_-.":
        prefix += "_"
    return prefix


class RedisBackend(ResultBackend):
    scheme = "redis"
    supports_counters = True
    expires_by_itself = True
    """Redis drops expired documents on its own: ``cleanup`` has nothing to do."""
    expiry_resolution = 0.0

    def __init__(
        self,
        url: str,
        *,
        serializer: str = "json",
        accept: Iterable[str] = ("json",),
        expires: float | None = 86400.0,
        **transport_options: Any,
    ) -> None:
        super().__init__(url, serializer=serializer, accept=accept, expires=expires)
        self._clients = RedisClients(url, transport_options)
        self._where = self._clients.target.safe_url
        self.client = self._clients.client
        self.prefix = key_prefix(
            transport_options.get(
                "global_keyprefix", self._clients.target.query.get("global_keyprefix")
            )
        )
        self._store_script = self.client.register_script(_STORE)
        self._chords = RedisChords(self, self.client, self.group_key)
        self._listener_lock = threading.Lock()
        self._listener: ResultListener | None = None
        self._listener_pid = os.getpid()

    @contextmanager
    def _redis(self) -> Iterator[None]:
        with translated(BackendUnavailable, BackendError, self._where):
            yield

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}{TASK_KEYPREFIX}{task_id}"

    def group_key(self, group_id: str) -> str:
        return f"{self.prefix}{GROUP_KEYPREFIX}{group_id}"

    def _expiry_ms(self, expires: float | None) -> int:
        # Celery: a falsy result_expires (None or 0) keeps documents for good.
        return max(1, round(expires * 1000)) if expires else 0

    def _decode_stored(self, data: bytes) -> Meta:
        payload, content_type, encoding = sniff(data)
        return self.decode(payload, content_type, encoding)

    # -- the contract -------------------------------------------------------------------
    def store(self, task_id: str, meta: Mapping[str, Any]) -> None:
        data, _, _ = self.encode(meta)
        key, expiry = self.task_key(task_id), self._expiry_ms(self.expires)
        with self._redis():
            outcome = run_script(self._store_script, [key], [data, expiry])
            if outcome == -1:
                self._store_watching(key, data, expiry)

    def _store_watching(self, key: str, data: bytes, expiry: int) -> None:
        """The SUCCESS check for values Lua cannot read (pickle, YAML): optimistic."""
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    cast(Any, pipe).watch(key)
                    current = pipe.get(key)
                    if current is not None and (
                        self._status_of(as_bytes(current)) == states.SUCCESS
                    ):
                        pipe.unwatch()
                        return
                    pipe.multi()
                    if expiry:
                        pipe.set(key, data, px=expiry)
                    else:
                        pipe.set(key, data)
                    pipe.publish(key, data)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def _status_of(self, data: bytes) -> Any:
        try:
            return self._decode_stored(data).get("status")
        except Exception:
            return None

    def get(self, task_id: str) -> Meta | None:
        with self._redis():
            # The short road: a waiting get() reads the key after every subscription.
            data = run_command(self.client, "GET", self.task_key(task_id))
        return None if data is None else self._decode_stored(as_bytes(data))

    def get_many(self, task_ids: Iterable[str]) -> dict[str, Meta]:
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, Meta] = {}
        for start in range(0, len(ids), _IDS_PER_MGET):
            chunk = ids[start : start + _IDS_PER_MGET]
            with self._redis():
                values = self.client.mget([self.task_key(task_id) for task_id in chunk])
            for task_id, data in zip(chunk, values, strict=True):
                if data is not None:
                    found[task_id] = self._decode_stored(as_bytes(data))
        return found

    def wait(self, task_id: str, timeout: float | None = None, *,
             just_sent: bool = False) -> Meta:
        """Return the document once ready, woken by the PUBLISH that stored it."""
        if not just_sent:  # else the read after subscribing is the first worth making
            meta = self.get(task_id)
            if meta is not None and meta.get("status") in states.READY_STATES:
                return meta
        deadline = None if timeout is None else time.monotonic() + timeout
        listener = self._shared_listener()
        with listener.watching(self.task_key(task_id).encode()) as waiter:
            while True:
                if waiter.needs_read():
                    meta = self.get(task_id)
                    if meta is not None and meta.get("status") in states.READY_STATES:
                        return meta
                for data in waiter.published():
                    meta = self._decode_stored(data)
                    if meta.get("status") in states.READY_STATES:
                        return meta
                if not waiter.sleep(deadline):
                    why = "" if listener.connected else f" (Redis at {self._where} unreachable)"
                    raise TimeoutError(f"task {task_id} not ready after {timeout}s{why}")

    def forget(self, task_id: str) -> None:
        with self._redis():
            self.client.delete(self.task_key(task_id))

    def cleanup(self) -> int:
        return 0  # Redis expires documents itself

    def check(self) -> None:
        try:
            with self._redis():
                self.client.ping()
        except BackendError as exc:
            raise BackendUnavailable(str(exc)) from exc

    # -- counters, groups -----------------------------------------------------------------
    def incr(self, key: str, amount: int = 1, expires: float | None = None) -> int:
        counter = f"{self.prefix}{COUNTER_KEYPREFIX}{key}"
        expiry = self._expiry_ms(expires)
        with self._redis(), self.client.pipeline(transaction=True) as pipe:
            pipe.incrby(counter, amount)
            if expiry:
                pipe.pexpire(counter, expiry)
            else:
                pipe.persist(counter)
            value, _ = pipe.execute()
        return int(value)

    def delete_counter(self, key: str) -> None:
        with self._redis():
            self.client.delete(f"{self.prefix}{COUNTER_KEYPREFIX}{key}")

    def save_group(self, group_id: str, task_ids: Sequence[str]) -> None:
        """Celery's ``GroupResult.save()`` document: ``{"result": <group tuple>}``."""
        members = [[[task_id, None], None] for task_id in task_ids]
        data, _, _ = self.encode({"result": [[group_id, None], members]})
        expiry = self._expiry_ms(self.expires)
        with self._redis():
            if expiry:
                self.client.set(self.group_key(group_id), data, px=expiry)
            else:
                self.client.set(self.group_key(group_id), data)

    def get_group(self, group_id: str) -> list[str] | None:
        with self._redis():
            data = self.client.get(self.group_key(group_id))
        if data is None:
            return None
        return group_members(self._decode_stored(as_bytes(data)).get("result"))

    def forget_group(self, group_id: str) -> None:
        with self._redis():
            self.client.delete(self.group_key(group_id))

    # -- chords, in Celery's keys so either side's workers can finish either's chords ----
    def prepare_chord(self, group_id: str, task_ids: Sequence[str]) -> bool:
        with self._redis():
            self._chords.prepare(group_id, len(task_ids))
        return True

    def on_chord_part(self, group_id: str, task_id: str, group_index: int | None) -> (
            list[Meta] | None):
        with self._redis():
            return self._chords.count_part(group_id, task_id, group_index)

    # -- the listener ---------------------------------------------------------------------
    def _shared_listener(self) -> ResultListener:
        with self._listener_lock:
            if self._listener_pid != os.getpid():
                # A forked child has no listener thread; the parent's socket is not ours.
                self._listener, self._listener_pid = None, os.getpid()
            if self._listener is None:
                self._listener = ResultListener(self._clients, self._where)
            return self._listener

    def close(self) -> None:
        with self._listener_lock:
            listener, self._listener = self._listener, None
        if listener is not None and self._listener_pid == os.getpid():
            listener.close()
        self._clients.close()
