"""The record a prefork process shares with its supervisor (conveyor.worker.slot)."""

from __future__ import annotations

import multiprocessing
import pickle
import struct
import time
from typing import Any

import pytest

from conveyor.envelope import Delivery, Envelope
from conveyor.worker import slot as slot_module
from conveyor.worker.slot import (
    SLOT_BYTES,
    RunningJob,
    Slot,
    SlotState,
    TornSlot,
    delivery_from_ref,
    delivery_ref,
)

FORK = multiprocessing.get_context("fork")


def new_buffer() -> Any:
    return FORK.RawArray("B", SLOT_BYTES)


def ref(tag: str, count: int = 1, data: Any = None) -> tuple[str, str, str, str, int, Any]:
    return ("celery", tag, "", "celery", count, data)


def sample_state() -> SlotState:
    running = RunningJob("id-1", "proj.add", True, 30.0, ref("tag-1", 2, {"stream": "1-0"}))
    return SlotState(deadline=1234.5, started=1204.5, idle_since=1200.25, processed=7,
                     backlog=2, overflowed=False, running=running,
                     held=[running.delivery, ref("tag-2"), ref("tag-3", 1, b"raw")])


def test_a_fresh_buffer_reads_as_an_idle_process() -> None:
    slot = Slot(new_buffer())
    assert slot.read() == SlotState()
    assert slot.deadline() == 0.0


def test_a_fetch_sent_ahead_is_named_until_the_next_held_list() -> None:
    slot = Slot(new_buffer())
    slot.write(sample_state())
    slot.write_unread("4f1c0a9e2b7d:")
    state = slot.read()
    assert state.unread == "4f1c0a9e2b7d:"
    assert state.held == sample_state().held  # the rest of the record is kept
    slot.write_held([ref("tag-4")], [], backlog=1)  # its reply was read
    assert slot.read().unread == ""
    with pytest.raises(ValueError, match="too long"):
        slot.write_unread("x" * 33)


def test_write_then_read_round_trips_the_state() -> None:
    slot = Slot(new_buffer())
    state = sample_state()
    slot.write(state)
    assert slot.read() == state
    assert slot.deadline() == 1234.5

    finished = SlotState(idle_since=1300.0, processed=8, held=[ref("tag-3", 1, b"raw")])
    slot.write(finished)
    assert slot.read() == finished
    assert slot.deadline() == 0.0


def test_the_supervisor_reads_another_slot_over_the_same_buffer() -> None:
    buffer = new_buffer()
    Slot(buffer).write(sample_state())
    assert Slot(buffer).read() == sample_state()


def test_deadline_reads_the_header_without_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    slot = Slot(new_buffer())
    slot.write(sample_state())

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("deadline() must not unpickle the record")

    monkeypatch.setattr(slot_module.pickle, "loads", refuse)
    assert slot.deadline() == 1234.5
    with pytest.raises(AssertionError, match="must not unpickle"):
        slot.read()  # the patch does stand in the way of a full read


def test_too_many_held_messages_are_dropped_and_the_record_says_so() -> None:
    slot = Slot(new_buffer())
    held = [ref(f"tag-{n}", 1, f"{n:04d}".encode() * 250) for n in range(400)]  # ~400 KB
    assert len(pickle.dumps(held)) > SLOT_BYTES
    running = RunningJob("id-9", "proj.slow", True, None, held[0])
    slot.write(SlotState(deadline=0.0, started=5.0, idle_since=1.0, processed=3,
                         backlog=399, running=running, held=held))
    state = slot.read()
    assert state.overflowed is True
    assert state.held == []
    assert state.running == running  # what the process runs is never dropped
    assert (state.started, state.idle_since, state.processed, state.backlog) == (5.0, 1.0, 3, 399)


def test_a_record_that_fits_is_not_marked_overflowed() -> None:
    slot = Slot(new_buffer())
    held = [ref(f"tag-{n}") for n in range(200)]
    slot.write(SlotState(held=held))
    state = slot.read()
    assert (state.overflowed, state.held) == (False, held)


def test_a_half_written_record_is_torn() -> None:
    buffer = new_buffer()
    slot = Slot(buffer)
    slot.write(sample_state())
    struct.pack_into("<Q", buffer, 0, 7)  # the writer died between its two sequence bumps
    with pytest.raises(TornSlot):
        slot.read(attempts=3)
    with pytest.raises(TornSlot):
        Slot(buffer).read()  # the default number of attempts gives up too
    assert slot.deadline() == 1234.5  # the header's deadline is still readable


def test_a_delivery_survives_its_reference() -> None:
    data = {"stream": "celery", "id": "1700000000000-0"}
    first = Delivery(Envelope(b"{}", "application/json", "utf-8", {"id": "t1"}, {}),
                     "celery", "tag-1", "tasks", "celery.key", False, 1, data)
    again = Delivery(first.envelope, "high", "tag-2", "", "high", True, 3, ("a", 1))
    for delivery in (first, again):
        rebuilt = delivery_from_ref(delivery_ref(delivery))
        assert (rebuilt.queue, rebuilt.tag, rebuilt.exchange, rebuilt.routing_key,
                rebuilt.delivery_count, rebuilt.broker_data) == (
            delivery.queue, delivery.tag, delivery.exchange, delivery.routing_key,
            delivery.delivery_count, delivery.broker_data)
        assert rebuilt.redelivered is (delivery.delivery_count > 1)
    # a reference is plain data: it crosses a pickle (the slot) unchanged
    assert pickle.loads(pickle.dumps(delivery_ref(again))) == delivery_ref(again)


def _write_once(buffer: Any) -> None:
    Slot(buffer).write(sample_state())


def test_a_record_written_by_a_child_process_is_read_by_the_parent() -> None:
    buffer = new_buffer()
    child = FORK.Process(target=_write_once, args=(buffer,))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert Slot(buffer).read() == sample_state()


def _write_many(buffer: Any, seconds: float) -> None:
    slot = Slot(buffer)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        # Every field says n, and the payload's size changes with n.
        running = RunningJob(f"id-{n}", "proj.task", False, float(n), None)
        slot.write(SlotState(deadline=float(n), started=float(n), idle_since=float(n),
                             processed=n, backlog=n, running=running,
                             held=[ref(f"tag-{n}")] * (n % 7)))


def test_reads_racing_a_writer_in_another_process_are_never_mixed() -> None:
    buffer = new_buffer()
    slot = Slot(buffer)
    child = FORK.Process(target=_write_many, args=(buffer, 0.8))
    child.start()
    seen = last = 0
    try:
        while child.is_alive():
            try:
                state = slot.read()
            except TornSlot:  # the writer was descheduled mid-write: read again
                continue
            n = state.processed
            if n == last == 0:
                continue  # nothing written yet
            assert n >= last, state  # a record of zeros after the first write: torn
            last = n
            assert (state.deadline, state.started, state.idle_since, state.backlog) == (
                float(n), float(n), float(n), n)
            assert state.running is not None
            assert state.running.task_id == f"id-{n}"
            assert state.held == [ref(f"tag-{n}")] * (n % 7)
            seen += 1
    finally:
        child.join(10)
    assert child.exitcode == 0
    assert seen > 100
