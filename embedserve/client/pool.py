"""Several servers behind one client: `Client(url=[...])` or EMBEDSERVE_URL="URL,URL".

The servers are taken to serve alike (replicas of one deployment: the same models). Each
request goes to the server with the fewest of this client's requests in flight that is
not backing off (ties: the one picked least recently, so a single thread's calls take
turns). A server that fails a request -- no connection, a timeout, a retryable status
(408, 429, 502, 503, 504, a proxy's 500) -- backs off: it is skipped for a while that
doubles with each failure in a row (`backoff` up to `max_backoff`, with jitter, or its
Retry-After), and the request goes at once to another server. A server whose back-off
has passed gets requests again; one that answers is healthy again. Only when every
server is backing off does the request wait, by the same retry policy and within the same
`retry_timeout` as with one server. So losing one replica loses no call, and a replica
that comes back is used again within `max_backoff`.

Nothing is started here: several servers are someone else's to run (autostart is off),
and a server that goes away is waited for, never restarted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from embedserve.client.errors import EmbedServeError
from embedserve.client.finder import DownMemory
from embedserve.client.options import Options
from embedserve.client.process import ServerProcess
from embedserve.client.transport import RetryPolicy, Target

log = logging.getLogger("embedserve.client")



@dataclass(eq=False)
class Member:
    target: Target
    in_flight: int = 0
    failures: int = 0  # in a row; 0: healthy
    back_until: float = 0.0  # skipped until then (time.monotonic())
    last_pick: int = 0


class ServerPool(DownMemory):
    """The servers one client spreads its requests over; thread-safe. Answers what
    Client asks of its finder (finder.ServerFinder for one server)."""

    def __init__(self, options: Options, retry: RetryPolicy) -> None:
        self._retry = retry
        self._members = [Member(Target(e.scheme, e.host, e.port, e.base_path, i + 1))
                         for i, e in enumerate(options.pool)]
        self._lock = threading.Lock()
        self._picks = 0
        self.target: Target | None = None  # the last one picked
        self.closed = False
        self._forget_failure()

    @property
    def size(self) -> int:
        return len(self._members)

    @property
    def url(self) -> str:
        return ",".join(member.target.url for member in self._members)

    def configured_target(self) -> Target:
        return self._members[0].target

    def health_targets(self) -> list[Target]:
        """Where Client.health looks: every server, the one picked last first."""
        targets = [member.target for member in self._members]
        return sorted(targets, key=lambda target: target is not self.target)

    def check_open(self) -> None:
        if self.closed:
            raise EmbedServeError("this Client is closed")

    def current(self) -> Target:
        """The server for the next request: fewest in flight among those not backing off;
        with all backing off, the one whose back-off ends first."""
        self.check_open()
        now = time.monotonic()
        with self._lock:
            ready = [m for m in self._members if m.back_until <= now]
            member = (min(ready, key=lambda m: (m.in_flight, m.last_pick)) if ready
                      else min(self._members, key=lambda m: m.back_until))
            self.target = member.target
            return member.target

    @contextmanager
    def sending(self, target: Target) -> Iterator[None]:
        member = self._member(target)
        with self._lock:
            member.in_flight += 1
            # Turns are counted by requests sent, not by looks (current() may only look).
            self._picks += 1
            member.last_pick = self._picks
        try:
            yield
        finally:
            with self._lock:
                member.in_flight -= 1

    def served(self, target: Target) -> None:
        """`target` answered: healthy again."""
        member = self._member(target)
        if member.failures:
            with self._lock:
                member.failures, member.back_until = 0, 0.0
            log.info("the server at %s answers again", target.url)

    def skip(self, target: Target, failure: str, retry_after: float | None) -> bool:
        """`target` failed a request: it backs off. Whether another server can take the
        request now (else the caller waits, as for one server)."""
        member = self._member(target)
        now = time.monotonic()
        with self._lock:
            member.failures += 1
            wait = self._retry.delay(member.failures, retry_after)
            member.back_until = max(member.back_until, now + wait)
            others = any(m.back_until <= now for m in self._members if m is not member)
        if member.failures == 1:
            log.warning("the server at %s failed (%s); skipping it for %.2fs", target.url,
                        failure, wait)
        return others

    @staticmethod
    def gone(target: Target, exc: BaseException) -> bool:
        return False  # nothing to restart or re-find: skip() moves on

    def lose(self, target: Target, failure: str) -> None:
        pass

    @staticmethod
    def shares_info(cached: Target, target: Target) -> bool:
        """Replicas serve alike: one /info describes every server of the pool."""
        return True

    def close(self) -> tuple[bool, ServerProcess | None]:
        with self._lock:
            if self.closed:
                return False, None
            self.closed = True
        return True, None

    def stop(self, server: ServerProcess) -> None:
        raise AssertionError("a pool starts no server")  # close() never hands one back

    def _member(self, target: Target) -> Member:
        return next(m for m in self._members if m.target is target)
