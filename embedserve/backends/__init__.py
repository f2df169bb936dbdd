"""Backends turn texts into vectors, under one of two contracts; `load_backend` is the one
place that picks.

- An `Encoder` is cheap enough to run in the request thread (the hash tier): texts in,
  vectors out, in one call.
- A `BatchedModel` is driven by the batcher's one model thread (the ML tiers): each text is
  tokenized once, in its request thread (`prepare`), and the model thread runs forward
  passes over batches of those encodings. It declares what it can do (`capabilities`).

A backend module may import heavy packages, but only inside itself: importing this package
stays standard-library only.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from embedserve.config import Config

log = logging.getLogger("embedserve.backends")

# What a BatchedModel can be asked for: vectors of texts, or relevance scores of
# query-document pairs (a cross-encoder).
EMBED = "embed"
SCORE = "score"
# A model's kind, from its folder (see backends.rerank.model_kind): shown in /info.
EMBEDDING = "embedding"
RERANKER = "reranker"


class BackendError(Exception):
    """A backend that was asked for by name cannot be loaded: a boot error, never retried."""


@dataclass(frozen=True)
class Token:
    """One token as TEI's /tokenize reports it; start/stop are character offsets."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class BackendInfo(Protocol):
    """What every backend says about itself (/info, /metrics, prompts), whatever its kind."""

    name: str
    model: str
    kind: str  # EMBEDDING or RERANKER
    # Vector size; a reranker's: the size of its score rows (see BatchedModel.forward).
    dimensions: int
    device: str
    # None: no limit of its own (the body-size limit still applies).
    max_input_tokens: int | None
    prompts: dict[str, str]
    default_prompt_name: str | None

    def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool = True
                 ) -> list[list[Token]]: ...


@dataclass(frozen=True)
class Encoded:
    vectors: Sequence[Sequence[float]]
    token_counts: list[int]


class Encoder(BackendInfo, Protocol):
    """Called in the request thread, one call at a time (the service takes care of that)."""

    # `dimensions`: vectors of that size, computed as such -- None: full size.
    def encode(self, texts: Sequence[str], *, normalize: bool = True,
               dimensions: int | None = None) -> Encoded: ...


@dataclass(frozen=True)
class Encoding:
    """One text as a BatchedModel's forward pass will take it, made by `prepare` in the
    request thread. The batcher plans with `tokens`; `data` is the model's own (e.g. token
    ids already truncated to its limit) and nobody else looks inside."""

    tokens: int  # in the forward pass: truncated, special tokens included
    untruncated: int  # before truncation: what truncate=false is checked against
    data: Any


class Rows(Protocol):
    """A forward pass's output, one row per text, in the batch's order: the model turns it
    into plain lists, so whoever drives it needs no tensor library."""

    def __len__(self) -> int: ...

    def lists(self, *, normalize: bool) -> list[list[float]]: ...


class BatchedModel(BackendInfo, Protocol):
    """Driven by the batcher. `prepare` may run in many request threads at once; `forward`
    and `is_out_of_memory` run in the model thread (one at a time: see batcher.py)."""

    capabilities: frozenset[str]
    # What one forward pass costs beyond its padded tokens, in tokens (measured at load).
    pass_overhead_tokens: float

    # `prompt` goes before each text; cut from the left, a text loses its first tokens
    # after the prompt, which stays whole where the model can (ids made in the request).
    def prepare(self, texts: Sequence[str], *, truncate_left: bool = False, prompt: str = ""
                ) -> list[Encoding]: ...

    def prepare_pairs(self, query: str, documents: Sequence[str]) -> list[Encoding]:
        """A reranker's (SCORE) items: each (query, document) pair tokenized as one input,
        cut to the model's limit as the library cuts pairs; the batcher plans with them as
        with texts. Models without SCORE raise NotImplementedError."""
        ...

    def forward(self, batch: Sequence[Encoding]) -> Rows:
        """A row per item: an embedding, or for a pair [raw score, activated score] (the
        model's own activation, e.g. a sigmoid), read with lists(normalize=False)."""
        ...

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether `exc` from forward means the batch was too big for the device: the
        batcher then halves it and tries again."""
        ...


@dataclass(frozen=True)
class Loaded:
    """What load_backend found: an encoder or a batched model, never both."""

    encoder: Encoder | None
    model: BatchedModel | None
    # Why each better tier was skipped, in the order tried; shown in /info.
    skipped: dict[str, str]

    def __post_init__(self) -> None:
        if (self.encoder is None) == (self.model is None):
            raise ValueError("Loaded takes an encoder or a batched model, exactly one")

    @property
    def backend(self) -> BackendInfo:
        if self.model is not None:
            return self.model
        assert self.encoder is not None  # __post_init__
        return self.encoder


# What the ML tiers serve when --model names nothing.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# How a skipped tier's reason starts when its packages are missing (see ml_absent).
NOT_INSTALLED = "not installed"

# The ML tiers, best first: (name, the package that must be installed, loader path of an
# embedding model, loader path of a reranker).
ML_TIERS = (
    ("sentence-transformers", "sentence_transformers",
     "embedserve.backends.sentence_transformers:SentenceTransformersBackend",
     "embedserve.backends.rerank:CrossEncoderBackend"),
    ("transformers", "transformers", "embedserve.backends.transformers:TransformersBackend",
     "embedserve.backends.rerank:SequenceClassificationBackend"),
)


def load_backend(config: Config) -> Loaded:
    """The backend the config asks for. `auto` walks the tiers best first and records why
    each was skipped; a backend named explicitly that cannot load is a BackendError."""
    skipped: dict[str, str] = {}
    for name, package, target, rerank_target in ML_TIERS:
        if config.backend not in ("auto", name):
            continue
        try:
            backend = in_passing_thread(lambda: _load_ml(name, package,
                                                         (target, rerank_target), config))
        except BackendError as exc:
            if config.backend == name:
                raise
            skipped[name] = str(exc)
            log.warning("backend %s skipped: %s", name, exc)
            continue
        return Loaded(None, backend, skipped)
    from embedserve.backends.hash import HashBackend

    if config.model_id and config.backend == "auto":
        # The model was asked for and will not be used: never silently.
        if ml_absent(skipped):
            why = "the ML packages are not installed (pip install 'embedserve[ml]')"
        else:
            why = "no ML backend could load it (see above)"
        log.warning("--model %s is ignored: serving the hash tier instead, because %s",
                    config.model_id, why)
    return Loaded(HashBackend(config.dimensions), None, skipped)


def ml_absent(skipped: dict[str, str]) -> bool:
    """Whether the ML tiers were skipped only for not being installed (load_backend's
    reasons), so that every load ends as this one did, rather than for failing to load."""
    return all(reason.startswith(NOT_INSTALLED) for reason in skipped.values())


def settle_memory() -> None:
    """After a model is loaded: collect what loading left, and keep the objects that remain
    (the model's and its libraries', hundreds of thousands) out of the collector's full
    passes. Each such pass walked them all holding the interpreter lock: under a bulk load
    one stalled the model thread and every request for a quarter of a second. Frozen
    objects are still freed when their last reference goes; release_memory unfreezes them
    so that a dropped model's reference cycles are collected too."""
    gc.collect()
    gc.freeze()


def release_memory() -> None:
    """After a model is dropped: collect it now and hand its memory back -- CUDA's cache
    to the device, glibc's freed heap to the system -- so that unloading shows."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()  # what the models still loaded hold: see settle_memory
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator keeps what it keeps
        pass


def looks_like_path(model: str) -> bool:
    """Whether --model names a folder rather than a Hugging Face id. An id is `name` or
    `org/name` (neither part starts with a dot), so ./ ../ / ~ a backslash, a drive letter,
    a trailing slash or a second slash all mean a path."""
    return (model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
            or model.endswith("/") or (len(model) > 1 and model[1] == ":"))


def model_folder_problem(model: str) -> str | None:
    """What is wrong with a --model that names a folder, or None (an id, or a folder)."""
    if not model or not looks_like_path(model):
        return None
    folder = os.path.expanduser(model)
    if os.path.isdir(folder):
        return None
    if os.path.exists(folder):
        return f"model folder {model!r} is a file, not a folder"
    return f"model folder {model!r} does not exist"


_T = TypeVar("_T")


def in_passing_thread(make: Callable[[], _T]) -> _T:
    """make(), run in a thread that ends with it; its exception is raised here.

    Importing the ML libraries, loading a model and warming it up run OpenMP parallel
    regions, and libgomp keeps a team of threads for each thread that has run one, for as
    long as that thread lives. With the loader's team alive beside the model thread's (the
    loader being a worker's main thread), every pass was slower -- on two cores a one-text
    all-MiniLM-L6-v2 pass took 12-18 ms instead of 9-11, a bulk pass 20% longer: libgomp
    spins less between regions, and sleeps on a futex instead, once it manages more threads
    than there are CPUs. Loaded in a thread that ends, the model thread's team is alone.
    (A signal's exception in the caller -- Ctrl-C in a script loading a model -- leaves the
    load to finish on its own, unused; a worker leaves with os._exit.)"""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, make()))
        except BaseException as exc:  # re-raised in the caller's thread, whatever it is
            outcome.append((False, exc))

    # A daemon: a worker told to stop while loading leaves at once (os._exit), and an
    # interpreter exiting otherwise does not wait for a download to end.
    thread = threading.Thread(target=run, name="load", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome.pop()  # not kept: an exception's traceback holds the load's frames
    if not ok:
        raise value
    return value


def _load_ml(name: str, package: str, targets: tuple[str, str], config: Config
             ) -> BatchedModel:
    if importlib.util.find_spec(package) is None or importlib.util.find_spec("torch") is None:
        missing = package if importlib.util.find_spec(package) is None else "torch"
        raise BackendError(f"{NOT_INSTALLED} ({missing} is missing; pip install 'embedserve[ml]')")
    # Before importing anything heavy (seconds): a folder that is not there is not worth
    # it, and is better said in those words than as advice about the Hugging Face cache.
    problem = model_folder_problem(config.model_id)
    if problem:
        raise BackendError(f"installed but failed to load: {problem}")
    try:
        # A reranker's folder says so (a sequence-classification head): same tiers, other
        # classes.
        from embedserve.backends.rerank import model_kind

        target = targets[1] if model_kind(config.model_id or DEFAULT_MODEL) == RERANKER \
            else targets[0]
        module_name, class_name = target.split(":")
        backend_class = getattr(importlib.import_module(module_name), class_name)
        backend: Any = backend_class(config)
        backend.warm_up()
    except BackendError as exc:
        raise BackendError(f"installed but failed to load: {exc}") from exc
    except ImportError as exc:
        raise BackendError(f"installed but failed to import: {exc}") from exc
    except Exception as exc:  # a model that fails to load must not take the server down
        log.debug("loading %s failed", name, exc_info=True)
        raise BackendError(f"installed but failed to load "
                           f"{config.model_id or 'the default model'}"
                           f": {type(exc).__name__}: {exc}") from exc
    return backend
