"""The in-process fallback: embeddings from embedserve's hash tier when no server can be
reached or started, and the policy that says when they may stand in for the server's.

When no server can be reached or started, `fallback` decides:
  "same-model" (default, also `True`): embed in-process with embedserve's hash tier, but
      only when that is the model the server would have used: the model this client last
      got from a server; before any server answered, the one the options ask for
      (backend="hash": yes; an ML backend or a model name: no; auto/unset: allowed, as
      this client has no vectors yet to mix with). After a server answered with another
      model (e.g. a sentence-transformers one) the call raises ServerUnavailable instead:
      vectors of different models are never mixed silently.
  "always": fall back to the hash tier whatever the server's model was.
  "never" (also `False`): raise ServerUnavailable.

Float32 consistency. base64 carries float32, so the server's vectors arrive rounded to
float32. The fallback rounds its doubles to float32 too when the transport is base64, so
server and fallback vectors are bit-for-bit identical (the hash tier is deterministic);
with encoding_format="float" both are the same doubles. `dimensions=N` too: like the
server's hash tier, the fallback computes N buckets directly (HashEmbedder(N)) and labels
the result with the served model's name (hash-v1-384 for a default server), as the server
does for that request.

Only the hash encoder is imported here: nothing of the server (service, dialects, backends).
"""

from __future__ import annotations

import copy
import logging
import threading
from array import array

from embedserve.client.errors import ServerUnavailable, ValidationError
from embedserve.client.options import Options
from embedserve.client.results import Embeddings
from embedserve.hashing import HashEmbedder, model_name

log = logging.getLogger("embedserve.client")

# Fallback embedders kept for request-time `dimensions` other than the model's own size.
MAX_FALLBACK_SIZES = 4


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
        self._embedder: HashEmbedder | None = None
        self._sized: dict[int, HashEmbedder] = {}  # for `dimensions`, oldest first
        # Not the client's lock: that one is held while a server starts.
        self._sized_lock = threading.Lock()

    def plan(self) -> tuple[HashEmbedder | None, str]:
        """The in-process embedder the policy allows, or None and why not."""
        policy = self._options.fallback
        if policy == "never":
            return None, "fallback is off (fallback='never')"
        served_dims = self.served_dimensions
        # A hash-tier server's size wins over the options: the fallback must match it.
        dims = (served_dims if served_dims and self.served_model == model_name(served_dims)
                else self._options.configured_dimensions())
        local_model = model_name(dims)
        if policy == "same-model":
            expected = self.served_model or self._options.requested_model(local_model)
            if expected is not None and expected != local_model:
                return None, (f"the server's model is {expected}, the in-process fallback "
                              f"would be {local_model} (pass fallback='always' to accept "
                              "vectors from another model)")
        embedder = self._embedder
        if embedder is None or embedder.dimensions != dims:
            embedder = self._embedder = HashEmbedder(dims)
        return embedder, ""

    def embed(self, texts: list[str], dimensions: int | None,
              cause: ServerUnavailable | None, url: str) -> Embeddings:
        """Embed in-process when the policy allows; else raise `cause` (or a
        ServerUnavailable for `url`) saying why the fallback did not answer."""
        embedder, refusal = self.plan()
        if embedder is None:
            if cause is None:
                raise ServerUnavailable(f"the server is unavailable; no fallback: {refusal}",
                                        url=url)
            # The same error (type and attributes kept), saying why nothing else was tried.
            error = copy.copy(cause)
            error.message = f"{cause.message}; no fallback: {refusal}"
            error.args = (f"{cause.args[0]}; no fallback: {refusal}",)
            raise error from cause.__cause__
        if dimensions is not None and dimensions > embedder.dimensions:
            raise ValidationError(422, f"'dimensions' must be between 1 and "
                                       f"{embedder.dimensions} for model {embedder.model}, got "
                                       f"{dimensions}", param="dimensions")
        if not self.active:
            self.active = True
            log.warning("embedding in-process with %s: %s", embedder.model, cause)
        # As the server's hash tier answers `dimensions`: that many buckets computed directly
        # (not the first values of the full vector), labelled with the served model's name.
        vectors = self._sized_embedder(embedder, dimensions).embed(texts)
        if self._options.encoding_format == "base64":
            # What the server's base64 transport would have delivered: bit-identical.
            vectors = [array("f", v).tolist() for v in vectors]
        return Embeddings(vectors, model=embedder.model, backend="hash", source="fallback")

    def _sized_embedder(self, embedder: HashEmbedder, dimensions: int | None) -> HashEmbedder:
        if dimensions is None or dimensions == embedder.dimensions:
            return embedder
        with self._sized_lock:
            # A few recent sizes only: each embedder keeps its own word cache.
            sized = self._sized.pop(dimensions, None) or HashEmbedder(dimensions)
            self._sized[dimensions] = sized
            while len(self._sized) > MAX_FALLBACK_SIZES:
                del self._sized[next(iter(self._sized))]
            return sized
