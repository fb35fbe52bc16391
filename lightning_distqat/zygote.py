"""The embedded swarm's fork server: one interpreter imports torch and hivemind once, then forks every expert.

An expert started as its own interpreter spends about 5 s of CPU on imports (torch, hivemind, and torch's first
optimizer, which imports ``torch._dynamo``); a swarm of nine experts on a 2-core machine spent most of its start-up
there. The fork server pays that once per swarm:

    python -m lightning_distqat.zygote --control-fd FD --parent PID

- the control socket (a Unix socketpair): the trainer sends one ``b"spawn"`` message per expert, carrying three
  descriptors (SCM_RIGHTS): the expert's stdin (its stage arrives there, as in ``expert/__main__.py``), its stderr and
  its report pipe. The server answers ``{"spawned": pid}`` per request, in order, and ``{"exited": pid, "code": c}``
  when it reaps one; an import error is sent to every expert's report pipe as the expert's own error.
- each expert is a ``fork()`` of the server after its imports: it leads its own session (its DHT process and p2pd
  join it), dies with the server (parent-death signal), which dies with the trainer; the trainer closing its end of
  the socket ends the server once its experts are gone. ``ps -o comm`` and ``top`` name it ``distqat-expert``.

The server imports only what every expert needs; it never imports the user's script. Nothing here imports torch at
module level: the trainer side (:class:`ForkServer`, :class:`ForkedProcess`) is standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Optional

__all__ = ["ForkServer", "ForkedProcess", "available"]

_SPAWN = b"spawn"
_PR_SET_NAME = 15


def available() -> bool:
    """Whether this platform offers what the fork server needs: descriptor passing and pidfds that work (Linux 5.3
    and later, and not refused by a container's seccomp profile)."""
    if not (hasattr(os, "pidfd_open") and hasattr(socket, "send_fds") and hasattr(signal, "pidfd_send_signal")):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------------- the trainer's side
class ForkedProcess:
    """An expert forked by the fork server, with the parts of ``subprocess.Popen`` the embedded swarm uses: ``pid``,
    ``stdin``, ``stderr``, ``poll``, ``wait``, ``send_signal``, ``returncode``.

    It is not our child: its end is seen on a pidfd (readable once it exits), its exit code comes from the server.
    """

    def __init__(self, server: "ForkServer", stdin: Any, stderr: Any) -> None:
        self._server = server
        self.stdin = stdin
        self.stderr = stderr
        self.returncode: Optional[int] = None
        self._pid: Optional[int] = None
        self._pidfd: Optional[int] = None
        self._spawned = threading.Event()
        self._exited = threading.Event()

    # called by the server's reader thread
    def _set_pid(self, pid: int) -> None:
        self._pid = pid
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # already reaped (its exit message follows)
            self._pidfd = None
        self._spawned.set()

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()
        self._spawned.set()

    @property
    def pid(self) -> Optional[int]:
        """The expert's process id (waits up to ``spawn_timeout`` for the server to fork it); ``None`` if the
        server did not fork it."""
        self._spawned.wait(self._server.spawn_timeout)
        return self._pid

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(["expert", str(self._pid)], timeout)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None or self._pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class ForkServer:
    """The trainer's handle on one fork server: :meth:`spawn` returns at once (the server forks the expert once its
    imports are done); :meth:`close` ends it once its experts are gone."""

    def __init__(self, env: dict[str, str], spawn_timeout: float = 120.0) -> None:
        self.spawn_timeout = spawn_timeout
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lightning_distqat.zygote", "--control-fd", str(theirs.fileno()),
                 "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), start_new_session=True, env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._socket = ours
        self._lock = threading.Lock()
        self._waiting: list[ForkedProcess] = []  # sent, not yet answered, in order
        self._by_pid: dict[int, ForkedProcess] = {}
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, name="distqat-forkserver", daemon=True)
        self._reader.start()

    def spawn(self) -> tuple[ForkedProcess, int]:
        """Ask for one expert; returns at once with its handle (its stdin and stderr pipes inside) and the read end
        of its report pipe."""
        stdin_r, stdin_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        report_r, report_w = os.pipe()
        try:
            process = ForkedProcess(self, os.fdopen(stdin_w, "wb"), os.fdopen(stderr_r, "rb"))
            with self._lock:
                self._waiting.append(process)
                try:
                    socket.send_fds(self._socket, [_SPAWN], [stdin_r, stderr_w, report_w])
                except OSError:
                    self._waiting.remove(process)
                    process._set_exit(1)
        finally:
            for fd in (stdin_r, stderr_w, report_w):
                os.close(fd)
        return process, report_r

    def _read(self) -> None:
        while True:
            try:
                data = self._socket.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            with self._lock:
                if "failed" in message:  # the server could not fork this one; its report says why
                    self._waiting.pop(0)._set_exit(1)
                elif "spawned" in message:
                    process = self._waiting.pop(0)
                    pid = int(message["spawned"])
                    self._by_pid[pid] = process
                    process._set_pid(pid)
                elif "exited" in message:  # always after its "spawned": the server sends both in order
                    pid, code = int(message["exited"]), int(message["code"])
                    if pid in self._by_pid:
                        self._by_pid.pop(pid)._set_exit(code)
        with self._lock:  # the server is gone: nothing more will be forked or reaped by it
            waiting, self._waiting = self._waiting, []
            running = [p for p in self._by_pid.values() if p.returncode is None]
        for process in waiting:
            process._set_exit(1)
        # its experts got SIGTERM with it (parent-death signal); see them end on their pidfds, code unknown
        deadline = time.monotonic() + 60.0
        while running and time.monotonic() < deadline and not self._closing.is_set():
            watched = {p._pidfd: p for p in running if p._pidfd is not None}
            for process in running:
                if process._pidfd is None:
                    process._set_exit(-1)
            poller = select.poll()  # not select(): a trainer's descriptors may be numbered past 1024
            for fd in watched:
                poller.register(fd, select.POLLIN)
            for fd, _ in (poller.poll(1000) if watched else []):
                watched[fd]._set_exit(-1)
            running = [p for p in running if p.returncode is None]

    def unspawned(self) -> bool:
        """Whether an expert asked for is not forked yet (the server is still importing)."""
        with self._lock:
            return bool(self._waiting)

    def close(self, timeout: float = 5.0) -> None:
        """Close the control socket (the server exits once its experts are gone) and wait for the server."""
        self._closing.set()
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._reader.join(timeout)
        self._socket.close()


# ---------------------------------------------------------------------------------------------- the server's side
def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:  # the trainer is gone
        pass


def _report_error(report_fd: int, error: str) -> None:
    """Write ``error`` to an expert's report pipe as that expert's start-up error."""
    try:
        os.write(report_fd, (json.dumps({"error": error}) + "\n").encode())
    except OSError:
        pass


def _fail_all(sock: socket.socket, error: str) -> None:
    """Tell every expert asked for so far (their requests wait in the socket) why none will start."""
    sock.settimeout(0.5)
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(sock, 64, 3)
        except OSError:
            return
        if len(fds) != 3:
            return
        _report_error(fds[2], error)
        for fd in fds:
            os.close(fd)


def _name_this_process(name: bytes) -> None:
    """What ``ps -o comm``, ``top`` and ``pgrep`` show for this process (its command line stays the server's)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _child(sock: socket.socket, wakeup: tuple[int, int], fds: list[int], imported: float, server: int) -> int:
    """In the forked expert: take its descriptors and serve; returns the exit code."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock.close()
    for fd in wakeup:
        os.close(fd)
    os.setsid()
    _name_this_process(b"distqat-expert")
    stdin_r, stderr_w, report_w = fds
    os.dup2(stdin_r, 0)
    os.dup2(stderr_w, 2)
    os.close(stdin_r)
    os.close(stderr_w)
    from lightning_distqat._hivemind import own_locks_after_fork
    from lightning_distqat._process import die_with_parent
    from lightning_distqat.expert.__main__ import serve

    die_with_parent(signal.SIGTERM)
    if os.getppid() != server:
        return 1
    own_locks_after_fork()  # not the other experts' (they are forks of the same server)
    if "numpy" in sys.modules:  # forks share the server's numpy seed; fresh interpreters each drew their own
        sys.modules["numpy"].random.seed()
    return serve(report_w, {"started": time.time(), "imported": imported})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_distqat.zygote",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    from lightning_distqat._process import die_with_parent

    die_with_parent(signal.SIGTERM)
    sock = socket.socket(fileno=args.control_fd)
    if os.getppid() != args.parent:
        return 1
    try:
        from lightning_distqat.expert.__main__ import import_expert

        import_expert()
    except BaseException:  # noqa: BLE001 - every expert reports it as its own start-up error
        _fail_all(sock, f"expert fork server (pid {os.getpid()}):\n{traceback.format_exc()}")
        return 1
    imported = time.time()

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    children: set[int] = set()
    open_ = True
    while open_ or children:
        readable, _, _ = select.select([sock, wake_r] if open_ else [wake_r], [], [], 1.0)
        if wake_r in readable:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        while children:  # reap every expert that exited
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
            _send(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})
        if sock not in readable:
            continue
        try:
            message, fds, _, _ = socket.recv_fds(sock, 64, 3)
        except OSError:
            message, fds = b"", []
        if not message:
            for fd in fds:
                os.close(fd)
            open_ = False  # the trainer closed its end: no more experts; wait for those that run
            continue
        if message != _SPAWN or len(fds) != 3:  # cannot happen with our trainer side; answer it all the same
            for fd in fds:
                os.close(fd)
            _send(sock, {"failed": f"a request with {len(fds)} descriptors"})
            continue
        server = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:  # e.g. EAGAIN under a process-count limit: this expert fails, the others go on
            _report_error(fds[2], f"expert fork server (pid {server}) could not fork this expert: {e!r}")
            for fd in fds:
                os.close(fd)
            _send(sock, {"failed": repr(e)})
            continue
        if pid == 0:
            code = 1
            try:
                code = _child(sock, (wake_r, wake_w), fds, imported, server)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        _send(sock, {"spawned": pid})
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    os._exit(code)  # nothing to clean up: skip the interpreter's teardown of torch and hivemind (about 0.9 s)
