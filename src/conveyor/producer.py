"""Turning a call into a published message: route, declare once, encode, publish."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from conveyor import protocol
from conveyor.config import Settings
from conveyor.envelope import Envelope
from conveyor.errors import BrokerUnavailable
from conveyor.outages import call_with_retry
from conveyor.protocol import CallTemplate, Embed, TaskHeaders, TaskMessage
from conveyor.request import current_request
from conveyor.router import Target
from conveyor.serialization import registry
from conveyor.task import as_datetime

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.brokers.base import Broker

logger = logging.getLogger("conveyor.producer")

PER_CALL_OPTIONS = frozenset({"task_id", "group_id", "group_index", "root_id", "parent_id"})
"""Options that differ from one call to the next without changing how a call is sent."""

_GENERAL_OPTIONS = ("eta", "countdown", "expires", "link", "link_error", "chain", "chord",
                    "acks_late", "headers")
"""Options that take the general path (``build``, ``encode``) when set."""

_PLAN_LIMIT = 1024


@dataclass(slots=True)
class Plan:
    """How calls of one task with the same options (but for ``PER_CALL_OPTIONS``) are
    sent: decided once, from the settings of the moment (see ``Producer.plan``)."""

    template: CallTemplate
    target: Target | None
    """None when ``task_routes`` has a callable router: it may route each call apart."""
    priority: int | None
    delivery_mode: int
    reply_to: str | None
    """None: the rpc:// backend's queue, asked on every send."""
    declared_on: Broker | None = None


@dataclass(frozen=True, slots=True)
class _Settled:
    """What the producer reads from settings on every send, read once per settings."""

    settings: Settings
    codecs: int  # serialization.registry.generation() when read
    routes_by_name: bool
    rpc_replies: bool
    retry_policy: tuple[int, float, float] | None
    """max_retries, first delay, max delay; None if the policy can't be read (each
    publish that retries then reads it again, and raises)."""


def _routes_by_name(task_routes: Any) -> bool:
    """Whether ``task_routes`` routes by task name alone (tables, no callables)."""
    if task_routes is None or isinstance(task_routes, Mapping):
        return True
    if isinstance(task_routes, (list, tuple)):
        return all(isinstance(item, Mapping) for item in task_routes)
    return False


def _retry_policy(settings: Settings) -> tuple[int, float, float]:
    policy = settings.task_publish_retry_policy
    return (
        int(policy.get("max_retries", 3)),
        float(policy.get("interval_start", 0.0)) or float(policy.get("interval_step", 0.2)),
        float(policy.get("interval_max", 0.2)),
    )


def _settle(settings: Settings) -> _Settled:
    try:
        retry_policy: tuple[int, float, float] | None = _retry_policy(settings)
    except Exception:  # raised again by the publish that reads it
        retry_policy = None
    return _Settled(
        settings=settings,
        codecs=registry.generation(),
        routes_by_name=_routes_by_name(settings.task_routes),
        rpc_replies=str(settings.result_backend or "").startswith("rpc://"),
        retry_policy=retry_policy,
    )


def _lineage() -> tuple[str | None, str | None]:
    """The root and parent ids a call made now inherits: those of the task running in
    this context, if any (a task called directly, as a function, is not a parent)."""
    parent = current_request()
    if parent.id is not None and not parent.called_directly:
        return parent.root_id, parent.id
    return None, None


class Producer:
    """Publishes task messages for one app; declares each queue once per broker.

    Most calls take the lean path: :meth:`plan` decides once per task and options how
    such calls are routed and written (a :class:`~conveyor.protocol.CallTemplate`), and
    each call then only adds what is its own (id, arguments, group). Calls with an eta,
    expiry, canvas options, extra headers, another serializer or compression take the
    general path (:meth:`build`, :meth:`encode`); both write the same bytes.
    """

    def __init__(self, app: Conveyor) -> None:
        self.app = app
        self._declared: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self._plans: dict[tuple[Any, ...], Plan | None] = {}
        self._settled: _Settled | None = None

    # -- the lean path ----------------------------------------------------------------
    def _current(self) -> _Settled:
        settled = self._settled
        conf = self.app.conf
        if settled is None or settled.settings is not conf or (
                settled.codecs != registry.generation()):
            settled = self._settled = _settle(conf)
            self._plans = {}
        return settled

    def plan(self, name: str, options: Mapping[str, Any]) -> Plan | None:
        """How calls of ``name`` with ``options`` are sent, or None for the general path.

        Cached by task name and options (but for ``PER_CALL_OPTIONS``) until settings or
        codecs change. Raises what routing the call raises.
        """
        self._current()
        plans = self._plans
        # With the types: 1, 1.0 and True are equal keys, but not the same JSON.
        key = (name, *[(option, value.__class__, value) for option, value in options.items()
                       if option not in PER_CALL_OPTIONS])
        try:
            return plans[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable option value: decide for this call alone
            return self._new_plan(name, options)
        plan = self._new_plan(name, options)
        if len(plans) >= _PLAN_LIMIT:
            plans.clear()
        plans[key] = plan
        return plan

    def _new_plan(self, name: str, options: Mapping[str, Any]) -> Plan | None:
        conf = self.app.conf
        for option in _GENERAL_OPTIONS:
            if options.get(option) is not None:
                return None
        serializer = options.get("serializer") or conf.task_serializer
        if not registry.is_builtin_json(serializer):
            return None
        if options.get("compression") or conf.task_compression:
            return None
        # In build()'s order, so a bad value raises what the general path raises.
        template = CallTemplate(
            name,
            retries=int(options.get("retries") or 0),
            shadow=options.get("shadow"),
            time_limit=options.get("time_limit", conf.task_time_limit),
            soft_time_limit=options.get("soft_time_limit", conf.task_soft_time_limit),
            origin=options.get("origin"),
            ignore_result=options.get("ignore_result"),
        )
        delivery_mode = options.get("delivery_mode", conf.task_default_delivery_mode)
        target = None
        priority = options.get("priority", conf.task_default_priority)
        if self._current().routes_by_name:
            target = self.app.router.resolve(name, (), {}, options)
            if target.priority is not None and options.get("priority") is None:
                priority = target.priority
        return Plan(
            template=template,
            target=target,
            priority=priority,
            delivery_mode=1 if delivery_mode in (1, "transient") else 2,
            reply_to=options.get("reply_to") or (None if self._current().rpc_replies else ""),
        )

    def plain(
        self,
        plan: Plan,
        name: str,
        args: Any,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> tuple[Envelope, Target]:
        """The envelope of one call on the lean path, and where it goes."""
        target = plan.target
        priority = plan.priority
        if target is None:
            target = self.app.router.resolve(name, args, kwargs, options)
            if target.priority is not None and options.get("priority") is None:
                priority = target.priority
        task_id = options.get("task_id") or protocol.new_id()
        inherited_root, inherited_parent = _lineage()
        envelope = plan.template.encode(
            task_id,
            args,
            kwargs,
            options.get("group_id"),
            options.get("group_index"),
            options.get("root_id") or inherited_root or task_id,
            options.get("parent_id") or inherited_parent,
            self._reply_to() if plan.reply_to is None else plan.reply_to,
            priority,
            plan.delivery_mode,
        )
        return envelope, target

    def plain_members(
        self, plan: Plan, calls: Sequence[Mapping[str, Any]], group_id: str
    ) -> list[Envelope]:
        """The envelopes of ``calls`` of one task (signatures: their ``args`` and
        ``kwargs`` are read), as members 0, 1... of group ``group_id``, each with a new
        task id and no other option of its own: what :meth:`plain` gives each of them,
        with what they share worked out once."""
        encode = plan.template.encode
        inherited_root, parent_id = _lineage()
        reply_to = self._reply_to() if plan.reply_to is None else plan.reply_to
        priority, delivery_mode = plan.priority, plan.delivery_mode
        new_id = protocol.new_id
        envelopes: list[Envelope] = []
        for index, call in enumerate(calls):
            task_id = new_id()
            envelopes.append(encode(task_id, call["args"], call["kwargs"], group_id, index,
                                    inherited_root or task_id, parent_id, reply_to, priority,
                                    delivery_mode))
        return envelopes

    def send_plain(
        self,
        plan: Plan,
        name: str,
        args: Any,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> str:
        """Publish one call on the lean path; returns its task id."""
        envelope, target = self.plain(plan, name, args, kwargs, options)
        broker = self.app.broker
        if plan.declared_on is not broker:
            self.declare(broker, target)
            if plan.target is not None:
                plan.declared_on = broker
        task_id: str = envelope.headers["id"]

        def send() -> None:
            broker.publish(envelope, exchange=target.exchange, routing_key=target.routing_key)

        self._with_retry(send, f"Publishing {name}[{task_id}]")
        return task_id

    def publish_envelopes(
        self, items: Sequence[tuple[Envelope, str, str]], targets: Sequence[Target]
    ) -> None:
        """Publish encoded calls without an eta, ``(envelope, exchange, routing key)``, in
        one broker operation (the bulk path of groups), once ``targets`` (where they go)
        are declared."""
        broker = self.app.broker
        for target in targets:
            self.declare(broker, target)
        self._with_retry(lambda: broker.publish_many(items),
                         f"Publishing {len(items)} messages")

    # -- the general path -------------------------------------------------------------

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
        inherited_root, inherited_parent = _lineage()
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
            root_id=options.get("root_id") or inherited_root or task_id,
            parent_id=options.get("parent_id") or inherited_parent,
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
        if not self._current().rpc_replies:
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

    def _with_retry(self, send: Callable[[], None], what: str) -> None:
        settled = self._current()
        if not settled.settings.task_publish_retry:
            send()
            return
        max_retries, first_delay, max_delay = settled.retry_policy or _retry_policy(
            settled.settings)
        call_with_retry(
            send, retry_on=(BrokerUnavailable,),
            max_retries=max_retries,
            first_delay=first_delay,
            max_delay=max_delay,
            what=what, logger=logger)


def _signatures(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    return [dict(item) for item in items]
