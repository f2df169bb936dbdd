"""What a served model is called: the names a request may use for it, and the one that
responses carry. Standard library only; no HTTP, no backend.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# Folder names that say nothing about the model inside: look one level up instead.
_GENERIC_FOLDERS = frozenset({"model", "models", "snapshot", "snapshots", "weights",
                              "checkpoint", "final", "latest", "main"})
# Titles of generated model cards (sentence-transformers' save() writes one), not names.
_GENERIC_TITLES = frozenset({"sentencetransformer", "crossencoder", "model", "model-card",
                             "readme"})
_HUB_CACHE_FOLDER = re.compile(r"^models--(.+?)--(.+)$")
_CARD_TITLE = re.compile(r"^#\s+(\S[^\n]*?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class ModelNames:
    """`accepted`: every name a request may use (compared case-insensitively); the first is
    what responses carry. `listed`: the names /v1/models and /api/tags show."""

    accepted: tuple[str, ...]
    listed: tuple[str, ...]

    @property
    def primary(self) -> str:
        return self.accepted[0]


def served_names(model: str, configured: str = "") -> ModelNames:
    """`configured` is --served-model-name: comma-separated names, the first answered in
    responses. The model's own names stay accepted, so a client that used them keeps
    working; only the configured ones are listed."""
    own = default_names(model)
    chosen = [name.strip() for name in configured.split(",") if name.strip()]
    if not chosen:
        # A local folder's path is accepted, but not listed as if it were a name.
        listed = [n for n in own if n != model] if os.path.isdir(model) else own
        return ModelNames(tuple(own), tuple(listed or own))
    accepted = list(dict.fromkeys(chosen + own))
    return ModelNames(tuple(accepted), tuple(chosen))


def default_names(model: str) -> list[str]:
    """A hub id answers to itself and its last part ("all-MiniLM-L6-v2" for
    "sentence-transformers/all-MiniLM-L6-v2"). A local folder answers to a name that
    means something -- the title of its model card, its hub id when it is a cached
    snapshot, or its folder name (skipping generic ones like "model") -- and to its path."""
    if not os.path.isdir(model):
        short = model.rstrip("/\\").rsplit("/", 1)[-1]
        return [model] if short in ("", model) else [model, short]
    folder = Path(model).resolve()
    name = _hub_id(folder) or _card_title(folder) or _folder_name(folder)
    names = [name] if name else []
    if "/" in name:
        names.append(name.rsplit("/", 1)[-1])
    return list(dict.fromkeys(names + [model]))


def _hub_id(folder: Path) -> str | None:
    # ~/.cache/huggingface/hub/models--org--name/snapshots/<revision>
    if folder.parent.name == "snapshots":
        match = _HUB_CACHE_FOLDER.match(folder.parent.parent.name)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def _card_title(folder: Path) -> str | None:
    """The first top-level heading of README.md, as model cards open ("# all-MiniLM-L6-v2"),
    when it reads like a model name (one word, no spaces)."""
    try:
        with open(folder / "README.md", encoding="utf-8", errors="replace") as card:
            text = card.read(64 * 1024)
    except OSError:
        return None
    match = _CARD_TITLE.search(text)
    title = match.group(1) if match else ""
    if title.lower() in _GENERIC_TITLES:
        return None
    return title if title and len(title) <= 100 and " " not in title else None


def _folder_name(folder: Path) -> str:
    for part in (folder, *folder.parents):
        if part.name and part.name.lower() not in _GENERIC_FOLDERS:
            return part.name
    return folder.name
