"""embedserve.Client: the app-side embedder that finds or starts the server, talks HTTP to
it, restarts it when it dies, falls back to in-process hash embeddings when nothing else
works, and cleans up at exit. Standard library only (urllib.parse + http.client).

    from embedserve import Client

    with Client() as client:                  # EMBEDSERVE_URL or http://127.0.0.1:8765
        vectors = client.embed(["first text", "second text"])
        vectors.model, vectors.backend, vectors.source   # 'hash-v1-384', 'hash', 'server'

Finding the server. `url` defaults to $EMBEDSERVE_URL, else the documented default
address. On first use the client asks GET /health there. If nothing listens and
`autostart` is on (and the host is this machine), it runs `python -m embedserve --host H
--port P ...` with the client's backend/model/dimensions/server_args, waits for the
server's ready line (bounded by `start_timeout`) and fails with ServerStartError quoting
the server's last log lines if it does not come up. `port=0` always starts a private
server on a free port.

Ownership. A server this client started is its own: it is stopped gracefully (SIGTERM,
then SIGKILL after `stop_timeout`) by close(), by the `with` block's end, or at interpreter
exit (atexit) -- not when the Client object is garbage-collected, so `Client().embed(x)`
in a loop reuses one server instead of starting one per call. A server it found running
is never stopped by it. Two clients (threads or processes) starting at once on one port
share one server: both spawn, the kernel lets one bind, the other's server exits
("cannot listen") and that client adopts the winner without owning it. A kill -9 (or an
unhandled SIGTERM) of the app skips atexit; for that case the child gets a stdin pipe
that only this process holds and EMBEDSERVE_WATCH_STDIN=1: a server that watches stdin
stops when the pipe closes, however this process ended.

The child runs in its own session (start_new_session): Ctrl-C in a terminal reaches the
app only, and the app decides (a REPL that catches KeyboardInterrupt keeps its server);
the app's exit then stops the server through atexit. The child's stdout and stderr are
drained by threads (a full pipe would block the server) that keep the last lines for
error messages and forward them to the "embedserve.client.server" logger at DEBUG.

Restarts. When a server this client uses goes away (connection refused, or its own
process exited) the request that noticed starts a new one (or finds the one another
client started) and is sent again, unless `restart=False`; this does not count against
`retries`. A server that keeps dying is not restarted more than MAX_RESTARTS times in
RESTART_WINDOW seconds.

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
the number of retries as well. A server someone else runs that stops listening (a
systemd or container restart) is waited for the same way, once per loss, when this client
may not start one and no fallback may answer in its place (a fallback of the same model
answers at once: its vectors are the server's). A URL where nothing ever answered, or
where such a wait already failed, is only looked at `retries` (default 3) more times, so
that the fallback or the error comes in about half a second rather than a minute.

Transport. One keep-alive HTTPConnection per thread (a Client is thread-safe; share one).
Requests go to the OpenAI route with base64 float32 vectors (`encoding_format`), split
into chunks that respect the server's /info limits (max_batch_size, max_body_bytes);
results come back in input order. Other 4xx raise at once: ValidationError
(400, 413, 422) or AuthenticationError (401, 403), with the server's message. Vectors are
decoded with `array`: numpy was measured no faster at building the lists returned here
(list creation dominates), so it is not imported.

Fallback. When no server can be reached or started, `fallback` decides:
  "same-model" (default, also `True`): embed in-process with embedserve's hash tier, but
      only when that is the model the server would have used: the model this client last
      got from a server; before any server answered, the one the options ask for
      (backend="hash": yes; an ML backend or a model name: no; auto/unset: allowed, as
      this client has no vectors yet to mix with). After a server answered with another
      model (e.g. a sentence-transformers one) the call raises ServerUnavailable instead:
      vectors of different models are never mixed silently.
  "always": fall back to the hash tier whatever the server's model was.
  "never" (also `False`): raise ServerUnavailable.
Every result says where it came from (`.model`, `.backend`, `.source` "server" or
"fallback"; also `client.last_model` ...), one call's vectors always come from one model,
and a change of model between calls is logged as a warning. While the server is down,
calls within RECHECK_INTERVAL of the last failure go straight to the fallback instead of
paying for retries each time.

Float32 consistency. base64 carries float32, so the server's vectors arrive rounded to
float32. The fallback rounds its doubles to float32 too when the transport is base64, so
server and fallback vectors are bit-for-bit identical (the hash tier is deterministic);
with encoding_format="float" both are the same doubles. `dimensions=N` too: like the
server's hash tier, the fallback computes N buckets directly (HashEmbedder(N)) and labels
the result with the served model's name (hash-v1-384 for a default server), as the server
does for that request.
"""

from __future__ import annotations

import atexit
import collections
import copy
import http.client
import json
import logging
import os
import random
import re
import signal
import site
import subprocess
import sys
import sysconfig
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from json.encoder import encode_basestring, encode_basestring_ascii
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from embedserve import __version__
from embedserve.config import DEFAULT_PORT, Config, parse_option
from embedserve.contracts import EXIT_FAILURE, URL_ENV, env_name, parse_ready_line
from embedserve.encoding import decode_float32_base64
from embedserve.hashing import HashEmbedder, model_name

log = logging.getLogger("embedserve.client")
server_log = logging.getLogger("embedserve.client.server")

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
FallbackPolicy = Literal["same-model", "always", "never"]
EncodingFormat = Literal["base64", "float"]
Source = Literal["server", "fallback"]

LOG_LINES_KEPT = 40
# A started server whose port is taken exits with this code and says "cannot listen".
EXIT_CANNOT_LISTEN = EXIT_FAILURE
MAX_SPAWNS_PER_START = 5
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
RECHECK_INTERVAL = 2.0
# Times one request may find its server gone and re-find or restart it (not retries).
MAX_RELOCATIONS = 2
# Read timeout of the /health probe: a server that accepts but does not answer within
# this is "not ready yet", not a reason to give up before the start deadline.
PROBE_TIMEOUT = 2.0
# The server's limits when its /info does not say (its own defaults).
DEFAULT_MAX_BATCH = Config.max_batch_size
DEFAULT_MAX_BODY = Config.max_body_bytes
# Room for the JSON around the inputs in a request body.
BODY_OVERHEAD = 256

RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})
VALIDATION_STATUSES = frozenset({400, 413, 422})
AUTH_STATUSES = frozenset({401, 403})
ML_BACKENDS = frozenset({"sentence-transformers", "transformers"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# A kept-alive connection the server closed while idle fails like this on reuse: resend
# once on a fresh connection before counting it as a failure.
STALE_CONNECTION_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError,
                           http.client.RemoteDisconnected)
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
# The shortest wait for an answer a retry gets, even at its deadline (a socket timeout of 0
# would make it non-blocking).
MIN_WAIT = 0.05
# Looks at a URL where nothing listens and no server may be started, when `retries` is None.
REFUSAL_RETRIES = 3
# Fallback embedders kept for request-time `dimensions` other than the model's own size.
MAX_FALLBACK_SIZES = 4


# --- errors -------------------------------------------------------------------------------

class EmbedServeError(Exception):
    """Base class of every error the client raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments defeat the default pickling (and copy):
        # rebuild from args + attributes instead, so errors cross process pools intact.
        return _rebuild_error, (type(self), self.args, self.__dict__)


def _rebuild_error(cls: type[EmbedServeError], args: tuple[Any, ...],
                   state: dict[str, Any]) -> EmbedServeError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ServerUnavailable(EmbedServeError, ConnectionError):
    """No server answered at `url` (or none could be started) within the client's bounds.
    `status` is the last HTTP status when the server answered only 429/503-like errors."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.status = status


class ServerStartError(ServerUnavailable):
    """A server this client started exited or did not become ready in time."""

    def __init__(self, message: str, *, url: str, returncode: int | None,
                 log_tail: Sequence[str]) -> None:
        tail = "".join(f"\n    {line}" for line in log_tail) or " (none)"
        super().__init__(f"{message}; the server's last log lines:{tail}", url=url)
        self.returncode = returncode
        self.log_tail = list(log_tail)


class ServerError(EmbedServeError):
    """The server answered with an HTTP error. `message` is the server's own text."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 code: str | None = None, param: str | None = None, url: str = "") -> None:
        phrase = _phrase(status)
        super().__init__(f"{status} {phrase}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.url = url


class ValidationError(ServerError, ValueError):
    """The request is wrong (400, 413, 422); retrying it cannot help. Raised the same way
    when the client itself catches the problem before sending (e.g. an empty text)."""


class AuthenticationError(ServerError):
    """Missing or wrong API key (401, 403): pass `api_key` or set EMBEDSERVE_API_KEY."""


class ModelMismatch(EmbedServeError):
    """The server changed models in the middle of one call, twice in a row."""


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "HTTP error"


# --- results ------------------------------------------------------------------------------

class Embeddings(list[list[float]]):
    """Vectors in input order (a plain list otherwise), with the model and backend that
    made them and whether the server or the in-process fallback answered."""

    model: str
    backend: str
    source: Source

    def __init__(self, vectors: Iterable[list[float]] = (), *, model: str, backend: str,
                 source: Source) -> None:
        super().__init__(vectors)
        self.model = model
        self.backend = backend
        self.source = source

    @property
    def dimensions(self) -> int:
        return len(self[0]) if self else 0


class Embedding(list[float]):
    """One vector (a plain list otherwise), labelled like Embeddings."""

    model: str
    backend: str
    source: Source

    def __init__(self, vector: Iterable[float], *, model: str, backend: str,
                 source: Source) -> None:
        super().__init__(vector)
        self.model = model
        self.backend = backend
        self.source = source


# --- one server this client started ------------------------------------------------------

class ServerProcess:
    """A `python -m embedserve` child: its process, its drained output, how to stop it.
    Holds no reference to the Client, so an atexit hook can keep it without keeping the
    client alive."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.command = list(command)
        self.owner_pid = os.getpid()
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.ready = threading.Event()
        self.url: str | None = None
        self._log_lock = threading.Lock()
        self.process = subprocess.Popen(
            self.command, env=dict(env), text=True, encoding="utf-8", errors="replace",
            # stdin is a pipe nobody writes to: its EOF tells a server that watches stdin
            # that this process is gone, even after a kill -9 that skips atexit.
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True)
        self.pid = self.process.pid
        self._drains = [
            threading.Thread(target=self._drain, args=(stream, name == "stdout"),
                             name=f"embedserve-{self.pid}-{name}", daemon=True)
            for name, stream in (("stdout", self.process.stdout),
                                 ("stderr", self.process.stderr))]
        for thread in self._drains:
            thread.start()

    def _drain(self, stream: Any, is_stdout: bool) -> None:
        try:
            for line in stream:
                line = line.rstrip("\n")
                with self._log_lock:
                    self.log.append(line)
                server_log.debug("[%s] %s", self.pid, line)
                if is_stdout and not self.ready.is_set():
                    ready = parse_ready_line(line)
                    if ready:
                        self.url = ready.url
                        self.ready.set()
        except (OSError, ValueError):
            pass  # the pipe was closed under us at stop()

    def log_tail(self) -> list[str]:
        with self._log_lock:
            return list(self.log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, deadline: float) -> str:
        """'ready', 'exited' or 'timeout'."""
        while True:
            if self.ready.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                return "ready"
            if self.process.poll() is not None:
                # Let the drains read what it printed last (the error message).
                for thread in self._drains:
                    thread.join(1.0)
                return "ready" if self.ready.is_set() else "exited"
            if time.monotonic() >= deadline:
                return "timeout"

    def lost_port_race(self) -> bool:
        return (self.process.returncode == EXIT_CANNOT_LISTEN
                and any("cannot listen" in line for line in self.log_tail()))

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (graceful), SIGKILL of its whole session after `timeout`. Idempotent.
        A forked copy of the owner does nothing: the server belongs to the parent."""
        if os.getpid() != self.owner_pid:
            return None
        process = self.process
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("server %s did not stop within %gs of SIGTERM: killing it",
                            self.pid, timeout)
                self._kill_session()
                process.wait(5.0)
        # Whatever is left in its session (workers of a supervisor that was killed, or
        # that outlived it) goes too: nothing this client started may outlive it.
        self._kill_session()
        for thread in self._drains:
            thread.join(1.0)
        for stream in (process.stdin, process.stdout, process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        return process.returncode

    def stop_at_exit(self, timeout: float) -> None:
        try:
            self.stop(timeout)
        except Exception:  # noqa: BLE001 - nothing useful to do at interpreter exit
            pass

    def _kill_session(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # start_new_session: pgid == pid
        except (ProcessLookupError, PermissionError, AttributeError):
            pass


# --- plumbing -----------------------------------------------------------------------------

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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_fields(body: bytes) -> tuple[str, str | None, str | None, str | None]:
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


def _env_setting(name: str, environ: Mapping[str, str]) -> Any:
    """EMBEDSERVE_<NAME> from `environ` as the server reads it, or None when unset. A bad
    value is a ValueError naming the variable and the value."""
    variable = env_name(name)
    text = environ.get(variable)
    if text is None:
        return None
    try:
        return parse_option(name, text)
    except ValueError as exc:
        raise ValueError(f"{variable}={text!r}: {exc}") from None


def _child_pythonpath(environ: Mapping[str, str]) -> str | None:
    """PYTHONPATH for the server child so it runs this very embedserve. An installed
    package is found anyway (and putting site-packages first could shadow the stdlib);
    a source checkout or a sys.path entry added at run time is not."""
    root = str(Path(__file__).resolve().parent.parent)
    installed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        installed.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - virtualenvs with an old site.py
        pass
    if root in {str(Path(p).resolve()) for p in installed if p}:
        return environ.get("PYTHONPATH")
    return os.pathsep.join(filter(None, [root, environ.get("PYTHONPATH")]))


# --- the client ---------------------------------------------------------------------------

class Client:
    """An embedder that finds or starts an embedserve server (see the module docstring).

    url: the server; default $EMBEDSERVE_URL, else http://127.0.0.1:8765.
    autostart: start `python -m embedserve` when nothing answers at `url` (this machine
        only). restart: start a new one when the server in use goes away.
    backend, model, dimensions, server_args, env, python: how a started server runs
        (--backend, --model, --dimensions, extra CLI flags, extra environment variables,
        the interpreter; default sys.executable). port: overrides the URL's port; 0 starts
        a private server on a free port every time.
    api_key: Bearer token (default $EMBEDSERVE_API_KEY); also given to a started server.
    encoding_format: "base64" (float32, compact, the default) or "float" (JSON doubles).
    batch_size: most texts per request (the server's max_batch_size caps it anyway).
    timeout: seconds to wait for one response; connect_timeout: for one connection.
    start_timeout: from spawning a server to its ready line; stop_timeout: from SIGTERM
        to SIGKILL when stopping a server this client owns.
    retry_timeout: how long one request keeps being retried (connection errors, timeouts,
        408, 429, 502, 503, 504) before the call fails or falls back; long enough by
        default (60 s) for a restarted worker to load its model. 0: no retries.
    retries: also cap the number of retries of one request (default None: only
        retry_timeout bounds them); also how often to look again where nothing listens and
        no server may be started (default 3).
    backoff, max_backoff: first retry delay (doubled each retry, with jitter), and its cap.
    fallback: "same-model" (True), "always" or "never" (False): see the module docstring.

    EMBEDSERVE_DIMENSIONS, EMBEDSERVE_BACKEND, EMBEDSERVE_MODEL and EMBEDSERVE_API_KEY (from
    `env`, over os.environ: what a started server sees) are read once, here, and parsed as
    the server parses them: a bad value (EMBEDSERVE_DIMENSIONS=abc or 0) raises ValueError
    naming the variable and the value.
    """

    def __init__(self, url: str | None = None, *, autostart: bool = True,
                 backend: str | None = None, model: str | None = None,
                 dimensions: int | None = None, port: int | None = None,
                 server_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 python: str | None = None, api_key: str | None = None,
                 encoding_format: EncodingFormat = "base64", batch_size: int | None = None,
                 timeout: float = 60.0, connect_timeout: float = 2.0,
                 start_timeout: float = 60.0, stop_timeout: float = 10.0,
                 retry_timeout: float = 60.0, retries: int | None = None,
                 backoff: float = 0.1, max_backoff: float = 2.0,
                 restart: bool = True, fallback: FallbackPolicy | bool = "same-model"
                 ) -> None:
        # Where a bad URL came from, for the error: the argument or the variable.
        source = "url" if url else URL_ENV
        url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        if any(c.isspace() or not c.isprintable() for c in url):
            raise ValueError(f"{source} must look like http://HOST:PORT, got {url!r}")
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{source} must look like http://HOST:PORT, got {url!r}")
        try:
            url_port = parts.port
        except ValueError as exc:
            raise ValueError(f"{source} {url!r}: {exc}") from None
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {port}")
        if encoding_format not in ("base64", "float"):
            raise ValueError(f"encoding_format must be 'base64' or 'float', got "
                             f"{encoding_format!r}")
        if fallback is True:
            fallback = "same-model"
        elif fallback is False:
            fallback = "never"
        if fallback not in ("same-model", "always", "never"):
            raise ValueError(f"fallback must be 'same-model', 'always', 'never', True or "
                             f"False; got {fallback!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if dimensions is not None and dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {dimensions}")
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout),
                            ("start_timeout", start_timeout), ("stop_timeout", stop_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if not 0 <= retry_timeout < float("inf"):
            raise ValueError(f"retry_timeout must be a number of seconds >= 0, got "
                             f"{retry_timeout!r}")
        if (retries is not None and retries < 0) or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must not be negative")

        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = port if port is not None else (
            url_port or (DEFAULT_PORT if parts.scheme == "http" else 443))
        self._base_path = parts.path.rstrip("/")
        self._autostart = autostart
        self._restart = restart
        self._backend = backend
        self._model = model
        self._dimensions = dimensions
        self._server_args = list(server_args)
        self._env = dict(env or {})
        self._python = python or sys.executable
        # The EMBEDSERVE_* settings the client itself needs, read once, from what a server it
        # starts would see, and parsed as that server parses them: a bad value is an error
        # now, not a server that fails to start later or a fallback of a silently other size.
        environ = {**os.environ, **self._env}
        self._env_dimensions: int | None = _env_setting("dimensions", environ)
        self._env_backend: str | None = _env_setting("backend", environ)
        self._env_model: str | None = _env_setting("model", environ) or None
        self._api_key = api_key if api_key is not None else (
            _env_setting("api_key", environ) or None)
        self._encoding_format: EncodingFormat = encoding_format
        self._batch_size = batch_size
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._retry_timeout = retry_timeout
        self._retries = retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._fallback: FallbackPolicy = fallback
        self._random = random.Random()

        # Lifecycle state, guarded by _lock (held while a server starts: other threads
        # then wait for that server instead of starting their own).
        self._lock = threading.RLock()
        self._target: Target | None = None
        self._generation = 0
        self._closed = False
        self._had_server = False
        self._restart_times: collections.deque[float] = collections.deque()
        self._down_until = 0.0  # while in the future: do not retry or start, fall back
        self._down_error: ServerUnavailable | None = None
        self._info: tuple[Target, dict[str, Any]] | None = None
        # A server this client did not start went away: whoever runs it may be restarting
        # it, so a client that may not start one waits for it (once per loss).
        self._foreign_lost = False
        self._served_model: str | None = None
        self._served_dimensions: int | None = None
        self._fallback_embedder: HashEmbedder | None = None
        self._sized_embedders: dict[int, HashEmbedder] = {}  # for `dimensions`, oldest first
        self._sized_lock = threading.Lock()
        self._in_fallback = False
        # One keep-alive connection per thread; all of them listed for close().
        self._local = threading.local()
        self._connections: set[http.client.HTTPConnection] = set()
        self._connections_lock = threading.Lock()

        self.last_model: str | None = None
        self.last_backend: str | None = None
        self.last_source: Source | None = None

    # -- public API ------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], *, dimensions: int | None = None) -> Embeddings:
        """Embed `texts` (a list of non-empty strings), in order. `dimensions` asks for
        shorter vectors where the model allows it: the hash tier computes that many buckets
        directly (the vectors of hash-v1-<dimensions>, still labelled with the served
        model's name, as the server does); ML models keep the first values, re-normalised."""
        texts = self._checked(texts)
        if dimensions is not None and (not isinstance(dimensions, int)
                                       or isinstance(dimensions, bool) or dimensions < 1):
            raise ValidationError(400, f"'dimensions' must be a positive integer, got "
                                       f"{dimensions!r}", param="dimensions")
        self._check_open()
        if self._fallback != "never" and self._down_until > time.monotonic():
            # Recently failed: do not pay for retries and start attempts on every call.
            result = self._embed_fallback(texts, dimensions, self._down_error)
        else:
            try:
                result = self._embed_remote(texts, dimensions)
            except ServerUnavailable as exc:
                self._check_open()
                with self._lock:
                    self._down_until = time.monotonic() + RECHECK_INTERVAL
                    self._down_error = exc
                result = self._embed_fallback(texts, dimensions, exc)
        self._note(result)
        return result

    def embed_single(self, text: str, *, dimensions: int | None = None) -> Embedding:
        if not isinstance(text, str):
            raise TypeError(f"embed_single() takes one str, got {type(text).__name__}")
        result = self.embed([text], dimensions=dimensions)
        return Embedding(result[0], model=result.model, backend=result.backend,
                         source=result.source)

    def info(self) -> dict[str, Any]:
        """The server's GET /info (starting a server if allowed)."""
        response, target = self._request("GET", "/info")
        info: dict[str, Any] = response.json()
        self._remember_info(target, info)
        return info

    def health(self) -> dict[str, Any]:
        """One GET /health to the server in use (or to `url`), without starting anything or
        retrying: {"status": "ok"} when it serves; ServerError (e.g. 503 loading) or
        ServerUnavailable otherwise."""
        self._check_open()
        target = self._target or self._configured_target()
        if target.port == 0:
            raise ServerUnavailable("no server started yet (port=0 starts one on first use)",
                                    url=target.url)
        try:
            response = self._send(target, "GET", "/health", None)
        except TRANSPORT_ERRORS as exc:
            raise ServerUnavailable(f"no answer from {target.url}: {exc!r}",
                                    url=target.url) from exc
        if response.status != 200:
            raise self._error(response, target)
        health: dict[str, Any] = response.json()
        return health

    def connect(self) -> Client:
        """Find or start the server now rather than on first use. Returns the client."""
        self._current_target()
        return self

    def close(self) -> None:
        """Close connections and stop the server this client started (if any). Idempotent;
        a server found running is left alone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            target, self._target = self._target, None
        self._close_connections()
        owned = target.server if target is not None else None
        if owned is not None:
            atexit.unregister(owned.stop_at_exit)
            log.info("stopping the server this client started (pid %s)", owned.pid)
            owned.stop(self._stop_timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @property
    def url(self) -> str:
        """Where the server in use answers (or will be looked for)."""
        return (self._target or self._configured_target()).url

    @property
    def owns_server(self) -> bool:
        """True while the server in use is one this client started (and will stop)."""
        target = self._target
        return target is not None and target.server is not None

    @property
    def server_pid(self) -> int | None:
        """The server process in use: the one this client started, or the one /info named."""
        target = self._target
        if target is None:
            return None
        if target.server is not None:
            return target.server.pid
        info = self._info
        if info is not None and info[0] is target:
            pid = info[1].get("supervisor_pid", info[1].get("pid"))
            return pid if isinstance(pid, int) else None
        return None

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return (f"Client(url={self.url!r}, owns_server={self.owns_server}, "
                f"fallback={self._fallback!r}, last_model={self.last_model!r})")

    # -- embedding -------------------------------------------------------------------------
    @staticmethod
    def _checked(texts: Sequence[str]) -> list[str]:
        if isinstance(texts, (str, bytes)):
            raise TypeError("embed() takes a list of strings; for one text use "
                            "embed_single(text)")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
            if not text:
                # The server rejects it too; checked here so that the fallback agrees.
                raise ValidationError(400, f"texts[{i}] is an empty string", param="input")
        return texts

    def _embed_remote(self, texts: list[str], dimensions: int | None) -> Embeddings:
        for _ in range(2):  # a server swapped for another model mid-call: redo it once
            info_target, info = self._server_info()
            vectors: list[list[float]] = []
            model: str | None = None
            last_target = info_target
            for start, body in self._chunks(texts, info, dimensions):
                response, last_target = self._request("POST", "/v1/embeddings", body,
                                                      first=start)
                chunk_model, chunk = self._decode(response, last_target)
                if model is None:
                    model = chunk_model
                elif chunk_model != model:
                    log.warning("the server changed model from %s to %s during one call; "
                                "embedding the whole call again", model, chunk_model)
                    break
                vectors.extend(chunk)
            else:
                if last_target is not info_target:  # restarted mid-call: describe the new one
                    info_target, info = self._server_info()
                if len(vectors) != len(texts):
                    raise EmbedServeError(f"server returned {len(vectors)} vectors for "
                                          f"{len(texts)} texts")
                model = model or str(info.get("model", ""))
                self._served_model = model
                return Embeddings(vectors, model=model, backend=str(info.get("backend", "")),
                                  source="server")
        raise ModelMismatch("the server changed models twice during one call")

    def _chunks(self, texts: list[str], info: Mapping[str, Any], dimensions: int | None
                ) -> Iterator[tuple[int, bytes]]:
        """(index of the first text, request body) per request, within the server's limits."""
        max_batch = info.get("max_batch_size")
        max_batch = max_batch if isinstance(max_batch, int) and max_batch > 0 else DEFAULT_MAX_BATCH
        if self._batch_size is not None:
            max_batch = min(max_batch, self._batch_size)
        max_body = info.get("max_body_bytes")
        max_body = max_body if isinstance(max_body, int) and max_body > 0 else DEFAULT_MAX_BODY
        tail = {"encoding_format": self._encoding_format}
        if dimensions is not None:
            tail["dimensions"] = dimensions  # type: ignore[assignment]
        head = b'{"input":'
        end = b"," + json.dumps(tail, separators=(",", ":")).encode()[1:]
        budget = max_body - len(head) - len(end) - BODY_OVERHEAD

        for first in range(0, len(texts), max_batch):
            group = texts[first : first + max_batch]
            # Fast path, nearly always taken: one C-level json.dumps for the whole group when
            # even the worst case (6 bytes per character, "\u001f") fits the body limit.
            if 6 * sum(map(len, group)) + 3 * len(group) + 2 <= budget:
                try:
                    encoded = json.dumps(group, ensure_ascii=False, separators=(",", ":"))
                    yield first, head + encoded.encode("utf-8") + end
                    continue
                except UnicodeEncodeError:
                    pass  # a lone surrogate: the exact path below escapes it
            yield from self._split_by_size(group, first, head, end, budget, max_body)

    @staticmethod
    def _split_by_size(group: list[str], first: int, head: bytes, end: bytes, budget: int,
                       max_body: int) -> Iterator[tuple[int, bytes]]:
        """Bodies of exact size, text by text, each under `budget` bytes of inputs."""
        batch: list[bytes] = []
        size = 2  # the brackets
        start = first
        for i, text in enumerate(group, first):
            try:
                encoded = encode_basestring(text).encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: only \u escapes can carry it
                encoded = encode_basestring_ascii(text).encode("ascii")
            if len(encoded) + 2 > budget:
                raise ValidationError(413, f"texts[{i}] is {len(encoded)} bytes as JSON; the "
                                           f"server takes request bodies up to {max_body} "
                                           "bytes", param="input")
            if batch and size + len(encoded) + 1 > budget:
                yield start, head + b"[" + b",".join(batch) + b"]" + end
                batch, size, start = [], 2, i
            batch.append(encoded)
            size += len(encoded) + 1
        if batch:
            yield start, head + b"[" + b",".join(batch) + b"]" + end

    def _decode(self, response: Response, target: Target) -> tuple[str, list[list[float]]]:
        try:
            payload = response.json()
            items = payload["data"]
            if any(item["index"] != i for i, item in enumerate(items)):
                items = sorted(items, key=lambda item: item["index"])
            raw = [item["embedding"] for item in items]
            if self._encoding_format == "base64":
                vectors = [decode_float32_base64(text) for text in raw]
            else:
                vectors = [list(map(float, vector)) for vector in raw]
            return str(payload["model"]), vectors
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbedServeError(f"unexpected response from {target.url}/v1/embeddings: "
                                  f"{exc!r}") from exc

    def _embed_fallback(self, texts: list[str], dimensions: int | None,
                        cause: ServerUnavailable | None) -> Embeddings:
        embedder, refusal = self._fallback_plan()
        if embedder is None:
            if cause is None:
                raise ServerUnavailable(f"the server is unavailable; no fallback: {refusal}",
                                        url=self.url)
            # The same error (type and attributes kept), saying why nothing else was tried.
            error = copy.copy(cause)
            error.message = f"{cause.message}; no fallback: {refusal}"
            error.args = (f"{cause.args[0]}; no fallback: {refusal}",)
            raise error from cause.__cause__
        if dimensions is not None and dimensions > embedder.dimensions:
            raise ValidationError(422, f"'dimensions' must be between 1 and "
                                       f"{embedder.dimensions} for model {embedder.model}, got "
                                       f"{dimensions}", param="dimensions")
        if not self._in_fallback:
            self._in_fallback = True
            log.warning("embedding in-process with %s: %s", embedder.model, cause)
        # As the server's hash tier answers `dimensions`: that many buckets computed directly
        # (not the first values of the full vector), labelled with the served model's name.
        vectors = self._sized_embedder(embedder, dimensions).embed(texts)
        if self._encoding_format == "base64":
            # What the server's base64 transport would have delivered: bit-identical.
            vectors = [array("f", v).tolist() for v in vectors]
        return Embeddings(vectors, model=embedder.model, backend="hash", source="fallback")

    def _sized_embedder(self, embedder: HashEmbedder, dimensions: int | None) -> HashEmbedder:
        if dimensions is None or dimensions == embedder.dimensions:
            return embedder
        with self._sized_lock:  # not _lock: that one is held while a server starts
            # A few recent sizes only: each embedder keeps its own word cache.
            sized = self._sized_embedders.pop(dimensions, None) or HashEmbedder(dimensions)
            self._sized_embedders[dimensions] = sized
            while len(self._sized_embedders) > MAX_FALLBACK_SIZES:
                del self._sized_embedders[next(iter(self._sized_embedders))]
            return sized

    def _fallback_plan(self) -> tuple[HashEmbedder | None, str]:
        """The in-process embedder the policy allows, or None and why not."""
        if self._fallback == "never":
            return None, "fallback is off (fallback='never')"
        served_dims = self._served_dimensions
        # A hash-tier server's size wins over the options: the fallback must match it.
        dims = (served_dims if served_dims and self._served_model == model_name(served_dims)
                else self._configured_dimensions())
        local_model = model_name(dims)
        if self._fallback == "same-model":
            expected = self._served_model or self._requested_model(dims)
            if expected is not None and expected != local_model:
                return None, (f"the server's model is {expected}, the in-process fallback "
                              f"would be {local_model} (pass fallback='always' to accept "
                              "vectors from another model)")
        embedder = self._fallback_embedder
        if embedder is None or embedder.dimensions != dims:
            embedder = self._fallback_embedder = HashEmbedder(dims)
        return embedder, ""

    def _configured_dimensions(self) -> int:
        if self._dimensions is not None:
            return self._dimensions
        return self._env_dimensions if self._env_dimensions is not None else Config.dimensions

    def _requested_model(self, dims: int) -> str | None:
        """The model a started server would serve, where the options say: None if unknown."""
        backend = self._backend or self._env_backend or "auto"
        model = self._model or self._env_model
        if backend == "hash":
            return model_name(dims)
        if backend in ML_BACKENDS or model:
            return f"{model or backend} ({backend})"
        return None

    def _note(self, result: Embeddings) -> None:
        if result.source == "server" and self._in_fallback:
            self._in_fallback = False
            log.warning("server at %s answers again; leaving the in-process fallback", self.url)
        if self.last_model is not None and result.model != self.last_model:
            log.warning("model changed from %s to %s (%s): vectors of different models are "
                        "not comparable", self.last_model, result.model, result.source)
        self.last_model, self.last_backend, self.last_source = (
            result.model, result.backend, result.source)

    def _server_info(self) -> tuple[Target, dict[str, Any]]:
        cached = self._info
        target = self._current_target()
        if cached is not None and cached[0] is target:
            return cached
        response, target = self._request("GET", "/info")
        info = response.json()
        self._remember_info(target, info)
        return target, info

    def _remember_info(self, target: Target, info: dict[str, Any]) -> None:
        self._info = (target, info)
        model, dims = info.get("model"), info.get("dimensions")
        if isinstance(model, str):
            self._served_model = model
            self._served_dimensions = dims if isinstance(dims, int) else None

    # -- requests with retries -------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, *, first: int = 0
                 ) -> tuple[Response, Target]:
        started = time.monotonic()
        # Retried until then: a restarted worker answers 503 "loading" for as long as its
        # model takes to load, and the app must not see that.
        deadline = started + self._retry_timeout
        failures = 0
        relocations = 0  # servers re-found or restarted for this request: not retries
        while True:
            target = self._current_target()
            retry_after: float | None = None
            # The first attempt waits `timeout` for its answer; a retry no later than the
            # deadline, so that one request ends within max(timeout, retry_timeout).
            wait = self._timeout if not failures else min(
                self._timeout, max(deadline - time.monotonic(), MIN_WAIT))
            try:
                response = self._send(target, method, path, body, wait)
            except TRANSPORT_ERRORS as exc:
                self._check_open()
                failure = f"{type(exc).__name__}: {exc}"
                status = None
                if self._gone(target, exc) and relocations < MAX_RELOCATIONS:
                    # Nothing listens (or our server died): the next _current_target()
                    # restarts or re-finds it at once; no backoff, it is not a busy server.
                    self._lose(target, failure)
                    relocations += 1
                    continue
            else:
                if response.status < 400:
                    return response, target
                if response.status not in RETRYABLE_STATUSES:
                    raise self._error(response, target, first)
                message = _error_fields(response.body)[0]
                failure = f"{response.status} {_phrase(response.status)}: {message}"
                status = response.status
                retry_after = _retry_after(response.headers)
            now = time.monotonic()
            if now >= deadline or (self._retries is not None and failures >= self._retries):
                raise ServerUnavailable(
                    f"{method} {target.url}{path} failed {failures + 1} times in "
                    f"{now - started:.1f}s; last: {failure}", url=target.url, status=status)
            failures += 1
            # Not past the deadline: a last try at the deadline beats giving up early.
            delay = min(self._delay(failures, retry_after), deadline - now)
            log.info("%s %s%s: %s; retry %d in %.2fs (retrying for up to %gs)", method,
                     target.url, path, failure, failures, delay, self._retry_timeout)
            time.sleep(delay)

    def _delay(self, failures: int, retry_after: float | None) -> float:
        if retry_after is not None:
            base = min(retry_after, self._max_backoff)
            return base + self._random.uniform(0, 0.1 * base)
        ceiling = min(self._max_backoff, self._backoff * 2.0 ** (failures - 1))
        # "Equal jitter": never zero (no hammering), spread (no thundering herd).
        return ceiling / 2 + self._random.uniform(0, ceiling / 2)

    def _error(self, response: Response, target: Target, first: int = 0) -> ServerError:
        message, kind, code, param = _error_fields(response.body)
        cls = (ValidationError if response.status in VALIDATION_STATUSES else
               AuthenticationError if response.status in AUTH_STATUSES else ServerError)
        error = cls(response.status, message, type=kind, code=code, param=param,
                    url=target.url)
        if first:
            # The server's indexes ("input[3]") are within one chunk; say where it began.
            error.args = (f"{error.args[0]} (in the request for texts[{first}:])",)
        return error

    def _gone(self, target: Target, exc: BaseException) -> bool:
        if isinstance(exc, ConnectionRefusedError):
            return True
        return target.server is not None and not target.server.alive()

    def _send(self, target: Target, method: str, path: str, body: bytes | None,
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
                response = connection.getresponse()
                data = response.read()
            except BaseException as exc:
                # Whatever happened (Ctrl-C included), the connection's state is unknown.
                self._drop_connection(connection)
                if attempt == 0 and reused and isinstance(exc, STALE_CONNECTION_ERRORS):
                    continue
                raise
            if response.will_close:
                self._drop_connection(connection)
            else:
                self._local.used = True
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()},
                            data)
        raise AssertionError("unreachable")

    def _connection(self, target: Target) -> tuple[http.client.HTTPConnection, bool]:
        local = self._local
        connection: http.client.HTTPConnection | None = getattr(local, "connection", None)
        if connection is not None and local.target is target:
            return connection, local.used
        if connection is not None:
            self._drop_connection(connection)
        cls = (http.client.HTTPSConnection if target.scheme == "https"
               else http.client.HTTPConnection)
        connection = cls(target.host, target.port, timeout=self._connect_timeout)
        local.connection, local.target, local.used = connection, target, False
        with self._connections_lock:
            self._connections.add(connection)
        return connection, False

    def _drop_connection(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        with self._connections_lock:
            self._connections.discard(connection)
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None

    def _close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            connection.close()

    # -- finding, starting, restarting the server ------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise EmbedServeError("this Client is closed")

    def _configured_target(self) -> Target:
        return Target(self._scheme, self._host, self._port, self._base_path, self._generation)

    def _current_target(self) -> Target:
        target = self._target
        if target is not None:
            return target
        with self._lock:
            self._check_open()
            if self._target is None:
                self._target = self._find_or_start()
                self._had_server = True
                self._down_until = 0.0
            return self._target

    def _lose(self, target: Target, failure: str) -> None:
        """The server behind `target` stopped answering: forget it (once, whichever thread
        sees it first), saying why when it was ours."""
        with self._lock:
            if self._target is not target:
                return  # another thread already moved on
            self._target = None
            server = target.server
            if server is not None and not server.alive():
                log.warning("the server this client started (pid %s) %s; last log lines:\n%s",
                            server.pid, server.describe_exit(),
                            "\n".join(server.log_tail()[-10:]))
                atexit.unregister(server.stop_at_exit)
                server.stop(self._stop_timeout)  # reap it and its workers
            elif server is None:
                log.warning("the server at %s went away (%s)", target.url, failure)
                self._foreign_lost = True

    def _find_or_start(self) -> Target:
        """Called with the lock held and no current target."""
        deadline = time.monotonic() + self._start_timeout
        may_start = self._autostart and (self._restart or not self._had_server)
        private = self._port == 0
        if private and not may_start:
            raise ServerUnavailable("the private server (port=0) is gone and restart is off",
                                    url=self.url)
        if may_start and self._down_until > time.monotonic() and self._down_error is not None:
            may_start = False  # a start just failed: only look, do not spawn again yet
        url = self._configured_target().url
        if private:
            url = url[: -len(":0")] + " (a free port)"
        local = self._host in LOOPBACK_HOSTS or self._host.startswith("127.")
        spawns = refusals = 0
        started = time.monotonic()
        # A server someone else runs went away: they may be restarting it; wait for it as
        # long as for any other restart, unless the fallback's identical vectors can answer
        # meanwhile. Otherwise (nothing was ever there, or waiting for it already failed
        # once) look a few times only: the fallback or the error is better than a minute's
        # wait for a server that is not coming.
        wait_until = (started + self._retry_timeout
                      if self._foreign_lost and self._fallback_plan()[0] is None else None)
        while True:
            if not private:
                state = self._probe(deadline)
                if state == "ok":
                    log.info("using the embedserve server at %s", url)
                    self._foreign_lost = False
                    return self._new_target(None)
                if state != "refused":
                    raise ServerUnavailable(f"{url} {state}", url=url)
                if not (may_start and local):
                    now = time.monotonic()
                    if wait_until is None:
                        again = refusals < (self._retries if self._retries is not None
                                            else REFUSAL_RETRIES)
                    else:
                        again = now < wait_until and (self._retries is None
                                                      or refusals < self._retries)
                    if again:  # someone else may be starting it right now
                        refusals += 1
                        delay = self._delay(refusals, None)
                        time.sleep(delay if wait_until is None else min(delay, wait_until - now))
                        continue
                    self._foreign_lost = False
                    why = ("autostart is off" if not self._autostart else
                           "restart is off" if not self._restart else
                           "autostart only starts servers on this machine (127.0.0.1, "
                           "localhost, ::1)" if not local else
                           f"a start failed less than {RECHECK_INTERVAL:g}s ago: "
                           f"{self._down_error}")
                    raise ServerUnavailable(f"nothing answers at {url} ({refusals + 1} tries in "
                                            f"{now - started:.1f}s) and {why}", url=url)
            self._count_restart(url)
            server = self._spawn()
            spawns += 1
            # Ours from now on: stopped at exit even if this thread is interrupted (Ctrl-C)
            # while waiting for it.
            atexit.register(server.stop_at_exit, self._stop_timeout)
            try:
                outcome = server.wait_ready(deadline)
            except BaseException:
                atexit.unregister(server.stop_at_exit)
                server.stop(self._stop_timeout)
                raise
            if outcome == "ready":
                log.info("started embedserve at %s (pid %s)", server.url, server.pid)
                return self._new_target(server)
            atexit.unregister(server.stop_at_exit)
            if outcome == "timeout":
                server.stop(self._stop_timeout)
                raise ServerStartError(f"the server started at {url} (pid {server.pid}) was "
                                       f"not ready within {self._start_timeout:g}s", url=url,
                                       returncode=server.process.returncode,
                                       log_tail=server.log_tail())
            server.stop(self._stop_timeout)  # reaps it; drains its last words
            if server.lost_port_race() and not private and spawns < MAX_SPAWNS_PER_START:
                # Another process bound the port first (a client starting at the same
                # time, or a server still letting go of it): use that one if it serves.
                log.info("port %s taken by another server; waiting for it to answer",
                         self._port)
                continue
            raise ServerStartError(f"the server started for {url} {server.describe_exit()}",
                                   url=url, returncode=server.process.returncode,
                                   log_tail=server.log_tail())

    def _probe(self, deadline: float) -> str:
        """GET /health at the configured URL until it answers 200 ('ok'), nothing listens
        ('refused') or the deadline passes (a description of what it saw)."""
        target = self._configured_target()
        delay = 0.02
        seen = "did not answer"
        while True:
            cls = (http.client.HTTPSConnection if target.scheme == "https"
                   else http.client.HTTPConnection)
            connection = cls(target.host, target.port, timeout=self._connect_timeout)
            try:
                connection.connect()
                connection.sock.settimeout(min(self._timeout, PROBE_TIMEOUT))
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                connection.request("GET", target.base_path + "/health", headers=headers)
                response = connection.getresponse()
                body = response.read()
                if response.status == 200:
                    return "ok"
                seen = f"answers {response.status} to GET /health: {_error_fields(body)[0]}"
                if response.status not in RETRYABLE_STATUSES:
                    return seen  # something answers, and it is not an embedserve server
            except ConnectionRefusedError:
                return "refused"
            except TRANSPORT_ERRORS as exc:
                seen = f"did not answer GET /health ({type(exc).__name__}: {exc})"
            finally:
                connection.close()
            # A server that is starting (503 loading) or busy: wait for it, bounded.
            if time.monotonic() + delay > deadline:
                return f"{seen} within {self._start_timeout:g}s"
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

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
        self._generation += 1
        host, port = self._host, self._port
        if server is not None and server.url is not None and port == 0:
            parts = urlsplit(server.url)
            host, port = parts.hostname or host, parts.port or port
        return Target(self._scheme, host, port, self._base_path, self._generation, server)

    def _spawn(self) -> ServerProcess:
        command = [self._python, "-m", "embedserve", "--host", self._host,
                   "--port", str(self._port)]
        if self._backend is not None:
            command += ["--backend", self._backend]
        if self._model is not None:
            command += ["--model", self._model]
        if self._dimensions is not None:
            command += ["--dimensions", str(self._dimensions)]
        command += self._server_args
        env = {**os.environ, **self._env, "PYTHONUNBUFFERED": "1",
               # Stop when this process is gone, however it went (read by servers that
               # support it; an unknown EMBEDSERVE_* variable is ignored by older ones).
               env_name("watch_stdin"): "1"}
        if self._api_key:
            env[env_name("api_key")] = self._api_key  # not in argv, which `ps` shows
        pythonpath = _child_pythonpath(env)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        log.info("starting %s", " ".join(command))
        try:
            return ServerProcess(command, env)
        except OSError as exc:
            raise ServerStartError(f"cannot run {command[0]!r}: {exc}", url=self.url,
                                   returncode=None, log_tail=[]) from exc


__all__ = [
    "AuthenticationError", "Client", "EmbedServeError", "Embedding", "Embeddings",
    "ModelMismatch", "ServerError", "ServerStartError", "ServerUnavailable", "ValidationError",
    "DEFAULT_URL", "URL_ENV",
]
