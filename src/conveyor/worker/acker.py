"""Acknowledgements sent in batches, off the dispatch and result paths.

Dispatching a job and reading a finished one must not wait for a broker round trip, and
one round trip can settle many messages. Acks queue here and a thread sends whatever has
gathered while the previous batch was on the wire or while it slept the broker's
``ack_linger`` after the first (asleep, not waiting on the queue, so queuing an ack wakes
no thread). An ack that is late by a few milliseconds changes nothing a user can
see; one that never arrives (the worker died) lets the lease lapse and the message is
delivered again: at-least-once holds. Where acking never waits (AMQP's I/O thread sends
them), acks skip this thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from conveyor.errors import BrokerError, BrokerUnavailable
from conveyor.outages import call_with_retry

if TYPE_CHECKING:
    from conveyor.brokers.base import Broker
    from conveyor.envelope import Delivery

logger = logging.getLogger("conveyor.worker")

BATCH_LIMIT = 512
ACK_RETRIES = 6


class Acker:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._pending: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._unsent: dict[str, Delivery] = {}
        self._unsent_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="conveyor-acker", daemon=True)
        self._thread.start()

    def ack(self, deliveries: list[Delivery]) -> None:
        if not self.broker.acks_wait:
            try:
                self.broker.ack_many(deliveries)
            except BrokerError as exc:
                logger.warning("Could not ack %d messages: %s", len(deliveries), exc)
            return
        with self._unsent_lock:
            for delivery in deliveries:
                self._unsent[delivery.tag] = delivery
        for delivery in deliveries:
            self._pending.put(delivery)

    def unsent(self) -> list[Delivery]:
        """Acks queued or on the wire: they die with this process if it dies now."""
        with self._unsent_lock:
            return list(self._unsent.values())

    def _run(self) -> None:
        linger = self.broker.ack_linger
        while True:
            first = self._pending.get()
            batch = [] if first is None else [first]
            stopping = first is None
            if not stopping and linger > 0:
                # Asleep rather than waiting on the queue: an ack queued meanwhile then
                # wakes nobody, and the task that queued it keeps the GIL.
                time.sleep(linger)
            while len(batch) < BATCH_LIMIT:
                try:
                    item = self._pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                self._send(batch)
                with self._unsent_lock:
                    for delivery in batch:
                        self._unsent.pop(delivery.tag, None)
            if stopping and self._pending.empty():
                return

    def _send(self, batch: list[Delivery]) -> None:
        try:
            # A short outage should not make finished tasks run again.
            call_with_retry(lambda: self.broker.ack_many(batch),
                            retry_on=(BrokerUnavailable,), max_retries=ACK_RETRIES,
                            first_delay=0.1, max_delay=2.0,
                            what=f"Acking {len(batch)} messages", logger=logger)
        except BrokerError as exc:
            # The leases will lapse and the messages come back: at-least-once holds.
            logger.warning("Could not ack %d messages: %s", len(batch), exc)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, then stop."""
        self._pending.put(None)
        self._thread.join(timeout)
