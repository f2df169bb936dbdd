"""HTTP to the server: one keep-alive connection per thread, requests and their answers,
what an error answer means, the /health probe, and the one retry policy every retry loop
of the client follows.

A Client is thread-safe (share one): each thread keeps its own HTTPConnection, all of
them listed so that close() can close them. A kept-alive connection the server closed
while idle is resent once on a fresh connection before it counts as a failure. Error
answers are read in any of the server's dialects: ValidationError (400, 413, 422),
ModelNotFound (404 for the request's `model`) and AuthenticationError (401, 403) carry the
server's message, at once.

Riding out restarts: retry_timeout. A worker that crashed is replaced by its supervisor;
meanwhile requests in flight see their connection reset, and a replacement that loads a
model answers 503 "loading" (Retry-After: 1) for as long as the load takes (seconds to
minutes). So every request (one per chunk of a call, and GET /info) is retried on
connection errors, timeouts, 408, 429, 502, 503 and 504 -- one rule for all of them, as
each can mean "being restarted" behind a proxy -- with exponential backoff and jitter,
honouring Retry-After (embedding is idempotent, so resending is safe), until
`retry_timeout` (default 60 s) has passed since it was first sent. The backoff never sleeps
past that point and a retry waits for its answer no longer than that, so one request ends
within max(timeout, retry_timeout), plus start_timeout if it has to start a server. Only
then does the call fail (ServerUnavailable) or fall back. `retries` (default None) can cap
the number of retries as well.

One policy (RetryPolicy, and a Retries budget per loop) decides every wait: a request's
retries; the looks at a URL where nothing listens yet (a server someone else restarts, or
another client starts); and the /health probe while a server starts (its own quicker
backoff, bounded by start_timeout).
"""

from __future__ import annotations

import http.client
import io
import json
import math
import random
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from embedserve import __version__
from embedserve.client.errors import (
    AuthenticationError,
    EmbedServeError,
    ModelNotFound,
    ServerError,
    ValidationError,
)
from embedserve.client.options import url_of
from embedserve.client.process import ServerProcess

# The largest answer read (a runaway or hostile one fails instead of filling memory): a
# chunk of --max-batch-size 2048 float vectors of 4,096 values is about 170 MB as JSON.
MAX_ANSWER_BYTES = 256 * 1024 * 1024
RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})
VALIDATION_STATUSES = frozenset({400, 413, 422})
AUTH_STATUSES = frozenset({401, 403})
# A kept-alive connection the server closed while idle fails like this on reuse: resend
# once on a fresh connection before counting it as a failure.
STALE_CONNECTION_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                           http.client.RemoteDisconnected)
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
# The shortest wait for an answer a retry gets, even at its deadline (a socket timeout of 0
# would make it non-blocking).
MIN_WAIT = 0.05
# Read timeout of the /health probe: a server that accepts but does not answer within
# this is "not ready yet", not a reason to give up before the start deadline.
PROBE_TIMEOUT = 2.0
# The /health probe's backoff while a server starts: first wait, and its cap.
PROBE_BACKOFF = 0.02
PROBE_MAX_BACKOFF = 0.25


@dataclass(frozen=True, eq=False)
class Target:
    """One server generation: where it answers, and whether this client started it.
    Replaced (never mutated) when the server is restarted or re-found."""

    scheme: str
    host: str
    port: int
    base_path: str
    generation: int
    server: ServerProcess | None = None

    @property
    def url(self) -> str:
        return url_of(self.scheme, self.host, self.port, self.base_path)


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server's Retry-After asks for (a number or an HTTP date), if any. One
    that asks for no wait (0, negative, a date past) is no advice: the backoff decides, so
    that a server answering "Retry-After: 0" is not hammered without a pause."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    # NaN would pass every bound the caller puts on it, and so retry at once, forever.
    return seconds if seconds > 0 and not math.isnan(seconds) else None


def retryable(response: Response) -> bool:
    """Whether an answer is retried: RETRYABLE_STATUSES, and a 500 that is not embedserve's
    own JSON error, which comes from a proxy in front of the server (Ray Serve's answers a
    plain 500 for a request whose replica died: another replica serves it)."""
    if response.status in RETRYABLE_STATUSES:
        return True
    return response.status == 500 and not _is_embedserve_error(response.body)


def _is_embedserve_error(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and "error" in payload


def error_fields(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, code, param) from any of the server's dialects, or the raw text."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").strip()[:500] or "(empty body)", None, None, None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):  # OpenAI
        return (str(error.get("message", "")), error.get("type"), error.get("code"),
                error.get("param"))
    if isinstance(error, str):  # TEI, Ollama
        return error, payload.get("error_type"), None, None
    return json.dumps(payload)[:500], None, None, None


def http_error(response: Response, url: str, first: int = 0) -> ServerError:
    """The typed error of an answer that is not retried; `first`: the index of the first
    text of the request, when it was not the call's first."""
    message, kind, code, param = error_fields(response.body)
    if 300 <= response.status < 400:  # not followed: the answer would be another server's
        message = (f"redirects to {response.headers.get('location', '')[:200]!r}; embedserve "
                   "servers do not redirect: give the client the final URL")
    # A 404 about the request's `model` field: the server serves no model of that name
    # (any other 404 is a wrong URL, a plain ServerError).
    cls = (ModelNotFound if response.status == 404 and param == "model" else
           ValidationError if response.status in VALIDATION_STATUSES else
           AuthenticationError if response.status in AUTH_STATUSES else ServerError)
    error = cls(response.status, message, type=kind, code=code, param=param, url=url)
    if first:
        # The server's indexes ("input[3]") are within one chunk; say where it began.
        error.args = (f"{error.args[0]} (in the request for texts[{first}:])",)
    return error


@dataclass(eq=False)
class _Held:
    """A thread's connection to one server: for which target generation, and whether it
    served a request already (a reused one may have been closed by the server while idle)."""

    connection: _HTTPConnection
    target: Target
    used: bool = False


class Connections:
    """One keep-alive HTTPConnection per thread and server (several servers: one each);
    all of them listed so that close_all() reaches every thread's."""

    def __init__(self, *, timeout: float, connect_timeout: float, api_key: str | None) -> None:
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._api_key = api_key
        # A server that is starting is looked at often: it is ready in about a second.
        self._probe_retry = RetryPolicy(PROBE_BACKOFF, PROBE_MAX_BACKOFF)
        self._local = threading.local()
        self._connections: set[_HTTPConnection] = set()
        self._lock = threading.Lock()

    def send(self, target: Target, method: str, path: str, body: bytes | None,
             wait: float | None = None) -> Response:
        """One request on this thread's connection. `wait`: seconds to wait for the answer
        (default `timeout`); a new connection gets min(connect_timeout, wait) to connect."""
        wait = self._timeout if wait is None else wait
        headers = {"User-Agent": f"embedserve-client/{__version__}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(2):
            connection, reused = self._connection(target)
            try:
                if connection.sock is None:
                    # Connect fast or fail fast; then wait for the answer up to `wait`.
                    connection.timeout = min(self._connect_timeout, wait)
                    connection.connect()
                connection.sock.settimeout(wait)  # type: ignore[attr-defined]
                connection.request(method, target.base_path + path, body=body, headers=headers)
                # The whole answer within `wait`, however slowly it trickles in.
                connection.deadline = time.monotonic() + wait
                response = connection.getresponse()
                if (response.length or 0) > MAX_ANSWER_BYTES:  # said at once: not read
                    raise _TooLarge(f"the answer from {target.url}{path} is {response.length} "
                                    f"bytes, over {MAX_ANSWER_BYTES} bytes")
                data = response.read(MAX_ANSWER_BYTES + 1)
                if len(data) > MAX_ANSWER_BYTES:
                    raise _TooLarge(f"the answer from {target.url}{path} is over "
                                    f"{MAX_ANSWER_BYTES} bytes")
            except BaseException as exc:
                # Whatever happened (Ctrl-C included), the connection's state is unknown.
                self._drop(connection)
                if attempt == 0 and reused and isinstance(exc, STALE_CONNECTION_ERRORS):
                    continue
                raise
            if response.will_close:
                self._drop(connection)
            else:
                self._held()[_address(target)].used = True
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()},
                            data)
        raise AssertionError("unreachable")

    def close_all(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            connection.close()

    def _held(self) -> dict[tuple[str, str, int, str], _Held]:
        held: dict[tuple[str, str, int, str], _Held] | None = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = {}
        return held

    def _connection(self, target: Target) -> tuple[_HTTPConnection, bool]:
        held = self._held()
        entry = held.get(_address(target))
        if entry is not None and entry.target is target:
            return entry.connection, entry.used
        if entry is not None:  # the same address, another server generation
            self._drop(entry.connection)
        connection = _new_connection(target, self._connect_timeout)
        held[_address(target)] = _Held(connection, target)
        with self._lock:
            self._connections.add(connection)
        return connection, False

    def _drop(self, connection: _HTTPConnection) -> None:
        connection.close()
        with self._lock:
            self._connections.discard(connection)
        held = self._held()
        for address, entry in list(held.items()):
            if entry.connection is connection:
                del held[address]

    def probe(self, target: Target, deadline: float, patience: float
              ) -> tuple[str, int | None]:
        """GET /health at `target` until it answers 200 ('ok'), nothing listens ('refused')
        or the deadline passes (a description of what it saw), with the last HTTP status it
        answered (a server still loading: 503). Each look uses a connection of its own: it
        must not be a kept-alive one to a server that was there before."""
        looks = self._probe_retry.start(deadline=deadline)
        seen = "did not answer"
        status: int | None = None
        while True:
            wait: float | None = None
            connection = _new_connection(target, self._connect_timeout)
            try:
                connection.connect()
                patience_now = looks.answer_wait(min(self._timeout, PROBE_TIMEOUT))
                connection.sock.settimeout(patience_now)  # type: ignore[attr-defined]
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                connection.request("GET", target.base_path + "/health", headers=headers)
                connection.deadline = time.monotonic() + patience_now
                response = connection.getresponse()
                body = response.read(MAX_ANSWER_BYTES + 1)
                status = response.status
                if status == 200:
                    return "ok", status
                seen = f"answers {status} to GET /health: {error_fields(body)[0]}"
                if status not in RETRYABLE_STATUSES:
                    return seen, status  # something answers: not an embedserve server
                wait = retry_after({k.lower(): v for k, v in response.getheaders()})
            except ConnectionRefusedError:
                return "refused", None
            except (http.client.BadStatusLine, http.client.LineTooLong,
                    http.client.UnknownProtocol) as exc:
                if not isinstance(exc, http.client.RemoteDisconnected):
                    # Not HTTP at all (an SSH banner...): no embedserve server, at once.
                    return f"answers something that is not HTTP ({exc!r:.80})", None
                seen = f"did not answer GET /health ({type(exc).__name__}: {exc})"
            except TRANSPORT_ERRORS as exc:
                seen = f"did not answer GET /health ({type(exc).__name__}: {exc})"
            finally:
                connection.close()
            # A server that is starting (503 loading) or busy: wait for it, bounded.
            delay = looks.next_delay(wait)
            if delay is None:
                return f"{seen} within {patience:g}s", status
            time.sleep(delay)


def _address(target: Target) -> tuple[str, str, int, str]:
    return target.scheme, target.host, target.port, target.base_path


def _new_connection(target: Target, connect_timeout: float) -> _HTTPConnection:
    cls = _HTTPSConnection if target.scheme == "https" else _HTTPConnection
    return cls(target.host, target.port, timeout=connect_timeout)


class _TooLarge(EmbedServeError):
    """An answer over MAX_ANSWER_BYTES (not retried: it would come again)."""


class _HTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection whose answers are read by `deadline` (time.monotonic()): a socket
    timeout bounds each read only, so a server sending a byte now and then could hold a
    call forever."""

    deadline = math.inf

    # The stdlib makes each answer with self.response_class(sock, method=...): a method
    # here, so that the answer knows this connection's deadline.
    def response_class(self, sock: socket.socket, *args: Any,  # type: ignore[override]
                       **kwargs: Any) -> http.client.HTTPResponse:
        return _Response(sock, *args, deadline=self.deadline, **kwargs)


class _HTTPSConnection(_HTTPConnection, http.client.HTTPSConnection):
    pass


class _Response(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, deadline: float, **kwargs: Any
                 ) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()  # the stdlib's reader, made for the socket as it is
        self.fp = io.BufferedReader(_Until(sock, deadline))


class _Until(io.RawIOBase):
    """Reads a socket until `deadline`: TimeoutError after it. Through the socket's own
    reader, which keeps it open for the answer when the connection closes it (an answer
    that ends the connection is read after HTTPConnection.close())."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the answer did not arrive in time")
        if left != math.inf:
            self._sock.settimeout(left)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class RetryPolicy:
    """Exponential backoff with jitter, honouring Retry-After: how long to wait before a
    retry. Each retry loop takes a budget of its own from it (start())."""

    def __init__(self, backoff: float, max_backoff: float) -> None:
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._random = random.Random()

    def start(self, *, seconds: float | None = None, deadline: float | None = None,
              cap: int | None = None) -> Retries:
        """A budget that starts now and ends `seconds` from now (or at the monotonic
        `deadline`), after `cap` retries, or at whichever comes first; None: unbounded."""
        started = time.monotonic()
        if seconds is not None:
            deadline = started + seconds
        return Retries(self, started, deadline, cap)

    def delay(self, failures: int, retry_after: float | None) -> float:
        """The wait before retry number `failures` (1, 2, ...), or what the server asked
        for (Retry-After), capped at max_backoff either way."""
        if retry_after is not None:
            base = min(retry_after, self.max_backoff)
            return base + self._random.uniform(0, 0.1 * base)
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (failures - 1))
        # "Equal jitter": never zero (no hammering), spread (no thundering herd).
        return ceiling / 2 + self._random.uniform(0, ceiling / 2)


class Retries:
    """One retry loop's budget: a deadline, a cap on the number of retries, or both.

        retries = policy.start(seconds=retry_timeout, cap=max_retries)
        while True:
            ... try, with retries.answer_wait(timeout) for the answer ...
            delay = retries.next_delay(retry_after)
            if delay is None: give up, after retries.tries tries in retries.elapsed() s
            time.sleep(delay)
    """

    def __init__(self, policy: RetryPolicy, started: float, deadline: float | None,
                 cap: int | None) -> None:
        self._policy = policy
        self.started = started
        self.deadline = deadline
        self.cap = cap
        self.failures = 0  # retries granted so far

    @property
    def tries(self) -> int:
        return self.failures + 1

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def answer_wait(self, timeout: float) -> float:
        """How long the next try may wait for its answer: `timeout` the first time; a retry
        no later than the deadline (MIN_WAIT at least), so that the loop ends within
        max(timeout, its budget)."""
        if not self.failures or self.deadline is None:
            return timeout
        return min(timeout, max(self.deadline - time.monotonic(), MIN_WAIT))

    def next_delay(self, retry_after: float | None = None) -> float | None:
        """After a failed try: the seconds to sleep before the next one, or None when the
        budget is spent. Never sleeps past the deadline: a last try at the deadline beats
        giving up early."""
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            return None
        if self.cap is not None and self.failures >= self.cap:
            return None
        self.failures += 1
        delay = self._policy.delay(self.failures, retry_after)
        return delay if self.deadline is None else min(delay, self.deadline - now)
