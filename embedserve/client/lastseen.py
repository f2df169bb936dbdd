"""What each server was last seen serving, kept across processes.

Under fallback="same-model" the fallback answers only with the model the server would have
used. A process that has not reached its server yet knew nothing of that model, and so
allowed the hash tier: a script run again while its sentence-transformers server was down
got hash vectors to store beside the model's. So the part of a server's /info that the
fallback reads is kept per server URL in a small JSON file, and a process that has not
heard from its server goes by what that server last said it serves.

The file is `served-models.json` in $EMBEDSERVE_STATE_DIR, else $XDG_STATE_HOME/embedserve,
else ~/.local/state/embedserve (%LOCALAPPDATA%\\embedserve on Windows); the Node client
reads and writes the same file. It is written only when what a server serves changes, whole
and by rename (never half-written), and holds the MAX_SERVERS servers whose news came last
(a server that keeps serving the same model is not rewritten at every start). Any
failure to read or write it (a read-only home, a damaged file) only loses the memory: the
client works on as if nothing had been seen.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embedserve.contracts import STATE_ENV

log = logging.getLogger("embedserve.client")

FILE_NAME = "served-models.json"
MAX_SERVERS = 64
# What the fallback reads of /info (fallback.Fallback.learn); nothing else is kept.
_INFO_KEYS = ("model", "dimensions")
_ENTRY_KEYS = ("names", "model", "backend", "dimensions", "kind")

_lock = threading.Lock()  # one writer per process; between processes the rename decides


def state_file() -> Path:
    folder = os.environ.get(STATE_ENV)
    if not folder:
        if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
            folder = os.path.join(os.environ["LOCALAPPDATA"], "embedserve")
        else:
            base = os.environ.get("XDG_STATE_HOME") or os.path.join(
                os.path.expanduser("~"), ".local", "state")
            folder = os.path.join(base, "embedserve")
    return Path(folder) / FILE_NAME


def served(info: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a server's /info that says what it serves."""
    kept = {key: info[key] for key in _INFO_KEYS if key in info}
    entries = info.get("models")
    if isinstance(entries, list):
        kept["models"] = [{key: entry[key] for key in _ENTRY_KEYS if key in entry}
                          for entry in entries if isinstance(entry, dict)]
    return kept


def recall(url: str) -> dict[str, Any] | None:
    """What the server at `url` last said it serves (served()'s form), or None."""
    entry = _read().get(url)
    info = entry.get("info") if isinstance(entry, dict) else None
    return info if isinstance(info, dict) else None


def remember(url: str, info: Mapping[str, Any]) -> None:
    """Keep what the server at `url` serves, if that is news."""
    kept = served(info)
    with _lock:
        servers = _read()
        previous = servers.get(url)
        if isinstance(previous, dict) and previous.get("info") == kept:
            return
        servers.pop(url, None)
        servers[url] = {"info": kept, "seen": time.time()}
        while len(servers) > MAX_SERVERS:  # oldest first: insertion order is seen order
            del servers[next(iter(servers))]
        _write(servers)


def _read() -> dict[str, Any]:
    path = state_file()
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.debug("ignoring %s: %s", path, exc)
        return {}
    servers = content.get("servers") if isinstance(content, dict) else None
    if not isinstance(servers, dict):
        return {}
    # Seen order, whoever wrote it (the Node client writes the same file).
    return dict(sorted(servers.items(), key=lambda item: _seen(item[1])))


def _seen(entry: Any) -> float:
    seen = entry.get("seen") if isinstance(entry, dict) else None
    return float(seen) if isinstance(seen, (int, float)) else 0.0


def _write(servers: dict[str, Any]) -> None:
    path = state_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=FILE_NAME, dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump({"version": 1, "servers": servers}, out, indent=1)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        log.debug("cannot keep what servers serve in %s: %s", path, exc)
