"""The task apps each system's worker and driver import (one module per system).

Every module reads the same ``BENCH_*`` environment variables (see ``bench.settings``)
and defines the same three tasks: ``noop`` (one Redis INCR, no result), ``add`` (a stored
result, for round trips) and ``io10`` (10 ms of sleep, then the INCR).
"""
