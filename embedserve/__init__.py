"""embedserve: a local text-embedding server that needs nothing but the standard library.

`python -m embedserve` serves deterministic hash embeddings at once; the same server
upgrades itself to Hugging Face models when the `ml` extra is installed.
`from embedserve import Client` gives apps an embedder that finds or starts the server.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from embedserve.hashing import HashEmbedder  # noqa: F401 (public API)

# Every class embedserve.client exports: what a call returns (Embeddings, Embedding) and
# every error it raises, so that `except embedserve.ModelMismatch` needs no submodule.
_CLIENT_NAMES = frozenset({"AuthenticationError", "Client", "EmbedServeError", "Embedding",
                           "Embeddings", "ModelMismatch", "ModelNotFound", "Ranking",
                           "Rankings", "ServerError",
                           "ServerStartError", "ServerUnavailable", "ValidationError"})

__all__ = sorted(_CLIENT_NAMES | {"HashEmbedder", "__version__"})


def __getattr__(name: str) -> Any:
    # The client is imported on first use: server workers never need it.
    if name in _CLIENT_NAMES:
        from embedserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'embedserve' has no attribute {name!r}")
