"""HTTP on the standard library: a hardened ThreadingHTTPServer serving on a socket it is
handed (the supervisor binds; workers serve), and the handler that walks one request down
the path: limits -> auth -> JSON -> dialect -> service -> dialect -> bytes.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
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
        # Non-blocking: workers share this socket, all of them wake when a connection
        # arrives, and only one gets it. A blocking accept() left the others stuck in it,
        # deaf to shutdown() until the next connection came (a drain hung for good).
        sock.setblocking(False)
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

    def handle_one_request(self) -> None:
        # The stdlib version with two timeouts: keep_alive_timeout while an idle connection
        # waits for its next request, and a deadline for receiving the request itself.
        config = self.server.config
        if not self._next_request_arrives():
            self.close_connection = True
            return
        self.started = time.monotonic()
        self.deadline = self.started + config.request_timeout
        self.body_read = False
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
            # Already here: pipelined, or arrived with the last one.
            if self.rfile.peek(1):  # type: ignore[attr-defined]
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
        status = 500
        try:
            methods = ROUTES.get(path)
            if methods is None:
                raise ApiError(404, f"no route {path!r}; see GET /info for the API")
            route = methods.get(self.command)
            if route is None:
                raise ApiError(405, f"{self.command} is not allowed on {path}",
                               headers={"Allow": ", ".join(sorted(methods))})
            self._authorize(path)
            reply = route(self)
        except (TimeoutError, ConnectionError):
            raise  # the connection is unusable: handle_one_request closes it
        except ApiError as error:
            if error.status >= 500:
                log.error("%s %s: %s", self.command, path, error.message)
            status = error.status
            self._skip_unread_body()
            self.send_json(status, dialect.error_body(error), error.headers)
        except Exception:
            log.exception("unhandled error in %s %s", self.command, path)
            self.close_connection = True
            failure = ApiError(500, "internal server error (details in the server log)")
            self.send_json(500, dialect.error_body(failure))
        else:
            status = 200
            if reply.content_type == "application/json":
                self.send_json(200, reply.body, reply.headers)
            else:
                self.send_body(200, reply.body, reply.content_type, reply.headers)
        finally:
            self.server.service.metrics.observe_request(
                path if path in ROUTES else "(unknown)", self.command, status,
                time.monotonic() - self.started)

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
        """After an error answered before the body was read (404, 405, 401...): the body is
        still in the stream, where it would be misread as the next request. Read it away
        if it is small, else close the connection after this response."""
        if self.body_read or self.close_connection:
            return
        length = self.headers.get("Content-Length", "0")
        if self.headers.get("Transfer-Encoding") or not length.isdigit() or \
                int(length) > self.server.config.max_body_bytes:
            self.close_connection = True
        elif int(length):
            try:
                self._read_exactly(int(length))
            except (OSError, TimeoutError):
                self.close_connection = True

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
        self.body_read = True  # from here on, whatever happens, don't try to skip it again
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
            {"id": service.model_names()[0], "object": "model",
             "created": int(service.started), "owned_by": "embedserve"}]})

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
        info = service.info()
        name = service.model_names()[-1]
        return Reply({"models": [{
            "name": f"{name}:latest", "model": f"{name}:latest",
            "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(service.started)),
            "size": 0, "digest": "",
            "details": {"format": info["backend"], "family": info["backend"],
                        "families": [info["backend"]], "parameter_size": "",
                        "quantization_level": ""}}]})

    def ollama_version(self) -> Reply:
        return Reply({"version": __version__})

    def tokenize(self) -> Reply:
        body = self.read_json()
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        service = self.server.service
        texts = texts_from(body.get("inputs"), "inputs", service.config.max_batch_size)
        special = body.get("add_special_tokens")
        special = True if special is None else special
        if not isinstance(special, bool):
            raise ApiError(400, "'add_special_tokens' must be a boolean")
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
