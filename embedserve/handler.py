"""One HTTP exchange after another on a connection: the request read within its deadline,
its framing decided once and strictly, then answered by the Dispatcher (dispatch.py: the
Host/Origin guards, the API key, the route's answer, errors as JSON in the route's dialect)
and written in one piece, never as an HTML page or a traceback.
"""

from __future__ import annotations

import io
import logging
import re
import select
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from embedserve import __version__
from embedserve.connections import DeadlineReader, send_within
from embedserve.dialects import Dialect
from embedserve.dispatch import SMALL_BODY_BYTES, json_body
from embedserve.errors import ApiError, quoted
from embedserve.httphead import (MAX_LINE, HeadError, HeaderList, check_request_line,
                                 read_header_lines)
from embedserve.routes import ROUTES
from embedserve.service import EmbeddingService

if TYPE_CHECKING:
    from embedserve.server import EmbedServer

log = logging.getLogger("embedserve.handler")
access_log = logging.getLogger("embedserve.access")

_READ_CHUNK = 1 << 16
_POLL = 0.25  # how often an idle connection notices that the server is draining
_DRAIN_LINGER = 0.5
_MAX_TRAILERS = 64
# Empty lines skipped before a request line (RFC 9112 2.2: a server SHOULD ignore at least
# one; a client may send a stray CRLF after a POST's body).
_MAX_LEADING_EMPTY_LINES = 8
# Chunks in one body: each costs a few Python calls, so 8 MB sent a byte a chunk would take
# a core for some 17 s. Clients send chunks of kilobytes.
_MAX_CHUNKS = 65536
# An unread body up to SMALL_BODY_BYTES is read away to keep the connection; a bigger one
# closes it, after a short lingering drain so that the close does not reset the connection
# before the client has read the answer (a client still sending gets an RST otherwise).
_LINGER_SECONDS = 2.0
# RFC 9112: Content-Length is 1*DIGIT, a chunk size 1*HEXDIG. int() would also take "+20",
# " 20 ", "2_0" or "-1" (a negative chunk size once read a body without end).
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]{1,15}")
_AUTHORITY = re.compile(r"[^/?#]*")


class Handler(BaseHTTPRequestHandler):
    """Also the `Exchange` (routing.py) that a route's answer gets."""

    protocol_version = "HTTP/1.1"
    server_version = f"embedserve/{__version__}"
    sys_version = ""
    # TCP_NODELAY: without it keep-alive responses stall ~40 ms (Nagle + delayed ACK).
    disable_nagle_algorithm = True
    server: EmbedServer
    # Read by read_header_lines, not by the stdlib's email parser (a Message).
    headers: HeaderList  # type: ignore[assignment]

    def setup(self) -> None:
        super().setup()
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader, _READ_CHUNK)
        self.linger = self.answering = self.dispatched = False
        self.started = time.monotonic()
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
        self.server.stalled(self.connection, True)  # until its head and body are in
        self.started = time.monotonic()
        self.dispatched = False  # from then on, the Dispatcher counts it in /metrics
        self.reader.deadline = self.started + config.request_timeout
        self.body_read = False
        self.body_length: int | None = 0  # None: chunked
        self.answering = False  # part of an answer may be on the wire: no other may follow
        self.awaits_continue = False  # "Expect: 100-continue", and no 100 sent yet
        # Nothing of the last request may shape the answer to this one (a HEAD's left the
        # body out of a 408 once), nor be missing if this one ends before its request line.
        self.command = self.requestline = self.path = ""
        self.announce_keep_alive = False
        try:
            self.raw_requestline = self._request_line()
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > MAX_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            check_request_line(self.raw_requestline)
            if not self.parse_request():
                return
            self._connection_options()
            self._take_absolute_form()
            self.dispatch()
        except HeadError as error:
            self.close_connection = self.linger = True
            self._try_send(ApiError(error.status, str(error)))
        except TimeoutError:
            self.close_connection = True
            if self.answering:  # the client did not take its answer in time: just close
                log.debug("answer to %s not taken in time", self.client_address[0])
                return
            log.debug("request from %s timed out", self.client_address[0])
            self._try_send(ApiError(408, "request not received within request_timeout "
                                         f"({config.request_timeout:g} s)"))
        except ConnectionError as exc:
            log.debug("connection from %s dropped: %r", self.client_address[0], exc)
            self.close_connection = True
        finally:
            self.reader.deadline = None
            self.server.stalled(self.connection, False)

    def parse_request(self) -> bool:
        """The stdlib's, for a request line that check_request_line has passed (so one
        digit either side of the version's dot), with the header lines read by
        read_header_lines instead of the stdlib's email parser."""
        self.command = None  # type: ignore[assignment]  # as the stdlib: no request yet
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3:  # a target split at a NEL or no-break space, as the stdlib splits it
            self.send_error(HTTPStatus.BAD_REQUEST,
                            f"Bad request syntax ({quoted(self.requestline)})")
            return False
        command, path, version = words
        if version >= "HTTP/2.0":
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                            f"Invalid HTTP version ({version[5:]})")
            return False
        self.close_connection = version < "HTTP/1.1"
        self.command, self.path, self.request_version = command, path, version
        if path.startswith("//"):  # the stdlib's guard against open redirects (gh-87389)
            self.path = "/" + path.lstrip("/")
        self.headers = read_header_lines(self.rfile)
        if self.headers.get("Expect", "").lower() == "100-continue" and version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def _request_line(self) -> bytes:
        """The request line (b"" when the connection ends first), past a few empty lines:
        a stray line end after a POST's body (some clients send one) is no request, and
        what follows it is waited for as on an idle connection."""
        for _ in range(_MAX_LEADING_EMPTY_LINES):
            line: bytes = self.rfile.readline(MAX_LINE + 1)
            if line not in (b"\r\n", b"\n"):
                return line
            self.server.stalled(self.connection, False)  # idle now: closable as such
            if not self._next_request_arrives():
                return b""
            self.reader.deadline = time.monotonic() + self.server.config.request_timeout
            self.server.stalled(self.connection, True)
        raise HeadError(400, "malformed request: empty lines where a request line was due")

    def _connection_options(self) -> None:
        """Whether the connection stays open after this request, from its Connection
        options (a comma-separated list, over one or more headers; the stdlib compares the
        whole value with "close" only): "close" closes it; an HTTP/1.0 request keeps it
        only with "keep-alive", and its answer then says so (an HTTP/1.0 client otherwise
        waits for the close)."""
        options = {option.strip(" \t").lower()
                   for value in self.headers.get_all("Connection") or ()
                   for option in value.split(",")}
        self.announce_keep_alive = False
        if "close" in options:
            self.close_connection = True
        elif self.request_version == "HTTP/1.0":
            self.close_connection = "keep-alive" not in options
            self.announce_keep_alive = not self.close_connection

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
        self.dispatched = True
        # Routes, guards, auth, errors and metrics: the Dispatcher's, as for every
        # transport. This handler adds HTTP/1.1 itself: framing, the body, the connection.
        answer = self.server.dispatcher.answer(self, draining=self.draining)
        if answer.close:
            self.close_connection = True
        if answer.silent:
            return
        self._skip_unread_body()
        self.send_body(answer.status, answer.body, answer.content_type, answer.headers)

    def handle_expect_100(self) -> bool:
        # The stdlib sends "100 Continue" as soon as the head is parsed. It is sent when the
        # body is first read instead (read_body): a request refused before that (401, 403,
        # 404, 413, 415, a 429 of a full server...) is answered before the client sends a
        # body it may not need to.
        self.awaits_continue = True
        return True

    def _take_absolute_form(self) -> None:
        """RFC 9112 3.2.2: a server takes `GET http://host/path` (what a client sends to a
        proxy) as `GET /path` with that Host, whatever Host header came with it."""
        scheme, _, rest = self.path.partition("://")
        if not rest or scheme.lower() not in ("http", "https"):
            return
        # The authority ends at the path, the query or the fragment (RFC 3986 3.2).
        end = _AUTHORITY.match(rest).end()  # type: ignore[union-attr]  # matches ""
        authority, path = rest[:end], rest[end:]
        if not authority or "@" in authority:
            raise HeadError(400, "malformed request: an absolute target without a host")
        self.path = path if path.startswith("/") else "/" + path
        self.headers.replace("Host", authority)

    def check_transport(self) -> None:
        self._check_framing()
        if self.body_length == 0:  # all of the request is in (else: once its body is)
            self.server.stalled(self.connection, False)
        hosts = self.headers.get_all("Host") or ()
        if len(hosts) > 1:
            raise self._bad_framing("more than one Host header")  # RFC 9112 3.2
        if not hosts and self.request_version == "HTTP/1.1":  # likewise; HTTP/1.0 has none
            raise self._bad_framing("an HTTP/1.1 request without a Host header")

    def _check_framing(self) -> None:
        """How long the body is, decided once and strictly (RFC 9112 §6): a request whose
        length two parties could read differently is refused and its connection closed,
        so no body is ever parsed as the next request (request smuggling)."""
        lengths = self.headers.get_all("Content-Length") or []
        encodings = self.headers.get_all("Transfer-Encoding") or []
        if encodings:
            self.body_length = None
            if self.request_version == "HTTP/1.0":  # RFC 9112 6.1: faulty framing
                raise self._bad_framing("Transfer-Encoding in an HTTP/1.0 request")
            if lengths:
                raise self._bad_framing("both Transfer-Encoding and Content-Length")
            # Values come without their spaces and tabs: any other blank (U+00A0, U+0085...)
            # makes it a coding a proxy may read otherwise.
            if len(encodings) > 1 or encodings[0].lower() != "chunked":
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
        if size is None or size > SMALL_BODY_BYTES or (size and self.awaits_continue):
            # (A client still waiting for "100 Continue" may never send its body: reading
            # it away could wait for nothing.)
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

    def read_body(self) -> bytes:
        """The whole body (dispatch.Incoming); once."""
        self.body_read = True  # from here on, whatever happens, don't try to skip it again
        limit = self.server.config.max_body_bytes
        if self.body_length is not None:
            if not self.headers.get("Content-Length"):
                self.close_connection = True
                raise ApiError(411, "a Content-Length header is required")
            if self.body_length > limit:
                # The body stays unread: this connection cannot be reused.
                self.close_connection = self.linger = True
                raise ApiError(413, f"request body is {self.body_length} bytes; the limit is "
                                    f"{limit}")
        if self.awaits_continue:  # the client waits for this before sending the body
            self.awaits_continue = False
            send_within(self.connection, self.write_timeout, b"HTTP/1.1 100 Continue\r\n\r\n")
        body = (self._read_chunked(limit) if self.body_length is None else
                self._read_exactly(self.body_length))
        self.server.stalled(self.connection, False)
        return body

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
        read = 0  # with chunk extensions and trailers: ignored, but read (64 KiB a chunk)
        for _ in range(_MAX_CHUNKS + 1):
            line = self._read_line()
            size_text, _, extension = line.partition(b";")
            if not _HEX_DIGITS.fullmatch(size_text):
                raise self._bad_framing("invalid chunk size "
                                        f"{quoted(size_text[:20].decode('latin-1'))}")
            size = int(size_text, 16)
            read += len(extension) + size
            self._check_body_limit(read, limit)
            if size == 0:
                for _ in range(_MAX_TRAILERS):
                    trailer = self._read_line()
                    if not trailer:
                        return bytes(body)
                    read += len(trailer)
                    self._check_body_limit(read, limit)
                raise self._bad_framing("too many trailer fields")
            body += self._read_exactly(size)
            if self._read_line():
                raise self._bad_framing("chunk data longer than its size")
        raise self._bad_framing(f"a body of more than {_MAX_CHUNKS} chunks")

    def _check_body_limit(self, read: int, limit: int) -> None:
        if read > limit:
            self.close_connection = self.linger = True
            raise ApiError(413, f"request body is over the limit of {limit} bytes")

    def _read_line(self) -> bytes:
        """One CRLF-terminated line of chunked framing, without its CRLF."""
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            raise ConnectionError("client closed the connection mid-body")
        if not line.endswith(b"\r\n") or len(line) > MAX_LINE:
            raise self._bad_framing("chunked body lines must end in CRLF")
        return line[:-2]

    # -- writing ---------------------------------------------------------------------------
    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None
                  ) -> None:
        """`payload` is an object to serialise, or bytes that already are JSON."""
        self.send_body(status, json_body(payload), "application/json", headers)

    def send_body(self, status: int, body: bytes, content_type: str,
                  headers: dict[str, str] | None = None) -> None:
        if self.server.draining:
            self.close_connection = True
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                 f"Server: {self.server_version}",
                 f"Date: {self.server.http_date()}"]
        if status != 204:  # RFC 9110: a 204 carries neither
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        if headers:
            lines.extend(f"{name}: {value}" for name, value in headers.items())
        if self.close_connection:
            lines.append("Connection: close")
        elif self.announce_keep_alive:
            lines.append("Connection: keep-alive")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.answering = True
        # One write: headers and body leave in the same segment. A reader that takes its
        # time gets request_timeout for the whole response too.
        self.server.stalled(self.connection, True)  # until the client has taken it
        try:
            send_within(self.connection, self.write_timeout, head,
                        body if self.command != "HEAD" else b"")
        finally:
            self.server.stalled(self.connection, False)
        if self.server.config.access_log:
            access_log.info('%s "%s" %d %d', self.client_address[0], self.requestline,
                            status, len(body))

    def _try_send(self, error: ApiError) -> None:
        self._count_refused(error.status)
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
        self._count_refused(error.status)
        self.send_json(error.status, self._dialect_of_request().error_body(error))

    def _count_refused(self, status: int) -> None:
        """A request answered before the Dispatcher saw it (its head malformed, too long or
        too slow) is counted too, under the labels of a path and method nobody named."""
        if not self.dispatched:
            self.service.metrics.observe_request("(unknown)", "other", status,
                                                 time.monotonic() - self.started)

    def _dialect_of_request(self) -> Dialect:
        # Also before dispatch (a timeout, a malformed request): from whatever path was read.
        return ROUTES.dialect_for(getattr(self, "path", ""))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.client_address[0], *args)

