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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from embedserve import __version__
from embedserve.backends import (EMBED, RERANKER, BackendError, BackendInfo,
                                 Encoder, Encoding, Loaded, Token, load_backend)
from embedserve.config import Config
from embedserve.errors import ApiError, ClientGone, quoted
from embedserve.metrics import Metrics
from embedserve.names import ModelNames
from embedserve.quantize import BINARY, CALIBRATED_TYPES, INT8, UBINARY, UINT8, Ranges, binary, \
    ubinary
from embedserve.registry import Registry, Slot
from embedserve.requests import EmbedRequest, EmbedResult
from embedserve.vectors import shorten

log = logging.getLogger("embedserve.service")

# Text the hash tier embeds between two looks at whether the client is still there (about
# 0.2 s of CPU on 2 cores for words it has not cached; a 32-text request is one part).
ENCODE_PART_CHARS = 256 * 1024

# Cohere's input types, and the prompt names that serve each purpose, the first a model has
# winning: nomic-style names, then the query / document (or passage) pairs of E5, BGE and
# most sentence-transformers models. A model with none of them embeds the text as it is.
INPUT_TYPE_PROMPTS = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage", "corpus"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}


class SharedInt(Protocol):
    """A counter the supervisor keeps in shared memory (multiprocessing.Value)."""

    value: int


class EmbeddingService:
    """Created before any model is loaded (so a loading worker can answer 503), and made
    ready by `load`. Tracks backend calls in progress so the worker's heartbeat can tell
    a stuck call from a long series of progressing ones."""

    def __init__(self, config: Config, restarts: SharedInt | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self._restarts = restarts
        self.started = time.time()
        self._slots = threading.BoundedSemaphore(config.max_concurrent_requests)
        # The in-thread encoder (hash) runs one call at a time anyway (its caches are
        # locked); queueing here, outside backend_call, keeps a call's measured age to the
        # call itself, so a worker busy with a queue of big requests is not taken for hung.
        self._encode_lock = threading.Lock()
        # A worker's counts go where its siblings can read them (see metrics.py); a
        # service hosted on its own counts in memory.
        self.metrics = metrics if metrics is not None else Metrics()
        self._calls_lock = threading.Lock()
        self._calls: dict[int, float] = {}
        self._next_call = 0
        self._registry: Registry | None = None

    @property
    def ready(self) -> bool:
        return self._registry is not None

    def load(self, loader: Callable[[Config], Loaded] = load_backend,
             serves: tuple[str, int] | None = None) -> None:
        """Know the models and, unless --no-preload, load them all: then ready. A model
        that cannot load, names two models share, or a default model other than `serves`
        (model, dimensions: what this server has served so far) are a BackendError."""
        try:
            registry = Registry(self.config, self.backend_call, self.metrics.observe_batch,
                                loader)
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        if self.config.preload:
            registry.preload()
        backend = registry.default.backend
        if serves is not None and backend is not None and \
                (backend.model, backend.dimensions) != serves:
            raise BackendError(f"loaded {backend.model} ({backend.dimensions} dimensions), "
                               f"but this server serves {serves[0]} ({serves[1]} dimensions): "
                               "its vectors would be mixed with another model's. Was the "
                               "model removed from the cache, or its backend uninstalled?")
        self._registry = registry
        self.publish_gauges()  # a sibling's scrape sees this worker's models at once

    def attach(self, loaded: Loaded) -> None:
        """Serve `loaded` as the one model (tests and hosts that load it themselves)."""
        self.load(lambda config: loaded)

    @property
    def backend(self) -> BackendInfo | None:
        """The default model's backend, once it is loaded."""
        return self._registry.default.backend if self._registry is not None else None

    @property
    def skipped(self) -> dict[str, str]:
        return self._registry.default.skipped if self._registry is not None else {}

    def check_room(self) -> None:
        """The 429 of admit(), now, without taking a slot (before a body is read)."""
        with self.admit():
            pass

    @contextmanager
    def admit(self) -> Iterator[None]:
        """A slot among max_concurrent_requests for one request's work, taken once its
        body is in (dispatch.py: the transport's side of it)."""
        if not self._slots.acquire(blocking=False):
            raise ApiError(429, "server is at its limit of "
                                f"{self.config.max_concurrent_requests} concurrent requests; "
                                "retry shortly", headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self._slots.release()

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Counted in /metrics as a request being served (the transport says from when)."""
        self.metrics.request_started()
        try:
            yield
        finally:
            self.metrics.request_finished()

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
        """Run one request on the model it names; callers hold a slot from `admit` around
        it. `client_gone`, asked while the request waits for the model, lets a request
        whose client hung up be dropped (ClientGone) instead of computed for no one."""
        registry = self._ready_registry()
        slot = registry.resolve(request.model)
        with registry.use(slot, request.keep_alive):
            backend = slot.backend
            assert backend is not None  # use() loads it
            model = slot.model
            served = slot.names.primary  # errors name a model as its clients do, not a path
            if model is not None and EMBED not in model.capabilities:  # before its options
                raise ApiError(400, f"model {served} does not embed text (it can: "
                                    f"{', '.join(sorted(model.capabilities)) or 'nothing'})",
                               param="model")
            dims = request.dimensions
            if dims is not None and not 1 <= dims <= backend.dimensions:
                raise ApiError(422, f"'dimensions' must be between 1 and {backend.dimensions} "
                                    f"for model {served}, got {quoted(dims)}",
                               param="dimensions")
            ranges = _ranges_for(backend, served, request, dims or backend.dimensions)
            texts, prompt = request.texts, self._prompt(backend, served, request)
            vectors: Sequence[Sequence[float]]
            if not texts:  # Ollama's request to load a model (keep_alive 0: to unload it)
                vectors, tokens = [], 0
            elif slot.encoder is not None:
                vectors, tokens = self._encode(slot.encoder, [prompt + t for t in texts],
                                               request.normalize, dims, client_gone)
            else:
                rows, tokens = self._embed_batched(slot, texts, prompt, request, client_gone)
                if dims is not None and dims < backend.dimensions:
                    rows = [shorten(v, dims, request.normalize) for v in rows]
                vectors = rows
        self.metrics.observe_embedding(backend.model, len(vectors), tokens)
        return EmbedResult(vectors, slot.names.primary, tokens,
                           _quantized(vectors, request.quantized, ranges))

    def _encode(self, encoder: Encoder, texts: list[str], normalize: bool, dims: int | None,
                client_gone: Callable[[], bool] | None
                ) -> tuple[list[Sequence[float]], int]:
        """The hash tier's vectors, computed here, ENCODE_PART_CHARS of text at a time. A
        request whose client hung up while it waited for the encoder, or between parts, is
        dropped (ClientGone): queued behind big requests, abandoned ones were all computed."""
        vectors: list[Sequence[float]] = []
        tokens = 0
        for part in _parts(texts, ENCODE_PART_CHARS):
            with self._encode_lock:
                if client_gone is not None and client_gone():
                    raise ClientGone(f"client gone; {len(texts) - len(vectors)} of its texts "
                                     "not embedded")
                with self.backend_call():
                    # `dimensions` buckets computed directly: the hash tier's features carry
                    # no order of importance, so a shortened vector would be mostly zeros.
                    encoded = encoder.encode(part, normalize=normalize, dimensions=dims)
            vectors.extend(encoded.vectors)
            tokens += sum(encoded.token_counts)
        return vectors, tokens

    @staticmethod
    def _embed_batched(slot: Slot, texts: list[str], prompt: str, request: EmbedRequest,
                       client_gone: Callable[[], bool] | None
                       ) -> tuple[list[list[float]], int]:
        model, batcher = slot.model, slot.batcher
        assert model is not None and batcher is not None  # loaded, and not an encoder
        check_well_formed(texts, request.input_name)
        batcher.check_room(len(texts))  # before tokenizing: a refusal should cost nothing
        # Tokenized once, here in the request thread: the counts checked and reported are
        # those of the very ids the model thread pads.
        encodings = model.prepare(texts, truncate_left=request.truncate_left, prompt=prompt)
        _check_lengths(slot.names.primary, model.max_input_tokens, encodings, request)
        vectors = batcher.embed(encodings, request.normalize, client_gone)
        return vectors, sum(e.tokens for e in encodings)

    def stop_now(self, error: ApiError) -> None:
        """A worker out of time to drain: answer what still waits for a model with
        `error`, so that its clients retry elsewhere instead of losing the connection."""
        for slot in self._registry.slots if self._registry is not None else []:
            if slot.batcher is not None:
                slot.batcher.close(error)

    def model_names(self) -> ModelNames:
        """Every served model's names, the default model's first."""
        slots = self._ready_registry().slots
        return ModelNames(tuple(n for slot in slots for n in slot.names.accepted),
                          tuple(n for slot in slots for n in slot.names.listed))

    def listed_models(self) -> list[tuple[str, str]]:
        """Every listed name with its model's backend ("" for one not loaded yet)."""
        return [(name, slot.backend.name if slot.backend else "")
                for slot in self._ready_registry().slots for name in slot.names.listed]

    def loaded_models(self) -> list[dict[str, object]]:
        """The ML models in memory now (Ollama's /api/ps): name, size, expiry (epoch s)."""
        registry, now = self._ready_registry(), time.monotonic()
        result: list[dict[str, object]] = []
        for slot in registry.slots:
            if not slot.unloadable:
                continue
            expiry = registry.expires_at(slot)
            result.append({"name": slot.names.primary, "backend": slot.backend.name
                           if slot.backend else "", "size": _memory(slot.backend),
                           "expires_at": None if expiry is None else
                           time.time() + max(0.0, expiry - now)})
        return result

    def publish_gauges(self) -> None:
        """Sample the models loaded and their queues into this worker's gauges (the
        worker's heartbeat calls this each second, and a scrape before it reports)."""
        registry = self._registry
        backends, depth = registry.describe_loaded() if registry is not None else ([], {})
        self.metrics.publish(backends or [{"backend": "loading"}], depth)

    def render_metrics(self) -> str:
        """The whole server's metrics (every worker's), as a scrape of /metrics gets them."""
        self.publish_gauges()
        return self.metrics.render(
            restarts=self._restarts.value if self._restarts is not None else 0)

    def tokenize(self, texts: list[str], add_special_tokens: bool, model: str | None = None
                 ) -> list[list[Token]]:
        registry = self._ready_registry()
        with registry.use(registry.resolve(model)) as slot:
            backend = slot.backend
            assert backend is not None
            if slot.model is not None:
                check_well_formed(texts)
            return backend.tokenize(texts, add_special_tokens=add_special_tokens)

    @staticmethod
    def _prompt(backend: BackendInfo, served: str, request: EmbedRequest) -> str:
        """What goes before each text: the prompt named, else the input type's, else the
        model's default ("" for none)."""
        if not request.prompts:
            return ""
        # An empty prompt_name is a name asked for (and none has it), not no name.
        name = request.prompt_name if request.prompt_name is not None else \
            _input_type_prompt(backend, request.input_type) or backend.default_prompt_name
        if name is None:
            return ""
        prompt = backend.prompts.get(name)
        if prompt is None:
            known = ", ".join(sorted(backend.prompts)) or "none"
            raise ApiError(422, f"model {served} has no prompt {quoted(name)} "
                                f"(its prompts: {known})", param="prompt_name")
        return prompt

    def registry(self) -> Registry:
        """The served models (503 while loading): for the answers built on embed."""
        return self._ready_registry()

    def _ready_registry(self) -> Registry:
        registry = self._registry
        if registry is None:
            raise ApiError(503, "the model is still loading; retry shortly",
                           headers={"Retry-After": "1"})
        return registry

    def info(self) -> dict[str, object]:
        """The default model's facts at the top (what single-model clients read), every
        model's under "models"."""
        registry, config = self._ready_registry(), self.config
        models = [self._model_info(registry, slot) for slot in registry.slots]
        default = models[0]
        return {
            **{key: default[key] for key in ("backend", "model", "kind", "dimensions", "device",
                                             "max_input_tokens", "prompts",
                                             "default_prompt_name")},
            "max_batch_size": config.max_batch_size,
            "max_rerank_documents": config.max_rerank_documents,
            "max_body_bytes": config.max_body_bytes,
            "max_concurrent_requests": config.max_concurrent_requests,
            "version": __version__,
            "pid": os.getpid(),
            "supervisor_pid": os.getppid(),
            "workers": config.workers,
            "restarts": self._restarts.value if self._restarts is not None else 0,
            "uptime_s": round(time.time() - self.started, 3),
            "skipped_backends": registry.default.skipped,
            **{key: default[key] for key in ("max_batch_tokens", "batches",
                                             "abandoned_requests", "pass_overhead_tokens",
                                             "pass_tokens")},
            # The names TEI clients read.
            "model_id": default["model"],
            "max_input_length": default["max_input_tokens"],
            "max_client_batch_size": config.max_batch_size,
            "models": models,
        }

    def model_info(self, name: str) -> dict[str, object]:
        """One served model's entry of info()["models"] (a 404 for a name not served)."""
        registry = self._ready_registry()
        return self._model_info(registry, registry.resolve(name))

    def _model_info(self, registry: Registry, slot: Slot) -> dict[str, object]:
        backend, batcher, known = slot.backend, slot.batcher, slot.known  # known: loaded once
        return {
            "names": list(slot.names.listed),
            "kind": slot.kind,  # "embedding" or "reranker" (None: not loaded yet)
            "loaded": backend is not None,
            "backend": known.name if known else None,
            # Never loaded: the model it will load, as --model named it (rm reads this).
            "model": known.model if known else slot.spec or slot.names.primary,
            # A reranker's rows are scores, not vectors of a size a client could use.
            "dimensions": known.dimensions if known and slot.kind != RERANKER else None,
            "device": backend.device if backend else None,
            "max_input_tokens": known.max_input_tokens if known else None,
            "prompts": sorted(known.prompts) if known else [],
            # What int8 / uint8 codes are computed against (see quantize.py), once known.
            "quantization_ranges": ranges.describe() if (ranges := _ranges(backend)) else None,
            "default_prompt_name": known.default_prompt_name if known else None,
            # Weights x dtype: what loading it costs in memory (each worker its own copy).
            "memory_bytes": _memory(backend),
            "skipped_backends": slot.skipped,
            "max_batch_tokens": self.config.max_batch_tokens if batcher else None,
            "batches": batcher.batches if batcher else None,
            # Requests dropped while waiting for the model because their client hung up.
            "abandoned_requests": batcher.abandoned if batcher else None,
            # What a forward pass was measured to cost beyond its tokens (see batcher.py).
            "pass_overhead_tokens": round(batcher.overhead) if batcher else None,
            # The padded tokens a pass holds at most: a bound on how long one pass takes.
            "pass_tokens": batcher.pass_tokens if batcher else None,
        }


def _input_type_prompt(backend: BackendInfo, input_type: str | None) -> str | None:
    """The model's prompt for a Cohere input_type, if it has one for that purpose."""
    names = INPUT_TYPE_PROMPTS.get(input_type or "", ())
    return next((name for name in names if name in backend.prompts), None)


def _ranges(backend: BackendInfo | None) -> Ranges | None:
    # Backends that know their ranges say so (hash: by definition; the PyTorch tiers:
    # calibrated as they load); a model attached by a host may have none.
    ranges = getattr(backend, "quantization_ranges", None)
    return ranges if isinstance(ranges, Ranges) else None


def _ranges_for(backend: BackendInfo, served: str, request: EmbedRequest, dimensions: int
                ) -> Ranges | None:
    """The ranges int8 / uint8 codes of this request need (None: it asks for neither);
    a 422, before any work, where the model has none for vectors of that size."""
    wanted = [kind for kind in request.quantized if kind in CALIBRATED_TYPES]
    if not wanted:
        return None
    ranges = _ranges(backend)
    sized = ranges.for_size(dimensions) if ranges is not None else None
    if sized is None:
        why = (f"its ranges are calibrated for its full {backend.dimensions} dimensions; "
               "ask for those" if ranges is not None else "it has no calibrated ranges")
        raise ApiError(422, f"{' and '.join(wanted)} embeddings of model {served} "
                            f"cannot have {dimensions} dimensions: {why}",
                       param="embedding_types")
    return sized


def _quantized(vectors: Sequence[Sequence[float]], kinds: tuple[str, ...], ranges: Ranges | None
               ) -> dict[str, list[list[int]]]:
    """Each compact form asked for, from the final (shortened, normalised) vectors."""
    codes: dict[str, list[list[int]]] = {}
    for kind in kinds:
        if kind == BINARY:
            codes[kind] = [binary(v) for v in vectors]
        elif kind == UBINARY:
            codes[kind] = [ubinary(v) for v in vectors]
        elif kind in (INT8, UINT8):
            assert ranges is not None  # _ranges_for found them
            quantize = ranges.int8 if kind == INT8 else ranges.uint8
            codes[kind] = [quantize(v) for v in vectors]
    return codes


def _memory(backend: BackendInfo | None) -> int:
    return int(getattr(backend, "memory_bytes", 0) or 0)


def _check_lengths(served: str, limit: int | None, encodings: list[Encoding],
                   request: EmbedRequest) -> None:
    if request.truncate or not limit:
        return
    for i, encoding in enumerate(encodings):
        if encoding.untruncated > limit:
            # A text cut before tokenizing counts its kept piece only: "at least".
            raise ApiError(422, f"{request.input_name(i)} has at least {encoding.untruncated} "
                                f"tokens; model {served} takes at most {limit}. Shorten it, "
                                "or allow truncation (truncate=true)", param="truncate")


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_well_formed(texts: list[str], name: Callable[[int], str] = "input {}".format,
                      param: str = "input") -> None:
    """JSON can carry a lone surrogate ("\\ud800"), which is not text a tokenizer can take:
    a 400 naming the input (`name` of its index) and its field (`param`, in the core's
    words), not a 500 for the whole batch. (The hash tier's spec gives them a meaning; the
    ML tiers have none to give.)"""
    for i, text in enumerate(texts):
        if _SURROGATE.search(text):
            raise ApiError(400, f"{name(i)} contains a lone surrogate (U+D800 to U+DFFF), "
                                "which is not valid Unicode text", param=param)


def _parts(texts: list[str], chars: int) -> Iterator[list[str]]:
    """`texts` in order, in runs of about `chars` characters (a longer text alone)."""
    if sum(map(len, texts)) <= chars:
        yield texts
        return
    start, size = 0, 0
    for i, text in enumerate(texts):
        if size and size + len(text) > chars:
            yield texts[start:i]
            start, size = i, 0
        size += len(text)
    yield texts[start:]
