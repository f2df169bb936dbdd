"""The connection side of the HTTP server: the listening socket, reads that cannot outlive a
request's deadline, and the accounting that bounds open connections (closing the longest
idle one to make room). It knows nothing of requests, routes or dialects: handler.py reads
and answers requests on the connections this module accepts.
"""

from __future__ import annotations

import io
import json
import logging
import math
import select
import socket
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from embedserve.guards import Guards
from embedserve.service import EmbeddingService

log = logging.getLogger("embedserve.connections")

# Seconds a request may wait on its client (for the rest of its head or body, or to take
# its answer) before the connection may be closed to make room for a new one, at the
# connection limit: a client on a working network sends a head in milliseconds.
STALLED_GRACE = 2.0


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen once; the socket then outlives any server (or worker) using it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class DeadlineReader(io.RawIOBase):
    """The socket as a raw stream whose every read waits at most until `deadline`. A plain
    socket timeout restarts with each byte, so a client trickling one byte at a time could
    hold a connection open forever (slowloris); the deadline bounds the whole request --
    line, headers and body. `deadline` None (between requests): don't wait at all.

    The socket stays non-blocking for the connection's life, so a read that finds data
    waiting (nearly all of them) is one recv; only a read that must wait selects. A timeout
    set before each read cost two more system calls, each releasing the interpreter lock:
    with several connections busy, each release handed the lock to another thread."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        sock.setblocking(False)
        self._sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def readinto(self, buffer: Any) -> int | None:
        sock = self._sock
        while True:
            try:
                return sock.recv_into(buffer)
            except BlockingIOError:
                if self.deadline is None:
                    return None  # RawIOBase's "nothing yet"; peek() then gives b""
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request not received within request_timeout")
            select.select([sock], [], [], remaining)


def send_within(sock: socket.socket, timeout: float, *parts: bytes) -> None:
    """All of `parts`, in order, on a non-blocking socket (see DeadlineReader), within
    `timeout` seconds for the whole of them: a reader that takes its time cannot hold a
    thread for longer. What the socket's buffer takes at once (a response, nearly always)
    is one send, without joining the parts: a big answer's head and body used to be copied
    into one, twice its size held for every client slow to read it."""
    views = [memoryview(part) for part in parts if part]
    deadline: float | None = None
    while True:
        try:
            sent = sock.sendmsg(views) if views else 0  # POSIX, as the supervisor
        except BlockingIOError:
            sent = 0
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if views and sent:
            views[0] = views[0][sent:]
        if not views:
            return
        now = time.monotonic()
        if deadline is None:
            deadline = now + timeout
        elif now >= deadline:
            raise TimeoutError("response not taken within request_timeout")
        select.select([], [sock], [], deadline - now)


class ConnectionServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on a socket it is handed (the supervisor binds; workers
    serve), with a bound on open connections and a draining flag for graceful stops."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, service: EmbeddingService,
                 handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = sock.family
        # bind_and_activate=False: no bind, no listen and, unlike HTTPServer.server_bind,
        # no reverse-DNS lookup (getfqdn) that can stall start-up.
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()
        # Non-blocking: workers share this socket, all of them wake when a connection
        # arrives, and only one gets it. A blocking accept() left the others stuck in it,
        # deaf to shutdown() until the next connection came (a drain hung for good).
        sock.setblocking(False)
        self.socket = sock
        self.server_name, self.server_port = sock.getsockname()[:2]
        self.service = service
        self.config = service.config
        self.guards = Guards.from_config(self.config)
        self.draining = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._connections = 0
        # Connections waiting for their next request, oldest first: at the connection
        # limit one of them is closed to make room, so idle sockets cannot lock clients out.
        self._waiting: dict[socket.socket, float] = {}
        # Connections mid-request whose client the server waits on (for the rest of the
        # request, or to take the answer), since when: at the limit, with no idle one, the
        # one stalled longest (past STALLED_GRACE) is closed, so that clients sending or
        # reading a byte at a time (slowloris) cannot lock the others out.
        self._stalled: dict[socket.socket, float] = {}
        self._date: tuple[int, str] = (0, "")
        self.loop_tick = time.monotonic()

    def service_actions(self) -> None:
        # Called by serve_forever at least every poll interval: proof the accept loop lives.
        self.loop_tick = time.monotonic()

    # -- connection accounting -----------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self._connections >= self.config.max_connections
            idle = self._oldest_closable() if full else None
            if not full or idle is not None:
                self._connections += 1
        if idle is not None:
            # Its thread wakes on the shutdown, reads EOF and closes; this one takes its
            # place (counted at once, so the limit is exceeded by at most the handovers).
            log.debug("at the connection limit: closing the longest idle or stalled connection")
            _shutdown(idle)
        elif full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release_connection()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release_connection()

    def _release_connection(self) -> None:
        with self._idle:
            self._connections -= 1
            if not self._connections:
                self._idle.notify_all()

    def _oldest_closable(self) -> socket.socket | None:
        """The connection to close for a new one (the lock held): the longest idle, else
        the longest stalled past STALLED_GRACE, else none."""
        for conns, since in ((self._waiting, math.inf),
                             (self._stalled, time.monotonic() - STALLED_GRACE)):
            oldest = next(iter(conns), None)  # oldest first: marked in time order
            if oldest is not None and conns[oldest] <= since:
                del conns[oldest]
                return oldest
        return None

    def stalled(self, conn: socket.socket, waits: bool) -> None:
        """Mark a connection as waiting on its client mid-request (closable at the limit,
        once STALLED_GRACE has passed), or no longer."""
        with self._lock:
            self._stalled.pop(conn, None)  # and back in at the end: oldest first
            if waits:
                self._stalled[conn] = time.monotonic()

    def waiting(self, conn: socket.socket, waits: bool) -> None:
        """Mark a connection as waiting for its next request (closable at the limit)."""
        with self._lock:
            if waits:
                self._waiting[conn] = time.monotonic()
            else:
                self._waiting.pop(conn, None)

    def wait_idle(self, timeout: float) -> bool:
        """While draining: wait until every connection is closed; False on timeout."""
        # --graceful-timeout inf (or past what a lock can wait: OverflowError) waits for good.
        limit = timeout if timeout < threading.TIMEOUT_MAX else None
        with self._idle:
            return self._idle.wait_for(lambda: not self._connections, limit)

    def _refuse(self, request: socket.socket) -> None:
        # Before any request is read, so in no dialect's shape but TEI's, the server's own.
        body = json.dumps({"error": "too many open connections", "error_type": "Overloaded"})
        try:
            request.settimeout(1.0)
            request.sendall((f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                             f"application/json\r\nContent-Length: {len(body)}\r\n"
                             f"Retry-After: 1\r\nConnection: close\r\n\r\n{body}").encode())
        except OSError:
            pass
        self.shutdown_request(request)

    def http_date(self) -> str:
        # The Date header changes once a second: formatted once a second, not per response.
        now = int(time.time())
        stamp, text = self._date
        if stamp != now:
            text = formatdate(now, usegmt=True)
            self._date = (now, text)
        return text


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
