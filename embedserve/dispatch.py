"""One request in, one answer out, whatever carried it: the route found, the Host/Origin
guards and the API key checked, the route's answer run, every error turned into JSON in the
route's dialect, and the request counted in /metrics. The socket server (handler.py) and
other hosts (Ray Serve, embedserve/ray.py) both answer through `Dispatcher.answer`, so every
route, dialect, auth rule and error behaves the same whichever carries the request.

A transport hands over an `Incoming`: the request line and headers, and the body to read
on demand (so a 401, a 404 or a 413 is answered before the body is read), plus its own
checks of framing. `handle()` is the same for a transport that already holds the whole body.

A request's work takes a slot (service.admit) once its body is in: a client sending its
body slowly, or not at all, holds no slot the others need. A server with no slot free
answers 429 before reading a body; one that fills up while a body arrives answers it once
the body is in. A body over SMALL_BODY_BYTES (or chunked, of unknown size) first takes one
of as many places for large bodies, held until it is answered: a flood of them is refused
before it is buffered, and memory stays bounded by the places, not by the connections.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from embedserve.dialects import Dialect
from embedserve.errors import ApiError, ClientGone, quoted
from embedserve.guards import Guards, is_json_media_type
from embedserve.httphead import HeaderList
from embedserve.routes import ROUTES
from embedserve.routing import Reply, Route
from embedserve.service import EmbeddingService

log = logging.getLogger("embedserve.dispatch")

# The status counted for a request whose client hung up before its answer (nginx's).
CLIENT_GONE = 499
# Methods worth their own metrics label; any other is counted as "other" (labels must not
# grow with what clients invent).
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A body up to this size is read before its request takes a slot: max_connections of them
# stalled halfway hold 32 MiB at the default limits, and only connections, which the
# connection limit closes (the longest stalled first) when it needs their places. (Also
# what a transport reads away of a body it did not use, to keep the connection.)
SMALL_BODY_BYTES = 64 * 1024


class Headers(Protocol):
    """What is read of the request's headers (httphead.HeaderList is one)."""

    def get(self, name: str, default: Any = None) -> Any: ...

    def get_all(self, name: str, failobj: Any = None) -> Any: ...


class Incoming(Protocol):
    """A request as its transport holds it."""

    @property
    def command(self) -> str:
        """The method: GET, POST..."""
        ...

    @property
    def path(self) -> str:
        """The request target: path and query."""
        ...

    @property
    def headers(self) -> Headers: ...

    @property
    def started(self) -> float:
        """time.monotonic() when the request began to arrive."""
        ...

    @property
    def body_length(self) -> int | None:
        """The body's size as announced (Content-Length); None: known once read (chunked)."""
        ...

    def check_transport(self) -> None:
        """The transport's own checks (framing), first; raises ApiError."""
        ...

    def read_body(self) -> bytes:
        """The whole body, read once (raises ApiError over the limit)."""
        ...

    def client_gone(self) -> bool: ...


@dataclass
class Outgoing:
    """The answer to send: `close` asks the transport to close the connection after it;
    `silent` (a client that hung up) means there is nobody to send it to."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False
    silent: bool = False


class _Exchange:
    """routing.Exchange for one request: what a route's answer may use of it."""

    def __init__(self, incoming: Incoming, service: EmbeddingService, dialect: Dialect,
                 draining: bool, large_bodies: threading.Semaphore) -> None:
        self._incoming = incoming
        self.service = service
        self.dialect = dialect
        self.draining = draining
        self.started = incoming.started
        self._large_bodies = large_bodies
        self._body: bytes | None = None

    @contextmanager
    def admit(self) -> Iterator[None]:
        """The request's JSON body received, then a slot for its work (see the module's
        docstring for the order)."""
        service = self.service
        service.check_room()  # a full server says so before the body is sent (100-continue)
        self._check_content_type()
        length = self._incoming.body_length
        if length is not None and length <= SMALL_BODY_BYTES:
            self._body = self._incoming.read_body()
            with service.admit(), service.in_flight():
                yield
            return
        if not self._large_bodies.acquire(blocking=False):
            raise ApiError(429, "server is receiving its limit of "
                                f"{service.config.max_concurrent_requests} large request "
                                "bodies; retry shortly", headers={"Retry-After": "1"})
        try:
            with service.in_flight():  # an upload under way is work a scaler should see
                self._body = self._incoming.read_body()
                with service.admit():
                    yield
        finally:
            self._large_bodies.release()

    def _check_content_type(self) -> None:
        headers = self._incoming.headers
        codings = [coding.strip(" \t").lower()
                   for value in headers.get_all("Content-Encoding") or ()
                   for coding in value.split(",")]
        if any(coding not in ("", "identity") for coding in codings):
            # RFC 9110 15.5.16 (read as it comes, a gzip body was "not valid UTF-8").
            raise ApiError(415, "request bodies are taken without a Content-Encoding (got "
                                f"{quoted(', '.join(codings))}); send the JSON as it is",
                           headers={"Accept-Encoding": "identity"})
        if len(headers.get_all("Content-Type") or ()) > 1:  # a proxy may have read another
            raise ApiError(400, "malformed request: more than one Content-Type header")
        if not is_json_media_type(headers.get("Content-Type")):
            # Also what a web page cannot send cross-site without asking first (a CORS
            # preflight): text/plain and form posts are refused before they are read.
            got = headers.get("Content-Type")
            raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'"
                                + (f" (got {quoted(got)})" if got else ""))

    def read_json(self) -> Any:
        body = self._body
        if body is None:  # a route that takes no slot takes a small body only
            self._check_content_type()
            length = self._incoming.body_length
            if length is None or length > SMALL_BODY_BYTES:
                raise ApiError(413, f"this route takes a body of at most {SMALL_BODY_BYTES} "
                                    "bytes, with a Content-Length")
            body = self._body = self._incoming.read_body()
        try:
            # A byte order mark is ignored, as RFC 8259 allows (Windows tools send one).
            text = body.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
        try:
            return json.loads(text, parse_constant=_reject_constant,
                              object_pairs_hook=_unique_keys)
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply") from None
        except (json.JSONDecodeError, _NotJson) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        except ValueError:  # json's only other: an integer past Python's digit limit, whose
            # message advises sys.set_int_max_str_digits (this server's business, not a client's)
            raise ApiError(400, "request body is not valid JSON here: a number has more than "
                                f"{sys.get_int_max_str_digits()} digits") from None

    def client_gone(self) -> bool:
        return self._incoming.client_gone()


class Dispatcher:
    """Answers requests for one service: routes, guards, auth, errors and metrics."""

    def __init__(self, service: EmbeddingService, guards: Guards | None = None) -> None:
        self.service = service
        self.config = service.config
        self.guards = guards if guards is not None else Guards.from_config(service.config)
        self._large_bodies = threading.Semaphore(service.config.max_concurrent_requests)

    def answer(self, incoming: Incoming, *, draining: bool = False) -> Outgoing:
        """The answer to one request. A transport's TimeoutError or ConnectionError (the
        body could not be read) goes through: its connection is unusable."""
        path = incoming.path.split("?", 1)[0]
        route = ROUTES.get(path)
        dialect = ROUTES.dialect_for(path)
        method_name = incoming.command
        # Metrics labels: known routes only, so clients cannot grow the label set.
        route_label = path if route is not None else "(unknown)"
        status = 500
        cors: dict[str, str] = {}
        try:
            try:
                incoming.check_transport()
                cors = self._check_browser(incoming.headers)
                if path == "*" and method_name == "OPTIONS":
                    # The asterisk form asks about the server as a whole (RFC 9110, 9.3.7).
                    reply = Reply(b"", "text/plain", {"Allow": ROUTES.all_methods}, status=204)
                elif route is None:
                    raise ApiError(404, f"no route {quoted(_readable(path))}; see GET /info "
                                        "for the API")
                elif method_name == "OPTIONS":
                    reply = self._options(route, incoming.headers)
                    if reply.status == 204 and incoming.headers.get(
                            "Access-Control-Request-Method"):
                        cors = {}  # a preflight's answer carries its own CORS headers
                else:
                    method = route.methods.get(method_name)
                    if method is None:
                        raise ApiError(405, f"{quoted(method_name)} is not allowed on {path}",
                                       headers={"Allow": route.allowed})
                    try:
                        self._authorize(route, incoming.headers)
                    except ApiError:
                        route_label = "(unauthenticated)"  # nothing of the request is kept
                        raise
                    reply = method.answer(_Exchange(incoming, self.service, dialect, draining,
                                                    self._large_bodies))
            except (TimeoutError, ConnectionError) as lost:
                # The connection is unusable: the transport closes it, after a 408 for a
                # request not received in time. Counted as what the client got (a 500 once,
                # which made slow clients look like server faults).
                status = 408 if isinstance(lost, TimeoutError) else CLIENT_GONE
                raise
            except ClientGone as gone:
                # Nobody to answer; counted apart (nginx's 499) so a dashboard can tell it
                # from a served request.
                status = CLIENT_GONE
                log.debug("%s %s: %s", method_name, path, gone)
                return Outgoing(status, b"", close=True, silent=True)
            except ApiError as error:
                status = error.status
                if status >= 500 and status != 503:
                    log.error("%s %s: %s", method_name, path, error.message)
                else:  # a client's mistake, or an expected state (loading, draining, busy)
                    log.debug("%s %s: %d %s", method_name, path, status, error.message)
                return Outgoing(status, json_body(dialect.error_body(error)),
                                headers={**(error.headers or {}), **cors})
            except RecursionError:
                # Deeply nested JSON, from the C parser or anything walking its result.
                status = 400
                log.debug("%s %s: input nested too deeply", method_name, path)
                return Outgoing(400, json_body(dialect.error_body(ApiError(
                    400, "request body is nested too deeply"))), headers=cors, close=True)
            except Exception:
                log.exception("unhandled error in %s %s", method_name, path)
                failure = ApiError(500, "internal server error (details in the server log)")
                return Outgoing(500, json_body(dialect.error_body(failure)), headers=cors,
                                close=True)
            status = reply.status
            body = (json_body(reply.body) if reply.content_type == "application/json"
                    else reply.body)
            return Outgoing(status, body, reply.content_type, {**(reply.headers or {}), **cors})
        finally:
            method_label = method_name if method_name in _KNOWN_METHODS else "other"
            self.service.metrics.observe_request(
                route_label, method_label, status, time.monotonic() - incoming.started)

    def _check_browser(self, headers: Headers) -> dict[str, str]:
        """Host (DNS rebinding) and Origin (other web pages) checks; see guards.py. The
        CORS headers an allowed Origin gets."""
        guards = self.guards
        for name in ("Host", "Origin"):
            if len(headers.get_all(name) or ()) > 1:  # which would the guard have read?
                raise ApiError(400, f"malformed request: more than one {name} header")
        host = headers.get("Host")
        if not guards.host_allowed(host):
            raise ApiError(403, f"Host {quoted(host)} is not one of this server's names; start it "
                                "with --allowed-hosts to accept it")
        origin = headers.get("Origin")
        if origin is None:
            return {}
        if not guards.origin_allowed(origin, host):
            raise ApiError(403, f"cross-origin requests from {quoted(origin)} are not allowed; "
                                "start the server with --cors-origins to allow them")
        return guards.cors_headers(origin)

    def _options(self, route: Route, headers: Headers) -> Reply:
        """A CORS preflight (an allowed Origin was checked already), or a plain OPTIONS.
        Never behind the API key: a browser's preflight carries no credentials."""
        allowed = ", ".join(sorted({*route.methods, "OPTIONS"}))
        origin = headers.get("Origin")
        if origin is not None and headers.get("Access-Control-Request-Method"):
            return Reply(b"", "text/plain", self.guards.preflight_headers(origin, allowed),
                         status=204)
        return Reply(b"", "text/plain", {"Allow": allowed}, status=204)

    def _authorize(self, route: Route, headers: Headers) -> None:
        key = self.config.api_key
        if not key or route.open:
            return
        credentials = headers.get_all("Authorization") or [""]
        if len(credentials) > 1:  # which one counts is for no one to guess (a proxy's?)
            raise ApiError(400, "more than one Authorization header")
        scheme, _, token = credentials[0].partition(" ")
        # A header's bytes are read as Latin-1: back to those bytes, a key sent as UTF-8
        # (what curl and browsers send) matches a non-ASCII --api-key.
        sent = token.strip(" \t").encode("latin-1", "replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def handle(self, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes,
               *, client_gone: Callable[[], bool] | None = None,
               started: float | None = None) -> Outgoing:
        """answer() for a request whose body is already read in full (a transport that
        framed it: Ray Serve's proxy)."""
        return self.answer(Buffered(method, path, HeaderList(headers), body,
                                    time.monotonic() if started is None else started,
                                    client_gone, self.config.max_body_bytes))


@dataclass
class Buffered:
    """An Incoming whose body arrived whole."""

    command: str
    path: str
    headers: HeaderList
    body: bytes
    started: float
    gone: Callable[[], bool] | None = None
    max_body_bytes: int = 0

    @property
    def body_length(self) -> int:
        return len(self.body)

    def check_transport(self) -> None:
        pass

    def read_body(self) -> bytes:
        if self.max_body_bytes and len(self.body) > self.max_body_bytes:
            raise ApiError(413, f"request body is {len(self.body)} bytes; the limit is "
                                f"{self.max_body_bytes}")
        return self.body

    def client_gone(self) -> bool:
        return self.gone() if self.gone is not None else False


def _readable(path: str) -> str:
    """A request target as its client wrote it: HTTP/1.1's bytes arrive read as Latin-1,
    and a client sending raw non-ASCII writes UTF-8."""
    try:
        return path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return path


def json_body(payload: Any) -> bytes:
    """`payload` is an object to serialise, or bytes that already are JSON."""
    return payload if isinstance(payload, bytes) else json.dumps(
        payload, separators=(",", ":")).encode()


class _NotJson(ValueError):
    """What json reads but a request may not hold: NaN, Infinity, -Infinity (JSON has none)
    and keys given twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A key given twice is read as its last value here and as its first by some parsers (a
    # proxy's or a firewall's that checked the request): refused, as TEI refuses it.
    result = dict(pairs)
    if len(result) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _NotJson(f"the key {quoted(key)} appears more than once in an object")
            seen.add(key)
    return result


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not valid JSON")
