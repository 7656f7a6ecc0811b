"""The Memcached result backend: ``cache+memcached://127.0.0.1:11211/``.

Several servers are separated by ``;`` (``cache+memcached://a:11211;b:11211/``), as in
Celery. Keys and values are those of Celery's cache backend: ``celery-task-meta-<id>``
holds the result document serialized with the result serializer, so Celery reads what
Conveyor stores and the other way round. Transport options: ``global_keyprefix`` (as
Celery applies it), ``connect_timeout``, ``timeout``, ``max_pool_size`` and
``item_size_max`` (the server's ``-I``, 1 MiB by default).

* Expiry is memcached's own: every document is written with ``result_expires`` as its
  lifetime, in whole seconds (at least one); lifetimes past 30 days are sent as a Unix
  time, since memcached reads larger numbers that way. ``cleanup`` has nothing to do.
* A stored SUCCESS is never replaced: a write reads the current document with ``gets``
  and replaces it with ``cas`` (or creates it with ``add``), looking again if another
  writer got there in between.
* Counters are memcached's atomic ``incr`` (``add`` creates the first value), under the
  key they are given, so ``chord-unlock-<group id>`` is the key Celery's cache backend
  counts. They only count up: memcached's counters are unsigned.
* ``wait`` polls (memcached cannot notify), with the base backoff of 0.5 ms to 50 ms.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from pymemcache.client.base import PooledClient
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from conveyor import serialization, states
from conveyor.backends.base import Meta, ResultBackend, group_members
from conveyor.errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    DecodeError,
    EncodeError,
    SerializationError,
)

T = TypeVar("T")

TASK_KEY_PREFIX = "celery-task-meta-"
GROUP_KEY_PREFIX = "celery-taskset-meta-"
DEFAULT_PORT = 11211
MAX_RELATIVE_EXPIRY = 30 * 24 * 60 * 60
"""Longer lifetimes are read by memcached as an absolute Unix time."""
DEFAULT_ITEM_SIZE_MAX = 1024 * 1024

_WRITE_ATTEMPTS = 100  # gets/cas rounds lost to other writers before giving up
_KEYS_PER_REQUEST = 100


def servers_of(url: str) -> list[tuple[str, int]]:
    """``cache+memcached://h1:11211;h2/`` → ``[("h1", 11211), ("h2", 11211)]``."""
    scheme, _, rest = url.partition("://")
    if scheme != "cache+memcached" or not rest.strip("/"):
        raise ConfigurationError(
            f"not a Memcached URL (expected cache+memcached://host:port/): {url!r}"
        )
    servers = []
    for part in rest.strip("/").split(";"):
        if not part:
            continue
        host, port = part, DEFAULT_PORT
        if part.startswith("["):  # [::1]:11211
            host, _, tail = part[1:].partition("]")
            if tail.startswith(":"):
                port = _port(tail[1:], url)
        elif part.count(":") == 1:
            host, _, number = part.partition(":")
            port = _port(number, url)
        servers.append((host, port))
    return servers


def _port(text: str, url: str) -> int:
    if not text.isdigit():
        raise ConfigurationError(f"bad port {text!r} in Memcached URL {url!r}")
    return int(text)


def memcached_expiry(seconds: float | None, now: float | None = None) -> int:
    """memcached's ``exptime`` for a lifetime in seconds; 0 means "never expires"."""
    if not seconds or seconds <= 0:
        return 0
    whole = max(1, math.ceil(seconds))  # 0 would mean "never"
    if whole <= MAX_RELATIVE_EXPIRY:
        return whole
    return int(time.time() if now is None else now) + whole


def with_global_prefix(prefix: str | None, key: str) -> str:
    """Celery's ``global_keyprefix``: joined with ``_`` unless it ends in a separator."""
    if not prefix:
        return key
    return f"{prefix}{key}" if prefix[-1] in ":_-." else f"{prefix}_{key}"


class MemcachedBackend(ResultBackend):
    """Results in memcached, expiring by themselves; thread-safe (pooled connections)."""

    scheme = "cache+memcached"
    supports_counters = True
    expires_by_itself = True
    """memcached drops expired items itself, so ``cleanup`` finds nothing to delete."""
    expiry_resolution = 1.0
    """Lifetimes are whole seconds, and the server's clock ticks once a second."""

    def __init__(
        self,
        url: str = "cache+memcached://127.0.0.1:11211/",
        *,
        serializer: str = "json",
        accept: Iterable[str] = ("json",),
        expires: float | None = 86400.0,
        global_keyprefix: str | None = None,
        connect_timeout: float = 5.0,
        timeout: float = 5.0,
        max_pool_size: int | None = None,
        item_size_max: int = DEFAULT_ITEM_SIZE_MAX,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) for the Memcached result backend: {', '.join(sorted(unknown))}"
                "; known: global_keyprefix, connect_timeout, timeout, max_pool_size,"
                " item_size_max"
            )
        super().__init__(url, serializer=serializer, accept=accept, expires=expires)
        self.servers = servers_of(url)
        self.item_size_max = item_size_max
        self._task_prefix = with_global_prefix(global_keyprefix, TASK_KEY_PREFIX)
        self._group_prefix = with_global_prefix(global_keyprefix, GROUP_KEY_PREFIX)
        self._counter_prefix = with_global_prefix(global_keyprefix, "")
        self._options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "timeout": timeout,
            "max_pool_size": max_pool_size,
            "no_delay": True,
            "default_noreply": False,  # wait for the reply, so a failed write raises
        }
        self._client = self._connect()
        _LIVE.add(self)

    def _connect(self) -> Any:
        if len(self.servers) == 1:
            return PooledClient(self.servers[0], **self._options)
        return HashClient(self.servers, use_pooling=True, **self._options)

    # -- plumbing --------------------------------------------------------------------------
    def _key(self, task_id: str) -> str:
        return self._task_prefix + task_id

    def _call(self, method: Callable[..., T], *args: Any, retry: bool = True) -> T:
        """One client call, retried once on a broken connection when it is safe to."""
        for attempt in (1, 2):
            try:
                return method(*args)
            except MemcacheUnexpectedCloseError as exc:
                error: Exception = exc
            except MemcacheServerError as exc:
                if "too large" in str(exc):
                    raise EncodeError(f"memcached refused the value: {exc}") from exc
                raise BackendError(f"memcached at {self.url}: {exc}") from exc
            except MemcacheClientError as exc:  # an illegal key, mostly
                raise BackendError(f"memcached refused the request: {exc}") from exc
            except (MemcacheError, OSError) as exc:
                error = exc
            if not retry or attempt == 2:
                raise BackendUnavailable(f"memcached at {self.url}: {error}") from error
        raise AssertionError("unreachable")  # pragma: no cover

    def _decode_document(self, data: bytes) -> Meta:
        meta = serialization.loads_untyped(bytes(data), self.serializer, self.accept)
        if not isinstance(meta, dict):
            raise DecodeError(f"result document is a {type(meta).__name__}, not a mapping")
        return meta

    def _is_success(self, data: bytes) -> bool:
        try:
            return self._decode_document(data).get("status") == states.SUCCESS
        except SerializationError:
            return False  # unreadable here: the new document replaces it

    # -- the contract ----------------------------------------------------------------------
    def store(self, task_id: str, meta: Mapping[str, Any]) -> None:
        data, _, _ = self.encode(meta)
        if len(data) > self.item_size_max:
            raise EncodeError(
                f"the result document of {task_id} is {len(data)} bytes; memcached stores"
                f" at most {self.item_size_max} (item_size_max)"
            )
        key = self._key(task_id)
        lifetime = memcached_expiry(self.expires)
        client = self._client
        for _ in range(_WRITE_ATTEMPTS):
            current, token = self._call(client.gets, key)
            if current is None:
                if self._call(client.add, key, data, lifetime, False):
                    return
                continue  # another writer created it first: look at theirs
            if self._is_success(current):
                return
            # False: changed since our gets; None: deleted since. Either way, look again.
            if self._call(client.cas, key, data, token, lifetime, False):
                return
        raise BackendError(f"{key} changed under every one of {_WRITE_ATTEMPTS} writes")

    def get(self, task_id: str) -> Meta | None:
        data = self._call(self._client.get, self._key(task_id))
        return None if data is None else self._decode_document(data)

    def get_many(self, task_ids: Iterable[str]) -> dict[str, Meta]:
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, Meta] = {}
        for start in range(0, len(ids), _KEYS_PER_REQUEST):
            keys = {
                self._key(task_id): task_id for task_id in ids[start : start + _KEYS_PER_REQUEST]
            }
            values = self._call(self._client.get_many, list(keys))
            for key, data in values.items():
                name = key.decode() if isinstance(key, bytes) else key
                found[keys[name]] = self._decode_document(data)
        return found

    def forget(self, task_id: str) -> None:
        self._call(self._client.delete, self._key(task_id), False)

    # -- groups: Celery's celery-taskset-meta-<gid> ---------------------------------------------
    def save_group(self, group_id: str, task_ids: Sequence[str]) -> None:
        """Celery's ``GroupResult.save()`` document: ``{"result": <group tuple>}``."""
        members = [[[task_id, None], None] for task_id in task_ids]
        data, _, _ = self.encode({"result": [[group_id, None], members]})
        lifetime = memcached_expiry(self.expires)
        self._call(self._client.set, self._group_prefix + group_id, data, lifetime, False)

    def get_group(self, group_id: str) -> list[str] | None:
        data = self._call(self._client.get, self._group_prefix + group_id)
        if data is None:
            return None
        return group_members(self._decode_document(data).get("result"))

    def forget_group(self, group_id: str) -> None:
        self._call(self._client.delete, self._group_prefix + group_id, False)

    # -- counters ------------------------------------------------------------------------------
    def incr(self, key: str, amount: int = 1, expires: float | None = None) -> int:
        if amount < 0:
            raise ValueError("memcached counters only count up (they are unsigned)")
        name = self._counter_prefix + key
        lifetime = memcached_expiry(expires)
        client = self._client
        for _ in range(_WRITE_ATTEMPTS):
            # Not retried on a broken connection: the increment may have happened.
            value = self._call(client.incr, name, amount, False, retry=False)
            if value is not None:
                # incr keeps the old lifetime; the contract sets the one given now.
                self._call(client.touch, name, lifetime, False)
                return int(value)
            if self._call(client.add, name, str(amount).encode(), lifetime, False):
                return amount
        raise BackendError(f"counter {name} changed under every one of {_WRITE_ATTEMPTS} tries")

    def delete_counter(self, key: str) -> None:
        self._call(self._client.delete, self._counter_prefix + key, False)

    def cleanup(self) -> int:
        """Nothing to do: memcached drops expired documents by itself."""
        return 0

    def check(self) -> None:
        try:
            self._call(self._client.get, self._key("conveyor-check"))
        except BackendError as exc:
            raise BackendUnavailable(str(exc)) from exc

    def close(self) -> None:
        self._client.close()

    def _after_fork_in_child(self) -> None:
        # The parent's sockets carry the parent's requests: the child opens its own and
        # keeps the inherited ones referenced, unused, so nothing closes them under it.
        _INHERITED.append(self._client)
        self._client = self._connect()


_LIVE: weakref.WeakSet[MemcachedBackend] = weakref.WeakSet()
_INHERITED: list[Any] = []


def _renew_in_child() -> None:
    for backend in list(_LIVE):
        backend._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_in_child)
