"""``conveyor demo``: a worker on the SQLite default, 1,000+ tasks, a progress bar, a summary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conveyor import states
from conveyor.result import AsyncResult

console = Console()


WEIGHTS = (("add", 60), ("fetch", 15), ("audit", 10), ("flaky", 10), ("broken", 5))
"""The demo's mix of task kinds, per hundred tasks."""


def _plan(count: int) -> list[tuple[str, int]]:
    """One task of each kind first (so even a tiny run shows them all), then the mix."""
    cycle = [name for name, weight in WEIGHTS for _ in range(weight)]
    kinds = [name for name, _ in WEIGHTS] + [cycle[i % len(cycle)] for i in range(count)]
    return [(kind, index) for index, kind in enumerate(kinds[:count])]


def run_demo(*, count: int, concurrency: int, directory: str) -> int:
    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "demo.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    os.environ["CONVEYOR_BROKER_URL"] = url
    os.environ["CONVEYOR_RESULT_BACKEND"] = url
    log_path = folder / "demo-worker.log"
    console.print(f"[bold]Conveyor demo[/] - SQLite broker and results in [cyan]{db}[/]")
    console.print(f"Worker log: [cyan]{log_path}[/]")

    from conveyor import demo

    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "-A", "conveyor.demo", "worker", "-l", "info",
             "-Q", "demo,demo-audit", "-c", str(concurrency), "-n", "demo@%h"],
            stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
        try:
            return _drive(demo, worker, count)
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
            demo.app.close()


def _send(demo: object, plan: list[tuple[str, int]]) -> dict[str, str]:
    from conveyor import demo as d

    ids: dict[str, str] = {}
    for kind, n in plan:
        result: AsyncResult[Any]
        if kind == "add":
            result = d.add.delay(n, n)
        elif kind == "fetch":
            result = d.fetch.delay(n)
        elif kind == "audit":
            result = d.audit.delay(f"user{n}", "login")
        elif kind == "flaky":
            result = d.flaky.delay(n)
        else:
            result = d.broken.delay(n)
        ids[result.id] = kind
    return ids


def _drive(demo: object, worker: subprocess.Popen[bytes], count: int) -> int:
    from conveyor import demo as d

    plan = _plan(count)
    started = time.perf_counter()
    ids = _send(demo, plan)
    sent_in = time.perf_counter() - started
    console.print(f"Sent {len(ids)} tasks in {sent_in:.2f}s "
                  f"({len(ids) / sent_in:,.0f}/s); waiting for the worker...")
    backend = d.app.backend
    assert backend is not None
    done: dict[str, str] = {}
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    deadline = time.monotonic() + 120
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("Running", total=len(ids))
        while len(done) < len(ids):
            if worker.poll() is not None:
                console.print(f"[red]The worker exited early (code {worker.returncode}); "
                              "see its log.[/]")
                return 1
            if time.monotonic() > deadline:
                console.print("[red]Timed out waiting for the tasks.[/]")
                return 1
            pending = [task_id for task_id in ids if task_id not in done]
            for task_id, meta in backend.get_many(pending).items():
                if meta.get("status") in states.READY_STATES:
                    done[task_id] = str(meta["status"])
            progress.update(bar, completed=len(done))
            if len(done) < len(ids):
                time.sleep(0.1)
    elapsed = time.perf_counter() - started
    _summary(ids, done, elapsed)
    return 0


def _summary(ids: dict[str, str], done: dict[str, str], elapsed: float) -> None:
    by_kind: Counter[tuple[str, str]] = Counter((ids[i], s) for i, s in done.items())
    table = Table(title="Summary")
    table.add_column("task")
    for state in (states.SUCCESS, states.FAILURE, states.REVOKED):
        table.add_column(state, justify="right")
    for kind in ("add", "fetch", "audit", "flaky", "broken"):
        table.add_row(kind, *(str(by_kind[(kind, s)]) for s in
                              (states.SUCCESS, states.FAILURE, states.REVOKED)))
    console.print(table)
    totals = Counter(done.values())
    console.print(", ".join(f"{state}: {totals[state]}" for state in sorted(totals)))
    console.print(f"{len(done)} tasks in {elapsed:.2f}s: [bold]{len(done) / elapsed:,.0f} "
                  "tasks/s[/] (send + run + store, one worker)")
