"""The result backend contract.

A backend stores one *meta* document per task id: Celery's result document
(``status``, ``result``, ``traceback``, ``children``, ``date_done``, ``task_id``, and
with ``result_extended`` the request's ``name``, ``args``, ``kwargs``, ``worker``,
``retries``, ``queue``). Backends differ only in where the document lives and how a
reader learns that it changed; encoding is shared here.

Semantics every implementation honours (checked by ``tests/contract/test_backend.py``):

* ``store`` replaces the document, except that a stored ``SUCCESS`` is never replaced
  by another state (a redelivered duplicate must not undo a success).
* ``get`` returns ``None`` for an unknown id (readers report that as PENDING).
* ``wait`` returns the document once it is in a ready state, or raises
  :class:`~conveyor.errors.TimeoutError`; it sleeps between checks or listens, never spins.
* Documents expire after ``expires`` seconds (``result_expires``); ``None`` keeps them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from conveyor import serialization, states
from conveyor.errors import DecodeError, TimeoutError

Meta = dict[str, Any]

POLL_FIRST = 0.0005
POLL_MAX = 0.05


class ResultBackend(ABC):
    """Stores task states and results; safe to use from several threads."""

    scheme: str = ""

    def __init__(
        self,
        url: str,
        *,
        serializer: str = "json",
        accept: Iterable[str] = ("json",),
        expires: float | None = 86400.0,
    ) -> None:
        self.url = url
        self.serializer = serializer
        self.accept = serialization.normalize_accept(accept)
        self.expires = expires

    # -- encoding shared by every backend -----------------------------------------------
    def encode(self, meta: Mapping[str, Any]) -> tuple[bytes, str, str]:
        return serialization.dumps(dict(meta), self.serializer)

    def decode(self, data: bytes, content_type: str | None = None,
               content_encoding: str | None = None) -> Meta:
        if content_type is None:
            content_type, content_encoding = serialization.content_type_of(self.serializer)
        meta = serialization.loads(data, content_type, content_encoding or "utf-8", self.accept)
        if not isinstance(meta, dict):
            raise DecodeError(f"result document is a {type(meta).__name__}, not a mapping")
        return meta

    # -- the contract -------------------------------------------------------------------
    @abstractmethod
    def store(self, task_id: str, meta: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def get(self, task_id: str) -> Meta | None: ...

    def get_many(self, task_ids: Iterable[str]) -> dict[str, Meta]:
        found: dict[str, Meta] = {}
        for task_id in task_ids:
            meta = self.get(task_id)
            if meta is not None:
                found[task_id] = meta
        return found

    def wait(self, task_id: str, timeout: float | None = None, *,
             just_sent: bool = False) -> Meta:
        """Poll with a backoff from 0.5 ms to 50 ms; backends that can listen override it.

        ``just_sent`` says this process sent the task a moment ago, so a first read would
        almost surely find nothing; a backend may skip it (the answer is the same)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = POLL_FIRST
        while True:
            meta = self.get(task_id)
            if meta is not None and meta.get("status") in states.READY_STATES:
                return meta
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"task {task_id} not ready after {timeout}s")
                interval = min(interval, left)
            time.sleep(interval)
            interval = min(interval * 2, POLL_MAX)

    @abstractmethod
    def forget(self, task_id: str) -> None: ...

    # -- atomic counters (chords count finished header parts with these) ---------------
    supports_counters: bool = False
    """True where ``incr`` is one atomic step in the backend itself."""

    def incr(self, key: str, amount: int = 1, expires: float | None = None) -> int:
        """Add ``amount`` to the counter ``key`` atomically and return the new value.

        Backends that cannot count atomically leave ``supports_counters`` False and
        raise; callers then fall back to another strategy (and say so).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot count atomically")

    def delete_counter(self, key: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot count atomically")

    # -- groups and chords --------------------------------------------------------------
    def save_group(self, group_id: str, task_ids: Sequence[str]) -> None:
        """Remember a group's members, in order (``GroupResult.save``).

        Stored as Celery's group document ``{"result": [[gid, None], [[[id, None], None],
        ...]]}``; backends with a place of their own for groups (Redis'
        ``celery-taskset-meta-<gid>``, SQL's ``celery_tasksetmeta``) override this trio.
        """
        members = [[[task_id, None], None] for task_id in task_ids]
        self.store(group_key(group_id), {
            "status": states.SUCCESS, "result": [[group_id, None], members],
            "traceback": None, "children": [], "date_done": None,
            "task_id": group_key(group_id)})

    def get_group(self, group_id: str) -> list[str] | None:
        meta = self.get(group_key(group_id))
        return None if meta is None else group_members(meta.get("result"))

    def forget_group(self, group_id: str) -> None:
        self.forget(group_key(group_id))

    def prepare_chord(self, group_id: str, task_ids: Sequence[str]) -> bool:
        """Get ready to count a chord's header; False if this backend cannot count
        (the producer then sends Celery's polling ``celery.chord_unlock`` instead)."""
        if not self.supports_counters:
            return False
        self.save_group(group_id, task_ids)
        return True

    def on_chord_part(self, group_id: str, task_id: str, group_index: int | None) -> (
            list[Meta] | None):
        """Count one finished header part. Returns the header's documents in order when
        this call completed the chord and won the right to run the body, else None.

        A redelivered part may be counted twice, so reaching the size is not enough:
        every member must be ready, and a claim counter makes exactly one caller win.
        """
        expires = self.expires if self.expires else None
        count = self.incr(f"chord-unlock-{group_id}", 1, expires)
        members = self.get_group(group_id)
        if members is None or count < len(members):
            return None
        found = self.get_many(members)
        if any(found.get(member, {}).get("status") not in states.READY_STATES
               for member in members):
            return None
        if self.incr(f"chord-claim-{group_id}", 1, expires) != 1:
            return None
        return [found[member] for member in members]

    @abstractmethod
    def cleanup(self) -> int:
        """Delete expired documents now; return how many."""

    @abstractmethod
    def close(self) -> None: ...

    def check(self) -> None:  # noqa: B027 - embedded backends are always reachable
        """Raise :class:`~conveyor.errors.BackendUnavailable` if unreachable."""

    def __enter__(self) -> ResultBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def group_key(group_id: str) -> str:
    return f"celery-taskset-meta-{group_id}"


def group_members(result: Any) -> list[str] | None:
    """Task ids of a stored group tuple ``[[gid, parent], [[[id, parent], None], ...]]``."""
    if not isinstance(result, (list, tuple)) or len(result) != 2:
        return None
    members = result[1]
    if not isinstance(members, (list, tuple)):
        return None
    ids: list[str] = []
    for member in members:
        head = member[0] if isinstance(member, (list, tuple)) and member else None
        task_id = head[0] if isinstance(head, (list, tuple)) and head else head
        if not isinstance(task_id, str):
            return None
        ids.append(task_id)
    return ids
