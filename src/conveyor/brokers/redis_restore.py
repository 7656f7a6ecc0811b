"""Giving back what dead Celery workers held: kombu's ``restore_visible``, done by ours.

A delivery in ``unacked`` that no Conveyor lease covers was taken by a Celery worker. If
it was delivered more than ``visibility_timeout`` ago, that worker is presumed dead and
the message goes back to the head of its queue with kombu's ``redelivered`` marks, as a
Celery worker would put it back. Scans hold kombu's ``unacked_mutex`` (so Celery and
Conveyor workers never restore the same delivery twice), run at most every
``restore_interval`` seconds and restore at most ``restore_limit`` deliveries each; each
restore is one script that first checks the entry is unchanged and still lapsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from typing import Any, cast

import redis
from conveyor.brokers.redis_routing import RedisTopology
from conveyor.brokers.redis_settings import BrokerSettings
from conveyor.errors import BrokerError
from conveyor.redis_connection import as_bytes

logger = logging.getLogger("conveyor.brokers.redis")


class ForeignRestorer:
    def __init__(
        self,
        client: redis.Redis,
        settings: BrokerSettings,
        topology: RedisTopology,
        scripts: dict[str, Any],
        visibility_timeout: float,
    ) -> None:
        self.client = client
        self.settings = settings
        self.layout = settings.layout
        self.topology = topology
        self._restore = scripts["RESTORE_FOREIGN"]
        self._release = scripts["RELEASE_LOCK"]
        self.visibility_timeout = visibility_timeout
        self.next_scan = 0.0

    def maybe_scan(self) -> None:
        """Scan if one is due. Raises redis-py errors (the caller translates them)."""
        now = time.time()
        if now < self.next_scan:
            return
        self.next_scan = now + self.settings.restore_interval
        layout = self.layout
        ceiling = now - self.visibility_timeout
        lapsed: list[bytes] = cast(Any, self.client).zrange(
            layout.unacked_index,
            "-inf",
            repr(ceiling),
            byscore=True,
            offset=0,
            num=self.settings.restore_limit,
        )
        if not lapsed:
            return
        token = secrets.token_hex(16)
        if not self.client.set(layout.unacked_mutex, token, nx=True, ex=self.settings.mutex_expire):
            return  # another worker (Celery's or ours) is restoring
        try:
            self._restore_tags(lapsed, ceiling)
        finally:
            self._release(keys=[layout.unacked_mutex], args=[token])

    def _restore_tags(self, tags: list[bytes], ceiling: float) -> None:
        layout = self.layout
        entries = self.client.hmget(layout.unacked, tags)
        records = self.client.hmget(layout.deliveries, tags)
        keys = [layout.unacked, layout.unacked_index, layout.deliveries]
        for tag, entry, record in zip(tags, entries, records, strict=True):
            if record is not None and json.loads(record).get("t"):
                continue  # a Conveyor lease: it lapses by its own expiry, in fetch
            if entry is None:  # an index entry without its message: drop it
                self._restore(keys=keys, args=[tag, "", 0, ""])
                continue
            raw = as_bytes(entry)
            try:
                plan = self.topology.restore_plan(raw)
            except (ValueError, TypeError, BrokerError) as exc:
                logger.error("Cannot restore delivery %r: %s", tag, exc)
                continue
            if plan is None:
                continue
            payload, list_keys = plan
            digest = hashlib.sha1(raw).hexdigest()
            self._restore(keys=[*keys, *list_keys], args=[tag, digest, repr(ceiling), payload])
