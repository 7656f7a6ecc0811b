"""Private RabbitMQ vhosts for tests, and the server-side levers tests pull.

Each test gets a vhost nobody else uses (``conveyor-test-<pid>-<n>``), so fixed queue
names never collide and nothing another user of the server does is disturbed. Vhosts are
created in batches with one ``rabbitmqctl eval`` (a rabbitmqctl call costs most of a
second) and deleted when the test process exits; vhosts left behind by a test process
that died are deleted the next time.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import subprocess
import threading
from pathlib import Path

from tests.conftest import AMQP_URL, require_service

from conveyor.brokers.amqp import AmqpBroker

PREFIX = "conveyor-test-"
BATCH = 16

_lock = threading.Lock()
_pool: list[str] = []
_created: list[str] = []
_numbers = itertools.count(1)
_by_path: dict[Path, str] = {}


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr or done.stdout}")
    return done.stdout


def evaluate(expression: str) -> str:
    return rabbitmqctl("eval", expression).strip()


def _binary(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"unsafe vhost name {name!r}")
    return f'<<"{name}">>'


def _create(names: list[str]) -> None:
    statements = ", ".join(
        f'rabbit_vhost:add({_binary(name)}, <<"conveyor-tests">>), '
        f'rabbit_auth_backend_internal:set_permissions(<<"guest">>, {_binary(name)}, '
        f'<<".*">>, <<".*">>, <<".*">>, <<"conveyor-tests">>)'
        for name in names
    )
    evaluate(f"{statements}, ok.")


def _delete(names: list[str]) -> None:
    # ``catch``: another test process may be deleting the same orphan right now.
    if names:
        evaluate(
            ", ".join(
                f'catch rabbit_vhost:delete({_binary(name)}, <<"conveyor-tests">>)'
                for name in names
            )
            + ", ok."
        )


def _delete_orphans() -> None:
    """Delete test vhosts whose creating process is gone (a killed test run)."""
    listed = rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers").split()
    orphans = []
    for name in listed:
        match = re.fullmatch(re.escape(PREFIX) + r"(\d+)-\d+", name)
        if match and not _alive(int(match.group(1))):
            orphans.append(name)
    _delete(orphans)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_vhost() -> str:
    """A fresh, empty vhost of this test process (guest has every permission on it)."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    with _lock:
        if not _pool:
            if not _created:
                _delete_orphans()
                atexit.register(_cleanup)
            names = [f"{PREFIX}{os.getpid()}-{next(_numbers)}" for _ in range(BATCH)]
            _create(names)
            _created.extend(names)
            _pool.extend(names)
        return _pool.pop(0)


def _cleanup() -> None:
    # atexit: best effort, the next run deletes what is left.
    with contextlib.suppress(Exception):
        _delete(_created)


def vhost_url(vhost: str) -> str:
    base = AMQP_URL.rstrip("/")
    scheme, rest = base.split("://", 1)
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{vhost}"


def contract_broker(tmp_path: Path, visibility_timeout: float) -> AmqpBroker:
    """The contract suite's factory: brokers of one test share that test's vhost."""
    with _lock:
        vhost = _by_path.get(tmp_path)
    if vhost is None:
        vhost = new_vhost()
        with _lock:
            vhost = _by_path.setdefault(tmp_path, vhost)
    return AmqpBroker(vhost_url(vhost), visibility_timeout=visibility_timeout)


def close_connections(vhost: str, reason: str = "test: connection cut") -> None:
    """Close every client connection of a vhost, as an operator (or a network blip) would."""
    rabbitmqctl("close_all_connections", "--vhost", vhost, reason)


CHANNELS_OF = (
    "[P || P <- rabbit_channel:list_local(), "
    "rabbit_channel:info(P, [vhost]) =:= [{{vhost, {vhost}}}]]"
)


def shorten_consumer_timeout(vhost: str, milliseconds: int, ticks: int, every_ms: int) -> str:
    """Give the channels now open on ``vhost`` a ``consumer_timeout`` of their own.

    RabbitMQ 3.10 reads ``consumer_timeout`` once, from the node-wide setting, when a
    channel opens (per-queue and per-vhost settings came in 3.12), and checks it on a
    60 s channel tick. To test against the real check without changing the node for
    everyone, this sets the value in the state of this vhost's channels only, then sends
    them ``ticks`` extra ticks ``every_ms`` apart from a process on the node.
    Returns what the eval answered (the channels changed).
    """
    channels = CHANNELS_OF.format(vhost=_binary(vhost))
    set_timeout = (
        f"[sys:replace_state(P, fun(G) -> Ch = element(4, G), Conf = element(2, Ch), "
        f"setelement(4, G, setelement(2, Ch, setelement(18, Conf, {int(milliseconds)}))) "
        f"end) =/= x || P <- {channels}]"
    )
    tick = (
        f"spawn(fun() -> lists:foreach(fun(_) -> timer:sleep({int(every_ms)}), "
        f"[P ! tick || P <- {channels}] end, lists:seq(1, {int(ticks)})) end)"
    )
    return evaluate(f"{set_timeout}, {tick}, length({channels}).")


def consumer_timeouts(vhost: str) -> list[int]:
    """The consumer_timeout (ms) of each channel open on ``vhost``."""
    channels = CHANNELS_OF.format(vhost=_binary(vhost))
    text = evaluate(f"[element(18, element(2, element(4, sys:get_state(P)))) || P <- {channels}].")
    return [int(value) for value in re.findall(r"\d+", text)]
