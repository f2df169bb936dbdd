"""One `python -m embedserve` child this client started: spawning it, draining its output,
reading its ready line, stopping it.

Ownership. A server this client started is its own: it is stopped gracefully (SIGTERM,
then SIGKILL after `stop_timeout`) by close(), by the `with` block's end, or at interpreter
exit (atexit) -- not when the Client object is garbage-collected, so `Client().embed(x)`
in a loop reuses one server instead of starting one per call. A server it found running
is never stopped by it. A kill -9 (or an unhandled SIGTERM) of the app skips atexit; for
that case the child gets a stdin pipe that only this process holds and
EMBEDSERVE_WATCH_STDIN=1: a server that watches stdin stops when the pipe closes, however
this process ended.

The child runs in its own session (start_new_session): Ctrl-C in a terminal reaches the
app only, and the app decides (a REPL that catches KeyboardInterrupt keeps its server);
the app's exit then stops the server through atexit. The child's stdout and stderr are
drained by threads (a full pipe would block the server) that keep the last lines for
error messages and forward them to the "embedserve.client.server" logger at DEBUG.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import site
import subprocess
import sysconfig
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from embedserve.client.errors import ServerStartError
from embedserve.client.options import Options
from embedserve.contracts import EXIT_FAILURE, env_name, parse_ready_line

log = logging.getLogger("embedserve.client")
server_log = logging.getLogger("embedserve.client.server")

LOG_LINES_KEPT = 40
# A started server whose port is taken exits with this code and says "cannot listen".
EXIT_CANNOT_LISTEN = EXIT_FAILURE


def spawn_server(options: Options, url: str) -> ServerProcess:
    """Run `python -m embedserve` as `options` say, on their host and port (ServerStartError
    naming `url` when it cannot run at all). The caller registers it for stopping."""
    command = [options.python, "-m", "embedserve", "--host", options.host,
               "--port", str(options.port)]
    if options.backend is not None:
        command += ["--backend", options.backend]
    if options.model is not None:
        command += ["--model", options.model]
    if options.dimensions is not None:
        command += ["--dimensions", str(options.dimensions)]
    command += options.server_args
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # Stop when this process is gone, however it went (read by servers that
           # support it; an unknown EMBEDSERVE_* variable is ignored by older ones), unless
           # the caller's env says otherwise (EMBEDSERVE_WATCH_STDIN=0, as in Node's).
           env_name("watch_stdin"): "1", **options.env}
    if options.api_key:
        env[env_name("api_key")] = options.api_key  # not in argv, which `ps` shows
    pythonpath = child_pythonpath(env)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    log.info("starting %s", " ".join(command))
    try:
        return ServerProcess(command, env)
    except OSError as exc:
        raise ServerStartError(f"cannot run {command[0]!r}: {exc}", url=url,
                               returncode=None, log_tail=[]) from exc


def child_pythonpath(environ: Mapping[str, str]) -> str | None:
    """PYTHONPATH for the server child so it runs this very embedserve. An installed
    package is found anyway (and putting site-packages first could shadow the stdlib);
    a source checkout or a sys.path entry added at run time is not."""
    # embedserve/client/process.py -> the folder that holds the embedserve package.
    root = str(Path(__file__).resolve().parents[2])
    installed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        installed.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - virtualenvs with an old site.py
        pass
    if root in {str(Path(p).resolve()) for p in installed if p}:
        return environ.get("PYTHONPATH")
    return os.pathsep.join(filter(None, [root, environ.get("PYTHONPATH")]))


class ServerProcess:
    """A `python -m embedserve` child: its process, its drained output, how to stop it.
    Holds no reference to the Client, so an atexit hook can keep it without keeping the
    client alive."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.command = list(command)
        self.owner_pid = os.getpid()
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.ready = threading.Event()
        self.url: str | None = None
        self._log_lock = threading.Lock()
        self.process = subprocess.Popen(
            self.command, env=dict(env), text=True, encoding="utf-8", errors="replace",
            # stdin is a pipe nobody writes to: its EOF tells a server that watches stdin
            # that this process is gone, even after a kill -9 that skips atexit.
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True)
        self.pid = self.process.pid
        self._drains = [
            threading.Thread(target=self._drain, args=(stream, name == "stdout"),
                             name=f"embedserve-{self.pid}-{name}", daemon=True)
            for name, stream in (("stdout", self.process.stdout),
                                 ("stderr", self.process.stderr))]
        for thread in self._drains:
            thread.start()

    def _drain(self, stream: Any, is_stdout: bool) -> None:
        try:
            for line in stream:
                line = line.rstrip("\n")
                with self._log_lock:
                    self.log.append(line)
                server_log.debug("[%s] %s", self.pid, line)
                if is_stdout and not self.ready.is_set():
                    ready = parse_ready_line(line)
                    if ready:
                        self.url = ready.url
                        self.ready.set()
        except (OSError, ValueError):
            pass  # the pipe was closed under us at stop()

    def log_tail(self) -> list[str]:
        with self._log_lock:
            return list(self.log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, deadline: float) -> str:
        """'ready', 'exited' or 'timeout'."""
        while True:
            if self.ready.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                return "ready"
            if self.process.poll() is not None:
                # Let the drains read what it printed last (the error message).
                for thread in self._drains:
                    thread.join(1.0)
                return "ready" if self.ready.is_set() else "exited"
            if time.monotonic() >= deadline:
                return "timeout"

    def lost_port_race(self) -> bool:
        return (self.process.returncode == EXIT_CANNOT_LISTEN
                and any("cannot listen" in line for line in self.log_tail()))

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (graceful), SIGKILL of its whole session after `timeout`. Idempotent.
        A forked copy of the owner does nothing: the server belongs to the parent."""
        if os.getpid() != self.owner_pid:
            return None
        process = self.process
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("server %s did not stop within %gs of SIGTERM: killing it",
                            self.pid, timeout)
                self._kill_session()
                process.wait(5.0)
        # Whatever is left in its session (workers of a supervisor that was killed, or
        # that outlived it) goes too: nothing this client started may outlive it.
        self._kill_session()
        for thread in self._drains:
            thread.join(1.0)
        for stream in (process.stdin, process.stdout, process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        return process.returncode

    def stop_at_exit(self, timeout: float) -> None:
        try:
            self.stop(timeout)
        except Exception:  # noqa: BLE001 - nothing useful to do at interpreter exit
            pass

    def _kill_session(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # start_new_session: pgid == pid
        except (ProcessLookupError, PermissionError, AttributeError):
            pass
