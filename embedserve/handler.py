"""One HTTP exchange after another on a connection: the request read within its deadline,
its framing decided once and strictly, the Host/Origin guards and the API key checked, then
the route's answer (routes.py) run and written in one piece. Errors come back as JSON in
the route's dialect, never as an HTML page or a traceback.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import re
import select
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from embedserve import __version__
from embedserve.connections import ConnectionServer, DeadlineReader, send_within
from embedserve.dialects import Dialect
from embedserve.errors import ApiError, ClientGone, quoted
from embedserve.guards import is_json_media_type
from embedserve.routes import ROUTES
from embedserve.routing import Reply, Route
from embedserve.service import EmbeddingService

log = logging.getLogger("embedserve.handler")
access_log = logging.getLogger("embedserve.access")

_MAX_LINE = 65536
_READ_CHUNK = 1 << 16
_POLL = 0.25  # how often an idle connection notices that the server is draining
_DRAIN_LINGER = 0.5
_MAX_TRAILERS = 64
# The status counted for a request whose client hung up before its answer (nginx's).
CLIENT_GONE = 499
# An unread body up to this size is read away to keep the connection; a bigger one closes
# it, after a short lingering drain so that the close does not reset the connection before
# the client has read the answer (a client still sending gets an RST otherwise).
_SKIP_BODY_BYTES = 64 * 1024
_LINGER_SECONDS = 2.0
# RFC 9112: Content-Length is 1*DIGIT, a chunk size 1*HEXDIG. int() would also take "+20",
# " 20 ", "2_0" or "-1" (a negative chunk size once read a body without end).
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]{1,15}")
# Methods worth their own metrics label; any other is counted as "other" (labels must not
# grow with what clients invent).
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Handler(BaseHTTPRequestHandler):
    """Also the `Exchange` (routing.py) that a route's answer gets."""

    protocol_version = "HTTP/1.1"
    server_version = f"embedserve/{__version__}"
    sys_version = ""
    # TCP_NODELAY: without it keep-alive responses stall ~40 ms (Nagle + delayed ACK).
    disable_nagle_algorithm = True
    server: ConnectionServer

    def setup(self) -> None:
        super().setup()
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader, _READ_CHUNK)
        self.linger = False
        self.write_timeout = self.server.config.request_timeout

    @property
    def service(self) -> EmbeddingService:
        return self.server.service

    @property
    def draining(self) -> bool:
        return self.server.draining

    def finish(self) -> None:
        super().finish()
        if self.linger:
            self._linger_close()

    def _linger_close(self) -> None:
        conn = self.connection
        try:
            conn.shutdown(socket.SHUT_WR)
            give_up = time.monotonic() + _LINGER_SECONDS
            drained = 0
            while drained <= self.server.config.max_body_bytes:
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    break
                conn.settimeout(remaining)
                data = conn.recv(_READ_CHUNK)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass

    def handle_one_request(self) -> None:
        # The stdlib version with two bounds: keep_alive_timeout while an idle connection
        # waits for its next request, and one deadline for receiving all of the request.
        config = self.server.config
        if not self._next_request_arrives():
            self.close_connection = True
            return
        self.started = time.monotonic()
        self.reader.deadline = self.started + config.request_timeout
        self.body_read = False
        self.body_length: int | None = 0  # None: chunked
        self.cors: dict[str, str] = {}
        self.dialect: Dialect = ROUTES.default_dialect  # the route's, once dispatch knows it
        try:
            self.raw_requestline = self.rfile.readline(_MAX_LINE + 1)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > _MAX_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.parse_request():
                return
            self.dispatch()
        except TimeoutError:
            log.debug("request from %s timed out", self.client_address[0])
            self.close_connection = True
            self._try_send(ApiError(408, "request not received within request_timeout "
                                         f"({config.request_timeout:g} s)"))
        except ConnectionError as exc:
            log.debug("connection from %s dropped: %r", self.client_address[0], exc)
            self.close_connection = True
        finally:
            self.reader.deadline = None

    def _next_request_arrives(self) -> bool:
        """Wait for the next request on this connection: up to keep_alive_timeout, or, once
        the server drains, a short linger. Closing an idle keep-alive connection the moment
        draining starts would reset a request the client has just sent; lingering lets
        such a request in, and it is then answered with `Connection: close`."""
        server, conn = self.server, self.connection
        self.reader.deadline = None
        try:
            # Already here: pipelined, or arrived with the last one.
            if self.rfile.peek(1):  # type: ignore[attr-defined]
                return True
        except (BlockingIOError, TimeoutError):
            pass
        except OSError:
            return False
        now = time.monotonic()
        give_up = now + server.config.keep_alive_timeout
        server.waiting(conn, True)
        try:
            while now < give_up:
                if server.draining:
                    give_up = min(give_up, now + _DRAIN_LINGER)
                readable, _, _ = select.select([conn], [], [], min(_POLL, give_up - now))
                if readable:
                    return True
                now = time.monotonic()
            return False
        finally:
            server.waiting(conn, False)

    def dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        route = ROUTES.get(path)
        self.dialect = dialect = ROUTES.dialect_for(path)
        # Metrics labels: known routes only, so clients cannot grow the label set.
        route_label = path if route is not None else "(unknown)"
        status = 500
        try:
            self._check_framing()
            self._check_browser(path)
            if route is None:
                raise ApiError(404, f"no route {quoted(path)}; see GET /info for the API")
            if self.command == "OPTIONS":
                reply = self._options(route)
            else:
                method = route.methods.get(self.command)
                if method is None:
                    raise ApiError(405, f"{quoted(self.command)} is not allowed on {path}",
                                   headers={"Allow": route.allowed})
                try:
                    self._authorize(route)
                except ApiError:
                    route_label = "(unauthenticated)"  # nothing of the request is kept
                    raise
                reply = method.answer(self)
        except (TimeoutError, ConnectionError):
            raise  # the connection is unusable: handle_one_request closes it
        except ClientGone as gone:
            # Nobody to answer; counted apart (nginx's 499) so a dashboard can tell it from
            # a served request.
            status = CLIENT_GONE
            self.close_connection = True
            log.debug("%s %s: %s", self.command, path, gone)
        except ApiError as error:
            status = error.status
            if status >= 500 and status != 503:
                log.error("%s %s: %s", self.command, path, error.message)
            else:  # a client's mistake, or an expected state (loading, draining, busy)
                log.debug("%s %s: %d %s", self.command, path, status, error.message)
            self._skip_unread_body()
            self.send_json(status, dialect.error_body(error), error.headers)
        except RecursionError:
            # Deeply nested JSON, from the C parser or anything walking its result.
            status = 400
            self.close_connection = True
            log.debug("%s %s: input nested too deeply", self.command, path)
            self.send_json(400, dialect.error_body(ApiError(
                400, "request body is nested too deeply")))
        except Exception:
            log.exception("unhandled error in %s %s", self.command, path)
            self.close_connection = True
            failure = ApiError(500, "internal server error (details in the server log)")
            self.send_json(500, dialect.error_body(failure))
        else:
            status = reply.status
            self._skip_unread_body()
            if reply.content_type == "application/json":
                self.send_json(status, reply.body, reply.headers)
            else:
                self.send_body(status, reply.body, reply.content_type, reply.headers)
        finally:
            method_label = self.command if self.command in _KNOWN_METHODS else "other"
            self.server.service.metrics.observe_request(
                route_label, method_label, status, time.monotonic() - self.started)

    def _check_framing(self) -> None:
        """How long the body is, decided once and strictly (RFC 9112 §6): a request whose
        length two parties could read differently is refused and its connection closed,
        so no body is ever parsed as the next request (request smuggling)."""
        lengths = self.headers.get_all("Content-Length") or []
        encodings = self.headers.get_all("Transfer-Encoding") or []
        if encodings:
            self.body_length = None
            if lengths:
                raise self._bad_framing("both Transfer-Encoding and Content-Length")
            if len(encodings) > 1 or encodings[0].strip().lower() != "chunked":
                raise self._bad_framing(f"unsupported Transfer-Encoding "
                                        f"{quoted(', '.join(encodings))}; only chunked is")
            return
        if not lengths:
            self.body_length = 0
            return
        values = {value.encode("latin-1", "replace") for value in lengths}
        if len(values) > 1:
            raise self._bad_framing("conflicting Content-Length headers")
        value = values.pop()
        if not _DIGITS.fullmatch(value):
            raise self._bad_framing(f"invalid Content-Length {quoted(value.decode('latin-1'))}")
        self.body_length = int(value)

    def _bad_framing(self, what: str) -> ApiError:
        self.close_connection = self.linger = True
        self.body_read = True  # unreadable: never skip it, the connection closes
        return ApiError(400, f"malformed request: {what}")

    def _check_browser(self, path: str) -> None:
        """Host (DNS rebinding) and Origin (other web pages) checks; see guards.py."""
        guards = self.server.guards
        if len(self.headers.get_all("Host") or ()) > 1:
            raise self._bad_framing("more than one Host header")  # RFC 9112 3.2
        host = self.headers.get("Host")
        if not guards.host_allowed(host):
            raise ApiError(403, f"Host {quoted(host)} is not one of this server's names; start it "
                                "with --allowed-hosts to accept it")
        origin = self.headers.get("Origin")
        if origin is None:
            return
        if not guards.origin_allowed(origin, host):
            raise ApiError(403, f"cross-origin requests from {quoted(origin)} are not allowed; "
                                "start the server with --cors-origins to allow them")
        self.cors = guards.cors_headers(origin)

    def _options(self, route: Route) -> Reply:
        """A CORS preflight (an allowed Origin was checked already), or a plain OPTIONS.
        Never behind the API key: a browser's preflight carries no credentials."""
        allowed = ", ".join(sorted({*route.methods, "OPTIONS"}))
        origin = self.headers.get("Origin")
        if origin is not None and self.headers.get("Access-Control-Request-Method"):
            self.cors = {}
            return Reply(b"", "text/plain", self.server.guards.preflight_headers(
                origin, allowed), status=204)
        return Reply(b"", "text/plain", {"Allow": allowed}, status=204)

    def _authorize(self, route: Route) -> None:
        key = self.server.config.api_key
        if not key or route.open:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    # -- reading ---------------------------------------------------------------------------
    def _skip_unread_body(self) -> None:
        """Before answering a request whose body was not read (a GET with a body, 404, 401,
        429...): the body is still in the stream, where it would be misread as the next
        request. A small one is read away (without keeping it); a bigger one, or one of
        unknown length, closes the connection after the answer, which is sent at once
        rather than after waiting for a body the server will not use."""
        if self.body_read:
            return
        self.body_read = True
        size = self.body_length
        if size is None or size > _SKIP_BODY_BYTES:
            self.close_connection = self.linger = True
            return
        try:
            while size:
                chunk = self.rfile.read1(min(size, _READ_CHUNK))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                size -= len(chunk)
        except (OSError, TimeoutError):
            self.close_connection = True

    def client_gone(self) -> bool:
        """True once the client has closed its end: the socket reads as ended (or fails).
        Bytes of a next, pipelined request mean it is still there."""
        conn = self.connection
        try:
            if not select.select([conn], [], [], 0)[0]:
                return False
            return conn.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False  # readable a moment ago, not now: still there
        except (OSError, ValueError):
            return True

    def read_json(self) -> Any:
        """The request body as JSON; the caller holds a slot from service.admit()."""
        if not is_json_media_type(self.headers.get("Content-Type")):
            # Also what a web page cannot send cross-site without asking first (a CORS
            # preflight): text/plain and form posts are refused before they are read.
            got = self.headers.get("Content-Type")
            raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'"
                                + (f" (got {quoted(got)})" if got else ""))
        body = self._read_body()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply") from None
        except (json.JSONDecodeError, ValueError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None

    def _read_body(self) -> bytes:
        self.body_read = True  # from here on, whatever happens, don't try to skip it again
        limit = self.server.config.max_body_bytes
        if self.body_length is None:
            return self._read_chunked(limit)
        if not self.headers.get("Content-Length"):
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required")
        if self.body_length > limit:
            # The body stays unread: this connection cannot be reused.
            self.close_connection = self.linger = True
            raise ApiError(413, f"request body is {self.body_length} bytes; the limit is "
                                f"{limit}")
        return self._read_exactly(self.body_length)

    def _read_exactly(self, size: int) -> bytes:
        parts: list[bytes] = []
        remaining = size
        while remaining:
            chunk = self.rfile.read1(min(remaining, _READ_CHUNK))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def _read_chunked(self, limit: int) -> bytes:
        # One growing buffer: a list of parts would cost an object per 1-byte chunk.
        body = bytearray()
        while True:
            line = self._read_line()
            size_text = line.split(b";", 1)[0]
            if not _HEX_DIGITS.fullmatch(size_text):
                raise self._bad_framing(f"invalid chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                for _ in range(_MAX_TRAILERS):
                    if not self._read_line():
                        return bytes(body)
                raise self._bad_framing("too many trailer fields")
            if len(body) + size > limit:
                self.close_connection = self.linger = True
                raise ApiError(413, f"request body is over the limit of {limit} bytes")
            body += self._read_exactly(size)
            if self._read_line():
                raise self._bad_framing("chunk data longer than its size")

    def _read_line(self) -> bytes:
        """One CRLF-terminated line of chunked framing, without its CRLF."""
        line = self.rfile.readline(_MAX_LINE + 1)
        if not line:
            raise ConnectionError("client closed the connection mid-body")
        if not line.endswith(b"\r\n") or len(line) > _MAX_LINE:
            raise self._bad_framing("chunked body lines must end in CRLF")
        return line[:-2]

    # -- writing ---------------------------------------------------------------------------
    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None
                  ) -> None:
        """`payload` is an object to serialise, or bytes that already are JSON."""
        body = payload if isinstance(payload, bytes) else json.dumps(
            payload, separators=(",", ":")).encode()
        self.send_body(status, body, "application/json", headers)

    def send_body(self, status: int, body: bytes, content_type: str,
                  headers: dict[str, str] | None = None) -> None:
        if self.server.draining:
            self.close_connection = True
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                 f"Server: {self.server_version}",
                 f"Date: {self.server.http_date()}"]
        if status != 204:  # RFC 9110: a 204 carries neither
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        for extra in (headers, getattr(self, "cors", None)):
            if extra:
                lines.extend(f"{name}: {value}" for name, value in extra.items())
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # One write: headers and body leave in the same segment. A reader that takes its
        # time gets request_timeout for the whole response too.
        send_within(self.connection, head + body if self.command != "HEAD" else head,
                    self.write_timeout)
        if self.server.config.access_log:
            access_log.info('%s "%s" %d %d', self.client_address[0], self.requestline,
                            status, len(body))

    def _try_send(self, error: ApiError) -> None:
        try:
            self.write_timeout = 1.0  # the connection closes after it
            self.send_json(error.status, self._dialect_of_request().error_body(error))
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # Called by the stdlib parser for malformed requests: answer JSON, never HTML.
        self.close_connection = True
        error = ApiError(int(code), message or HTTPStatus(code).phrase)
        self.send_json(error.status, self._dialect_of_request().error_body(error))

    def _dialect_of_request(self) -> Dialect:
        # Also before dispatch (a timeout, a malformed request): from whatever path was read.
        return ROUTES.dialect_for(getattr(self, "path", ""))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.client_address[0], *args)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
