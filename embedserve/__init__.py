"""embedserve: a local text-embedding server that needs nothing but the standard library.

`python -m embedserve` serves deterministic hash embeddings at once; the same server
upgrades itself to Hugging Face models when the `ml` extra is installed.
"""

from __future__ import annotations

__version__ = "0.1.0"

from embedserve.hashing import HashEmbedder

__all__ = ["HashEmbedder", "__version__"]
