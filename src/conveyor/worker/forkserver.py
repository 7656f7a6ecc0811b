"""The fork server the prefork pool starts its processes from.

A fresh interpreter imports the app (and the process code) once, before any thread or
connection exists; each new process is a fork of it, so starting one is fast and never
copies a lock some thread held. ``multiprocessing``'s fork server does the same, but it
always starts a resource tracker beside it: one more interpreter, 12 MiB of memory,
watching for named semaphores and shared memory segments the pool never creates. This
one is the part the pool needs:

* the supervisor sends a request (a pickled call and the file descriptors it needs) over
  a Unix socket; the server forks, the child makes the call with the descriptors added
  to its arguments, and the server answers with the child's pid;
* the server reaps its children and writes each one's exit code to a pipe only the
  supervisor reads, as ``multiprocessing`` does: the pipe is the child's sentinel;
* when the supervisor is gone (its socket closes) the server takes no more requests and
  exits once its last child has, so those children still see the supervisor's end and
  clean up after it (see ``process._die_with_supervisor``).

Shared memory the processes write (their slots) is a memory file passed the same way.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import wait
from typing import Any

_LENGTH = struct.Struct("!Q")
_PID = struct.Struct("!q")
_EXIT_CODE = struct.Struct("!i")
MAX_FDS = 16
"""Most descriptors one request can pass."""
_HELD_BACK = {signal.SIGTERM, signal.SIGINT}
"""Signals this server ignores, blocked while it forks (see ``serve``)."""
LOST_EXIT_CODE = -signal.SIGKILL
"""The exit code of a process whose server died before reporting it: the server's death
killed it (the processes ask Linux for that, ``process._die_with_parent``)."""


def shared_buffer(size: int) -> tuple[int, mmap.mmap]:
    """``size`` zeroed bytes of memory shared with the processes it is passed to: the
    descriptor to pass, and this process's mapping of it."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("conveyor-slots", os.MFD_CLOEXEC)
    else:  # an unlinked file: nothing is left behind however the worker ends
        with tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def map_shared_buffer(fd: int, size: int) -> mmap.mmap:
    """The mapping of a :func:`shared_buffer` passed to this process (``fd`` is closed:
    the mapping keeps the memory)."""
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class ForkedProcess:
    """A process the fork server started: what the supervisor needs of
    ``multiprocessing.Process`` (``pid``, ``sentinel``, ``exitcode``, ``join``...)."""

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel
        self.exitcode: int | None = None

    def _poll(self, timeout: float | None) -> bool:
        """Whether it has ended, waiting up to ``timeout`` seconds."""
        if self.exitcode is not None:
            return True
        if self.sentinel < 0:  # closed unreaped: nothing more can be learnt
            self.exitcode = LOST_EXIT_CODE
            return True
        if not wait([self.sentinel], timeout):
            return False
        data = b""
        with contextlib.suppress(OSError):
            data = os.read(self.sentinel, _EXIT_CODE.size)
        self.exitcode = (_EXIT_CODE.unpack(data)[0] if len(data) == _EXIT_CODE.size
                         else LOST_EXIT_CODE)
        return True

    def is_alive(self) -> bool:
        return not self._poll(0)

    def join(self, timeout: float | None = None) -> None:
        self._poll(timeout)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        # Once reaped its pid may be another process's: never signal it then.
        if self.is_alive():
            os.kill(self.pid, signum)

    def close(self) -> None:
        """Release the sentinel, once the process has ended and been reaped."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


class ForkServer:
    """The supervisor's side: starts the server on first use, and again if it died."""

    def __init__(self, preload: Sequence[str]) -> None:
        self.preload = list(preload)
        self._lock = threading.Lock()
        self._server: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._retired: list[subprocess.Popen[bytes]] = []

    @property
    def pid(self) -> int | None:
        return self._server.pid if self._server is not None else None

    def start_process(
        self, target: Callable[..., Any], args: tuple[Any, ...], fds: Sequence[int]
    ) -> ForkedProcess:
        """Fork a process that calls ``target(*args, *passed_fds)``, where
        ``passed_fds`` are its copies of ``fds``. ``target`` and ``args`` must pickle."""
        request = pickle.dumps((target, args), protocol=pickle.HIGHEST_PROTOCOL)
        if len(fds) > MAX_FDS - 1:
            raise ValueError(f"a process can be passed at most {MAX_FDS - 1} descriptors")
        with self._lock:
            status_r, status_w = os.pipe()
            try:
                pid = self._request(request, [status_w, *fds])
            except BaseException:
                os.close(status_r)
                raise
            finally:
                os.close(status_w)  # the server holds its own copy
        return ForkedProcess(pid, status_r)

    def _request(self, request: bytes, fds: list[int]) -> int:
        for attempt in range(2):
            connection = self._ensure_running()
            try:
                socket.send_fds(connection, [_LENGTH.pack(len(request))], fds)
                connection.sendall(request)
                (pid,) = _PID.unpack(_receive_exactly(connection, _PID.size))
            except OSError as exc:
                self._discard()  # it died: the next attempt starts a new one
                if attempt:
                    raise ConnectionError(f"the fork server did not answer ({exc}); it "
                                          "may have failed to import the app") from exc
                continue
            if pid < 0:  # the server is fine, the fork failed
                raise OSError(-pid, f"the fork server could not fork: {os.strerror(-pid)}")
            return int(pid)
        raise AssertionError("unreachable")

    def _ensure_running(self) -> socket.socket:
        if self._socket is not None and self._server is not None and self._server.poll() is None:
            return self._socket
        self._discard()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The same import path as this process: ``-A proj`` may rely on the directory
        # the worker was started in.
        bootstrap = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
                     "from conveyor.worker.forkserver import serve; "
                     "serve(int(sys.argv[2]), json.loads(sys.argv[3]))")
        try:
            self._server = subprocess.Popen(
                [sys.executable, "-c", bootstrap, json.dumps(sys.path),
                 str(theirs.fileno()), json.dumps(self.preload)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._socket = ours
        return ours

    def _discard(self) -> None:
        self._let_go(timeout=0)

    def close(self, timeout: float = 10.0) -> None:
        """Let the server go: it exits once its last process has (the caller has stopped
        them); waits up to ``timeout`` seconds for that."""
        with self._lock:
            self._let_go(timeout)

    def _let_go(self, timeout: float) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._server is not None:
            self._retired.append(self._server)
            self._server = None
        # A server still waiting for its processes is reaped by a later call.
        running = []
        for server in self._retired:
            try:
                server.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                running.append(server)
        self._retired = running


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            # An OSError like the others: the caller retries later, as after a failed fork.
            raise ConnectionAbortedError("the fork server closed the connection")
        data += chunk
    return data


# -- the server ------------------------------------------------------------------------------

def serve(socket_fd: int, preload: Sequence[str]) -> None:
    """The server's life (``python -c``): import ``preload``, then fork on request."""
    # Ctrl-C reaches the terminal's whole process group, and a service manager's SIGTERM
    # often every process of the service: the supervisor and the processes decide what
    # that means for the tasks (a warm shutdown), and this server outlives them. Dying
    # here would kill the processes mid-task (their parent-death signal).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for module in preload:
        # A module that fails here fails again in each process, which reports it.
        with contextlib.suppress(Exception):
            __import__(module)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    connection: socket.socket | None = socket.socket(fileno=socket_fd)
    children: dict[int, int] = {}  # pid -> the write end of its exit code pipe
    while connection is not None or children:
        watched = [wake_r] if connection is None else [wake_r, connection.fileno()]
        ready, _, _ = select.select(watched, [], [])
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        _reap(children)
        if connection is not None and connection.fileno() in ready:
            try:
                request = _read_request(connection)
            except (OSError, ValueError):
                request = None
            if request is None:  # the supervisor is gone
                connection.close()
                connection = None
                continue
            payload, fds = request
            # The child starts with this server's dispositions, SIGTERM ignored: held
            # back until it has its own, a SIGTERM sent at once still reaches it.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_BACK)
            try:
                pid = os.fork()
            except OSError as exc:  # out of memory or processes: the supervisor retries
                pid = -(exc.errno or 1)
                os.close(fds[0])
            else:
                if pid == 0:
                    _child(payload, fds, connection, (wake_r, wake_w, *children.values()),
                           mask)
                children[pid] = fds[0]
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in fds[1:]:
                os.close(fd)
            with contextlib.suppress(OSError):
                connection.sendall(_PID.pack(pid))


def _read_request(connection: socket.socket) -> tuple[bytes, list[int]] | None:
    header, fds, _flags, _address = socket.recv_fds(connection, _LENGTH.size, MAX_FDS)
    try:
        if not header:
            return None
        if len(header) < _LENGTH.size:
            header += _receive_exactly(connection, _LENGTH.size - len(header))
        (length,) = _LENGTH.unpack(header)
        if not fds:
            raise ValueError("a request without its exit code pipe")
        return _receive_exactly(connection, length), fds
    except BaseException:
        for fd in fds:  # the request is dropped: so are the descriptors it brought
            os.close(fd)
        raise


def _reap(children: dict[int, int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_w = children.pop(pid, None)
        if status_w is None:
            continue
        with contextlib.suppress(OSError):
            os.write(status_w, _EXIT_CODE.pack(os.waitstatus_to_exitcode(status)))
        os.close(status_w)


def _child(payload: bytes, fds: list[int], connection: socket.socket,
           server_fds: Sequence[int], mask: Iterable[int]) -> None:
    """In the forked process: drop what is the server's, make the call, exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        connection.close()
        for fd in (*server_fds, fds[0]):
            os.close(fd)
        target, args = pickle.loads(payload)
        target(*args, *fds[1:])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
