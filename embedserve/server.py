"""HTTP on the standard library: a hardened ThreadingHTTPServer serving on a socket it is
handed (the supervisor binds; workers serve), and the handler that walks one request down
the path: limits -> auth -> JSON -> dialect -> service -> dialect -> bytes.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import json
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from embedserve import __version__
from embedserve.dialects import (OLLAMA, OLLAMA_LEGACY, OPENAI, TEI_DIALECT, Dialect,
                                 texts_from)
from embedserve.errors import ApiError, quoted
from embedserve.guards import Guards, is_json_media_type
from embedserve.service import EmbeddingService

log = logging.getLogger("embedserve.server")
access_log = logging.getLogger("embedserve.access")

_MAX_LINE = 65536
_READ_CHUNK = 1 << 16
_POLL = 0.25  # how often an idle connection notices that the server is draining
_DRAIN_LINGER = 0.5
_MAX_TRAILERS = 64
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
# /tokenize answers ~15x its input in JSON: its texts are bounded in characters.
MAX_TOKENIZE_CHARS = 256 * 1024


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
    line, headers and body. `deadline` None (between requests): don't wait at all."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def readinto(self, buffer: Any) -> int | None:
        if self.deadline is None:
            self._sock.settimeout(0)
            try:
                return self._sock.recv_into(buffer)
            except BlockingIOError:
                return None  # RawIOBase's "nothing yet"; peek() then gives b""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received within request_timeout")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class EmbedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, service: EmbeddingService) -> None:
        self.address_family = sock.family
        # bind_and_activate=False: no bind, no listen and, unlike HTTPServer.server_bind,
        # no reverse-DNS lookup (getfqdn) that can stall start-up.
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
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
        self._date: tuple[int, str] = (0, "")
        self.loop_tick = time.monotonic()

    def service_actions(self) -> None:
        # Called by serve_forever at least every poll interval: proof the accept loop lives.
        self.loop_tick = time.monotonic()

    # -- connection accounting -----------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self._connections >= self.config.max_connections
            idle = next(iter(self._waiting), None) if full else None
            if idle is not None:
                del self._waiting[idle]
            if not full or idle is not None:
                self._connections += 1
        if idle is not None:
            # Its thread wakes on the shutdown, reads EOF and closes; this one takes its
            # place (counted at once, so the limit is exceeded by at most the handovers).
            log.debug("at the connection limit: closing the longest idle connection")
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

    def waiting(self, conn: socket.socket, waits: bool) -> None:
        """Mark a connection as waiting for its next request (closable at the limit)."""
        with self._lock:
            if waits:
                self._waiting[conn] = time.monotonic()
            else:
                self._waiting.pop(conn, None)

    def wait_idle(self, timeout: float) -> bool:
        """While draining: wait until every connection is closed; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._connections, timeout)

    def _refuse(self, request: socket.socket) -> None:
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


def _dialect_for(path: str) -> Dialect:
    if path.startswith(("/v1/", "/embeddings")):
        return OPENAI
    return OLLAMA if path.startswith("/api/") else TEI_DIALECT


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"embedserve/{__version__}"
    sys_version = ""
    # TCP_NODELAY: without it keep-alive responses stall ~40 ms (Nagle + delayed ACK).
    disable_nagle_algorithm = True
    server: EmbedServer

    def setup(self) -> None:
        super().setup()
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader, _READ_CHUNK)
        self.linger = False

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
        dialect = _dialect_for(path)
        route_label = path if path in ROUTES else "(unknown)"
        status = 500
        try:
            self._check_framing()
            self._check_browser(path)
            methods = ROUTES.get(path)
            if methods is None:
                raise ApiError(404, f"no route {quoted(path)}; see GET /info for the API")
            if self.command == "OPTIONS":
                reply = self._options(methods)
            else:
                route = methods.get(self.command)
                if route is None:
                    raise ApiError(405, f"{quoted(self.command)} is not allowed on {path}",
                                   headers={"Allow": ", ".join(sorted(methods))})
                try:
                    self._authorize(path)
                except ApiError:
                    route_label = "(unauthenticated)"  # nothing of the request is kept
                    raise
                reply = route(self)
        except (TimeoutError, ConnectionError):
            raise  # the connection is unusable: handle_one_request closes it
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
            method = self.command if self.command in _KNOWN_METHODS else "other"
            self.server.service.metrics.observe_request(
                route_label, method, status, time.monotonic() - self.started)

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

    def _options(self, methods: dict[str, Any]) -> Reply:
        """A CORS preflight (an allowed Origin was checked already), or a plain OPTIONS."""
        allowed = ", ".join(sorted({*methods, "OPTIONS"}))
        origin = self.headers.get("Origin")
        if origin is not None and self.headers.get("Access-Control-Request-Method"):
            self.cors = {}
            return Reply(b"", "text/plain", self.server.guards.preflight_headers(
                origin, allowed), status=204)
        return Reply(b"", "text/plain", {"Allow": allowed}, status=204)

    def _authorize(self, path: str) -> None:
        key = self.server.config.api_key
        if not key or path in OPEN_PATHS:
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
        # A reader that takes its time gets request_timeout for the whole response too.
        self.connection.settimeout(self.server.config.request_timeout)
        # One write: headers and body leave in the same segment.
        self.wfile.write(head + body if self.command != "HEAD" else head)
        if self.server.config.access_log:
            access_log.info('%s "%s" %d %d', self.client_address[0], self.requestline,
                            status, len(body))

    def _try_send(self, error: ApiError) -> None:
        try:
            self.connection.settimeout(1.0)
            self.send_json(error.status, _dialect_for(getattr(self, "path", "")).error_body(error))
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # Called by the stdlib parser for malformed requests: answer JSON, never HTML.
        self.close_connection = True
        error = ApiError(int(code), message or HTTPStatus(code).phrase)
        self.send_json(error.status, _dialect_for(getattr(self, "path", "")).error_body(error))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.client_address[0], *args)

    # -- routes ------------------------------------------------------------------------------
    def health(self) -> Reply:
        if self.server.draining:
            raise ApiError(503, "draining: this worker is shutting down")
        if not self.server.service.ready:
            raise ApiError(503, "loading: the model is not ready yet",
                           headers={"Retry-After": "1"})
        return Reply({"status": "ok"})

    def info(self) -> Reply:
        return Reply(self.server.service.info())

    def models(self) -> Reply:
        service = self.server.service
        return Reply({"object": "list", "data": [
            {"id": name, "object": "model", "created": int(service.started),
             "owned_by": "embedserve"} for name in service.model_names().listed]})

    def metrics(self) -> Reply:
        text = self.server.service.render_metrics()
        return Reply(text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def openapi(self) -> Reply:
        from embedserve.openapi import build_openapi

        return Reply(build_openapi(self.server.service))

    def ollama_root(self) -> Reply:
        # Ollama answers GET / with this text; tools use it to see that a server is up.
        return Reply(b"Ollama is running", "text/plain; charset=utf-8")

    def ollama_tags(self) -> Reply:
        service = self.server.service
        backend = service.info()["backend"]
        modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(service.started))
        return Reply({"models": [{
            "name": f"{name}:latest", "model": f"{name}:latest", "modified_at": modified,
            "size": 0, "digest": "",
            "details": {"format": backend, "family": backend, "families": [backend],
                        "parameter_size": "", "quantization_level": ""}}
            for name in service.model_names().listed]})

    def ollama_version(self) -> Reply:
        return Reply({"version": __version__})

    def tokenize(self) -> Reply:
        service = self.server.service
        with service.admit():
            body = self.read_json()
            if not isinstance(body, dict):
                raise ApiError(400, "request body must be a JSON object")
            texts = texts_from(body.get("inputs"), "inputs", service.config.max_batch_size)
            special = body.get("add_special_tokens")
            special = True if special is None else special
            if not isinstance(special, bool):
                raise ApiError(400, "'add_special_tokens' must be a boolean")
            # Each token becomes a JSON object many times its size: bound the input.
            chars = sum(map(len, texts))
            if chars > MAX_TOKENIZE_CHARS:
                raise ApiError(413, f"'inputs' hold {chars} characters; /tokenize takes at "
                                    f"most {MAX_TOKENIZE_CHARS} per request", param="inputs")
            return Reply([[dataclasses.asdict(t) for t in tokens]
                          for tokens in service.tokenize(texts, special)])

    def openai_embeddings(self) -> Reply:
        return self._embed(OPENAI)

    def tei_embed(self) -> Reply:
        return self._embed(TEI_DIALECT)

    def ollama_embed(self) -> Reply:
        return self._embed(OLLAMA)

    def ollama_embeddings(self) -> Reply:
        return self._embed(OLLAMA_LEGACY)

    def _embed(self, dialect: Dialect) -> Reply:
        service = self.server.service
        with service.admit():
            request = dialect.parse(self.read_json(), service.config.max_batch_size)
            computing = time.monotonic()
            result = service.embed(request)
            body = dialect.render(request, result)
        now = time.monotonic()
        # TEI's timing headers, for clients and proxies that log them.
        return Reply(body, headers={
            "x-compute-time": f"{(now - computing) * 1000:.3f}",
            "x-total-time": f"{(now - self.started) * 1000:.3f}",
            "x-compute-characters": str(sum(map(len, request.texts))),
            "x-compute-tokens": str(result.prompt_tokens),
        })


@dataclass(frozen=True)
class Reply:
    """What a route answers: a JSON-able object, or bytes already in `content_type`."""

    body: Any
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    status: int = 200


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


RouteTable = dict[str, dict[str, Callable[[Handler], Reply]]]
ROUTES: RouteTable = {
    "/health": {"GET": Handler.health, "HEAD": Handler.health},
    "/info": {"GET": Handler.info},
    "/metrics": {"GET": Handler.metrics},
    "/openapi.json": {"GET": Handler.openapi},
    "/v1/models": {"GET": Handler.models},
    "/v1/embeddings": {"POST": Handler.openai_embeddings},
    "/embeddings": {"POST": Handler.openai_embeddings},
    "/embed": {"POST": Handler.tei_embed},
    "/tokenize": {"POST": Handler.tokenize},
    "/": {"POST": Handler.tei_embed, "GET": Handler.ollama_root, "HEAD": Handler.ollama_root},
    "/api/embed": {"POST": Handler.ollama_embed},
    "/api/embeddings": {"POST": Handler.ollama_embeddings},
    "/api/tags": {"GET": Handler.ollama_tags},
    "/api/version": {"GET": Handler.ollama_version},
}
# Paths that answer without an API key: health checks and Ollama's liveness probe.
OPEN_PATHS = frozenset({"/health"})
