"""The ``conveyor`` command.

Exit codes: 0 ok, 1 the task or command failed, 2 usage error, 3 the app does not
import, 4 bad configuration (unknown broker scheme, unknown setting), 5 the broker or
backend cannot be reached, 6 timed out waiting.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from conveyor import states
from conveyor.app import Conveyor
from conveyor.cli_app import AppNotFound, load_app
from conveyor.cli_results import results
from conveyor.errors import (
    BackendUnavailable,
    BrokerUnavailable,
    ConfigurationError,
    TimeoutError,
)
from conveyor.logs import setup_logging

EXIT_FAILED = 1
EXIT_APP = 3
EXIT_CONFIG = 4
EXIT_UNREACHABLE = 5
EXIT_TIMEOUT = 6

F = TypeVar("F", bound=Callable[..., Any])

console = Console(stderr=True)
out = Console()


def fail(message: str, code: int) -> NoReturn:
    console.print(f"[bold red]Error:[/] {message}", highlight=False)
    sys.exit(code)


class State:
    def __init__(self, app_spec: str | None, broker: str | None) -> None:
        self.app_spec = app_spec
        self.broker = broker
        self._app: Conveyor | None = None

    @property
    def app(self) -> Conveyor:
        if self._app is None:
            try:
                app = load_app(self.app_spec) if self.app_spec else Conveyor()
                if self.broker:
                    app.configure(broker_url=self.broker)
            except AppNotFound as exc:
                fail(str(exc), EXIT_APP)
            except ConfigurationError as exc:
                fail(str(exc), EXIT_CONFIG)
            self._app = app
        return self._app

    def close(self) -> None:
        """Close what the command opened (pooled database sessions, broker connections),
        rather than leaving it to the interpreter's exit."""
        if self._app is not None:
            self._app.close()

    def connected(self) -> Conveyor:
        """The app, with its broker reachable (or a clear exit)."""
        app = self.app
        try:
            app.broker.check()
        except ConfigurationError as exc:
            fail(str(exc), EXIT_CONFIG)
        except BrokerUnavailable as exc:
            fail(f"cannot reach the broker: {exc}", EXIT_UNREACHABLE)
        return app


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-A", "--app", "app_spec", metavar="MODULE[:APP]",
              help="The application: a module, or module:attribute.")
@click.option("-b", "--broker", help="Broker URL, overriding the app's broker_url.")
@click.version_option(package_name="conveyor")
@click.pass_context
def main(ctx: click.Context, app_spec: str | None, broker: str | None) -> None:
    """Conveyor: a distributed task queue that speaks Celery's protocol."""
    ctx.obj = State(app_spec, broker)
    ctx.call_on_close(ctx.obj.close)


@main.command()
@click.option("-l", "--loglevel", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error", "critical"],
                                case_sensitive=False))
@click.option("-Q", "--queues", help="Comma-separated queues to consume.")
@click.option("-c", "--concurrency", type=int, help="Pool size (default: number of CPUs).")
@click.option("-n", "--hostname", help="Node name, e.g. worker1@%h.")
@click.option("-P", "--pool", type=click.Choice(["prefork", "threads", "asyncio", "solo"]),
              help="Execution pool (default: prefork).")
@click.option("--autoscale", metavar="MAX,MIN", help="Grow and shrink the pool with load.")
@click.option("--prefetch-multiplier", type=int,
              help="Messages fetched ahead per slot (worker_prefetch_multiplier).")
@click.option("--max-tasks-per-child", type=int, help="Replace a process after N tasks.")
@click.option("--max-memory-per-child", type=int, help="Replace a process above N KiB RSS.")
@click.pass_obj
def worker(state: State, loglevel: str, queues: str | None, concurrency: int | None,
           hostname: str | None, pool: str | None, autoscale: str | None,
           prefetch_multiplier: int | None, max_tasks_per_child: int | None,
           max_memory_per_child: int | None) -> None:
    """Start a worker."""
    from conveyor.worker.autoscale import parse_autoscale
    from conveyor.worker.supervisor import Supervisor
    from conveyor.worker.worker import Worker

    setup_logging(loglevel)
    app = state.connected()
    if state.app_spec is None and (pool or app.conf.worker_pool) == "prefork":
        fail("the prefork pool needs the app's import path: conveyor -A module worker",
             EXIT_APP)
    try:
        policy = parse_autoscale(autoscale) if autoscale else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--autoscale") from None
    consumed = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    instance: Worker | Supervisor
    try:
        if (pool or app.conf.worker_pool) == "prefork":
            instance = Supervisor(
                app, app_spec=state.app_spec, queues=consumed, concurrency=concurrency,
                hostname=hostname, autoscale=policy, prefetch_multiplier=prefetch_multiplier,
                max_tasks_per_child=max_tasks_per_child,
                max_memory_per_child=max_memory_per_child, broker_url=state.broker)
        else:
            instance = Worker(
                app, queues=consumed, concurrency=concurrency, pool=pool, hostname=hostname,
                autoscale=policy, prefetch_multiplier=prefetch_multiplier)
    except ConfigurationError as exc:
        fail(str(exc), EXIT_CONFIG)
    instance.run()


def _json_option(value: str | None, what: str, kind: type) -> Any:
    if value is None:
        return kind()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=what) from None
    if not isinstance(parsed, kind):
        raise click.BadParameter(f"must be a JSON {kind.__name__}", param_hint=what)
    return parsed


@main.command()
@click.argument("name")
@click.option("-a", "--args", "args_json", help="Positional arguments as a JSON array.")
@click.option("-k", "--kwargs", "kwargs_json", help="Keyword arguments as a JSON object.")
@click.option("-Q", "--queue", help="Queue to send to.")
@click.option("--exchange", help="Exchange to publish through.")
@click.option("--routing-key", help="Routing key.")
@click.option("--countdown", type=float, help="Seconds to wait before running.")
@click.option("--eta", help="ISO-8601 time to run at.")
@click.option("--expires", type=float, help="Seconds after which the task is discarded.")
@click.option("--priority", type=int, help="Priority 0-9.")
@click.option("--serializer", help="json (default), msgpack, yaml or pickle.")
@click.pass_obj
def call(state: State, name: str, args_json: str | None, kwargs_json: str | None,
         queue: str | None, exchange: str | None, routing_key: str | None,
         countdown: float | None, eta: str | None, expires: float | None,
         priority: int | None, serializer: str | None) -> None:
    """Send a task by name and print its id."""
    args = _json_option(args_json, "--args", list)
    kwargs = _json_option(kwargs_json, "--kwargs", dict)
    app = state.connected()
    options = {key: value for key, value in {
        "queue": queue, "exchange": exchange, "routing_key": routing_key,
        "countdown": countdown, "eta": eta, "expires": expires, "priority": priority,
        "serializer": serializer}.items() if value is not None}
    try:
        result = app.send_task(name, args, kwargs, **options)
    except ConfigurationError as exc:
        fail(str(exc), EXIT_CONFIG)
    out.print(result.id, highlight=False)


@main.command()
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="Wait until the task is ready.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait at most.")
@click.option("--traceback", "show_traceback", is_flag=True, help="Show the traceback.")
@click.pass_obj
def result(state: State, task_id: str, wait: bool, timeout: float | None,
           show_traceback: bool) -> None:
    """Show a task's state and result."""
    app = state.app
    backend = app.backend
    if backend is None:
        fail("the app has no result backend configured", EXIT_CONFIG)
    try:
        meta = backend.wait(task_id, timeout) if wait else backend.get(task_id)
    except TimeoutError:
        fail(f"task {task_id} not ready after {timeout}s", EXIT_TIMEOUT)
    except BackendUnavailable as exc:
        fail(f"cannot reach the result backend: {exc}", EXIT_UNREACHABLE)
    status = str(meta["status"]) if meta else states.PENDING
    value = meta.get("result") if meta else None
    out.print(f"{status}: {json.dumps(value, default=repr)}", highlight=False)
    if show_traceback and meta and meta.get("traceback"):
        out.print(str(meta["traceback"]), highlight=False)
    if status in (states.FAILURE, states.REVOKED):
        sys.exit(EXIT_FAILED)


@main.command()
@click.option("-Q", "--queues", help="Comma-separated queues (default: the app's queues).")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def purge(state: State, queues: str | None, force: bool) -> None:
    """Delete every waiting message from queues."""
    app = state.connected()
    names = [q.strip() for q in queues.split(",")] if queues else [
        q.name for q in app.router.consumed_queues(None)]
    if not force and not click.confirm(
            f"Delete all waiting messages in {', '.join(names)}?", err=True):
        sys.exit(EXIT_FAILED)
    total = sum(app.broker.purge(name) for name in names)
    out.print(f"Purged {total} messages from {len(names)} queue(s).", highlight=False)


@main.command()
@click.option("-Q", "--queues", help="Comma-separated queues (default: all known).")
@click.pass_obj
def status(state: State, queues: str | None) -> None:
    """Queues and their depths."""
    app = state.connected()
    names = [q.strip() for q in queues.split(",")] if queues else None
    if names is None and not app.broker.lists_queues:
        names = [q.name for q in app.router.consumed_queues(None)]
    table = Table(title=f"Queues on {app.broker.scheme}")
    for column in ("queue", "ready", "delayed", "leased", "dead-lettered"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for row in app.broker.stats(names):
        table.add_row(row.name, str(row.ready), str(row.delayed), str(row.leased),
                      str(row.dead))
    out.print(table)


@main.command()
@click.option("-n", "--tasks", "count", type=int, default=1100, show_default=True,
              help="How many tasks to send.")
@click.option("-c", "--concurrency", type=int, default=2, show_default=True)
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".conveyor",
              show_default=True, help="Where the SQLite database and worker log go.")
def demo(count: int, concurrency: int, directory: str) -> None:
    """Start a worker on SQLite, send tasks of every kind, and report."""
    from conveyor.demo_run import run_demo

    sys.exit(run_demo(count=count, concurrency=concurrency, directory=directory))


main.add_command(results)
