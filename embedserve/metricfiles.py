"""Where a worker keeps its metric values so that any worker can report the whole server.

With --workers N each scrape of /metrics is answered by one worker, so that worker must see
its siblings' counts. The design is prometheus_client's multiprocess mode, on the standard
library: each worker writes its values into memory-mapped files of its own, in a run
directory the supervisor creates (and removes), and the scraped worker reads them all.

- `total-<id>.db`: counters and histogram parts, summed over every worker that ever ran,
  so a restarted worker's counts are kept and a counter never goes backwards.
- `live-<id>.db`: gauges (requests in flight, queue depth, models loaded), summed over
  the workers running now; the supervisor deletes a worker's file when it reaps it.
- `retired.json`: the supervisor folds a dead worker's totals into it (and deletes the
  worker's file), so the directory does not grow with every restart. It lists the ids it
  holds; a reader skips those workers' files (see `read_totals` for why that is exact).

A file is one writer's (one process, its threads serialised by the caller's lock) and any
number of readers'. Layout: an 8-byte header holding the bytes in use, then entries of
[u32 key length][key: JSON, padded][f64 value] with every value 8-byte aligned, so a value
is rewritten in place by one aligned store, and an entry is complete before the header
counts it. Ids are the supervisor's spawn count, never reused (unlike pids).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import struct
from pathlib import Path
from typing import IO, Protocol

log = logging.getLogger("embedserve.metricfiles")

# (family, labels as exposition text, part): part is "" for a counter or gauge, a bucket's
# bound, "sum" or "count" for a histogram.
Key = tuple[str, str, str]

_HEADER = struct.Struct("<I4x")
_LENGTH = struct.Struct("<I")
_VALUE = struct.Struct("<d")
_INITIAL_SIZE = 1 << 14
TOTAL, LIVE = "total", "live"
RETIRED = "retired.json"
# A run directory is <temp>/embedserve-metrics-<supervisor pid>-<random>.
RUN_DIR_PREFIX = "embedserve-metrics-"


class Store(Protocol):
    def add(self, key: Key, amount: float) -> None: ...

    def set(self, key: Key, value: float) -> None: ...

    def values(self) -> dict[Key, float]: ...


class MemoryStore:
    """A store for a process with no run directory (a service hosted in-process)."""

    def __init__(self) -> None:
        self._values: dict[Key, float] = {}

    def add(self, key: Key, amount: float) -> None:
        self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, key: Key, value: float) -> None:
        self._values[key] = value

    def values(self) -> dict[Key, float]:
        return dict(self._values)


class FileStore:
    """One worker's values in a memory-mapped file that other processes read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._file: IO[bytes] = os.fdopen(fd, "r+b")
        if os.fstat(fd).st_size < _INITIAL_SIZE:
            self._file.truncate(_INITIAL_SIZE)
        self._map = mmap.mmap(fd, 0)
        used = _HEADER.unpack_from(self._map, 0)[0]
        if used < _HEADER.size:  # a new file
            used = _HEADER.size
            _HEADER.pack_into(self._map, 0, used)
        self._used = used
        # An existing file (never so far: ids are not reused) is carried on, not reset.
        self._offsets = {key: offset for key, offset, _ in _entries(self._map, used)}

    def add(self, key: Key, amount: float) -> None:
        offset = self._offsets.get(key)
        if offset is None:
            offset = self._append(key)
        _VALUE.pack_into(self._map, offset, _VALUE.unpack_from(self._map, offset)[0] + amount)

    def set(self, key: Key, value: float) -> None:
        offset = self._offsets.get(key)
        if offset is None:
            offset = self._append(key)
        _VALUE.pack_into(self._map, offset, value)

    def values(self) -> dict[Key, float]:
        return {key: _VALUE.unpack_from(self._map, offset)[0]
                for key, offset in self._offsets.items()}

    def _append(self, key: Key) -> int:
        encoded = json.dumps(key).encode()
        padding = -(_LENGTH.size + len(encoded)) % 8
        size = _LENGTH.size + len(encoded) + padding + _VALUE.size
        if self._used + size > len(self._map):
            self._grow(self._used + size)
        start = self._used
        _LENGTH.pack_into(self._map, start, len(encoded))
        self._map[start + _LENGTH.size:start + _LENGTH.size + len(encoded)] = encoded
        offset = start + _LENGTH.size + len(encoded) + padding
        _VALUE.pack_into(self._map, offset, 0.0)
        # Counted last: a reader sees the whole entry or none of it.
        self._used = start + size
        _HEADER.pack_into(self._map, 0, self._used)
        self._offsets[key] = offset
        return offset

    def _grow(self, needed: int) -> None:
        size = len(self._map)
        while size < needed:
            size *= 2
        self._map.close()
        self._file.truncate(size)
        self._map = mmap.mmap(self._file.fileno(), 0)


def _entries(data: bytes | mmap.mmap, used: int) -> list[tuple[Key, int, float]]:
    found: list[tuple[Key, int, float]] = []
    position = _HEADER.size
    while position + _LENGTH.size <= used:
        length = _LENGTH.unpack_from(data, position)[0]
        start = position + _LENGTH.size
        padding = -(_LENGTH.size + length) % 8
        offset = start + length + padding
        if offset + _VALUE.size > used:
            break  # cannot happen with a whole header; never read past what is counted
        family, labels, part = json.loads(bytes(data[start:start + length]))
        found.append(((family, labels, part), offset, _VALUE.unpack_from(data, offset)[0]))
        position = offset + _VALUE.size
    return found


def _read(handle: IO[bytes]) -> dict[Key, float]:
    header = handle.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return {}  # created a moment ago, not yet sized
    used = _HEADER.unpack(header)[0]
    data = header + handle.read(max(0, used - _HEADER.size))
    return {key: value for key, _, value in _entries(data, min(used, len(data)))}


def worker_stores(directory: Path, worker: int) -> tuple[FileStore, FileStore]:
    """The (totals, live gauges) files of worker `worker`."""
    return (FileStore(directory / f"{TOTAL}-{worker}.db"),
            FileStore(directory / f"{LIVE}-{worker}.db"))


def _worker_id(path: Path) -> int | None:
    stem = path.name.removesuffix(".db")
    kind, _, number = stem.partition("-")
    return int(number) if kind in (TOTAL, LIVE) and number.isdigit() else None


def _retired(directory: Path) -> tuple[set[int], dict[Key, float]]:
    try:
        data = json.loads((directory / RETIRED).read_text("utf-8"))
    except FileNotFoundError:
        return set(), {}
    return set(data["workers"]), {tuple(key): value  # type: ignore[misc]
                                  for key, value in data["values"]}


def read_totals(directory: Path) -> dict[Key, float]:
    """Every worker's counters summed: the retired ones' and the files of the rest.

    Exact while the supervisor retires a worker meanwhile, because it writes retired.json
    (an atomic rename) before it deletes the worker's file, and this opens the files before
    it reads retired.json: a file it could not open is already in the retired.json it
    reads, and one it opened is skipped if retired.json holds it, else counted once."""
    handles: dict[int, IO[bytes]] = {}
    try:
        for path in directory.glob(f"{TOTAL}-*.db"):
            worker = _worker_id(path)
            if worker is None:
                continue
            try:
                handles[worker] = path.open("rb")
            except FileNotFoundError:
                continue
        retired, totals = _retired(directory)
        for worker, handle in handles.items():
            if worker not in retired:
                _add_into(totals, _read(handle))
    finally:
        for handle in handles.values():
            handle.close()
    return totals


def read_live(directory: Path) -> list[dict[Key, float]]:
    """Each running worker's gauges."""
    found = []
    for path in directory.glob(f"{LIVE}-*.db"):
        try:
            with path.open("rb") as handle:
                found.append(_read(handle))
        except FileNotFoundError:
            continue  # its worker was reaped meanwhile
    return found


def retire(directory: Path, worker: int) -> None:
    """A dead worker (the supervisor reaped it): drop its gauges, fold its totals into
    retired.json, then delete its file. Only the supervisor calls this, one at a time."""
    (directory / f"{LIVE}-{worker}.db").unlink(missing_ok=True)
    path = directory / f"{TOTAL}-{worker}.db"
    try:
        with path.open("rb") as handle:
            counts = _read(handle)
    except FileNotFoundError:
        return  # it died before it made one
    workers, totals = _retired(directory)
    if worker not in workers:
        _add_into(totals, counts)
        workers.add(worker)
        temporary = directory / f"{RETIRED}.tmp"
        temporary.write_text(json.dumps({"workers": sorted(workers), "values": [
            [list(key), value] for key, value in totals.items()]}), "utf-8")
        os.replace(temporary, directory / RETIRED)
    path.unlink(missing_ok=True)
    log.debug("metrics of worker %d retired", worker)


def _add_into(totals: dict[Key, float], values: dict[Key, float]) -> None:
    for key, value in values.items():
        totals[key] = totals.get(key, 0.0) + value


def remove_stale_run_dirs(parent: Path) -> None:
    """Remove the run directories of supervisors that are gone and whose workers could not
    remove them either (the whole process group killed at once). Only this user's."""
    for path in parent.glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = path.name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)  # alive (or a pid reused since: then it is left be)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            log.debug("removed %s, left by a supervisor that is gone", path)
        except OSError:
            continue  # alive under another user, or gone from the folder meanwhile
