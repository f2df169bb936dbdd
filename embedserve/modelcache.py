"""The models in the Hugging Face cache: what each snapshot holds (enough for the ML tiers to
load it offline?), the listing `embedserve models` prints, and deleting for `embedserve rm`.
huggingface_hub is imported inside functions only: importing this module stays
standard-library only. Nothing here loads a model: the files alone are judged.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_REVISION = "main"  # what `--model ID` serves: the cache's refs/main
# What a snapshot needs for the ML tiers to load it (transformers' and sentence-transformers'
# own file names); ONNX, GGUF or TensorFlow-only repositories have none of these weights.
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


class HubError(Exception):
    """One model's failure, worded for the person at the shell."""


@dataclass(frozen=True)
class CachedRevision:
    commit: str
    refs: tuple[str, ...]
    size: int
    snapshot: str
    problems: tuple[str, ...]


@dataclass(frozen=True)
class CachedModel:
    id: str
    path: str
    size: int
    revisions: tuple[CachedRevision, ...]
    problems: tuple[str, ...]  # why `--model ID` would not load offline; none: it would

    @property
    def loads_offline(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Cache:
    folder: str
    models: tuple[CachedModel, ...]
    warnings: tuple[str, ...]  # folders huggingface_hub could not read as a cached repo


@dataclass(frozen=True)
class Removed:
    model: str
    revisions: int
    freed: int


def hub_settings() -> tuple[str, str, bool]:
    """(endpoint, cache folder, offline), as huggingface_hub read them from the environment."""
    from huggingface_hub import constants

    offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()
    return str(constants.ENDPOINT), str(constants.HF_HUB_CACHE), bool(offline)


def cache_folder() -> str:
    return hub_settings()[1]


def snapshot_problems(folder: Path) -> list[str]:
    """Why the ML tiers could not load this folder, judged by its files alone: config.json,
    weights and a tokenizer (for a sentence-transformers model, in its Transformer module's
    folder), and every module folder modules.json names."""
    problems: list[str] = []
    base = folder
    for module in _modules(folder):
        path = module.get("path") or ""
        if path and not (folder / path).is_dir():
            problems.append(f"no {path}/ (named in modules.json)")
        if str(module.get("type", "")).endswith("Transformer"):
            base = folder / path
    if not (base / "config.json").is_file():
        problems.append("no config.json")
    weights = _weights_problem(base)
    if weights:
        problems.append(weights)
    if not any((base / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    return problems


def _modules(folder: Path) -> list[dict[str, Any]]:
    try:
        modules = json.loads((folder / "modules.json").read_text("utf-8"))
    except (OSError, ValueError):
        return []
    return [m for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []


def _weights_problem(folder: Path) -> str | None:
    if any((folder / name).is_file() for name in WEIGHTS):
        return None
    for index in WEIGHT_INDEXES:
        try:
            weight_map = json.loads((folder / index).read_text("utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        missing = sorted({s for s in weight_map.values() if not (folder / s).is_file()})
        return f"{len(missing)} weight shards missing ({missing[0]}, ...)" if missing else None
    return f"no weights ({' or '.join(WEIGHTS)})"


def _missing_from_listing(repo_id: str, commit: str, snapshot: Path) -> list[str]:
    """Files the hub listed for this commit that are not in the snapshot: an interrupted
    download. The server's offline look-up refuses such a snapshot (IncompleteSnapshotError),
    so it does not load offline even when the essential files are there. Versions of
    huggingface_hub that keep no listing cannot tell: nothing is reported."""
    try:
        from huggingface_hub import get_cached_repo_tree
        listed = get_cached_repo_tree(repo_id, revision=commit)
    except Exception:
        return []
    return [f.path for f in listed if not (snapshot / f.path).is_file()]


def folder_size(folder: Path) -> int:
    """Bytes on disk of a snapshot's files, each blob counted once."""
    blobs: dict[str, int] = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.realpath(os.path.join(root, name))
            if os.path.isfile(path):
                blobs[path] = os.path.getsize(path)
    return sum(blobs.values())


def _scan() -> Any:
    """The cache as huggingface_hub reads it (HFCacheInfo); None when there is none yet."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir()
    except CacheNotFound:
        return None
    except ValueError as exc:  # HF_HUB_CACHE names a file, for one
        raise HubError(f"cannot read the Hugging Face cache {cache_folder()}: {exc}") from None


def cached_models() -> Cache:
    info = _scan()
    if info is None:
        return Cache(cache_folder(), (), ())
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        revisions = []
        for rev in sorted(repo.revisions, key=lambda r: -r.last_modified):
            problems = snapshot_problems(rev.snapshot_path)
            missing = _missing_from_listing(repo.repo_id, rev.commit_hash, rev.snapshot_path)
            if missing:
                problems.append(f"incomplete download: {len(missing)} files missing "
                                f"({', '.join(missing[:3])})")
            revisions.append(CachedRevision(rev.commit_hash, tuple(sorted(rev.refs)),
                                            rev.size_on_disk, str(rev.snapshot_path),
                                            tuple(problems)))
        main = next((r for r in revisions if DEFAULT_REVISION in r.refs), None)
        if main is None:
            why: tuple[str, ...] = (f"no '{DEFAULT_REVISION}' revision cached, which --model "
                                    f"{repo.repo_id} serves (serve a snapshot folder)",)
        else:
            why = main.problems
        models.append(CachedModel(repo.repo_id, str(repo.repo_path), repo.size_on_disk,
                                  tuple(revisions), why))
    damaged = _damaged(info)
    for model_id, path, warning in damaged:
        models.append(CachedModel(model_id, str(path), folder_size(path), (),
                                  (f"damaged copy: {warning}",)))
    listed = {warning for _, _, warning in damaged}
    return Cache(str(info.cache_dir or cache_folder()),
                 tuple(sorted(models, key=lambda m: m.id.lower())),
                 tuple(w for w in map(str, info.warnings) if w not in listed))


def _damaged(info: Any) -> list[tuple[str, Path, str]]:
    """(id, folder, why) of each model folder scan_cache_dir could not read (a blob deleted
    by hand, a ref to a missing snapshot): it lists them as warnings only, yet they take
    disk and `embedserve rm` must be able to delete them."""
    readable = {repo.repo_path for repo in info.repos}
    cache = Path(info.cache_dir or cache_folder())
    found = []
    for path in sorted(cache.glob("models--*")):
        if path.is_dir() and path not in readable:
            why = next((str(w) for w in info.warnings if str(path) in str(w)), "unreadable")
            if not any(path.glob("snapshots/*")):
                why = "no snapshot: a download that failed or was cut short"
            found.append((path.name.split("--", 1)[1].replace("--", "/"), path, why))
    return found


def remove(model: str) -> Removed:
    """Delete every cached revision of `model`, and its folder."""
    info = _scan()
    if info is None:
        raise HubError(f"{model} is not in the Hugging Face cache ({cache_folder()}): the "
                       "cache is empty")
    repos = [r for r in info.repos if r.repo_type == "model"]
    # Hub ids are case-insensitive; the cache keeps the spelling that downloaded it.
    repo = (next((r for r in repos if r.repo_id == model), None)
            or next((r for r in repos if r.repo_id.lower() == model.lower()), None))
    damaged = [(i, path) for i, path, _ in _damaged(info) if i.lower() == model.lower()]
    if repo is None and damaged:
        model_id, path = damaged[0]
        size = folder_size(path)
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            raise HubError(f"could not delete {path}")
        return Removed(model_id, 0, size)
    if repo is None:
        cached = ", ".join(sorted(r.repo_id for r in repos)) or "none"
        folder = info.cache_dir or cache_folder()
        raise HubError(f"{model} is not in the Hugging Face cache ({folder}); cached "
                       f"models: {cached}")
    hashes = [rev.commit_hash for rev in repo.revisions]
    if hashes:
        info.delete_revisions(*hashes).execute()
    if repo.repo_path.exists():
        # An interrupted first download leaves blobs and no snapshot: no revision to name.
        shutil.rmtree(repo.repo_path, ignore_errors=True)
    if repo.repo_path.exists():
        raise HubError(f"could not delete {repo.repo_path} (see the warnings above)")
    return Removed(repo.repo_id, len(hashes), repo.size_on_disk)


def human_size(size: int) -> str:
    """Decimal units, as the hub's pages and `hf cache` show sizes."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
