"""Turning a call into a published message: route, declare once, encode, publish."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from conveyor import protocol
from conveyor.envelope import Envelope
from conveyor.errors import BrokerUnavailable
from conveyor.outages import call_with_retry
from conveyor.protocol import Embed, TaskHeaders, TaskMessage
from conveyor.request import current_request
from conveyor.router import Target
from conveyor.task import as_datetime

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.brokers.base import Broker

logger = logging.getLogger("conveyor.producer")


class Producer:
    """Publishes task messages for one app; declares each queue once per broker."""

    def __init__(self, app: Conveyor) -> None:
        self.app = app
        self._declared: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def declare(self, broker: Broker, target: Target) -> None:
        key = (id(broker), f"{target.exchange}\x00{target.queue.name if target.queue else ''}")
        if key in self._declared:
            return
        with self._lock:
            if key in self._declared:
                return
            if target.declare_exchange is not None:
                broker.declare_exchange(target.declare_exchange)
            for queue in target.bound_queues:
                broker.declare_queue(queue)
            if target.queue is not None:
                broker.declare_queue(target.queue)
            self._declared.add(key)

    def build(
        self,
        name: str,
        args: Any,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> TaskMessage:
        conf = self.app.conf
        task_id = options.get("task_id") or protocol.new_id()
        eta = as_datetime(options.get("eta"), relative=False)
        countdown = options.get("countdown")
        if eta is None and countdown is not None:
            eta = as_datetime(float(countdown), relative=True)
        parent = current_request()
        in_task = parent.id is not None and not parent.called_directly
        extra = dict(options.get("headers") or {})
        if options.get("acks_late") is not None:
            # Not a Celery header: Celery workers ignore it, ours ack late for this call.
            extra["acks_late"] = bool(options["acks_late"])
        headers = TaskHeaders(
            id=task_id,
            task=name,
            eta=eta,
            expires=as_datetime(options.get("expires"), relative=True),
            retries=int(options.get("retries") or 0),
            group=options.get("group_id"),
            group_index=options.get("group_index"),
            root_id=options.get("root_id") or (parent.root_id if in_task else None) or task_id,
            parent_id=options.get("parent_id") or (parent.id if in_task else None),
            shadow=options.get("shadow"),
            time_limit=options.get("time_limit", conf.task_time_limit),
            soft_time_limit=options.get("soft_time_limit", conf.task_soft_time_limit),
            origin=options.get("origin"),
            ignore_result=options.get("ignore_result"),
            extra=extra,
        )
        chord = options.get("chord")
        embed = Embed(
            callbacks=_signatures(options.get("link")),
            errbacks=_signatures(options.get("link_error")),
            chain=_signatures(options.get("chain")),
            chord=dict(chord) if chord is not None else None,
        )
        delivery_mode = options.get("delivery_mode", conf.task_default_delivery_mode)
        return TaskMessage(
            headers=headers,
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            embed=embed,
            reply_to=options.get("reply_to") or self._reply_to(),
            correlation_id=task_id,
            priority=options.get("priority", conf.task_default_priority),
            delivery_mode=1 if delivery_mode in (1, "transient") else 2,
        )

    def _reply_to(self) -> str:
        # The rpc:// backend gets results on a queue of this process, named on every send.
        if not str(self.app.conf.result_backend or "").startswith("rpc://"):
            return ""
        return str(getattr(self.app.backend, "reply_to", "") or "")

    def encode(self, message: TaskMessage, options: Mapping[str, Any]) -> Envelope:
        conf = self.app.conf
        return protocol.encode_task(
            message,
            serializer=options.get("serializer") or conf.task_serializer,
            compression=options.get("compression") or conf.task_compression,
        )

    def publish(self, message: TaskMessage, target: Target, options: Mapping[str, Any]) -> None:
        envelope = self.encode(message, options)
        broker = self.app.broker
        self.declare(broker, target)
        delay = None
        if message.headers.eta is not None:
            delay = (message.headers.eta - datetime.now(UTC)).total_seconds()
            delay = delay if delay > 0 else None

        def send() -> None:
            broker.publish(envelope, exchange=target.exchange,
                           routing_key=target.routing_key, delay=delay)

        self._with_retry(send, f"Publishing {message.task}[{message.id}]")

    def publish_many(self, batch: Sequence[tuple[TaskMessage, Target, Mapping[str, Any]]]
                     ) -> None:
        """Publish calls without an eta in one broker operation (a pipeline, a
        transaction): the bulk path of groups. Encoding fails before anything is sent."""
        broker = self.app.broker
        items = []
        for message, target, options in batch:
            items.append((self.encode(message, options), target.exchange, target.routing_key))
            self.declare(broker, target)
        self._with_retry(lambda: broker.publish_many(items),
                         f"Publishing {len(items)} messages")

    def _with_retry(self, send: Callable[[], None], what: str) -> None:
        conf = self.app.conf
        if not conf.task_publish_retry:
            send()
            return
        policy = conf.task_publish_retry_policy
        call_with_retry(
            send, retry_on=(BrokerUnavailable,),
            max_retries=int(policy.get("max_retries", 3)),
            first_delay=float(policy.get("interval_start", 0.0)) or float(
                policy.get("interval_step", 0.2)),
            max_delay=float(policy.get("interval_max", 0.2)),
            what=what, logger=logger)


def _signatures(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    return [dict(item) for item in items]
