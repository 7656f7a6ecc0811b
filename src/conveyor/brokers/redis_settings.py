"""The Redis broker's options: kombu's transport options, plus a few of Conveyor's.

They come from ``broker_transport_options`` and, for the simple ones, from the URL query
(``redis://host/0?global_keyprefix=app:``), so one URL can name a whole isolated broker;
transport options win. kombu options that mean nothing here are accepted silently, so
settings shared with Celery keep working; anything else is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from conveyor.brokers.redis_layout import PRIORITY_STEPS, SEP, KeyLayout
from conveyor.redis_connection import CONNECTION_OPTIONS

logger = logging.getLogger("conveyor.brokers.redis")

LAYOUT_OPTIONS = frozenset(
    {
        "global_keyprefix",
        "sep",
        "priority_steps",
        "fanout_prefix",
        "fanout_patterns",
        "unacked_key",
        "unacked_index_key",
        "unacked_mutex_key",
    }
)
TUNING_OPTIONS = frozenset(
    {
        "unacked_mutex_expire",
        "unacked_restore_limit",
        "restore_interval",
        "polling_interval",
        "dead_letter_limit",
        "scan_limit",
    }
)
URL_OPTIONS = frozenset(
    {
        "global_keyprefix",
        "dead_letter_limit",
        "scan_limit",
        "unacked_restore_limit",
        "restore_interval",
        "polling_interval",
    }
)
IGNORED_OPTIONS = frozenset(
    {
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "retry_policy",
        "ack_emulation",
        "body_encoding",
        "queue_order_strategy",
        "confirm_publish",
        "unacked_restore_interval",
        "unacked_restore_throttle",
        "retry_on_timeout",
    }
)
"""kombu/Celery transport options with no meaning here."""


@dataclass(frozen=True)
class BrokerSettings:
    layout: KeyLayout
    scan_limit: int = 100
    """Lapsed leases and due delayed messages each fetch moves back, per queue."""
    restore_limit: int = 100
    """Deliveries of dead Celery workers one scan restores (kombu's option)."""
    restore_interval: float = 10.0
    """Seconds between those scans."""
    mutex_expire: int = 300
    polling_interval: float = 0.25
    """Only where the server refuses client tracking: how often an idle fetch looks."""
    dead_letter_limit: int = 10_000

    @classmethod
    def from_options(
        cls,
        query: Mapping[str, str],
        options: Mapping[str, Any],
        *,
        visibility_timeout: float,
        db: int,
    ) -> BrokerSettings:
        known = LAYOUT_OPTIONS | TUNING_OPTIONS | CONNECTION_OPTIONS | IGNORED_OPTIONS
        unknown = set(options) - known
        if unknown:
            logger.warning(
                "Redis broker ignores unknown transport options: %s", ", ".join(sorted(unknown))
            )
        merged = {**{k: v for k, v in query.items() if k in URL_OPTIONS}, **options}
        layout = KeyLayout(
            prefix=str(merged.get("global_keyprefix") or ""),
            sep=str(merged.get("sep", SEP)),
            steps=tuple(int(step) for step in merged.get("priority_steps", PRIORITY_STEPS)),
            db=db,
            fanout_prefix=merged.get("fanout_prefix", True),
            fanout_patterns=merged.get("fanout_patterns", True) not in (False, "false", "0"),
            unacked_name=str(merged.get("unacked_key", "unacked")),
            unacked_index_name=str(merged.get("unacked_index_key", "unacked_index")),
            unacked_mutex_name=str(merged.get("unacked_mutex_key", "unacked_mutex")),
        )
        return cls(
            layout=layout,
            scan_limit=int(merged.get("scan_limit", 100)),
            restore_limit=int(merged.get("unacked_restore_limit") or 100),
            # A dead worker's deliveries wait visibility_timeout anyway; scanning a few
            # times within that is enough, and never more often than 20 times a second.
            restore_interval=float(
                merged.get("restore_interval", min(10.0, max(0.05, visibility_timeout / 4)))
            ),
            mutex_expire=int(merged.get("unacked_mutex_expire", 300)),
            polling_interval=float(merged.get("polling_interval", 0.25)),
            dead_letter_limit=int(merged.get("dead_letter_limit", 10_000)),
        )
