"""Execution pools: where jobs run. Every pool runs jobs through ``worker.runner``."""

from __future__ import annotations

from conveyor.worker.pools.base import Pool, ResultCallback, StartCallback

__all__ = ["POOL_NAMES", "Pool", "ResultCallback", "StartCallback"]

POOL_NAMES = ("prefork", "threads", "asyncio", "solo")
