"""Finding the server, starting one, and replacing it when it goes away.

Finding the server. `url` defaults to $EMBEDSERVE_URL, else the documented default
address. On first use the client asks GET /health there. If nothing listens and
`autostart` is on (and the host is this machine), it runs `python -m embedserve --host H
--port P ...` with the client's backend/model/dimensions/server_args, waits for the
server's ready line (bounded by `start_timeout`) and fails with ServerStartError quoting
the server's last log lines if it does not come up. `port=0` always starts a private
server on a free port.

Sharing. Two clients (threads or processes) starting at once on one port share one
server: both spawn, the kernel lets one bind, the other's server exits ("cannot listen")
and that client adopts the winner without owning it. Within one client, the lock is held
while a server starts: other threads then wait for that server instead of starting their
own.

Restarts. When a server this client uses goes away (connection refused, or its own
process exited) the request that noticed starts a new one (or finds the one another
client started) and is sent again, unless `restart=False`; this does not count against
`retries`. A server that keeps dying is not restarted more than MAX_RESTARTS times in
RESTART_WINDOW seconds. A server someone else runs that stops listening (a systemd or
container restart) is waited for like any restart, once per loss, when this client may
not start one and no fallback may answer in its place (a fallback of the same model
answers at once: its vectors are the server's). A URL where nothing ever answered, or
where such a wait already failed, is only looked at `retries` (default 3) more times, so
that the fallback or the error comes in about half a second rather than a minute.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from embedserve.client.errors import EmbedServeError, ServerStartError, ServerUnavailable
from embedserve.client.options import Options
from embedserve.client.process import ServerProcess, spawn_server
from embedserve.client.transport import Connections, RetryPolicy, Target

log = logging.getLogger("embedserve.client")

MAX_SPAWNS_PER_START = 5
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
# After a failure, for this long: calls go straight to the fallback (when allowed) and no
# new server is started, so a dead server does not cost every call its retries.
RECHECK_INTERVAL = 2.0
# Looks at a URL where nothing listens and no server may be started, when `retries` is None.
REFUSAL_RETRIES = 3


class DownMemory:
    """Remembers a call that found no server, for RECHECK_INTERVAL: then calls go to the
    fallback (where allowed) without retrying. Shared by ServerFinder and pool.ServerPool;
    a subclass sets `_lock` and calls `_forget_failure` in its __init__."""

    _lock: Any

    def _forget_failure(self) -> None:
        self._down_until = 0.0  # while in the future: do not retry or start, fall back
        self.down_error: ServerUnavailable | None = None

    def recently_failed(self) -> bool:
        """Within RECHECK_INTERVAL of a call that found no server (see `down_error`)."""
        return self._down_until > time.monotonic()

    def note_failure(self, error: ServerUnavailable) -> None:
        """A call found no server: for RECHECK_INTERVAL, do not look for one again."""
        with self._lock:
            self._down_until = time.monotonic() + RECHECK_INTERVAL
            self.down_error = error


class ServerFinder(DownMemory):
    """The server one client uses (its current Target), found or started on demand, and
    forgotten when it goes away. Thread-safe: a lock guards the lifecycle state."""

    def __init__(self, options: Options, connections: Connections, retry: RetryPolicy,
                 may_fall_back: Callable[[], bool]) -> None:
        self._options = options
        self._connections = connections
        self._retry = retry
        # Whether the fallback may answer now in the server's place.
        self._may_fall_back = may_fall_back
        # Held while a server starts: other threads then wait for that server.
        self._lock = threading.RLock()
        self.target: Target | None = None
        self.closed = False
        self._generation = 0
        self._had_server = False
        self._restart_times: collections.deque[float] = collections.deque()
        self._forget_failure()
        # A server this client did not start went away: whoever runs it may be restarting
        # it, so a client that may not start one waits for it (once per loss).
        self._foreign_lost = False

    # One server: what ServerPool (pool.py) answers for several, answered for one.
    size = 1

    @property
    def url(self) -> str:
        return (self.target or self.configured_target()).url

    def sending(self, target: Target) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def served(self, target: Target) -> None:
        pass

    def skip(self, target: Target, failure: str, retry_after: float | None) -> bool:
        return False  # no other server to turn to: the request is retried here

    @staticmethod
    def shares_info(cached: Target, target: Target) -> bool:
        return cached is target  # a restarted server may serve another model

    def health_targets(self) -> list[Target]:
        """Where Client.health looks: the server in use, or the configured one."""
        return [self.target or self.configured_target()]

    def configured_target(self) -> Target:
        """Where the options say the server is (port 0 until a private one started)."""
        options = self._options
        return Target(options.scheme, options.host, options.port, options.base_path,
                      self._generation)

    def check_open(self) -> None:
        if self.closed:
            raise EmbedServeError("this Client is closed")

    def current(self) -> Target:
        """The server in use, found or started now if there is none."""
        target = self.target
        if target is not None:
            return target
        with self._lock:
            self.check_open()
            if self.target is None:
                self.target = self._find_or_start()
                self._had_server = True
                self._down_until = 0.0
            return self.target

    @staticmethod
    def gone(target: Target, exc: BaseException) -> bool:
        """Whether a failed request means the server itself is gone (not just busy)."""
        if isinstance(exc, ConnectionRefusedError):
            return True
        return target.server is not None and not target.server.alive()

    def close(self) -> tuple[bool, ServerProcess | None]:
        """Mark closed: (whether this call closed it, the server it owned, to stop)."""
        with self._lock:
            if self.closed:
                return False, None
            self.closed = True
            target, self.target = self.target, None
        return True, target.server if target is not None else None

    def stop(self, server: ServerProcess) -> None:
        """Stop a server this client started, now rather than at exit."""
        atexit.unregister(server.stop_at_exit)
        server.stop(self._options.stop_timeout)

    def lose(self, target: Target, failure: str) -> None:
        """The server behind `target` stopped answering: forget it (once, whichever thread
        sees it first), saying why when it was ours."""
        with self._lock:
            if self.target is not target:
                return  # another thread already moved on
            self.target = None
            server = target.server
            if server is not None and not server.alive():
                log.warning("the server this client started (pid %s) %s; last log lines:\n%s",
                            server.pid, server.describe_exit(),
                            "\n".join(server.log_tail()[-10:]))
                self.stop(server)  # reap it and its workers
            elif server is None:
                log.warning("the server at %s went away (%s)", target.url, failure)
                self._foreign_lost = True

    def _find_or_start(self) -> Target:
        """Called with the lock held and no current target."""
        options = self._options
        may_start = options.autostart and (options.restart or not self._had_server)
        # Waiting for a server that is there but not answering yet (loading, or hung): as
        # long as for a server being started when this client may start one, else as long
        # as for any request (a client that starts nothing ends within retry_timeout).
        patience = options.start_timeout if may_start else options.retry_timeout
        deadline = time.monotonic() + patience
        private = options.port == 0
        if private and not may_start:
            raise ServerUnavailable("the private server (port=0) is gone and restart is off",
                                    url=self.url)
        if may_start and self._down_until > time.monotonic() and self.down_error is not None:
            may_start = False  # a start just failed: only look, do not spawn again yet
        url = self.configured_target().url
        if private:
            url = url[: -len(":0")] + " (a free port)"
        local = options.local
        spawns = 0
        # A server someone else runs went away: they may be restarting it; wait for it as
        # long as for any other restart, unless the fallback's identical vectors can answer
        # meanwhile. Otherwise (nothing was ever there, or waiting for it already failed
        # once) look a few times only: the fallback or the error is better than a minute's
        # wait for a server that is not coming.
        if self._foreign_lost and not self._may_fall_back():
            looks = self._retry.start(seconds=options.retry_timeout, cap=options.retries)
        else:
            looks = self._retry.start(cap=REFUSAL_RETRIES if options.retries is None
                                      else options.retries)
        while True:
            if not private:
                state, status = self._connections.probe(self.configured_target(), deadline,
                                                        patience)
                if state == "ok":
                    log.info("using the embedserve server at %s", url)
                    self._foreign_lost = False
                    return self._new_target(None)
                if state != "refused":
                    raise ServerUnavailable(f"{url} {state}", url=url, status=status)
                if not (may_start and local):
                    delay = looks.next_delay()
                    if delay is not None:  # someone else may be starting it right now
                        time.sleep(delay)
                        continue
                    self._foreign_lost = False
                    why = ("autostart is off" if not options.autostart else
                           "restart is off" if not options.restart else
                           "autostart only starts servers on this machine (127.0.0.1, "
                           "localhost, ::1)" if not local else
                           f"a start failed less than {RECHECK_INTERVAL:g}s ago: "
                           f"{self.down_error}")
                    raise ServerUnavailable(f"nothing answers at {url} ({looks.tries} tries in "
                                            f"{looks.elapsed():.1f}s) and {why}", url=url)
            self._count_restart(url)
            server = spawn_server(self._options, self.url)
            spawns += 1
            # Ours from now on: stopped at exit even if this thread is interrupted (Ctrl-C)
            # while waiting for it.
            atexit.register(server.stop_at_exit, options.stop_timeout)
            try:
                outcome = server.wait_ready(deadline)
            except BaseException:
                self.stop(server)
                raise
            if outcome == "ready":
                log.info("started embedserve at %s (pid %s)", server.url, server.pid)
                return self._new_target(server)
            atexit.unregister(server.stop_at_exit)
            if outcome == "timeout":
                server.stop(options.stop_timeout)
                raise ServerStartError(f"the server started at {url} (pid {server.pid}) was "
                                       f"not ready within {options.start_timeout:g}s",
                                       url=url,
                                       returncode=server.process.returncode,
                                       log_tail=server.log_tail())
            server.stop(options.stop_timeout)  # reaps it; drains its last words
            if server.lost_port_race() and not private and spawns < MAX_SPAWNS_PER_START:
                # Another process bound the port first (a client starting at the same
                # time, or a server still letting go of it): use that one if it serves.
                log.info("port %s taken by another server; waiting for it to answer",
                         options.port)
                continue
            raise ServerStartError(f"the server started for {url} {server.describe_exit()}",
                                   url=url, returncode=server.process.returncode,
                                   log_tail=server.log_tail())

    def _count_restart(self, url: str) -> None:
        if not self._had_server:
            return
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > RESTART_WINDOW:
            self._restart_times.popleft()
        if len(self._restart_times) >= MAX_RESTARTS:
            raise ServerUnavailable(f"the server at {url} went away {MAX_RESTARTS} times in "
                                    f"{RESTART_WINDOW:g}s; not restarting it again yet",
                                    url=url)
        self._restart_times.append(now)

    def _new_target(self, server: ServerProcess | None) -> Target:
        options = self._options
        self._generation += 1
        host, port = options.host, options.port
        if server is not None and server.url is not None and port == 0:
            parts = urlsplit(server.url)
            host, port = parts.hostname or host, parts.port or port
        return Target(options.scheme, host, port, options.base_path, self._generation,
                      server)

