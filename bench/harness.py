"""Benchmark Conveyor against Celery and Dramatiq on this machine, in one run.

    pip install -e '.[bench]'
    python bench/harness.py                    # 3 repetitions; writes RESULTS.md + results.png
    python bench/harness.py --quick            # smaller numbers, 1 repetition, same outputs
    python bench/harness.py --smoke            # CI: tiny numbers, no chart, a temp file
    python bench/harness.py --brokers redis --systems conveyor,celery --reps 5

Redis (127.0.0.1:6379, database 14) is required: every counted task INCRs a key there.
RabbitMQ (127.0.0.1:5672, guest) is used when it answers. It is a script, not a test:
nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# Run as a script (python bench/harness.py), the repository root is not on sys.path;
# the bench package, and the task apps the workers import, live there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.runner import PROFILES, Run, run, with_reps
from bench.systems.setups import BROKERS, SYSTEMS

HERE = Path(__file__).resolve().parent


def _names(value: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    return names


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/harness.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="4,000 tasks instead of 20,000, 1 repetition (unless --reps)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny numbers, 1 repetition, no chart, output to a temp file")
    parser.add_argument("--brokers", default=",".join(BROKERS),
                        type=lambda v: _names(v, BROKERS, "broker"),
                        help="comma-separated: sqlite,redis,amqp (default: all)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        type=lambda v: _names(v, SYSTEMS, "system"),
                        help="comma-separated: conveyor,celery,dramatiq (default: all)")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions (default: 3; 1 with --quick or --smoke)")
    parser.add_argument("--output", type=Path, default=None,
                        help="where RESULTS.md goes (default: bench/RESULTS.md; with "
                             "--smoke a temp file)")
    parser.add_argument("--chart", type=Path, default=None,
                        help="where the PNG goes (default: results.png beside the output)")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    parser.add_argument("--render", type=Path, metavar="RESULTS.json", default=None,
                        help="measure nothing: write RESULTS.md and the chart again from "
                             "the samples a run saved")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    from bench.report import chart, results_markdown, tables

    profile = with_reps(PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"],
                        args.reps)
    if args.output is not None:
        output = args.output
    elif args.smoke:
        output = Path(tempfile.mkdtemp(prefix="conveyor-bench-smoke-")) / "RESULTS.md"
    else:
        output = HERE / "RESULTS.md"
    draw = profile.chart and not args.no_chart
    chart_path = args.chart or output.with_name("results.png")

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    command = list(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        finished = Run.from_json(saved)
        command = saved.get("argv", command)  # the measuring run's options, not --render
        draw = finished.profile.chart and not args.no_chart
    else:
        log(f"profile {profile.name}: {profile.reps} rep(s), {profile.drain_n:,} tasks; "
            f"brokers {','.join(args.brokers)}; systems {','.join(args.systems)}")
        finished = run(profile, args.brokers, args.systems, log)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The raw samples beside the tables: the chart can be redrawn without measuring again.
    output.with_suffix(".json").write_text(
        json.dumps({**finished.to_json(), "argv": command}, indent=1) + "\n")
    if draw:
        try:
            chart_path.parent.mkdir(parents=True, exist_ok=True)
            chart(finished, chart_path)
        except Exception as exc:  # matplotlib is in the bench extra only; keep the tables
            log(f"no chart: {type(exc).__name__}: {exc}")
            draw = False
    chart_link = None
    if draw:
        try:
            chart_link = str(chart_path.resolve().relative_to(output.resolve().parent))
        except ValueError:
            chart_link = str(chart_path.resolve())
    output.write_text(results_markdown(finished, command, chart_link))
    print(tables(finished))
    print()
    log(f"wrote {output}" + (f" and {chart_path}" if draw else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
