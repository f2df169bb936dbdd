"""The in-process fallback: embeddings from embedserve's hash tier when no server can be
reached or started, and the policy that says when they may stand in for the server's.

When no server can be reached or started, `fallback` decides:
  "same-model" (default, also `True`): embed in-process with embedserve's hash tier, but
      only when that is the model the server would have used: the model this client last
      got from a server (a name its /info gave its hash tier counts as the hash tier's,
      and labels the result); before any server answered this client, the one the options
      ask for (backend="hash": yes; an ML backend or a model name: no), else the one the
      server at this URL last said it served, to this or an earlier process (kept by
      lastseen.py); with none of those known, allowed. After a server answered with another
      model (e.g. a sentence-transformers one) the call raises ServerUnavailable instead:
      vectors of different models are never mixed silently, not even by a script run again
      while its server is down.
  "always": fall back to the hash tier whatever the server's model was.
  "never" (also `False`): raise ServerUnavailable.

Float32 consistency. base64 carries float32, so the server's vectors arrive rounded to
float32. The fallback rounds its doubles to float32 too when the transport is base64, so
server and fallback vectors are bit-for-bit identical (the hash tier is deterministic);
with encoding_format="float" both are the same doubles. `dimensions=N` too: like the
server's hash tier, the fallback computes N buckets directly (HashEmbedder(N)) and labels
the result with the served model's name (hash-v1-384 for a default server), as the server
does for that request.

A call that names its model (`embed(..., model=...)`) gets that model's vectors or none:
the fallback answers it only when the name is the hash tier's -- `hash`, `hash-v1-<D>`, or
a name the server's /info listed for its hash tier -- under any policy but "never", and
never for another model (ServerUnavailable then), whatever the policy.

Only the hash encoder is imported here: nothing of the server (service, dialects, backends).
"""

from __future__ import annotations

import copy
import logging
import threading
from array import array
from collections.abc import Mapping
from typing import Any, NamedTuple

from embedserve.client import lastseen
from embedserve.client.errors import ServerUnavailable, ValidationError
from embedserve.client.options import HASH_MODEL, Options
from embedserve.client.results import Embeddings
from embedserve.hashing import HASH_VERSION, HashEmbedder, model_name

log = logging.getLogger("embedserve.client")

# Fallback embedders kept for request-time `dimensions` other than the model's own size.
MAX_FALLBACK_SIZES = 4
# What a call may name the hash tier: `--model hash` serves it; hash-v1-<D> is its model id.
HASH_TIER = "hash"


class Plan(NamedTuple):
    """What the fallback would answer a call with: `embedder` and the model name its result
    carries; or no embedder, and `refusal` says why."""

    embedder: HashEmbedder | None
    label: str = ""
    refusal: str = ""


class Fallback:
    """The fallback embedders of one client, and what its server last said it serves."""

    def __init__(self, options: Options) -> None:
        self._options = options
        # What a server last said it serves (its /info, or an answer's model): the model
        # the fallback must match under "same-model", and the size it must compute.
        self.served_model: str | None = None
        self.served_dimensions: int | None = None
        # Whether the last call was answered here: the switch either way is logged once.
        self.active = False
        # Names the server's /info gave its hash tier, lower-cased: (the name its answers
        # carry, its size). A call naming one of them may be answered here.
        self._hash_names: dict[str, tuple[str, int]] = {}
        # The first reranker the server's /info listed: what a rerank naming no model gets.
        self.served_reranker: str | None = None
        self._embedder: HashEmbedder | None = None
        self._sized: dict[int, HashEmbedder] = {}  # for `dimensions`, oldest first
        # Not the client's lock: that one is held while a server starts.
        self._sized_lock = threading.Lock()
        # The URL whose remembered /info (lastseen.py) says what to match, while no server
        # has answered this client; None: not looked up yet; "": none. Looked up under a
        # lock: a thread seeing "looked up" must see what was learnt.
        self._recalled: str | None = None
        self._recall_lock = threading.Lock()

    def learn(self, info: Mapping[str, Any], url: str | None = None) -> None:
        """What a server's GET /info says it serves: its default model (what calls without
        a model get), and the names of its hash tier (its "models" list, where it has one).
        `url`: the server's, kept for other processes (lastseen.py) when the options name
        it (not a private server's, whose port is another at every start)."""
        if url is not None:  # a server answered: what it says now beats any memory
            self._recalled = ""
            if url in self._options.server_urls():
                lastseen.remember(url, info)
        model, dims = info.get("model"), info.get("dimensions")
        if not isinstance(model, str):
            return
        self.served_model = model
        self.served_dimensions = dims if isinstance(dims, int) else None
        hash_names: dict[str, tuple[str, int]] = {}
        entries = info.get("models")
        if not isinstance(entries, list):
            entries = [{"names": [model], **info}]  # a server of one model
        # A reranker's name: its first listed one, else its model (a list may be empty).
        rerankers = [(entry.get("names") or [entry.get("model")])[0] for entry in entries
                     if isinstance(entry, dict) and entry.get("kind") == "reranker"]
        rerankers = [name for name in rerankers if isinstance(name, str) and name]
        self.served_reranker = str(rerankers[0]) if rerankers else None
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("backend") != "hash":
                continue
            size, names = entry.get("dimensions"), entry.get("names")
            names = [n for n in (names if isinstance(names, list) else []) + [entry.get("model")]
                     if isinstance(n, str)]
            if isinstance(size, int) and size > 0 and names:
                for name in names:
                    hash_names.setdefault(name.lower(), (names[0], size))
        self._hash_names = hash_names

    def request_name(self, model: str) -> str:
        """The name to send for `model`: 'hash' (what `--model hash` serves, and what the
        fallback answers for) becomes the name the server's /info gave its hash tier, where
        the server does not list 'hash' itself; any other name goes as it is."""
        if model.lower() != HASH_TIER or HASH_TIER in self._hash_names:
            return model
        return next(iter(self._hash_names.values()), (model, 0))[0]

    def plan(self, model: str | None = None) -> Plan:
        """The in-process embedder the policy allows for a call asking for `model` (None:
        the server's default), or None and why not."""
        policy = self._options.fallback
        if policy == "never":
            return Plan(None, refusal="fallback is off (fallback='never')")
        if model is not None:
            return self._plan_named(model)
        served, served_dims = self.served_model, self.served_dimensions
        # A name the server's /info gave its hash tier (e.g. by --served-model-name): that
        # is the model, under the name the server's answers carry.
        known = self._hash_names.get(served.lower()) if served is not None else None
        if known is not None:
            local_model, dims = known
        else:
            # A hash-tier server's size wins over the options: the fallback must match it.
            dims = (served_dims if served_dims and served == model_name(served_dims)
                    else self._options.configured_dimensions())
            local_model = model_name(dims)
        if policy == "same-model":
            expected = served or self._options.requested_model(local_model)
            if expected is None and self._recall():
                return self.plan(model)  # as if that server had answered this client
            if expected is not None and expected != local_model:
                seen = (f" (what it last said it serves, kept in {lastseen.state_file()})"
                        if self._recalled else "")
                return Plan(None, refusal=(
                    f"the server's model is {expected}{seen}, the in-process fallback would "
                    f"be {local_model} (pass fallback='always' to accept vectors from another "
                    "model)"))
        embedder = self._embedder
        if embedder is None or embedder.dimensions != dims:
            embedder = self._embedder = HashEmbedder(dims)
        return Plan(embedder, local_model)

    def _recall(self) -> bool:
        """Learn what the servers of these options last said they serve, once: True when
        something was remembered (lastseen.py)."""
        with self._recall_lock:
            if self._recalled is not None:
                return bool(self._recalled) and self.served_model is not None
            for url in self._options.server_urls():
                info = lastseen.recall(url)
                if info is not None and isinstance(info.get("model"), str):
                    self.learn(info)
                    self._recalled = url
                    return True
            self._recalled = ""
            return False

    def _plan_named(self, model: str) -> Plan:
        """A call that named its model: the hash tier's vectors when it names the hash
        tier, under any policy but "never"; otherwise nothing, whatever the policy."""
        wanted = model.lower()
        known = self._hash_names.get(wanted)
        if known is None and wanted == HASH_TIER:
            # The hash tier the server listed; else the one a server started here would run.
            tiers = list(self._hash_names.values())
            dims = self._options.configured_dimensions()
            known = tiers[0] if tiers else (model_name(dims), dims)
        if known is None:
            match = HASH_MODEL.fullmatch(wanted)
            if match is not None:
                known = (model_name(int(match.group(1))), int(match.group(1)))
        if known is None:
            return Plan(None, refusal=(
                f"the call asked for model {model!r}, and the in-process fallback serves "
                f"only the hash tier ('{HASH_TIER}', hash-v{HASH_VERSION}-<dimensions>)"))
        label, dims = known
        embedder = self._embedder
        if embedder is None or embedder.dimensions != dims:
            embedder = self._sized_embedder(None, dims)
        return Plan(embedder, label)

    def embed(self, texts: list[str], dimensions: int | None,
              cause: ServerUnavailable | None, url: str, model: str | None = None
              ) -> Embeddings:
        """Embed in-process when the policy allows for a call asking for `model` (None: the
        server's default); else raise `cause` (or a ServerUnavailable for `url`) saying why
        the fallback did not answer."""
        embedder, label = self._allowed(self.plan(model), cause, url)
        if dimensions is not None and dimensions > embedder.dimensions:
            raise ValidationError(422, f"'dimensions' must be between 1 and "
                                       f"{embedder.dimensions} for model {embedder.model}, got "
                                       f"{dimensions}", param="dimensions")
        if not self.active:
            self.active = True
            log.warning("embedding in-process with %s: %s", label, cause)
        # As the server's hash tier answers `dimensions`: that many buckets computed directly
        # (not the first values of the full vector), labelled with the served model's name.
        vectors = self._sized_embedder(embedder, dimensions).embed(texts)
        if self._options.encoding_format == "base64":
            # What the server's base64 transport would have delivered: bit-identical.
            vectors = [array("f", v).tolist() for v in vectors]
        return Embeddings(vectors, model=label, backend="hash", source="fallback")

    def rerank_vectors(self, texts: list[str], cause: ServerUnavailable | None, url: str,
                       model: str | None) -> tuple[list[list[float]], str]:
        """The hash tier's vectors (doubles, as the server's hash tier reranks with them)
        and their label, for a rerank call asking for `model`; None: what the server would
        have used, its first reranker if it has one, which the fallback never stands in
        for under "same-model"."""
        plan = self.plan(model)
        reranker = self.served_reranker
        if model is None and reranker is not None and self._options.fallback == "same-model":
            plan = Plan(None, refusal=(
                f"the server reranks with {reranker}, the in-process fallback would rank by "
                "hash embeddings (pass fallback='always' to accept that)"))
        embedder, label = self._allowed(plan, cause, url)
        if not self.active:
            self.active = True
            log.warning("reranking in-process with %s: %s", label, cause)
        return embedder.embed(texts), label

    @staticmethod
    def _allowed(plan: Plan, cause: ServerUnavailable | None, url: str
                 ) -> tuple[HashEmbedder, str]:
        """The plan's embedder and label; else `cause` (or a ServerUnavailable for `url`),
        saying why the fallback did not answer."""
        embedder, label, refusal = plan
        if embedder is None:
            if cause is None:
                raise ServerUnavailable(f"the server is unavailable; no fallback: {refusal}",
                                        url=url)
            # The same error (type and attributes kept), saying why nothing else was tried.
            error = copy.copy(cause)
            error.message = f"{cause.message}; no fallback: {refusal}"
            error.args = (f"{cause.args[0]}; no fallback: {refusal}",)
            raise error from cause.__cause__
        return embedder, label

    def _sized_embedder(self, embedder: HashEmbedder | None, dimensions: int | None
                        ) -> HashEmbedder:
        if embedder is not None and (dimensions is None or dimensions == embedder.dimensions):
            return embedder
        assert dimensions is not None
        with self._sized_lock:
            # A few recent sizes only: each embedder keeps its own word cache.
            sized = self._sized.pop(dimensions, None) or HashEmbedder(dimensions)
            self._sized[dimensions] = sized
            while len(self._sized) > MAX_FALLBACK_SIZES:
                del self._sized[next(iter(self._sized))]
            return sized
