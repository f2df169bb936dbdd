"""What the server does, without HTTP: validate an EmbedRequest against the loaded backend,
run it, post-process (dimensions, normalisation), and describe itself for /info. An Encoder
runs in the request thread; a BatchedModel through the Batcher's one model thread.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from embedserve import __version__
from embedserve.backends import EMBED, BackendInfo, BatchedModel, Encoder, Encoding, Loaded, Token
from embedserve.config import Config
from embedserve.errors import ApiError, quoted
from embedserve.metrics import Metrics
from embedserve.names import ModelNames, served_names
from embedserve.requests import EmbedRequest, EmbedResult
from embedserve.vectors import shorten

if TYPE_CHECKING:
    from embedserve.batcher import Batcher

log = logging.getLogger("embedserve.service")


class SharedInt(Protocol):
    """A counter the supervisor keeps in shared memory (multiprocessing.Value)."""

    value: int


class EmbeddingService:
    """Created before the backend is loaded (so a loading worker can answer 503), and made
    ready by `attach`. Tracks backend calls in progress so the worker's heartbeat can tell
    a stuck call from a long series of progressing ones."""

    def __init__(self, config: Config, restarts: SharedInt | None = None) -> None:
        self.config = config
        self._restarts = restarts
        self.backend: BackendInfo | None = None
        self._encoder: Encoder | None = None
        self._model: BatchedModel | None = None
        self.skipped: dict[str, str] = {}
        self.started = time.time()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_requests)
        # The in-thread encoder (hash) runs one call at a time anyway (its caches are
        # locked); queueing here, outside backend_call, keeps a call's measured age to the
        # call itself, so a worker busy with a queue of big requests is not taken for hung.
        self._encode_lock = threading.Lock()
        self._names = ModelNames(("",), ("",))
        self.metrics = Metrics()
        self._batcher: Batcher | None = None
        self._calls_lock = threading.Lock()
        self._calls: dict[int, float] = {}
        self._next_call = 0

    @property
    def ready(self) -> bool:
        return self.backend is not None

    def attach(self, loaded: Loaded) -> None:
        self.skipped = loaded.skipped
        if loaded.model is not None:  # one model thread, dynamic batches
            from embedserve.batcher import Batcher

            self._batcher = Batcher(loaded.model, self.config, self.backend_call,
                                    self.metrics.observe_batch)
        self._encoder, self._model = loaded.encoder, loaded.model
        backend = loaded.backend
        self._names = served_names(backend.model, self.config.served_model_name)
        self.backend = backend

    @contextmanager
    def admit(self) -> Iterator[None]:
        """A slot among max_concurrent_requests for one request's work, taken before its
        body is read: a flood of large bodies is refused before it is buffered."""
        if not self._slots.acquire(blocking=False):
            raise ApiError(429, "server is at its limit of "
                                f"{self.config.max_concurrent_requests} concurrent requests; "
                                "retry shortly", headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self._slots.release()

    @contextmanager
    def backend_call(self) -> Iterator[None]:
        """Wraps every call into the model, so the heartbeat can see one that is stuck."""
        with self._calls_lock:
            call = self._next_call = self._next_call + 1
            self._calls[call] = time.monotonic()
        try:
            yield
        finally:
            with self._calls_lock:
                del self._calls[call]

    def oldest_call_age(self) -> float:
        """Seconds the longest-running model call has been running (0 when idle)."""
        with self._calls_lock:
            started = min(self._calls.values(), default=None)
        return 0.0 if started is None else time.monotonic() - started

    def embed(self, request: EmbedRequest, client_gone: Callable[[], bool] | None = None
              ) -> EmbedResult:
        """Run one request; callers hold a slot from `admit` around it. `client_gone`, asked
        while the request waits for the model, lets a request whose client hung up be
        dropped (ClientGone) instead of computed for no one."""
        backend = self._ready_backend()
        if request.model is not None:
            self.check_model(request.model)
        dims = request.dimensions
        if dims is not None and not 1 <= dims <= backend.dimensions:
            raise ApiError(422, f"'dimensions' must be between 1 and {backend.dimensions} "
                                f"for model {backend.model}, got {dims}", param="dimensions")
        texts = self._prompted(backend, request)
        if self._encoder is not None:
            # The hash tier computes `dimensions` buckets directly: its features carry no
            # order of importance, so a shortened 384-d vector would be mostly zeros.
            with self._encode_lock, self.backend_call():
                encoded = self._encoder.encode(texts, normalize=request.normalize,
                                               dimensions=dims)
            vectors, tokens = encoded.vectors, sum(encoded.token_counts)
        else:
            vectors, tokens = self._embed_batched(texts, request, client_gone)
            if dims is not None and dims < backend.dimensions:
                vectors = [shorten(v, dims, request.normalize) for v in vectors]
        self.metrics.observe_embedding(len(vectors), tokens)
        return EmbedResult(vectors, self._names.primary, tokens)

    def _embed_batched(self, texts: list[str], request: EmbedRequest,
                       client_gone: Callable[[], bool] | None
                       ) -> tuple[list[list[float]], int]:
        model, batcher = self._model, self._batcher
        assert model is not None and batcher is not None  # attach: no encoder, so a model
        if EMBED not in model.capabilities:
            raise ApiError(400, f"model {model.model} does not embed text (it can: "
                                f"{', '.join(sorted(model.capabilities)) or 'nothing'})")
        check_well_formed(texts)
        batcher.check_room(len(texts))  # before tokenizing: a refusal should cost nothing
        # Tokenized once, here in the request thread: the counts checked and reported are
        # those of the very ids the model thread pads.
        encodings = model.prepare(texts, truncate_left=request.truncate_left)
        self._check_lengths(model, encodings, request.truncate)
        vectors = batcher.embed(encodings, request.normalize, client_gone)
        return vectors, sum(e.tokens for e in encodings)

    def stop_now(self, error: ApiError) -> None:
        """A worker out of time to drain: answer what still waits for the model with
        `error`, so that its clients retry elsewhere instead of losing the connection."""
        if self._batcher is not None:
            self._batcher.close(error)

    def model_names(self) -> ModelNames:
        self._ready_backend()
        return self._names

    def check_model(self, name: str) -> None:
        # A request for another model must not silently get this one's vectors.
        names = self.model_names()
        if name.lower() not in (n.lower() for n in names.accepted):
            listed = ", ".join(repr(n) for n in names.listed)
            raise ApiError(404, f"model {quoted(name)} is not served here; this server serves "
                                f"{listed}", param="model")

    def render_metrics(self) -> str:
        backend = self.backend
        labels = ({"backend": backend.name, "model": backend.model, "device": backend.device,
                   "dimensions": str(backend.dimensions)} if backend else {"backend": "loading"})
        return self.metrics.render(
            backend=labels, queue_depth=self._batcher.queue_depth() if self._batcher else 0,
            restarts=self._restarts.value if self._restarts is not None else 0)

    def tokenize(self, texts: list[str], add_special_tokens: bool) -> list[list[Token]]:
        backend = self._ready_backend()
        if self._model is not None:
            check_well_formed(texts)
        return backend.tokenize(texts, add_special_tokens=add_special_tokens)

    @staticmethod
    def _prompted(backend: BackendInfo, request: EmbedRequest) -> list[str]:
        name = request.prompt_name or backend.default_prompt_name
        if name is None:
            return request.texts
        prompt = backend.prompts.get(name)
        if prompt is None:
            known = ", ".join(sorted(backend.prompts)) or "none"
            raise ApiError(422, f"model {backend.model} has no prompt {quoted(name)} "
                                f"(its prompts: {known})", param="prompt_name")
        return [prompt + text for text in request.texts]

    @staticmethod
    def _check_lengths(model: BatchedModel, encodings: list[Encoding], truncate: bool) -> None:
        limit = model.max_input_tokens
        if truncate or not limit:
            return
        for i, encoding in enumerate(encodings):
            if encoding.untruncated > limit:
                raise ApiError(422, f"input {i} has {encoding.untruncated} tokens; model "
                                    f"{model.model} takes at most {limit}. Shorten it, or "
                                    "allow truncation (truncate=true)", param="truncate")

    def _ready_backend(self) -> BackendInfo:
        backend = self.backend
        if backend is None:
            raise ApiError(503, "the model is still loading; retry shortly",
                           headers={"Retry-After": "1"})
        return backend

    def info(self) -> dict[str, object]:
        backend, config = self._ready_backend(), self.config
        return {
            "backend": backend.name,
            "model": backend.model,
            "dimensions": backend.dimensions,
            "device": backend.device,
            "max_input_tokens": backend.max_input_tokens,
            "max_batch_size": config.max_batch_size,
            "max_body_bytes": config.max_body_bytes,
            "max_concurrent_requests": config.max_concurrent_requests,
            "version": __version__,
            "pid": os.getpid(),
            "supervisor_pid": os.getppid(),
            "workers": config.workers,
            "restarts": self._restarts.value if self._restarts is not None else 0,
            "uptime_s": round(time.time() - self.started, 3),
            "skipped_backends": self.skipped,
            "prompts": sorted(backend.prompts),
            "max_batch_tokens": config.max_batch_tokens if self._batcher else None,
            "batches": self._batcher.batches if self._batcher else None,
            # Requests dropped while waiting for the model because their client hung up.
            "abandoned_requests": self._batcher.abandoned if self._batcher else None,
            # What a forward pass was measured to cost beyond its tokens (see batcher.py).
            "pass_overhead_tokens": round(self._batcher.overhead) if self._batcher else None,
            "default_prompt_name": backend.default_prompt_name,
            # The names TEI clients read.
            "model_id": backend.model,
            "max_input_length": backend.max_input_tokens,
            "max_client_batch_size": config.max_batch_size,
        }


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_well_formed(texts: list[str]) -> None:
    """JSON can carry a lone surrogate ("\\ud800"), which is not text a tokenizer can take:
    a 400 naming the input, not a 500 for the whole batch. (The hash tier's spec gives
    them a meaning; the ML tiers have none to give.)"""
    for i, text in enumerate(texts):
        if _SURROGATE.search(text):
            raise ApiError(400, f"input {i} contains a lone surrogate (U+D800 to U+DFFF), "
                                "which is not valid Unicode text")
