"""An in-process result backend: one shared store per URL, for tests and single processes.

Backends built with the same URL in one process share a store, so a producer and a worker
running in threads of the same process see each other's results. Documents are kept
encoded, exactly as a networked backend would keep them: a result that cannot be
serialized fails at ``store`` time here too, and readers get their own copy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from conveyor import states
from conveyor.backends.base import Meta, ResultBackend
from conveyor.errors import TimeoutError

# Without a cleanup call nothing else would ever drop expired documents from a
# long-lived process, so ``store`` sweeps them now and then.
_SWEEP_EVERY = 60.0


@dataclass(slots=True)
class _Entry:
    status: str
    data: bytes
    content_type: str
    content_encoding: str
    expires_at: float | None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass(slots=True)
class _Store:
    entries: dict[str, _Entry] = field(default_factory=dict)
    # key -> (value, expires_at); a namespace of its own, apart from task ids.
    counters: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    changed: threading.Condition = field(default_factory=threading.Condition)
    last_sweep: float = field(default_factory=time.monotonic)

    def live(self, task_id: str, now: float) -> _Entry | None:
        entry = self.entries.get(task_id)
        return None if entry is None or entry.expired(now) else entry

    def sweep(self, now: float) -> int:
        expired = [task_id for task_id, entry in self.entries.items() if entry.expired(now)]
        for task_id in expired:
            del self.entries[task_id]
        for key in [key for key, (_, at) in self.counters.items() if at is not None and at <= now]:
            del self.counters[key]
        self.last_sweep = now
        return len(expired)


_STORES: dict[str, _Store] = {}
_STORES_LOCK = threading.Lock()


def _store_for(url: str) -> _Store:
    with _STORES_LOCK:
        return _STORES.setdefault(url, _Store())


class MemoryBackend(ResultBackend):
    """Results in this process's memory; ``wait`` wakes the moment a result is stored."""

    scheme = "memory"
    supports_counters = True

    def __init__(
        self,
        url: str = "memory://",
        *,
        serializer: str = "json",
        accept: Iterable[str] = ("json",),
        expires: float | None = 86400.0,
    ) -> None:
        super().__init__(url, serializer=serializer, accept=accept, expires=expires)
        self._store = _store_for(url)

    @classmethod
    def reset_all(cls) -> None:
        """Empty every store in this process (for tests).

        Stores are emptied rather than dropped so backends that already exist keep
        sharing one store with the ones created afterwards.
        """
        with _STORES_LOCK:
            stores = list(_STORES.values())
        for store in stores:
            with store.changed:
                store.entries.clear()
                store.counters.clear()

    def _expires_at(self, now: float) -> float | None:
        # Celery treats both None and 0 as "never expire".
        return now + self.expires if self.expires else None

    def store(self, task_id: str, meta: Mapping[str, Any]) -> None:
        data, content_type, content_encoding = self.encode(meta)
        status = str(meta.get("status"))
        with self._store.changed:
            now = time.monotonic()
            current = self._store.live(task_id, now)
            if current is not None and current.status == states.SUCCESS:
                return
            self._store.entries[task_id] = _Entry(
                status, data, content_type, content_encoding, self._expires_at(now)
            )
            if now - self._store.last_sweep >= _SWEEP_EVERY:
                self._store.sweep(now)
            self._store.changed.notify_all()

    def _live(self, task_id: str) -> _Entry | None:
        with self._store.changed:
            return self._store.live(task_id, time.monotonic())

    def _decode(self, entry: _Entry) -> Meta:
        return self.decode(entry.data, entry.content_type, entry.content_encoding)

    def get(self, task_id: str) -> Meta | None:
        entry = self._live(task_id)
        return None if entry is None else self._decode(entry)

    def get_many(self, task_ids: Iterable[str]) -> dict[str, Meta]:
        with self._store.changed:
            now = time.monotonic()
            found = {task_id: self._store.live(task_id, now) for task_id in task_ids}
        return {task_id: self._decode(entry) for task_id, entry in found.items() if entry}

    def wait(self, task_id: str, timeout: float | None = None, *,
             just_sent: bool = False) -> Meta:
        ready: _Entry | None = None

        def is_ready() -> bool:
            nonlocal ready
            entry = self._store.live(task_id, time.monotonic())
            ready = entry if entry is not None and entry.status in states.READY_STATES else None
            return ready is not None

        with self._store.changed:
            self._store.changed.wait_for(is_ready, timeout)
        if ready is None:
            raise TimeoutError(f"task {task_id} not ready after {timeout}s")
        return self._decode(ready)

    def forget(self, task_id: str) -> None:
        with self._store.changed:
            self._store.entries.pop(task_id, None)

    def incr(self, key: str, amount: int = 1, expires: float | None = None) -> int:
        with self._store.changed:
            now = time.monotonic()
            value, expires_at = self._store.counters.get(key, (0, None))
            if expires_at is not None and expires_at <= now:
                value = 0
            value += amount
            self._store.counters[key] = (value, None if expires is None else now + expires)
            return value

    def delete_counter(self, key: str) -> None:
        with self._store.changed:
            self._store.counters.pop(key, None)

    def cleanup(self) -> int:
        with self._store.changed:
            return self._store.sweep(time.monotonic())

    def close(self) -> None:
        """Nothing to release: the store outlives any one backend made for it."""
