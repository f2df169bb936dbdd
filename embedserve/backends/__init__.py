"""Backends turn texts into vectors. One protocol; `load_backend` is the one place that picks.

A backend module may import heavy packages, but only inside itself: importing this package
stays standard-library only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from embedserve.config import Config

log = logging.getLogger("embedserve.backends")


class BackendError(Exception):
    """A backend that was asked for by name cannot be loaded: a boot error, never retried."""


@dataclass(frozen=True)
class Encoded:
    vectors: list[list[float]]
    token_counts: list[int]


class Backend(Protocol):
    name: str
    model: str
    dimensions: int
    device: str
    # None: no limit of its own (the body-size limit still applies).
    max_input_tokens: int | None

    def encode(self, texts: Sequence[str], *, normalize: bool = True) -> Encoded: ...


@dataclass(frozen=True)
class Loaded:
    backend: Backend
    # Why each better tier was skipped, in the order tried; shown in /info.
    skipped: dict[str, str]


def load_backend(config: Config) -> Loaded:
    skipped: dict[str, str] = {}
    if config.backend in ("sentence-transformers", "transformers"):
        raise BackendError(f"backend {config.backend!r} is not available in embedserve yet; "
                           "use --backend hash or auto")
    if config.backend == "auto":
        for tier in ("sentence-transformers", "transformers"):
            skipped[tier] = "not available in this version of embedserve"
            log.info("backend %s skipped: %s", tier, skipped[tier])
    from embedserve.backends.hash import HashBackend

    return Loaded(HashBackend(config.dimensions), skipped)
