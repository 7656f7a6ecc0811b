"""The producer side of one system, in a process of its own: ``python -m bench.driver NAME``.

It imports that system's task app (so Celery's, Dramatiq's and Conveyor's global state
never meet in one process), then answers commands from the harness, one JSON object a
line on stdin, with one JSON object a line on stdout. Timing happens here, around the
client calls themselves, so the pipe to the harness is never part of a figure.

Commands (``op``): ``purge`` (queue), ``enqueue`` (n: single calls after one untimed
warm-up; ``late``: of the late-acknowledged no-op), ``bulk`` (calls, size), ``enqueue_io``
(n), ``round_trip`` (n, warmup), ``quit``. Every answer has ``ok``; a failed command
answers ``ok: false`` with the error, and the driver keeps serving.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

ROUND_TRIP_TIMEOUT = 10.0  # seconds for one result: a lost task fails the run, not hangs it


class Driver(Protocol):
    def send_one(self) -> None: ...
    def send_late(self) -> None: ...
    def send_batch(self, size: int, queue: str) -> None: ...
    def send_io(self) -> None: ...
    def round_trip(self) -> Any: ...
    def purge(self, queue: str) -> int: ...


class ConveyorDriver:
    def __init__(self) -> None:
        from bench.systems import conveyor_app

        self.mod = conveyor_app

    def send_one(self) -> None:
        self.mod.noop.delay()

    def send_late(self) -> None:
        self.mod.noop_late.delay()

    def send_batch(self, size: int, queue: str) -> None:
        from conveyor.canvas import group

        group(self.mod.noop.s() for _ in range(size)).apply_async(queue=queue)

    def send_io(self) -> None:
        self.mod.io10.delay()

    def round_trip(self) -> Any:
        return self.mod.add.delay(1, 2).get(timeout=ROUND_TRIP_TIMEOUT)

    def purge(self, queue: str) -> int:
        return self.mod.app.broker.purge(queue)


class CeleryDriver:
    def __init__(self) -> None:
        from bench.systems import celery_app

        self.mod = celery_app

    def send_one(self) -> None:
        self.mod.noop.delay()

    def send_late(self) -> None:
        self.mod.noop_late.delay()

    def send_batch(self, size: int, queue: str) -> None:
        from celery import group

        group(self.mod.noop.s() for _ in range(size)).apply_async(queue=queue)

    def send_io(self) -> None:
        self.mod.io10.delay()

    def round_trip(self) -> Any:
        return self.mod.add.delay(1, 2).get(timeout=ROUND_TRIP_TIMEOUT)

    def purge(self, queue: str) -> int:
        with self.mod.app.connection_for_write() as connection:
            channel = connection.default_channel
            try:
                return int(channel.queue_purge(queue) or 0)
            except Exception as exc:
                # RabbitMQ answers 404 for a queue never declared: nothing to purge.
                if "NOT_FOUND" in str(exc) or "404" in str(exc):
                    return 0
                raise


class DramatiqDriver:
    def __init__(self) -> None:
        from bench.systems import dramatiq_app

        self.mod = dramatiq_app

    def send_one(self) -> None:
        self.mod.noop.send()

    def send_late(self) -> None:
        # Dramatiq acknowledges every message after its actor returns (it has no other
        # mode), so the ordinary no-op is already a late-acknowledged one.
        self.mod.noop.send()

    def send_batch(self, size: int, queue: str) -> None:
        import dramatiq

        # Dramatiq has no batch publish; ``group`` is its way to send many at once (it
        # enqueues them one by one).
        message = self.mod.noop.message()
        dramatiq.group(message.copy(queue_name=queue) for _ in range(size)).run()

    def send_io(self) -> None:
        self.mod.io10.send()

    def round_trip(self) -> Any:
        message = self.mod.add.send(1, 2)
        return message.get_result(block=True, timeout=int(ROUND_TRIP_TIMEOUT * 1000))

    def purge(self, queue: str) -> int:
        self.mod.broker.flush(queue)
        return 0


DRIVERS: dict[str, Callable[[], Driver]] = {
    "conveyor": ConveyorDriver,
    "celery": CeleryDriver,
    "dramatiq": DramatiqDriver,
}


def _timed(count: int, call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return time.perf_counter() - started


def handle(driver: Driver, command: dict[str, Any]) -> dict[str, Any]:
    op = command["op"]
    if op == "purge":
        return {"purged": driver.purge(command["queue"])}
    if op == "enqueue":
        # The warm-up call opens connections and declares the queue; it lands in the
        # queue too, so the worker's target is n + 1.
        send = driver.send_late if command.get("late") else driver.send_one
        send()
        return {"sent": command["n"] + 1, "seconds": _timed(command["n"], send)}
    if op == "bulk":
        size, queue = command["size"], command["queue"]
        driver.send_batch(1, queue)  # warm-up: connections, declarations
        seconds = _timed(command["calls"], lambda: driver.send_batch(size, queue))
        return {"sent": command["calls"] * size, "seconds": seconds}
    if op == "enqueue_io":
        driver.send_io()
        for _ in range(command["n"]):
            driver.send_io()
        return {"sent": command["n"] + 1}
    if op == "round_trip":
        for _ in range(command["warmup"]):
            driver.round_trip()
        latencies: list[float] = []
        for _ in range(command["n"]):
            started = time.perf_counter()
            value = driver.round_trip()
            latencies.append(time.perf_counter() - started)
            if value != 3:
                raise RuntimeError(f"add(1, 2) returned {value!r}")
        return {"latencies": latencies}
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in DRIVERS:
        print(f"usage: python -m bench.driver {{{','.join(DRIVERS)}}}", file=sys.stderr)
        return 2
    # Answers go to the real stdout; anything a library prints goes to stderr instead,
    # so it can never be mistaken for an answer.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def answer(payload: dict[str, Any]) -> None:
        answers.write(json.dumps(payload) + "\n")

    try:
        driver = DRIVERS[argv[0]]()
    except Exception as exc:
        answer({"ok": False, "error": _describe(exc)})
        return 1
    answer({"ok": True, "ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            answer({"ok": True})
            break
        try:
            answer({"ok": True, **handle(driver, command)})
        except Exception as exc:
            traceback.print_exc()
            answer({"ok": False, "error": _describe(exc)})
    return 0


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
