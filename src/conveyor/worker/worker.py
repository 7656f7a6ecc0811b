"""The worker's life: start the pool, fetch, dispatch, keep leases alive, shut down.

Threads: *fetch* pulls messages while the prefetch window has room and checks each one
(``Consumer.intake``); *dispatch* (the thread calling :meth:`Worker.run`) starts ready
jobs on free pool slots and applies autoscaling; *leases* keeps held messages leased;
the pool reports finished jobs from its own threads.

This class is the whole worker for the threads, asyncio and solo pools. The prefork pool
runs one of these in each process (``conveyor.worker.process``), under a supervisor.

Shutdown: the first SIGTERM/SIGINT is warm (stop fetching, give prefetched messages
back, let running tasks finish); a second one is cold (kill running tasks; late-ack
messages go back to the queue).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from conveyor.errors import BrokerError, ConfigurationError
from conveyor.urls import redact_url
from conveyor.worker.autoscale import AutoscalePolicy
from conveyor.worker.consumer import Consumer
from conveyor.worker.job import Job, JobResult
from conveyor.worker.pools.base import Pool
from conveyor.worker.signal_relay import relay_signals

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.brokers.base import Broker
    from conveyor.config import Settings
    from conveyor.routing import Queue

logger = logging.getLogger("conveyor.worker")

FETCH_TIMEOUT = 1.0
RECONNECT_MAX_DELAY = 30.0


def expand_hostname(template: str | None) -> str:
    """Celery's ``-n`` templates: %h host, %n its first label, %d the domain."""
    host = socket.gethostname()
    name, _, domain = host.partition(".")
    value = template or "conveyor@%h"
    value = value.replace("%h", host).replace("%n", name).replace("%d", domain)
    return value.replace("%%", "%")


def starting_size(conf: Settings, concurrency: int | None,
                  autoscale: AutoscalePolicy | None) -> int:
    """Slots to start with: the autoscale minimum, else ``-c``, else the setting, else
    one per core."""
    if autoscale is not None:
        return autoscale.minimum
    return concurrency or conf.worker_concurrency or os.cpu_count() or 1


def declare_queues(broker: Broker, queues: Sequence[Queue], stopping: threading.Event) -> None:
    """Declare the consumed queues, waiting out a broker that is not up yet."""
    delay = 0.5
    while True:
        try:
            for queue in queues:
                broker.declare_queue(queue)
            return
        except BrokerError as exc:
            if stopping.is_set():
                raise
            logger.warning("Broker unavailable (%s); retrying in %.1fs", exc, delay)
            stopping.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)


class Worker:
    def __init__(
        self,
        app: Conveyor,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        pool: str | None = None,
        hostname: str | None = None,
        autoscale: AutoscalePolicy | None = None,
        prefetch_multiplier: int | None = None,
    ) -> None:
        conf = app.conf
        self.app = app
        self.hostname = expand_hostname(hostname)
        self.queues = app.router.consumed_queues(queues)
        self.queue_names = [q.name for q in self.queues]
        self.autoscale = autoscale
        size = starting_size(conf, concurrency, autoscale)
        self.pool_name = pool or conf.worker_pool
        self.prefetch_multiplier = (conf.worker_prefetch_multiplier
                                    if prefetch_multiplier is None else prefetch_multiplier)
        self.consumer = Consumer(app, self.hostname)
        self.pool = self._make_pool(self.pool_name, size)
        lease = app.broker.visibility_timeout
        self.renew_interval = conf.worker_lease_renew_interval or max(0.05, lease / 4)
        self._stopping = threading.Event()
        self._cold = threading.Event()
        self._signals = 0
        self._fetcher = threading.Thread(target=self._fetch_loop, name="conveyor-fetch",
                                         daemon=True)
        self._renewer = threading.Thread(target=self._renew_loop, name="conveyor-leases",
                                         daemon=True)
        self._fetch_delay = 0.5
        self._idle_since = time.monotonic()
        self._last_scale = 0.0
        self.consuming = False

    def _make_pool(self, name: str, size: int) -> Pool:
        if name in ("solo", "threads"):
            from conveyor.worker.pools.threads import SoloPool, ThreadsPool

            cls = SoloPool if name == "solo" else ThreadsPool
            return cls(self.app, size, self._on_result, self._on_started)
        if name == "asyncio":
            from conveyor.worker.pools.aio import AsyncioPool

            return AsyncioPool(self.app, size, self._on_result, self._on_started)
        if name == "prefork":
            raise ConfigurationError(
                "the prefork pool is a supervisor of processes, not a pool of this worker: "
                "start it with `conveyor -A module worker` (conveyor.worker.supervisor), "
                "or use pool='threads' or 'solo' in this process")
        raise ConfigurationError(
            f"unknown pool {name!r}; choose prefork, threads, asyncio or solo")

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def prefetch_disabled(self) -> bool:
        return self.app.conf.worker_disable_prefetch or self.prefetch_multiplier <= 0

    def window(self) -> int:
        """The prefetch limit: ``concurrency * worker_prefetch_multiplier``."""
        size = self.pool.size()
        return size if self.prefetch_disabled else size * self.prefetch_multiplier

    def room(self) -> int:
        """How many more messages to fetch now (caller holds the consumer's lock).

        As Celery's prefetch count, the limit counts unacknowledged messages: a started
        early-ack task is acked and frees its place. With prefetch off, only a free slot
        makes room, so a message never waits behind a running task."""
        consumer = self.consumer
        used = consumer.inflight if self.prefetch_disabled else consumer.unacked
        return self.window() - used

    def start(self) -> None:
        self._declare_with_retry()
        self.pool.start()
        self.app.broker.set_prefetch(self.window())
        self._announce()
        self._start_fetching()
        self._renewer.start()

    def _start_fetching(self) -> None:
        self._fetcher.start()

    def _announce(self) -> None:
        logger.info("%s ready: pool=%s concurrency=%s queues=%s broker=%s", self.hostname,
                    self.pool.name, self.pool.size(), ",".join(self.queue_names),
                    redact_url(self.app.conf.broker_url))

    def _declare_with_retry(self) -> None:
        declare_queues(self.app.broker, self.queues, self._stopping)

    def run(self) -> None:
        """Start and serve until shut down (blocks)."""
        if threading.current_thread() is threading.main_thread():
            self._install_signals()
        self.start()
        try:
            self.serve()
        finally:
            self.shutdown()

    def _install_signals(self) -> None:
        relay_signals(self._on_signal, signal.SIGTERM, signal.SIGINT)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.warning("Warm shutdown (%s): finishing running tasks; signal again "
                           "for a cold shutdown", signal.Signals(signum).name)
            self._stopping.set()
        else:
            logger.warning("Cold shutdown: stopping running tasks now")
            self._cold.set()
            self._stopping.set()
        self.app.broker.wake()

    def stop(self, *, cold: bool = False) -> None:
        if cold:
            self._cold.set()
        self._stopping.set()
        self.app.broker.wake()
        with self.consumer.lock:
            self.consumer.lock.notify_all()

    # -- fetching --------------------------------------------------------------------------
    def _fetch_loop(self) -> None:
        consumer = self.consumer
        while not self._stopping.is_set():
            with consumer.lock:
                window = self.window()
                room = self.room()
                # Refill in batches (one round trip for many messages), unless no job is
                # waiting for a slot: then even one message is worth fetching now.
                if room <= 0 or (consumer.ready and room < max(1, window // 2)):
                    consumer.lock.wait(0.2)
                    continue
            self._fetch_batch(room, FETCH_TIMEOUT)

    def _fetch_batch(self, room: int, timeout: float) -> int:
        """Fetch up to ``room`` messages and take them in; a broker error is logged and
        waited out with a growing pause. Returns how many were fetched."""
        consumer = self.consumer
        try:
            deliveries = self.app.broker.fetch(self.queue_names, room, timeout)
        except BrokerError as exc:
            self.consuming = False
            delay = self._fetch_delay
            logger.warning("Fetching from the broker failed (%s); retrying in %.1fs",
                           exc, delay)
            self._stopping.wait(delay)
            self._fetch_delay = min(delay * 2, RECONNECT_MAX_DELAY)
            return 0
        if not self.consuming:
            self.consuming = True
            if self._fetch_delay > 0.5:
                logger.warning("Broker reachable again; consuming from %s",
                               ",".join(self.queue_names))
        self._fetch_delay = 0.5
        for delivery in deliveries:
            if self._stopping.is_set():
                consumer.give_back(delivery, "worker shutting down")
                continue
            consumer.intake(delivery)
        if deliveries:
            self._fetched()
        return len(deliveries)

    def _fetched(self) -> None:
        """Called after each fetched batch went through intake."""

    # -- dispatching -----------------------------------------------------------------------
    def serve(self) -> None:
        consumer = self.consumer
        while not self._stopping.is_set():
            jobs: list[Job] = []
            with consumer.lock:
                free = self.pool.free_slots() if consumer.ready else 0
                while len(jobs) < free:
                    job = consumer.take_ready()
                    if job is None:
                        break
                    jobs.append(job)
                if not jobs:
                    consumer.lock.wait(0.2)
            if jobs:
                self._start_jobs(jobs)
            if self.autoscale is not None:
                self._autoscale(time.monotonic())

    def _start_jobs(self, jobs: list[Job]) -> None:
        for job in jobs:
            if not self.pool.apply(job):
                self.consumer.not_started(job)

    def _on_started(self, job: Job) -> None:
        self.consumer.started([job])

    def _on_result(self, job: Job, result: JobResult) -> None:
        self.consumer.finished(job, result)

    def _renew_loop(self) -> None:
        # A thread of its own: a task running in the dispatch thread (the prefork pool's
        # processes run them there) must not let the leases of the messages lapse.
        while not self._stopping.wait(self.renew_interval):
            self._renew_leases()

    def _renew_leases(self) -> None:
        leased = self.consumer.leased()
        if not leased:
            return
        try:
            self.app.broker.extend(leased)
        except BrokerError as exc:
            logger.warning("Could not renew %d leases: %s", len(leased), exc)

    def _autoscale(self, now: float) -> None:
        if now - self._last_scale < 0.5:
            return
        self._last_scale = now
        assert self.autoscale is not None
        backlog = len(self.consumer.ready)
        idle = self.pool.free_slots()
        if backlog or not idle:
            self._idle_since = now
        delta = self.autoscale.decide(size=self.pool.size(), backlog=backlog,
                                      idle_slots=idle, idle_for=now - self._idle_since)
        if delta > 0:
            logger.info("Autoscale: growing the pool by %d", delta)
            self.pool.grow(delta)
        elif delta < 0:
            logger.info("Autoscale: shrinking the pool by %d", -delta)
            self.pool.shrink(-delta)
            self._idle_since = now
        if delta:
            self.app.broker.set_prefetch(self.window())

    # -- shutdown --------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stopping.set()
        self.app.broker.wake()
        if self._fetcher.is_alive():
            self._fetcher.join(timeout=FETCH_TIMEOUT + 5)
        released = self.consumer.release_unstarted()
        if released:
            logger.info("Gave %d prefetched messages back to the broker", released)
        graceful = not self._cold.is_set()
        unfinished = self._stop_pool(graceful)
        self.consumer.release_jobs(unfinished)
        self.consumer.release_unstarted()  # handed back by a process that ended meanwhile
        self.consumer.acker.close()
        if self._renewer.is_alive():
            self._renewer.join(timeout=5)
        self._announce_stop()

    def _announce_stop(self) -> None:
        logger.info("%s stopped after %d tasks", self.hostname, self.consumer.processed)

    def _stop_pool(self, graceful: bool) -> list[Job]:
        if not graceful:
            return self.pool.stop(graceful=False)
        # Wait for running tasks, but turn cold if a second signal arrives meanwhile.
        while self.pool.running() and not self._cold.is_set():
            self._renew_leases()
            self._cold.wait(min(0.2, self.renew_interval))
        return self.pool.stop(graceful=not self._cold.is_set(), timeout=5)
