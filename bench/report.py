"""Tables, RESULTS.md and the chart, from a finished run.

Every figure is a median over repetitions with its min-max; a cell that never measured
shows ``n/a (error: ...)`` with the first line of what went wrong.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from bench.measure import Summary
from bench.runner import BASELINE, ROOT, Profile, Results, Run, task_message_bytes
from bench.settings import AMQP_HOST, AMQP_PORT, BENCH_REDIS_URL
from bench.systems.setups import (
    SUPPORTED,
    SYSTEMS,
    drain_command,
    io_command,
    setup_for,
    shown,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass(frozen=True)
class Column:
    metric: str
    title: str
    fmt: Callable[[float], str]
    higher_is_better: bool


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _ms(value: float) -> str:
    return f"{value:,.2f}"


def _seconds(value: float) -> str:
    return f"{value:,.2f}"


def _mib(value: float) -> str:
    return f"{value:,.0f}"


THROUGHPUT = (
    Column("enqueue_single", "enqueue, 1 per call", _rate, True),
    Column("enqueue_bulk", "enqueue, bulk \u00d71,000", _rate, True),
    Column("drain", "drain, after start-up", _rate, True),
    Column("drain_total", "drain, with start-up", _rate, True),
    Column("drain_late", "drain late-ack, after start-up", _rate, True),
    Column("io", "I/O 10 ms at 100", _rate, True),
)
LATENCY = (
    Column("startup", "worker start-up (s)", _seconds, False),
    Column("rt_p50", "round trip p50 (ms)", _ms, False),
    Column("rt_p99", "round trip p99 (ms)", _ms, False),
    Column("rss", "peak RSS, drain (MiB)", _mib, False),
)


def _clean(text: str, limit: int = 90) -> str:
    """One line of error text, safe inside a Markdown table cell."""
    line = " ".join(text.split()).replace("|", "/")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def summary_of(results: Results, broker: str, system: str, metric: str) -> Summary | None:
    values = results.samples.get((broker, system, metric))
    return Summary.of(values) if values else None


def cell_text(results: Results, broker: str, system: str, column: Column, reps: int) -> str:
    summary = summary_of(results, broker, system, column.metric)
    error = results.errors.get((broker, system, column.metric))
    if summary is None:
        if error is None:
            return "\u2013"  # not measured for this system (the bare client's latency, ...)
        return f"n/a (error: {_clean(error)})"
    text = column.fmt(summary.median)
    if summary.count > 1:
        text += f" ({column.fmt(summary.low)}\u2013{column.fmt(summary.high)})"
    if summary.count < reps:
        text += f" [{summary.count}/{reps} reps]"
    return text


def ratio_text(results: Results, broker: str, ours: str, theirs: str, column: Column) -> str:
    a = summary_of(results, broker, ours, column.metric)
    b = summary_of(results, broker, theirs, column.metric)
    if a is None or b is None or b.median == 0:
        return "\u2013"
    return f"{a.median / b.median:.2f}\u00d7"


def table(results: Results, run: Run, columns: Sequence[Column], title: str) -> str:
    lines = [f"### {title}", "",
             "| broker | system | " + " | ".join(c.title for c in columns) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in columns) + " |"]
    for broker in run.brokers:
        rows = [(b, s) for b, s in results.attempted if b == broker]
        for _, system in rows:
            if system == BASELINE and not any(
                    (broker, BASELINE, c.metric) in results.samples
                    or (broker, BASELINE, c.metric) in results.errors for c in columns):
                continue  # the bare client has no latency or memory figures
            name = f"{system} (bare, pipelined)" if system == BASELINE else system
            cells = [cell_text(results, broker, system, c, run.profile.reps) for c in columns]
            lines.append(f"| {broker} | {name} | " + " | ".join(cells) + " |")
        present = {system for _, system in rows}
        for peer in ("celery", "dramatiq"):
            if "conveyor" in present and peer in present:
                ratios = [ratio_text(results, broker, "conveyor", peer, c) for c in columns]
                lines.append(f"| {broker} | *conveyor / {peer}* | " + " | ".join(ratios)
                             + " |")
    return "\n".join(lines)


def tables(run: Run) -> str:
    return "\n\n".join([
        table(run.results, run, THROUGHPUT, "Throughput (tasks/s; higher is better)"),
        table(run.results, run, LATENCY, "Start-up, latency and memory (lower is better)"),
    ])


def failures(run: Run) -> str:
    if not run.results.errors:
        return ""
    # One line per distinct error, naming every metric it cost.
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for (broker, system, metric), error in run.results.errors.items():
        grouped.setdefault((broker, system, _clean(error, 300)), []).append(metric)
    lines = ["### Failures", "",
             "The first line of each error (the latest one for each metric):", ""]
    for (broker, system, error), metrics in sorted(grouped.items()):
        lines.append(f"- {broker} / {system} ({', '.join(metrics)}): {error}")
    return "\n".join(lines)


# -- the machine ----------------------------------------------------------------------------------

def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _server_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    try:
        import redis

        client = redis.Redis.from_url(BENCH_REDIS_URL)
        versions["Redis server"] = str(client.info("server")["redis_version"])
        client.close()
    except Exception as exc:
        versions["Redis server"] = f"unknown ({type(exc).__name__})"
    try:
        import pika

        connection = pika.BlockingConnection(pika.ConnectionParameters(
            host=AMQP_HOST, port=AMQP_PORT, credentials=pika.PlainCredentials("guest", "guest")))
        raw = connection._impl.server_properties.get("version", "?")
        versions["RabbitMQ server"] = raw.decode() if isinstance(raw, bytes) else str(raw)
        connection.close()
    except Exception as exc:
        versions["RabbitMQ server"] = f"unknown ({type(exc).__name__})"
    return versions


def git_commit() -> str:
    """HEAD, and whether Conveyor's sources differ from it (others work in the same tree)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} with uncommitted changes under src/" if dirty else commit


def machine(run: Run) -> str:
    import psutil

    memory = psutil.virtual_memory().total / 2**30
    lines = [
        f"- CPU: {os.cpu_count()} cores ({_cpu_model()}), {memory:.0f} GiB memory; "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- Conveyor {_version('conveyor')} (commit {run.commit or git_commit()}), "
        f"Celery {_version('celery')} (kombu {_version('kombu')}, py-amqp "
        f"{_version('amqp')}), Dramatiq {_version('dramatiq')} (pika {_version('pika')})",
        f"- redis-py {_version('redis')}, hiredis {_version('hiredis')}, "
        f"psutil {_version('psutil')}",
    ]
    if run.load:
        lines.append("- Load average (1 min) at the start and end of the run: "
                     + " and ".join(f"{value:.1f}" for value in run.load)
                     + ": the machine is shared, so compare ratios within this run")
    servers = _server_versions()
    lines.append("- " + ", ".join(f"{name} {version}" for name, version in servers.items())
                 + ", both on loopback")
    return "\n".join(lines)


# -- RESULTS.md ------------------------------------------------------------

def how_it_was_run(run: Run, argv: Sequence[str]) -> str:
    p: Profile = run.profile
    placeholder = "<queue>"
    commands = []
    for system in run.systems:
        commands.append(f"    {shown(drain_command(system, placeholder))}")
    io_lines = [f"    {shown(io_command(system, placeholder))}" for system in run.systems]
    backends = []
    for broker in run.brokers:
        for system in run.systems:
            if broker in SUPPORTED[system]:
                setup = setup_for(system, broker, Path("<tmp>/bench.db"))
                backends.append(f"{system} on {broker}: {setup.backend_note}")
    # A run saved before the late-ack drain existed did not measure it.
    late = any(metric == "drain_late"
               for (_, _, metric) in [*run.results.samples, *run.results.errors])
    late_drain = [
        f"- **Drain late-ack**: after the round trip that worker stops, {p.drain_n:,} more "
        "no-ops are queued (plus one warm-up call, as above) and the same worker command "
        "starts again; rate after start-up, measured as the drain. Conveyor and Celery: "
        "`noop_late`, the same no-op declared `acks_late=True`, so each message is "
        "acknowledged after its task returns. Dramatiq always acknowledges after the actor "
        "returns (it has no other mode), so its late-ack figure is its ordinary drain "
        "(`noop`) run a second time and measured the same way: a run of its own, not the "
        "drain figure copied.",
    ] if late else []
    lines = [
        f"    python bench/harness.py {' '.join(argv)}".rstrip(),
        "",
        f"{p.reps} repetition(s); within each, every broker in turn and on it every system "
        "in turn (conveyor, celery, dramatiq), so slow drifts of this shared machine hit "
        "all systems alike. Queue names are new for every cell, and purged around it.",
        "",
        f"- **Enqueue, 1 per call**: {p.drain_n:,} `noop.delay()` calls (Dramatiq: "
        "`noop.send()`) from one producer process, after one untimed warm-up call. These "
        "are the tasks the drain then runs.",
        f"- **Enqueue, bulk**: {p.bulk_calls} calls of `group(noop.s() x {p.bulk_size:,})"
        ".apply_async()` (Dramatiq: `group(...).run()`) into a side queue, purged "
        "afterwards. Conveyor's `group` publishes its members in one broker operation "
        "(on Redis, one MULTI/EXEC transaction); Celery's and Dramatiq's send them one "
        "publish at a time over one connection (neither has a batch publish). The bare "
        "client row is "
        f"redis-py: {p.drain_n:,} single `LPUSH`es, then pipelines of {p.bulk_size:,} "
        f"(values of {task_message_bytes()} bytes, the size of a Conveyor `noop` message "
        "on Redis).",
        f"- **Drain**: with the {p.drain_n:,} no-ops queued, one worker command with 2 "
        "processes starts (below). Start-up = from starting the command to the first "
        "execution; the drain ends at the last one. Each no-op INCRs a Redis counter "
        "(db 14), polled every 2 ms. *After start-up* = (n - 1) / (last - first execution); "
        "*with start-up* = n / (last execution - command start). Conveyor and Celery "
        "acknowledge each message as its task starts (their default, early ack); Dramatiq "
        "after the actor returns (its only mode).",
        f"- **Round trip**: {p.round_trips} sequential `add.delay(1, 2).get()` on that "
        f"worker once idle, after {p.round_trip_warmup} untimed ones; p50 and p99 of each "
        "repetition, then median and min\u2013max over repetitions.",
        *late_drain,
        f"- **I/O**: {p.io_n:,} tasks that sleep 10 ms then INCR, queued first, run by each "
        "system's best setting for 100 concurrent waits (below); rate after start-up. "
        "The ceiling is 100 / 10 ms = 10,000 tasks/s.",
        "- **Peak RSS**: the drain worker's process tree (parent plus every child), summed "
        "every 50 ms during the (first) drain with psutil; a page shared by several processes "
        "counts in each.",
        "",
        "Drain workers (2 processes)" + (", for both drains:" if late else ":"),
        "",
        *commands,
        "",
        "I/O workers (concurrency 100). Conveyor: `async def` tasks on its asyncio pool. "
        "Celery: its thread pool (gevent and eventlet, its other I/O pools, are not "
        "installed). Dramatiq: threads (its async actors still hold a thread each), 2 "
        "processes x 50, which measured 20-40% ahead of 1 x 100 here:",
        "",
        *io_lines,
        "",
        "Result backends (round trips): " + "; ".join(backends) + ".",
        "",
        "Every system runs with its defaults otherwise (prefetch, acks"
        + (" but for the late-ack drain's task" if late else "") + ", Celery's "
        "mingle/gossip, Dramatiq's middleware plus Results), as a user starts it. "
        "Brokers: SQLite in a fresh file per cell, Redis db 14 on 127.0.0.1:6379, "
        "RabbitMQ on 127.0.0.1:5672 (vhost `/`).",
    ]
    return "\n".join(lines)


def results_markdown(run: Run, argv: Sequence[str], chart_name: str | None) -> str:
    date = dt.datetime.fromtimestamp(run.started, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    minutes = (run.finished - run.started) / 60
    parts = [
        "# Benchmarks: Conveyor, Celery and Dramatiq",
        "",
        f"Generated by `bench/harness.py` on {date} ({minutes:.0f} min). Medians over "
        f"{run.profile.reps} repetition(s), min\u2013max in brackets; ratios are of medians "
        "(for the second table, below 1 means Conveyor is lower). Regenerate with "
        "`pip install -e '.[bench]' && python bench/harness.py`.",
        "",
    ]
    if chart_name:
        parts += [f"![Drain and enqueue rates]({chart_name})", ""]
    parts += [tables(run), ""]
    if run.skipped:
        parts += ["Not measured: " + "; ".join(f"{b} ({why})" for b, why in
                                               run.skipped.items()), ""]
    failed = failures(run)
    if failed:
        parts += [failed, ""]
    parts += ["## The machine", "", machine(run), "", "## How it was run", "",
              how_it_was_run(run, argv), ""]
    return "\n".join(parts)


# -- the chart ------------------------------------------------------------

COLORS = {"conveyor": "#2a7ab9", "celery": "#7fb35a", "dramatiq": "#e0823d",
          BASELINE: "#9a9a9a"}


def chart(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    results = run.results
    panels = [
        ("drain", "Drain: 2 worker processes, after start-up", False, False),
        ("drain_late", "Drain late-ack: 2 worker processes, after start-up", False, False),
        ("io", "I/O: 10 ms tasks at concurrency 100", False, False),
        ("enqueue_single", "Enqueue: one task per call", True, False),
        # The bare pipelined client is some 20x the rest: only a log scale shows both.
        ("enqueue_bulk", "Enqueue: bulk, calls of 1,000 (log scale)", True, True),
    ]
    # A run saved before a figure existed (the late-ack drain) has no panel for it.
    if not any(metric == "drain_late" for (_, _, metric) in results.samples):
        panels = [panel for panel in panels if panel[0] != "drain_late"]
    rows = (len(panels) + 1) // 2
    figure_height = 4.0 * rows  # inches
    figure, grid = plt.subplots(rows, 2, figsize=(12, figure_height), squeeze=False)
    axes = list(grid.flat)
    for spare in axes[len(panels):]:
        spare.set_visible(False)
    by_metric: dict[str, Axes] = {}
    for axis, (metric, title, with_baseline, log_scale) in zip(
            axes[:len(panels)], panels, strict=True):
        by_metric[metric] = axis
        systems = [s for s in SYSTEMS if s in run.systems]
        if with_baseline:
            systems.append(BASELINE)
        width = 0.8 / len(systems)
        for index, system in enumerate(systems):
            xs, heights, low, high = [], [], [], []
            for position, broker in enumerate(run.brokers):
                summary = summary_of(results, broker, system, metric)
                if summary is None:
                    continue
                xs.append(position + (index - (len(systems) - 1) / 2) * width)
                heights.append(summary.median)
                low.append(summary.median - summary.low)
                high.append(summary.high - summary.median)
            if not xs:
                continue
            label = "redis-py (bare)" if system == BASELINE else system
            axis.bar(xs, heights, width, yerr=[low, high], capsize=3, label=label,
                     color=COLORS[system], error_kw={"elinewidth": 1})
            for x, height, up in zip(xs, heights, high, strict=True):
                # Above the error bar's cap, where the value never hides behind it.
                axis.annotate(_rate(height), (x, height + up), xytext=(0, 3),
                              textcoords="offset points", ha="center", fontsize=7)
        axis.set_xticks(range(len(run.brokers)), run.brokers)
        axis.set_title(title, fontsize=10)
        axis.set_ylabel("tasks/s")
        if log_scale:
            axis.set_yscale("log")
            axis.set_ylim(bottom=100, top=axis.get_ylim()[1] * 1.8)
        else:
            axis.set_ylim(top=axis.get_ylim()[1] * 1.08)  # room for the value labels
        axis.grid(axis="y", alpha=0.3)
    # Both drains on one scale, so the cost of acknowledging late reads off the bars.
    drains = [by_metric[metric] for metric in ("drain", "drain_late") if metric in by_metric]
    top = max(axis.get_ylim()[1] for axis in drains)
    for axis in drains:
        axis.set_ylim(top=top)
    # One legend for all panels, from the panel that shows every series.
    handles, labels = by_metric["enqueue_bulk"].get_legend_handles_labels()
    # The title and the legend keep the same height in inches however many rows follow.
    figure.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9,
                  bbox_to_anchor=(0.5, 1 - 0.36 / figure_height), frameon=False)
    reps = run.profile.reps
    figure.suptitle(f"Conveyor, Celery and Dramatiq on {os.cpu_count()} cores, loopback: "
                    f"medians of {reps} repetition{'s' if reps != 1 else ''}, "
                    "bars span min\u2013max", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.56 / figure_height))
    figure.savefig(path, dpi=110)
    plt.close(figure)
