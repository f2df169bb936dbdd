"""What the core takes and gives, whatever the wire format: the dialects build these, the
service answers them. Nothing here imports another embedserve module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str]
    dimensions: int | None = None
    normalize: bool = True
    truncate: bool = True
    prompt_name: str | None = None
    model: str | None = None
    encoding_format: str = "float"
    truncate_left: bool = False  # TEI truncation_direction=Left: keep the end of the text
    # How long the model stays loaded after this request, in seconds (Ollama's keep_alive):
    # None: the server's policy; negative: for good; 0: unload after this request.
    keep_alive: float | None = None


@dataclass(frozen=True)
class EmbedResult:
    vectors: list[list[float]]
    model: str
    prompt_tokens: int
