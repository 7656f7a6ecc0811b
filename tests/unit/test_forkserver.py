"""The prefork pool's fork server: processes forked on request, their exit codes, the
memory and pipes passed to them, and the server's own life."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conveyor.worker.forkserver import (
    LOST_EXIT_CODE,
    ForkServer,
    map_shared_buffer,
    shared_buffer,
)

# -- what the forked processes run (module level: requests pickle them by name) ---------


def write_pid_and_args(message: str, number: int, buffer_fd: int) -> None:
    buffer = map_shared_buffer(buffer_fd, 64)
    buffer[:64] = f"{os.getpid()} {message} {number}".encode().ljust(64)


def fail() -> None:
    raise RuntimeError("this process fails")


def exit_with(code: int) -> None:
    raise SystemExit(code)


def wait_for_eof(pipe_fd: int) -> None:
    os.read(pipe_fd, 1)


def sleep_long() -> None:
    time.sleep(60)


def ended(pid: int) -> bool:
    """Exited (a zombie its parent has not reaped yet counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def server() -> Iterator[ForkServer]:
    fork_server = ForkServer(preload=["conveyor.worker.forkserver"])
    yield fork_server
    # A failed test may leave processes running: the server waits for them.
    if fork_server.pid is not None and psutil.pid_exists(fork_server.pid):
        for child in psutil.Process(fork_server.pid).children():
            child.kill()
    fork_server.close(timeout=5)


def test_a_process_gets_its_arguments_and_the_descriptors_passed(server: ForkServer) -> None:
    fd, buffer = shared_buffer(64)
    process = server.start_process(write_pid_and_args, ("hello", 7), [fd])
    process.join(timeout=10)
    assert process.exitcode == 0
    assert buffer[:64].decode().split() == [str(process.pid), "hello", "7"]
    # It was forked by the server, not by this process.
    assert process.pid not in {p.pid for p in psutil.Process().children()}
    process.close()
    os.close(fd)


@pytest.mark.parametrize(("target", "args", "code"), [
    (fail, (), 1),
    (exit_with, (3,), 3),
    (exit_with, (0,), 0),
])
def test_exit_codes_are_those_of_multiprocessing(
    server: ForkServer, target: object, args: tuple[object, ...], code: int
) -> None:
    process = server.start_process(target, args, [])  # type: ignore[arg-type]
    process.join(timeout=10)
    assert process.exitcode == code
    process.close()


def test_a_signal_shows_as_a_negative_exit_code(server: ForkServer) -> None:
    process = server.start_process(sleep_long, (), [])
    assert process.is_alive()
    process.terminate()
    process.join(timeout=10)
    assert process.exitcode == -signal.SIGTERM
    assert not process.is_alive()
    process.kill()  # ended: signals nothing, and does not fail
    process.close()


def test_a_sigterm_sent_as_the_process_starts_still_ends_it(server: ForkServer) -> None:
    # The server ignores SIGTERM, and a child starts with its dispositions: one sent
    # before the child has set its own must not be lost.
    processes = [server.start_process(sleep_long, (), []) for _ in range(20)]
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == -signal.SIGTERM
        process.close()


def test_the_sentinel_is_ready_once_the_process_ended(server: ForkServer) -> None:
    from multiprocessing.connection import wait

    process = server.start_process(sleep_long, (), [])
    assert wait([process.sentinel], 0.2) == []
    process.kill()
    assert wait([process.sentinel], 10) == [process.sentinel]
    process.join(timeout=0)
    assert process.exitcode == -signal.SIGKILL
    process.close()


def test_the_server_outlives_its_client_until_its_last_process_ends(
    server: ForkServer,
) -> None:
    read_end, write_end = os.pipe()
    process = server.start_process(wait_for_eof, (), [read_end])
    os.close(read_end)
    server_pid = server.pid
    assert server_pid is not None
    server.close(timeout=0.5)
    # Its process still runs: the server is still there, reaping nothing yet.
    assert psutil.pid_exists(process.pid)
    assert psutil.Process(server_pid).status() != psutil.STATUS_ZOMBIE
    os.close(write_end)  # the process returns, and the server follows it
    process.join(timeout=10)
    assert process.exitcode == 0
    deadline = time.monotonic() + 10
    while not ended(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended(server_pid)
    process.close()


def test_a_dead_server_is_replaced_and_its_processes_report_lost(server: ForkServer) -> None:
    first = server.start_process(sleep_long, (), [])
    first_server = server.pid
    assert first_server is not None
    os.kill(first_server, signal.SIGKILL)
    first.join(timeout=10)
    # Nobody is left to reap it and report how it ended.
    assert first.exitcode == LOST_EXIT_CODE
    os.kill(first.pid, signal.SIGKILL)  # it set no parent-death signal of its own
    second = server.start_process(exit_with, (5,), [])
    second.join(timeout=10)
    assert second.exitcode == 5
    assert server.pid not in (None, first_server)
    first.close()
    second.close()


def test_a_fork_that_fails_is_an_oserror_and_the_server_is_kept() -> None:
    import errno
    import socket
    import struct
    import threading

    # A server whose fork fails (out of processes): it cannot be made to fail for real
    # here, so this one answers as serve() does then, with the negated errno.
    ours, theirs = socket.socketpair()

    def answer_fork_failed() -> None:
        _header, fds, _flags, _address = socket.recv_fds(theirs, 8, 16)
        for fd in fds:
            os.close(fd)
        theirs.sendall(struct.pack("!q", -errno.EAGAIN))

    class Running:
        pid = 1

        @staticmethod
        def poll() -> None:
            return None

    fork_server = ForkServer(preload=[])
    fork_server._socket, fork_server._server = ours, Running()  # type: ignore[assignment]
    answering = threading.Thread(target=answer_fork_failed)
    answering.start()
    with pytest.raises(OSError) as raised:
        fork_server.start_process(exit_with, (0,), [])
    answering.join()
    assert raised.value.errno == errno.EAGAIN
    assert fork_server._socket is ours  # not taken for a dead server
    ours.close()
    theirs.close()


def test_a_server_that_dies_at_start_is_an_oserror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dies_at_import.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the server gets this process's path
    fork_server = ForkServer(preload=["dies_at_import"])
    with pytest.raises(OSError, match="fork server"):
        fork_server.start_process(exit_with, (0,), [])
    fork_server.close(timeout=5)
