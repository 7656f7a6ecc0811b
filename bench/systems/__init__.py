"""The task apps each system's worker and driver import (one module per system).

Every module reads the same ``BENCH_*`` environment variables (see ``bench.settings``)
and defines the same tasks: ``noop`` (one Redis INCR, no result), ``add`` (a stored
result, for round trips) and ``io10`` (10 ms of sleep, then the INCR). Conveyor and Celery
add ``noop_late``, the no-op declared ``acks_late=True``; Dramatiq always acknowledges
after the actor returns, so its ``noop`` serves for both drains.
"""
