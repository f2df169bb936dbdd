"""embedserve.Client: the app-side embedder that finds or starts the server, talks HTTP to
it, restarts it when it dies, falls back to in-process hash embeddings when nothing else
works, and cleans up at exit. Standard library only (urllib.parse + http.client), and
nothing of the server: importing it loads no backend, dialect or service module.

    from embedserve import Client

    with Client() as client:                  # EMBEDSERVE_URL or http://127.0.0.1:8765
        vectors = client.embed(["first text", "second text"])
        vectors.model, vectors.backend, vectors.source   # 'hash-v1-384', 'hash', 'server'
        client.models()                       # ['hash-v1-384']: the served names
        client.embed(["a text"], model="hash-v1-384")    # one served model, by name

Each part lives in a module of its own (as in the Node client, extras/node/lib):
  options.py    the constructor's arguments, checked once, EMBEDSERVE_* variables included
  finder.py     finding the server at `url`, starting one (autostart), sharing it with
                other clients, restarting it when it goes away
  process.py    one server this client started: spawn, output, ready line, stop, ownership
                (atexit, and a stdin pipe the server watches for when the app is killed)
  transport.py  one keep-alive connection per thread, error answers, and the one retry
                policy every retry loop follows
  pool.py       several servers (url=[...]): the one with fewest calls in flight, back-offs
  wire.py       texts checked, request bodies chunked to /info's limits, vectors decoded
  rerank.py     rerank(): its requests, results and the fallback's cosine ranking
  fallback.py   the in-process hash embeddings and the policy that allows them
  results.py    Embeddings and Embedding; errors.py, every error the client raises

Every result says where it came from (`.model`, `.backend`, `.source` "server" or
"fallback"; also `client.last_model` ...), one call's vectors always come from one model,
and a change of model between calls asking for the same one is logged as a warning.

Models. A server may serve several models; a call names one with `model=` (the OpenAI
request's `model` field), else gets the client's `model` option when given, else the
server's default (the first of `models()`). A name the server does not serve is a
ModelNotFound (a ValidationError) listing the names it does. The fallback answers a call
that names its model only when that is the hash tier (see fallback.py). A call fails with
ServerUnavailable (or falls back, as `fallback` allows) only after its requests were
retried until `retry_timeout` (60 s: long enough for a restarted worker to load its
model). While the server is down, calls within RECHECK_INTERVAL of the last failure go
straight to the fallback instead of paying for retries each time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from embedserve.client import rerank as reranking
from embedserve.client import wire
from embedserve.client.errors import (
    AuthenticationError,
    EmbedServeError,
    ModelMismatch,
    ModelNotFound,
    ServerError,
    ServerStartError,
    ServerUnavailable,
    ValidationError,
    _rebuild_error,  # noqa: F401 - errors pickled before the split name it here
    phrase,
)
from embedserve.client.fallback import Fallback
from embedserve.client.finder import RECHECK_INTERVAL, ServerFinder  # noqa: F401
from embedserve.client.pool import ServerPool
from embedserve.client.options import (
    DEFAULT_URL,
    EncodingFormat,
    FallbackPolicy,
    resolve_options,
)
from embedserve.client.results import Embedding, Embeddings, Ranking, Rankings, Source
from embedserve.client.transport import (
    TRANSPORT_ERRORS,
    Connections,
    Response,
    RetryPolicy,
    Target,
    error_fields,
    http_error,
    retry_after,
    retryable,
)
from embedserve.contracts import URL_ENV

log = logging.getLogger("embedserve.client")

# Times one request may find its server gone and re-find or restart it (not retries).
MAX_RELOCATIONS = 2
# Model names whose last answer's model is remembered (to warn when it changes).
MAX_SEEN_MODELS = 64


class Client:
    """An embedder that finds or starts an embedserve server (see the package docstring).

    url: the server; default $EMBEDSERVE_URL, else http://127.0.0.1:8765. Several servers
        that serve alike (replicas): a list of URLs, or one string of comma-separated URLs
        (EMBEDSERVE_URL too). Requests then go to the server with the fewest in flight; one
        that fails is skipped for a back-off while the others serve (see client/pool.py).
        With several, no server is ever started (autostart is off).
    autostart: start `python -m embedserve` when nothing answers at `url` (this machine
        only). restart: start a new one when the server in use goes away.
    backend, model, dimensions, server_args, env, python: how a started server runs
        (--backend, --model, --dimensions, extra CLI flags, extra environment variables,
        the interpreter; default sys.executable). `model` is also the model every call
        asks for (the request's `model` field) unless it names its own. port: overrides
        the URL's port; 0 starts a private server on a free port every time.
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
    fallback: "same-model" (True), "always" or "never" (False): see
        embedserve.client.fallback.

    EMBEDSERVE_DIMENSIONS, EMBEDSERVE_BACKEND, EMBEDSERVE_MODEL and EMBEDSERVE_API_KEY (from
    `env`, over os.environ: what a started server sees) are read once, here, and parsed as
    the server parses them: a bad value (EMBEDSERVE_DIMENSIONS=abc or 0) raises ValueError
    naming the variable and the value.
    """

    def __init__(self, url: str | Sequence[str] | None = None, *, autostart: bool = True,
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
        self._options = options = resolve_options(
            url, autostart=autostart, backend=backend, model=model, dimensions=dimensions,
            port=port, server_args=server_args, env=env, python=python, api_key=api_key,
            encoding_format=encoding_format, batch_size=batch_size, timeout=timeout,
            connect_timeout=connect_timeout, start_timeout=start_timeout,
            stop_timeout=stop_timeout, retry_timeout=retry_timeout, retries=retries,
            backoff=backoff, max_backoff=max_backoff, restart=restart, fallback=fallback)
        # Every retry: a request's, and the looks for a server someone else restarts.
        self._retry = RetryPolicy(options.backoff, options.max_backoff)
        self._connections = Connections(timeout=options.timeout,
                                        connect_timeout=options.connect_timeout,
                                        api_key=options.api_key)
        self._fallback = Fallback(options)
        # The model the call in progress on this thread named (None: the server's default):
        # whether the fallback may answer it decides how long a lost server is waited for.
        self._call = threading.local()
        self._finder: ServerFinder | ServerPool
        if options.pool:
            self._finder = ServerPool(options, self._retry)
        else:
            self._finder = ServerFinder(
                options, self._connections, self._retry,
                lambda: self._fallback.plan(getattr(self._call, "model", None)).embedder
                is not None)
        # The server's /info, for the target that answered it.
        self._info: tuple[Target, dict[str, Any]] | None = None

        self.last_model: str | None = None
        self.last_backend: str | None = None
        self.last_source: Source | None = None
        # The model each name asked for (None: the default) last came from, lower-cased.
        self._seen_models: dict[str | None, str] = {}

    # -- public API ------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], *, dimensions: int | None = None,
              model: str | None = None) -> Embeddings:
        """Embed `texts` (a list of non-empty strings), in order. `model` names the served
        model to use (one of `models()`, or any name the server accepts for it); default:
        the client's `model` option when given, else the server's default model. A name
        the server does not serve raises ModelNotFound. `dimensions` asks for shorter
        vectors where the model allows it: the hash tier computes that many buckets
        directly (the vectors of hash-v1-<dimensions>, still labelled with the served
        model's name, as the server does); ML models keep the first values, re-normalised."""
        texts = wire.checked_texts(texts)
        if dimensions is not None and (not isinstance(dimensions, int)
                                       or isinstance(dimensions, bool) or dimensions < 1):
            raise ValidationError(400, f"'dimensions' must be a positive integer, got "
                                       f"{dimensions!r}", param="dimensions")
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a str, got {type(model).__name__}")
        if model is not None and not model.strip():
            raise ValidationError(400, "'model' must name a model, got an empty string",
                                  param="model")
        finder = self._finder
        finder.check_open()
        self._call.model = model
        try:
            if self._options.fallback != "never" and finder.recently_failed():
                # Recently failed: do not pay for retries and start attempts on every call.
                result = self._fallback.embed(texts, dimensions, finder.down_error, self.url,
                                              model)
            else:
                try:
                    result = self._embed_remote(texts, dimensions, model)
                except ServerUnavailable as exc:
                    finder.check_open()
                    finder.note_failure(exc)
                    result = self._fallback.embed(texts, dimensions, exc, self.url, model)
        finally:
            self._call.model = None
        self._note(result, model)
        return result

    def embed_single(self, text: str, *, dimensions: int | None = None,
                     model: str | None = None) -> Embedding:
        if not isinstance(text, str):
            raise TypeError(f"embed_single() takes one str, got {type(text).__name__}")
        result = self.embed([text], dimensions=dimensions, model=model)
        return Embedding(result[0], model=result.model, backend=result.backend,
                         source=result.source)

    def rerank(self, query: str, documents: Sequence[str], *, top_n: int | None = None,
               model: str | None = None) -> Rankings:
        """`documents` best first by relevance to `query`, at most `top_n`: Ranking(index,
        score, document)s, with `.model`, `.backend`, `.method` ("cross-encoder", or
        "embeddings": cosine similarity) and `.source`. `model`: default: the server's first
        reranker, else its default model. See embedserve.client.rerank."""
        query, documents = reranking.checked(query, documents, top_n, model)
        finder = self._finder
        finder.check_open()
        self._call.model = model
        try:
            if self._options.fallback != "never" and finder.recently_failed():
                result = self._rerank_fallback(query, documents, top_n, finder.down_error,
                                               model)
            else:
                try:
                    result = reranking.remote(self, query, documents, top_n, model)
                except ServerUnavailable as exc:
                    finder.check_open()
                    finder.note_failure(exc)
                    result = self._rerank_fallback(query, documents, top_n, exc, model)
        finally:
            self._call.model = None
        if result.source == "server" and self._fallback.active:
            self._fallback.active = False
            log.warning("server at %s answers again; leaving the in-process fallback", self.url)
        self.last_model, self.last_backend, self.last_source = (
            result.model, result.backend, result.source)
        return result

    def _rerank_fallback(self, query: str, documents: list[str], top_n: int | None,
                         cause: ServerUnavailable | None, model: str | None) -> Rankings:
        vectors, label = self._fallback.rerank_vectors([query] + documents, cause, self.url,
                                                       model)
        return reranking.ranked(reranking.by_cosine(vectors, documents), top_n, model=label,
                                backend="hash", method=reranking.EMBEDDINGS,
                                source="fallback")

    def models(self) -> list[str]:
        """The names of the models the server serves (GET /v1/models), in its order: the
        first is its default, which calls that name no model get. Starts a server if
        allowed; ServerUnavailable when none can be had (the fallback does not answer)."""
        response, target = self._request("GET", "/v1/models")
        return wire.model_ids(response.body, target.url)

    def info(self) -> dict[str, Any]:
        """The server's GET /info (starting a server if allowed)."""
        response, target = self._request("GET", "/info")
        info = wire.json_object(response.body, f"{target.url}/info")
        self._remember_info(target, info)
        return info

    def health(self) -> dict[str, Any]:
        """One GET /health to the server in use (or to `url`; with several, to each until
        one serves), without starting anything or retrying: {"status": "ok"} when it serves;
        ServerError (e.g. 503 loading) or ServerUnavailable (the last server's) otherwise."""
        self._finder.check_open()
        failure = EmbedServeError("no server to ask")  # there is always one
        for target in self._finder.health_targets():
            if target.port == 0:
                raise ServerUnavailable("no server started yet (port=0 starts one on first "
                                        "use)", url=target.url)
            try:
                response = self._connections.send(target, "GET", "/health", None)
            except TRANSPORT_ERRORS as exc:
                failure = ServerUnavailable(f"no answer from {target.url}: {exc!r}",
                                            url=target.url)
                continue
            if response.status == 200:
                return wire.json_object(response.body, f"{target.url}/health")
            failure = http_error(response, target.url)
        raise failure

    def connect(self) -> Client:
        """Find or start the server now rather than on first use. Returns the client."""
        self._finder.current()
        return self

    def close(self) -> None:
        """Close connections and stop the server this client started (if any). Idempotent;
        a server found running is left alone."""
        closing, owned = self._finder.close()
        if not closing:
            return
        self._connections.close_all()
        if owned is not None:
            log.info("stopping the server this client started (pid %s)", owned.pid)
            self._finder.stop(owned)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @property
    def url(self) -> str:
        """Where the server in use answers (or will be looked for)."""
        return self._finder.url

    @property
    def owns_server(self) -> bool:
        """True while the server in use is one this client started (and will stop)."""
        target = self._finder.target
        return target is not None and target.server is not None

    @property
    def server_pid(self) -> int | None:
        """The server process in use: the one this client started, or the one /info named."""
        target = self._finder.target
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
        return self._finder.closed

    def __repr__(self) -> str:
        return (f"Client(url={self.url!r}, owns_server={self.owns_server}, "
                f"fallback={self._options.fallback!r}, last_model={self.last_model!r})")

    # -- embedding -------------------------------------------------------------------------
    def _embed_remote(self, texts: list[str], dimensions: int | None, asked: str | None
                      ) -> Embeddings:
        """The call's vectors from the server; `asked`: the model the call named."""
        encoding_format = self._options.encoding_format
        # Every chunk asks for the same model: one call's vectors come from one model.
        wanted = asked if asked is not None else self._options.model
        for _ in range(2):  # a server swapped for another model mid-call: redo it once
            info_target, info = self._server_info()
            vectors: list[list[float]] = []
            model: str | None = None
            last_target = info_target
            sent = None if wanted is None else self._fallback.request_name(wanted)
            for start, body in wire.chunks(texts, info, dimensions, encoding_format,
                                           self._options.batch_size, sent):
                try:
                    response, last_target = self._request("POST", "/v1/embeddings", body,
                                                          first=start)
                except ModelNotFound as exc:
                    self._name_missing_model(exc, wanted)
                    raise
                chunk_model, chunk = wire.decode(response.body, encoding_format,
                                                 last_target.url)
                wire.check_start(len(vectors), start)
                if model is None:
                    model = chunk_model
                elif chunk_model != model:
                    log.warning("the server changed model from %s to %s during one call; "
                                "embedding the whole call again", model, chunk_model)
                    break
                vectors.extend(chunk)
            else:
                if not self._finder.shares_info(info_target, last_target):
                    # restarted mid-call: describe the new one
                    info_target, info = self._server_info()
                model = model or str(info.get("model", ""))
                wire.check_answer(vectors, len(texts), dimensions, info, model)
                if asked is None:  # what the server's default (or the option's) model is
                    self._fallback.served_model = model
                return Embeddings(vectors, model=model, backend=wire.backend_of(info, model),
                                  source="server")
        raise ModelMismatch("the server changed models twice during one call")

    def _name_missing_model(self, error: ModelNotFound, asked: str | None) -> None:
        """Completes the 404 of a model name the server does not serve: the name asked for,
        and the served names (one GET /v1/models, not retried: the error comes at once)."""
        error.model = asked
        target = self._finder.target
        if target is None:
            return
        try:
            response = self._connections.send(target, "GET", "/v1/models", None)
            if response.status == 200:
                error.available = wire.model_ids(response.body, target.url)
        except (*TRANSPORT_ERRORS, EmbedServeError):
            pass  # the server's message lists them anyway

    def _note(self, result: Embeddings, asked: str | None) -> None:
        if result.source == "server" and self._fallback.active:
            self._fallback.active = False
            log.warning("server at %s answers again; leaving the in-process fallback", self.url)
        # A call asking for another model than the last one gets another model: no news.
        # The same request answered by another model is (a server swapped, a fallback).
        key = asked.lower() if asked is not None else None
        previous = self._seen_models.get(key)
        if previous is not None and result.model != previous:
            log.warning("model changed from %s to %s (%s): vectors of different models are "
                        "not comparable", previous, result.model, result.source)
        self._seen_models[key] = result.model
        if len(self._seen_models) > MAX_SEEN_MODELS:
            del self._seen_models[next(iter(self._seen_models))]
        self.last_model, self.last_backend, self.last_source = (
            result.model, result.backend, result.source)

    def _server_info(self) -> tuple[Target, dict[str, Any]]:
        cached = self._info
        target = self._finder.current()
        if cached is not None and self._finder.shares_info(cached[0], target):
            return cached
        response, target = self._request("GET", "/info")
        info = wire.json_object(response.body, f"{target.url}/info")
        self._remember_info(target, info)
        return target, info

    def _remember_info(self, target: Target, info: dict[str, Any]) -> None:
        self._info = (target, info)
        self._fallback.learn(info, target.url)

    # -- requests with retries -------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, *, first: int = 0
                 ) -> tuple[Response, Target]:
        options = self._options
        # Retried until retry_timeout: a restarted worker answers 503 "loading" for as long
        # as its model takes to load, and the app must not see that.
        retries = self._retry.start(seconds=options.retry_timeout, cap=options.retries)
        relocations = 0  # servers re-found or restarted for this request: not retries
        skips = 0  # other servers of a pool turned to at once: not retries either
        finder = self._finder
        while True:
            target = finder.current()
            retry_wait: float | None = None
            try:
                with finder.sending(target):
                    response = self._connections.send(target, method, path, body,
                                                      retries.answer_wait(options.timeout))
            except TRANSPORT_ERRORS as exc:
                finder.check_open()
                failure = f"{type(exc).__name__}: {exc}"
                status = None
                if finder.gone(target, exc) and relocations < MAX_RELOCATIONS:
                    # Nothing listens (or our server died): the next current() restarts or
                    # re-finds it at once; no backoff, it is not a busy server.
                    finder.lose(target, failure)
                    relocations += 1
                    continue
            else:
                if response.status < 300:
                    finder.served(target)
                    return response, target
                if not retryable(response):
                    finder.served(target)  # it answers: a client's error, not the server's
                    raise http_error(response, target.url, first)
                message = error_fields(response.body)[0]
                failure = f"{response.status} {phrase(response.status)}: {message}"
                status = response.status
                retry_wait = retry_after(response.headers)
            # With several servers, another one takes the request now.
            if finder.skip(target, failure, retry_wait) and skips < finder.size:
                skips += 1
                continue
            delay = retries.next_delay(retry_wait)
            if delay is None:
                raise ServerUnavailable(
                    f"{method} {target.url}{path} failed {retries.tries} times in "
                    f"{retries.elapsed():.1f}s; last: {failure}", url=target.url, status=status)
            log.info("%s %s%s: %s; retry %d in %.2fs (retrying for up to %gs)", method,
                     target.url, path, failure, retries.failures, delay, options.retry_timeout)
            time.sleep(delay)


__all__ = [
    "AuthenticationError", "Client", "EmbedServeError", "Embedding", "Embeddings",
    "ModelMismatch", "ModelNotFound", "Ranking", "Rankings", "ServerError",
    "ServerStartError", "ServerUnavailable", "ValidationError", "DEFAULT_URL", "URL_ENV",
]
