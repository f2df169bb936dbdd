"""The models one server serves, by name: which request goes to which model, and when a
model is loaded and unloaded. Each loaded ML model has its own batcher and model thread;
models share the device. No HTTP here, and no tensor library (backends/ has those).

Loading policy: every model loads at start unless --no-preload (then on its first
request, which waits; requests for other models do not). --model-idle-timeout unloads an
ML model unused that long; --max-loaded-models evicts the least recently used; a request's
keep_alive (Ollama's) sets how long its model stays, 0 meaning: unload after this request.
The hash tier costs nothing to keep and is never unloaded. `auto` falling back to the hash
tier (the ML packages missing, or the model failing to load) is the tier's fallback only at
the start of a one-model server; a model loaded later (on first use, or again after an
unload) that cannot load fails its request instead, as hash vectors would go out under its
name (the ML packages being absent altogether excepted: then every load ends the same).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

from embedserve.backends import (DEFAULT_MODEL, BackendError, BackendInfo, BatchedModel,
                                 Encoder, Loaded, load_backend, ml_absent,
                                 release_memory, settle_memory)
from embedserve.batcher import Batcher
from embedserve.config import Config
from embedserve.errors import ApiError, quoted
from embedserve.hashing import model_name
from embedserve.names import ModelNames, served_names

log = logging.getLogger("embedserve.registry")

HASH = "hash"  # --model hash: the hash tier, beside or instead of ML models
_LATEST = ":latest"  # Ollama's tag for the one version of a model a server has
SWEEP_EVERY = 1.0  # seconds between looks for idle models (at most)
SWEEP_FLOOR = 0.05  # seconds between sweeps at the least


@dataclass(frozen=True)
class Known:
    """What a loaded model said of itself, kept when it is unloaded: /info says the same
    of it loaded or not (TEI clients read its id and input limit there)."""

    name: str  # its backend tier
    kind: str  # embedding or reranker
    model: str
    dimensions: int
    max_input_tokens: int | None
    prompts: tuple[str, ...]
    default_prompt_name: str | None


@dataclass(eq=False)
class Slot:
    """One served model, loaded or not."""

    spec: str  # as given to --model ('' for the backend's default)
    configured_names: str  # its --served-model-name value
    names: ModelNames
    loaded: Loaded | None = None
    batcher: Batcher | None = None
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    keep_until: float | None = None  # set by a request's keep_alive; else the idle timeout
    known: Known | None = None  # what it said of itself, once loaded (kept when unloaded)
    load_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def kind(self) -> str | None:
        """embedding or reranker, once loaded (None: never loaded yet)."""
        return self.known.kind if self.known is not None else None

    @property
    def backend(self) -> BackendInfo | None:
        return self.loaded.backend if self.loaded is not None else None

    @property
    def encoder(self) -> Encoder | None:
        return self.loaded.encoder if self.loaded is not None else None

    @property
    def model(self) -> BatchedModel | None:
        return self.loaded.model if self.loaded is not None else None

    @property
    def skipped(self) -> dict[str, str]:
        """Why each better backend tier was passed over for this model."""
        return self.loaded.skipped if self.loaded is not None else {}

    @property
    def unloadable(self) -> bool:
        return self.model is not None


def _names(spec: str, model: str, configured: str) -> ModelNames:
    names = served_names(model, configured)
    if spec == HASH:  # what it was asked for by: "hash" reaches the hash tier too
        return ModelNames(names.accepted + (HASH,), names.listed)
    return names


def _configured(slot: Slot) -> set[str]:
    return {n.strip().lower() for n in slot.configured_names.split(",") if n.strip()}


class Registry:
    def __init__(self, config: Config,
                 track_call: Callable[[], AbstractContextManager[None]],
                 observe_batch: Callable[[str, int, float], None] =
                 lambda model, size, seconds: None,
                 loader: Callable[[Config], Loaded] = load_backend) -> None:
        self.config = config
        self._track_call = track_call
        self._observe_batch = observe_batch
        self._loader = loader
        self._lock = threading.Lock()  # in_use, last_used, keep_until of every slot
        specs = config.model or ("",)
        configured = config.served_model_name
        if len(configured) > len(specs):
            raise ValueError(f"{len(configured)} --served-model-name values for "
                             f"{len(specs)} --model values: they pair by position")
        self.slots = [Slot(spec, configured[i] if i < len(configured) else "",
                           self._expected_names(spec, configured[i] if i < len(configured)
                                                else ""))
                      for i, spec in enumerate(specs)]
        self._check_unique_names()
        threading.Thread(target=self._sweep, name="model-sweeper", daemon=True).start()

    @property
    def default(self) -> Slot:
        return self.slots[0]

    # -- names -----------------------------------------------------------------------------
    def _expected_names(self, spec: str, configured: str) -> ModelNames:
        """Names known before loading (for --no-preload); corrected after a load."""
        model = model_name(self.config.dimensions) if spec == HASH else spec
        return _names(spec, model or DEFAULT_MODEL, configured)

    def _check_unique_names(self) -> None:
        """A name two models would answer to: an error if it was given with
        --served-model-name; if it is only their own (two folders named alike), neither
        answers to it, and each must keep a name of its own."""
        owners: dict[str, list[Slot]] = {}
        for slot in self.slots:
            for name in dict.fromkeys(n.lower() for n in slot.names.accepted):
                owners.setdefault(name, []).append(slot)
        shared = {name for name, slots in owners.items() if len(slots) > 1}
        for name in sorted(shared):
            given = [s.spec for s in owners[name] if name in _configured(s)]
            if given:
                raise ValueError(f"--served-model-name {name!r} would serve two models: "
                                 + ", ".join(repr(s.spec) for s in owners[name]))
            log.warning("models %s are all called %r: none answers to it",
                        ", ".join(repr(s.spec) for s in owners[name]), name)
        for slot in self.slots:
            if not shared:
                break
            keep = tuple(n for n in slot.names.accepted if n.lower() not in shared)
            if not keep:
                raise ValueError(f"model {slot.spec!r} has no name of its own: give it one "
                                 "with --served-model-name")
            slot.names = ModelNames(keep, tuple(n for n in slot.names.listed
                                                if n.lower() not in shared) or keep[:1])

    def listed_names(self) -> list[str]:
        return [name for slot in self.slots for name in slot.names.listed]

    def resolve(self, name: str | None) -> Slot:
        """The model a request names (any accepted name, any case, with or without
        Ollama's ":latest" tag, which names the one version a server has); None: the
        default."""
        if name is None:
            return self.default
        wanted = name.lower()
        for candidate in (wanted, wanted.removesuffix(_LATEST)):
            for slot in self.slots:
                if candidate in (n.lower() for n in slot.names.accepted):
                    return slot
        listed = ", ".join(repr(n) for n in self.listed_names())
        raise ApiError(404, f"model {quoted(name)} is not served here; this server serves "
                            f"{listed}", param="model")

    # -- loading and unloading -------------------------------------------------------------
    def preload(self) -> None:
        """Load every model now (a worker's start); a model that cannot load is a
        BackendError, as a boot error."""
        for slot in self.slots:
            self._load(slot, at_start=True)

    @contextmanager
    def use(self, slot: Slot, keep_alive: float | None = None) -> Iterator[Slot]:
        """`slot`, loaded, for one request. `keep_alive` (seconds; negative: forever; 0:
        unload once this request is done) replaces the idle timeout for this model, once
        the request has succeeded: a refused one changes nothing."""
        with self._lock:
            slot.in_use += 1
        succeeded = False
        try:
            if slot.loaded is None:
                try:
                    self._load(slot)
                except BackendError as exc:
                    log.error("model %s failed to load: %s", slot.spec or "(default)", exc)
                    raise ApiError(500, f"model {slot.names.primary} failed to load: {exc}"
                                   ) from None
            yield slot
            succeeded = True
        finally:
            now = time.monotonic()
            with self._lock:
                slot.in_use -= 1
                slot.last_used = now
                if succeeded and keep_alive is not None:
                    slot.keep_until = math.inf if keep_alive < 0 else now + keep_alive
                release = succeeded and keep_alive == 0 and not slot.in_use
            if release:
                self.unload(slot, "keep_alive 0")

    def _load(self, slot: Slot, at_start: bool = False) -> None:
        self._make_room(slot)
        with slot.load_lock:
            if slot.loaded is not None:
                return
            began = time.monotonic()
            loaded = self._load_backend(slot, at_start)
            if loaded.model is not None:
                name = loaded.model.model
                slot.batcher = Batcher(loaded.model, self.config, self._track_call,
                                       lambda size, seconds: self._observe_batch(
                                           name, size, seconds))
            backend = loaded.backend
            # Known now for sure (a folder's card, or `auto` falling back to the hash tier).
            if backend.model != slot.spec:
                slot.names = _names(slot.spec, backend.model, slot.configured_names)
                self._check_unique_names()
            with self._lock:
                slot.loaded = loaded
                slot.known = Known(backend.name, backend.kind, backend.model, backend.dimensions,
                                   backend.max_input_tokens, tuple(backend.prompts),
                                   backend.default_prompt_name)
                slot.last_used = time.monotonic()
                slot.keep_until = None
            settle_memory()
            log.info("loaded %s (%s on %s) in %.1fs", backend.model, backend.name,
                     backend.device, time.monotonic() - began)

    def _load_backend(self, slot: Slot, at_start: bool) -> Loaded:
        if slot.spec == HASH:
            from embedserve.backends.hash import HashBackend

            return Loaded(HashBackend(self.config.dimensions), None, {})
        loaded = self._loader(self.config.for_model(slot.spec))
        # `auto` falling back to the hash tier is the tier's documented fallback at the start
        # of a one-model server, and with the ML packages absent altogether (every load ends
        # alike). Beside other models, or after the start (this model's first use under
        # --no-preload, a reload after an unload, its files gone since), hash vectors would
        # go out under this model's name.
        fallback_ok = len(self.slots) == 1 and (at_start or ml_absent(loaded.skipped))
        if loaded.model is None and not fallback_ok:
            raise BackendError(f"no ML backend could load {slot.spec or 'the default model'}: "
                               + "; ".join(f"{k}: {v}" for k, v in loaded.skipped.items()))
        return loaded

    def _make_room(self, slot: Slot) -> None:
        """--max-loaded-models: unload the least recently used idle ML model first."""
        limit = self.config.max_loaded_models
        if not limit or slot.spec == HASH:
            return
        with self._lock:
            loaded = [s for s in self.slots if s.unloadable and s is not slot]
            idle = sorted((s for s in loaded if not s.in_use), key=lambda s: s.last_used)
            surplus = len(loaded) + 1 - limit
        for victim in idle[:max(0, surplus)]:
            self.unload(victim, f"--max-loaded-models {limit}")

    def unload(self, slot: Slot, reason: str) -> None:
        """Give an idle ML model's memory back; a model in use stays."""
        with slot.load_lock:
            with self._lock:
                if slot.in_use or not slot.unloadable:
                    return
                loaded, batcher = slot.loaded, slot.batcher
                slot.loaded = slot.batcher = None
                slot.keep_until = None
            if batcher is not None:
                batcher.stop()
            name = loaded.backend.model if loaded is not None else slot.spec
            del loaded, batcher
            release_memory()
            log.info("unloaded %s (%s)", name, reason)

    def describe_loaded(self) -> tuple[list[dict[str, str]], dict[str, int]]:
        """The labels of each model loaded and the texts waiting for each (for /metrics),
        read under the lock unload() takes to detach a model: the caller (the heartbeat,
        each second) then never holds a model while unload() gives its memory back."""
        with self._lock:
            return _describe(self.slots)

    def expires_at(self, slot: Slot) -> float | None:
        """time.monotonic() at which an idle model will be unloaded; None: never."""
        if not slot.unloadable:
            return None
        if slot.keep_until is not None:
            return None if slot.keep_until == math.inf else slot.keep_until
        idle = self.config.model_idle_timeout
        return slot.last_used + idle if idle else None

    def _sweep(self) -> None:
        # Floored: --model-idle-timeout 1e-300 made this loop spin a core.
        interval = max(SWEEP_FLOOR, min(SWEEP_EVERY,
                                        self.config.model_idle_timeout / 4 or SWEEP_EVERY))
        while True:
            time.sleep(interval)
            now = time.monotonic()
            for slot in self.slots:
                expiry = self.expires_at(slot)
                if expiry is not None and now >= expiry and not slot.in_use:
                    self.unload(slot, "idle")


def _describe(slots: list[Slot]) -> tuple[list[dict[str, str]], dict[str, int]]:
    # Strings and numbers only leave this frame: no reference to a model outlives it.
    labels, depths = [], {}
    for slot in slots:
        backend = slot.backend
        if backend is None:
            continue
        labels.append({"backend": backend.name, "model": backend.model,
                       "device": backend.device, "dimensions": str(backend.dimensions),
                       "kind": backend.kind})
        if slot.batcher is not None:
            depths[backend.model] = slot.batcher.queue_depth()
    return labels, depths
