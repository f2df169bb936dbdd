"""HTTP on the standard library: a hardened ThreadingHTTPServer serving on a socket it is
handed (the supervisor binds; workers serve), and the handler that walks one request down
the path: limits -> auth -> JSON -> dialect -> service -> dialect -> bytes.
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from embedserve import __version__
from embedserve.dialects import OPENAI, TEI_DIALECT, Dialect
from embedserve.errors import ApiError
from embedserve.service import EmbeddingService

log = logging.getLogger("embedserve.server")
access_log = logging.getLogger("embedserve.access")

_MAX_LINE = 65536
_READ_CHUNK = 1 << 16
_POLL = 0.25  # how often an idle connection notices that the server is draining
_DRAIN_LINGER = 0.5


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


class EmbedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, service: EmbeddingService) -> None:
        self.address_family = sock.family
        # bind_and_activate=False: no bind, no listen and, unlike HTTPServer.server_bind,
        # no reverse-DNS lookup (getfqdn) that can stall start-up.
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_name, self.server_port = sock.getsockname()[:2]
        self.service = service
        self.config = service.config
        self.draining = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._connections = 0
        self._date: tuple[int, str] = (0, "")
        self.loop_tick = time.monotonic()

    def service_actions(self) -> None:
        # Called by serve_forever at least every poll interval: proof the accept loop lives.
        self.loop_tick = time.monotonic()

    # -- connection accounting -----------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self._connections >= self.config.max_connections
            if not full:
                self._connections += 1
        if full:
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


def _dialect_for(path: str) -> Dialect:
    return OPENAI if path.startswith(("/v1/", "/embeddings")) else TEI_DIALECT


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"embedserve/{__version__}"
    sys_version = ""
    # TCP_NODELAY: without it keep-alive responses stall ~40 ms (Nagle + delayed ACK).
    disable_nagle_algorithm = True
    server: EmbedServer

    def handle_one_request(self) -> None:
        # The stdlib version with two timeouts: keep_alive_timeout while an idle connection
        # waits for its next request, and a deadline for receiving the request itself.
        config = self.server.config
        if not self._next_request_arrives():
            self.close_connection = True
            return
        self.deadline = time.monotonic() + config.request_timeout
        self.connection.settimeout(config.request_timeout)
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

    def _next_request_arrives(self) -> bool:
        """Wait for the next request on this connection: up to keep_alive_timeout, or, once
        the server drains, a short linger. Closing an idle keep-alive connection the moment
        draining starts would reset a request the client has just sent; lingering lets
        such a request in, and it is then answered with `Connection: close`."""
        server, conn = self.server, self.connection
        conn.settimeout(0)
        try:
            if self.rfile.peek(1):  # already here (pipelined, or arrived with the last one)
                return True
        except (BlockingIOError, TimeoutError):
            pass
        except OSError:
            return False
        now = time.monotonic()
        give_up = now + server.config.keep_alive_timeout
        while now < give_up:
            if server.draining:
                give_up = min(give_up, now + _DRAIN_LINGER)
            readable, _, _ = select.select([conn], [], [], min(_POLL, give_up - now))
            if readable:
                return True
            now = time.monotonic()
        return False

    def dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        dialect = _dialect_for(path)
        try:
            methods = ROUTES.get(path)
            if methods is None:
                raise ApiError(404, f"no route {path!r}; see GET /info for the API")
            route = methods.get(self.command)
            if route is None:
                raise ApiError(405, f"{self.command} is not allowed on {path}",
                               headers={"Allow": ", ".join(sorted(methods))})
            self._authorize(path)
            status, payload = route(self)
        except (TimeoutError, ConnectionError):
            raise  # the connection is unusable: handle_one_request closes it
        except ApiError as error:
            if error.status >= 500:
                log.error("%s %s: %s", self.command, path, error.message)
            self.send_json(error.status, dialect.error_body(error), error.headers)
        except Exception:
            log.exception("unhandled error in %s %s", self.command, path)
            self.close_connection = True
            error = ApiError(500, "internal server error (details in the server log)")
            self.send_json(500, dialect.error_body(error))
        else:
            self.send_json(status, payload)

    def _authorize(self, path: str) -> None:
        key = self.server.config.api_key
        if not key or path == "/health":
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    # -- reading ---------------------------------------------------------------------------
    def read_json(self) -> Any:
        body = self._read_body()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, ValueError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None

    def _read_body(self) -> bytes:
        limit = self.server.config.max_body_bytes
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                self.close_connection = True
                raise ApiError(400, f"unsupported Transfer-Encoding {encoding!r}")
            return self._read_chunked(limit)
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required")
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"invalid Content-Length {length!r}") from None
        if size > limit:
            # The body stays unread: this connection cannot be reused.
            self.close_connection = True
            raise ApiError(413, f"request body is {size} bytes; the limit is {limit}")
        return self._read_exactly(size)

    def _read_exactly(self, size: int) -> bytes:
        parts: list[bytes] = []
        remaining = size
        while remaining:
            self._check_deadline()
            chunk = self.rfile.read1(min(remaining, _READ_CHUNK))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            self._check_deadline()
            line = self.rfile.readline(_MAX_LINE + 1)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "malformed chunked body") from None
            if size == 0:
                while self.rfile.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                    self._check_deadline()  # skip trailers
                return b"".join(parts)
            total += size
            if total > limit:
                self.close_connection = True
                raise ApiError(413, f"request body is over the limit of {limit} bytes")
            parts.append(self._read_exactly(size))
            self.rfile.readline(_MAX_LINE + 1)  # the CRLF after each chunk

    def _check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError("request took longer than request_timeout to arrive")

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
                 f"Date: {self.server.http_date()}",
                 f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}"]
        if headers:
            lines.extend(f"{name}: {value}" for name, value in headers.items())
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
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
    def health(self) -> tuple[int, Any]:
        if self.server.draining:
            raise ApiError(503, "draining: this worker is shutting down")
        if not self.server.service.ready:
            raise ApiError(503, "loading: the model is not ready yet",
                           headers={"Retry-After": "1"})
        return 200, {"status": "ok"}

    def info(self) -> tuple[int, Any]:
        return 200, self.server.service.info()

    def models(self) -> tuple[int, Any]:
        service = self.server.service
        model = service.info()["model"]
        return 200, {"object": "list", "data": [
            {"id": model, "object": "model", "created": int(service.started),
             "owned_by": "embedserve"}]}

    def openai_embeddings(self) -> tuple[int, Any]:
        return self._embed(OPENAI)

    def tei_embed(self) -> tuple[int, Any]:
        return self._embed(TEI_DIALECT)

    def _embed(self, dialect: Dialect) -> tuple[int, Any]:
        service = self.server.service
        request = dialect.parse(self.read_json(), service.config.max_batch_size)
        return 200, dialect.render(request, service.embed(request))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


RouteTable = dict[str, dict[str, Callable[[Handler], tuple[int, Any]]]]
ROUTES: RouteTable = {
    "/health": {"GET": Handler.health, "HEAD": Handler.health},
    "/info": {"GET": Handler.info},
    "/v1/models": {"GET": Handler.models},
    "/v1/embeddings": {"POST": Handler.openai_embeddings},
    "/embeddings": {"POST": Handler.openai_embeddings},
    "/embed": {"POST": Handler.tei_embed},
    "/": {"POST": Handler.tei_embed},
}
