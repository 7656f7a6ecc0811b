"""The prefork process's one SIGALRM timer, shared by a job's soft time limit and the
hand-over of the idle wait it kept (real signals, in the test's main thread)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from conveyor.errors import SoftTimeLimitExceeded
from conveyor.worker.alarm import JobAlarm

# pytest-timeout's usual method is a SIGALRM timer of its own: these tests need the one.
pytestmark = pytest.mark.timeout(60, method="thread")


@pytest.fixture
def alarm() -> Iterator[JobAlarm]:
    previous = signal.getsignal(signal.SIGALRM)
    made = JobAlarm()
    made.install()
    yield made
    made.disarm()
    signal.signal(signal.SIGALRM, previous)


def busy_for(seconds: float) -> None:
    """Run Python (not a sleep), as a task would: the handler runs between bytecodes."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def timer_left() -> float:
    return signal.getitimer(signal.ITIMER_REAL)[0]


def test_the_hand_over_comes_at_its_time_and_the_job_runs_on(alarm: JobAlarm) -> None:
    handed: list[float] = []
    began = time.monotonic()
    alarm.arm(None, began + 0.05, lambda: handed.append(time.monotonic()))
    busy_for(0.02)
    assert handed == []
    busy_for(0.1)
    assert len(handed) == 1
    assert handed[0] - began >= 0.05  # never early
    assert timer_left() == 0  # nothing else was due


def test_a_hand_over_already_due_happens_when_the_job_starts(alarm: JobAlarm) -> None:
    handed: list[str] = []
    alarm.arm(None, time.monotonic() - 0.001, lambda: handed.append("now"))
    assert handed == ["now"]
    assert timer_left() == 0


def test_the_soft_limit_raises_in_the_job_after_an_earlier_hand_over(
    alarm: JobAlarm,
) -> None:
    handed: list[float] = []
    began = time.monotonic()
    alarm.arm(0.15, began + 0.03, lambda: handed.append(time.monotonic()))
    with pytest.raises(SoftTimeLimitExceeded):
        busy_for(2.0)
    assert 0.15 <= time.monotonic() - began < 1.0
    assert len(handed) == 1


def test_a_soft_limit_sooner_than_the_hand_over_leaves_the_hand_over_armed(
    alarm: JobAlarm,
) -> None:
    handed: list[str] = []
    began = time.monotonic()
    alarm.arm(0.02, began + 0.5, lambda: handed.append("late"))
    with pytest.raises(SoftTimeLimitExceeded):
        busy_for(2.0)
    assert handed == []
    assert timer_left() > 0  # the task caught its soft limit and runs on
    busy_for(0.6)
    assert handed == ["late"]


def test_disarming_cancels_both_and_a_late_signal_finds_nothing_due(
    alarm: JobAlarm,
) -> None:
    handed: list[str] = []
    alarm.arm(0.02, time.monotonic() + 0.02, lambda: handed.append("x"))
    alarm.disarm()
    assert timer_left() == 0
    signal.raise_signal(signal.SIGALRM)  # one that was on its way as the job ended
    busy_for(0.05)
    assert handed == []


def test_a_job_without_either_deadline_sets_no_timer(alarm: JobAlarm) -> None:
    alarm.arm(None, None, lambda: None)
    assert timer_left() == 0


def test_a_hand_over_that_fails_is_reported_and_the_job_runs_on(
    alarm: JobAlarm, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise OSError("the gate's file is gone")

    alarm.arm(None, time.monotonic() + 0.01, broken)
    busy_for(0.05)  # not interrupted
    assert "Could not hand the idle wait over" in caplog.text
