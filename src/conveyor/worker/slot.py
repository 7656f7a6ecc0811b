"""What a prefork process tells its supervisor, through memory they share.

Each process consumes from the broker itself, so the supervisor learns what it holds only
from here: the job it runs (to fail it if the process dies or overruns its hard time
limit) and the messages it fetched and has not settled (to give them back at once). The
process writes after each fetch and at the start and end of each job; the supervisor
reads only when it must (a death, a deadline, an autoscale decision), so the hot path
costs a small pickle and a copy, never a system call or a wake-up.

A sequence counter guards each write (a seqlock): odd while the writer is busy, so a
reader that raced a write simply reads again.
"""

from __future__ import annotations

import ctypes
import pickle
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor.envelope import Delivery, Envelope

if TYPE_CHECKING:
    from conveyor.worker.job import Job

SLOT_BYTES = 64 * 1024  # room for the records of some 350 held messages
RUNNING_BYTES = 8 * 1024
# After the sequence number: deadline, started, idle since, processed, backlog,
# overflowed, running length, held length, started mask, unread fetch.
UNREAD_BYTES = 32
_FIELDS = struct.Struct(f"<dddqqbiiQ{UNREAD_BYTES}s")
MASK_BITS = 64
_HEADER_SIZE = 8 + _FIELDS.size
_HELD_AT = _HEADER_SIZE + RUNNING_BYTES
_LENGTH = struct.Struct("<I")
_VERDICTS_AT = 8 + _LENGTH.size
_DEADLINE = struct.Struct("<d")


class _Sequence:
    """The seqlock's counter: one aligned 64-bit word, stored and loaded whole.

    (``struct.pack_into`` would not do: it zeroes its target before filling it, so a
    reader could see 0, an even number, in the middle of a write.)"""

    def __init__(self, buffer: Any, offset: int) -> None:
        self._word = ctypes.c_uint64.from_buffer(buffer, offset)

    def get(self) -> int:
        return int(self._word.value)

    def set(self, value: int) -> None:
        self._word.value = value
_EMPTY = Envelope(b"", "application/json", "utf-8", {}, {})

DeliveryRef = tuple[str, str, str, str, int, Any]
"""queue, tag, exchange, routing key, delivery count, broker data: enough to settle."""


def delivery_ref(delivery: Delivery) -> DeliveryRef:
    return (delivery.queue, delivery.tag, delivery.exchange, delivery.routing_key,
            delivery.delivery_count, delivery.broker_data)


def delivery_from_ref(ref: DeliveryRef) -> Delivery:
    """A delivery good for ack, reject and extend (they need no body)."""
    queue, tag, exchange, routing_key, count, data = ref
    return Delivery(_EMPTY, queue, tag, exchange, routing_key, count > 1, count, data)


@dataclass(frozen=True, slots=True)
class RunningJob:
    task_id: str
    task_name: str
    acks_late: bool
    time_limit: float | None
    delivery: DeliveryRef | None
    reply_to: str = ""
    correlation_id: str | None = None
    """Where an ``rpc://`` result goes: the supervisor stores the failure of a lost job."""


@dataclass(slots=True)
class SlotState:
    deadline: float = 0.0
    """When the running job's hard time limit ends (``time.monotonic``); 0: none."""
    started: float = 0.0
    """When the running job started; 0 while the process is idle."""
    idle_since: float = 0.0
    processed: int = 0
    backlog: int = 0
    """Fetched messages waiting for the process to be free."""
    overflowed: bool = False
    """Too many held messages to list: the unlisted ones come back when their lease lapses."""
    running: RunningJob | None = None
    held: list[DeliveryRef] = field(default_factory=list)
    """Messages fetched and not settled, in the order they were written."""
    acking: list[DeliveryRef] = field(default_factory=list)
    """Messages whose ack was queued and maybe not sent yet."""
    started_mask: int = 0
    """Bit ``i``: ``held[i]`` has started since (for ``i`` < ``MASK_BITS``)."""
    unread: str = ""
    """The id of a fetch sent ahead whose reply the process had not read: what it took is
    listed nowhere else (``Broker.release_unread`` gives it back)."""

    def settled_by_start(self, index: int) -> bool | None:
        """Whether ``held[index]`` started (so an early ack was due); None: unknown."""
        if index >= MASK_BITS:
            return None
        return bool(self.started_mask >> index & 1)


class TornSlot(Exception):
    """The record stayed half-written: its process died while writing it."""


class Slot:
    """One process's record: the ``index``-th ``SLOT_BYTES`` of a shared buffer (memory
    the supervisor shares with every process, holding the records of them all).

    A header of numbers, then the running job (pickled, ``RUNNING_BYTES`` at most), then
    the held messages (pickled). Each part is written on its own, so starting and ending a
    job rewrites only the small parts: no list of held messages is pickled per task."""

    def __init__(self, buffer: Any, index: int = 0) -> None:
        self.buffer = buffer
        self.index = index
        self._view = memoryview(buffer).cast("B")[index * SLOT_BYTES:(index + 1) * SLOT_BYTES]
        # Go on from the number already there: a reader must never see the same number
        # before and after a write, even across the writer's change of hands.
        self._counter = _Sequence(buffer, index * SLOT_BYTES)
        current = self._counter.get()
        self._sequence = current + current % 2
        # deadline, started, idle since, processed, backlog, overflowed, running, held,
        # mask, unread
        self._fields: list[Any] = [0.0, 0.0, 0.0, 0, 0, False, 0, 0, 0, b""]

    def clear(self) -> None:
        """Supervisor: a fresh record for the process about to take this slot."""
        self.write(SlotState(idle_since=time.monotonic()))

    # -- the process's side ----------------------------------------------------------------
    def write(self, state: SlotState) -> None:
        """Everything at once."""
        self._fields[:5] = [state.deadline, state.started, state.idle_since, state.processed,
                            state.backlog]
        self._fields[8] = state.started_mask
        self._fields[9] = state.unread.encode()
        self._put(_running_bytes(state.running),
                  self._held_bytes(state.held, state.acking, state.overflowed))

    def write_running(self, running: RunningJob, deadline: float, started: float,
                      backlog: int, position: int | None) -> None:
        """A job starts; ``position``: its message's place in the held list written last."""
        self._fields[0:2] = [deadline, started]
        self._fields[4] = backlog
        if position is not None and position < MASK_BITS:
            self._fields[8] |= 1 << position
        self._put(_running_bytes(running), None)

    def write_idle(self, processed: int, idle_since: float, backlog: int) -> None:
        """The job ended: only numbers change (a running part of length 0: none)."""
        self._fields[0:5] = [0.0, 0.0, idle_since, processed, backlog]
        self._fields[6] = 0
        self._put(None, None)

    def write_held(self, held: list[DeliveryRef], acking: list[DeliveryRef],
                   backlog: int, started: int = 0) -> None:
        """Messages were fetched: a new held list; ``started``: the mask of those that
        already started (a late-ack job running). The reply of any fetch sent ahead has
        been read by then: no fetch is unread."""
        self._fields[4] = backlog
        self._fields[8] = started
        self._fields[9] = b""
        self._put(None, self._held_bytes(held, acking, False))

    def write_unread(self, fetch_id: str) -> None:
        """A fetch is about to be sent ahead: until the next held list, what it takes is
        known by this id alone."""
        encoded = fetch_id.encode()
        if len(encoded) > UNREAD_BYTES:
            raise ValueError(f"fetch id {fetch_id!r} is too long to record")
        self._fields[9] = encoded
        self._put(None, None)

    def _held_bytes(self, held: list[DeliveryRef], acking: list[DeliveryRef],
                    overflowed: bool) -> bytes:
        payload = pickle.dumps((held, acking), protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > len(self._view) - _HELD_AT:
            payload = pickle.dumps(([], []), protocol=pickle.HIGHEST_PROTOCOL)
            overflowed = True
        self._fields[5] = overflowed
        return payload

    def _put(self, running: bytes | None, held: bytes | None) -> None:
        view, fields = self._view, self._fields
        self._sequence += 1
        self._counter.set(self._sequence)
        if running is not None:
            view[_HEADER_SIZE:_HEADER_SIZE + len(running)] = running
            fields[6] = len(running)
        if held is not None:
            view[_HELD_AT:_HELD_AT + len(held)] = held
            fields[7] = len(held)
        view[8:_HEADER_SIZE] = _FIELDS.pack(*fields)
        self._sequence += 1
        self._counter.set(self._sequence)

    # -- the supervisor's side ---------------------------------------------------------------
    def deadline(self) -> float:
        """The hard deadline alone, without unpickling (read on every supervisor turn)."""
        return float(_DEADLINE.unpack_from(self._view, 8)[0])

    def read(self, attempts: int = 1000) -> SlotState:
        view = self._view
        for _ in range(attempts):
            (sequence, deadline, started, idle_since, processed, backlog, overflowed,
             running_length, held_length, mask, unread) = (self._counter.get(),
                                                           *_FIELDS.unpack_from(view, 8))
            if sequence % 2:
                time.sleep(0)
                continue
            running = bytes(view[_HEADER_SIZE:_HEADER_SIZE + running_length])
            held = bytes(view[_HELD_AT:_HELD_AT + held_length])
            if self._counter.get() != sequence:
                continue
            held_lists = pickle.loads(held) if held else ([], [])
            return SlotState(
                deadline, started, idle_since, processed, backlog, bool(overflowed),
                RunningJob(*pickle.loads(running)) if running else None,
                held_lists[0], held_lists[1], mask, unread.rstrip(b"\0").decode())
        raise TornSlot("the process's record was being written when it was read")


def _running_bytes(running: RunningJob | None) -> bytes:
    if running is None:
        return b""
    fields = (running.task_id, running.task_name, running.acks_late, running.time_limit,
              running.delivery, running.reply_to, running.correlation_id)
    payload = pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > RUNNING_BYTES:  # absurdly long names: keep what settles the message
        payload = pickle.dumps((running.task_id[:255], running.task_name[:255],
                                running.acks_late, running.time_limit, running.delivery,
                                "", None), protocol=pickle.HIGHEST_PROTOCOL)
    return payload


def lost_sibling_job(buffer: Any, count: int, mine: int, task_id: str) -> SlotState | None:
    """The record of another process that was running ``task_id`` unacknowledged.

    A late-ack message comes back from an AMQP broker the moment the connection of the
    process running it closes, before the supervisor has reaped that process: the other
    processes' records say whose it was."""
    for index in range(count):
        if index == mine:
            continue
        try:
            state = Slot(buffer, index).read(attempts=10)
        except TornSlot:
            continue
        running = state.running
        if running is not None and running.task_id == task_id and running.delivery:
            return state
    return None


def running_job(job: Job, delivery: Delivery | None, now: float) -> tuple[RunningJob, float]:
    """The record of a job that starts now, and its hard deadline (0: none)."""
    ref = delivery_ref(delivery) if delivery is not None else None
    props = job.envelope.properties
    record = RunningJob(job.task_id, job.task_name, job.acks_late, job.time_limit, ref,
                        str(props.get("reply_to") or ""), props.get("correlation_id"))
    return record, (now + job.time_limit if job.time_limit else 0.0)


Verdict = tuple[bool, int]
"""Whether to acknowledge without running (the failure is stored), and how many times
the message was lost with its process so far."""


class Verdicts:
    """The supervisor's word on late-ack messages whose process died running them.

    Where the broker alone can settle a delivery (AMQP), it redelivers such a message by
    itself, to any process. Without a word from the supervisor, that process would run a
    task that was already failed as lost or timed out (and that Celery would have
    acknowledged), and a message that kills every process would loop forever: each
    process counts the deliveries it saw, and a dead one forgets. Processes look here
    only for redelivered messages, so the common path never reads it.
    """

    KEEP = 1024

    def __init__(self, buffer: Any) -> None:
        self._view = memoryview(buffer).cast("B")
        self._counter = _Sequence(buffer, 0)
        self._sequence = 0
        self._entries: dict[str, Verdict] = {}
        self._cached: tuple[int, dict[str, Verdict]] = (-1, {})

    def give(self, task_id: str, acknowledge: bool) -> None:
        """Supervisor: record the verdict on a lost message (the latest ``KEEP`` stay)."""
        _, lost = self._entries.pop(task_id, (False, 0))
        self._entries[task_id] = (acknowledge, lost + 1)
        while len(self._entries) > self.KEEP:
            del self._entries[next(iter(self._entries))]
        payload = pickle.dumps(self._entries, protocol=pickle.HIGHEST_PROTOCOL)
        while len(payload) > len(self._view) - _VERDICTS_AT and self._entries:
            del self._entries[next(iter(self._entries))]
            payload = pickle.dumps(self._entries, protocol=pickle.HIGHEST_PROTOCOL)
        view = self._view
        self._sequence += 1
        self._counter.set(self._sequence)
        view[_VERDICTS_AT:_VERDICTS_AT + len(payload)] = payload
        view[8:_VERDICTS_AT] = _LENGTH.pack(len(payload))
        self._sequence += 1
        self._counter.set(self._sequence)

    def get(self, task_id: str) -> Verdict | None:
        """Process: the verdict on a task's message, if the supervisor gave one."""
        view = self._view
        for _ in range(1000):
            sequence, length = self._counter.get(), _LENGTH.unpack_from(view, 8)[0]
            if sequence == self._cached[0]:
                return self._cached[1].get(task_id)
            if sequence % 2:
                time.sleep(0)
                continue
            payload = bytes(view[_VERDICTS_AT:_VERDICTS_AT + length])
            if self._counter.get() != sequence:
                continue
            entries: dict[str, Verdict] = pickle.loads(payload) if length else {}
            self._cached = (sequence, entries)
            return entries.get(task_id)
        return None  # the supervisor is mid-write for this long only if it died: no word
