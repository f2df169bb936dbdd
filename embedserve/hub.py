"""`embedserve pull`: download models into the Hugging Face cache ahead of time (a container
build, a machine about to go offline) and prove that each one serves, with failures worded
for the shell. (What is cached, listed and deleted: modelcache.py.) huggingface_hub is
imported inside functions only, so importing this module stays standard-library only.

The proof starts the real server offline in a subprocess and asks it for an embedding: a
load in this process would prove less (it has been online; the server finds the id its own
way, from the cache alone, and may fall back to the hash tier).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedserve.backends import looks_like_path
from embedserve.contracts import ReadyLine, parse_ready_line
from embedserve.errors import quoted
from embedserve.modelcache import (DEFAULT_REVISION, HubError, cache_folder, folder_size,
                                   hub_settings, snapshot_problems)

HASH_MODEL = "hash"  # --model hash: the built-in tier, nothing to download
CHECK_TIMEOUT = 600.0  # seconds for the server to load a model (a big one, on a CPU)
# The names, in a class's MRO, of the network failures of requests / httpx / httpx2 (whichever
# the installed huggingface_hub uses): matched by name so that none needs importing here.
# "2024-01-01 12:00:00,000 WARNING embedserve.backends[42]: ": the server's log prefix, which
# says nothing to the person reading why a model did not load.
LOG_PREFIX = re.compile(r"^\S+ \S+ (?:WARNING|ERROR|CRITICAL) \S+: ")
NETWORK_ERRORS = frozenset({"ConnectError", "ConnectTimeout", "TimeoutException",
                            "NetworkError", "ReadTimeout", "ConnectionError", "Timeout",
                            "ProxyError", "gaierror"})


@dataclass(frozen=True)
class Pulled:
    model: str
    commit: str  # "" for the hash tier
    folder: str
    size: int
    check: str  # what the load check saw, or why none ran
    # `--model ID` serves refs/main; another revision is served from its folder.
    serve_with: str


def require_hub() -> None:
    """huggingface_hub is not a dependency of the core: say how to get it, once."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise HubError("the model commands need huggingface_hub: pip install '.[ml]' in the "
                       "clone (or pip install huggingface_hub)") from None


# -- pull ------------------------------------------------------------------------------------

def pull(model: str, *, revision: str | None = None, check: bool = True,
         check_timeout: float = CHECK_TIMEOUT) -> Pulled:
    """Download `model` into the Hugging Face cache and, with `check`, prove it serves offline."""
    if model == HASH_MODEL:
        return Pulled(model, "", "", 0, "the hash tier is built in: nothing to download", "")
    if looks_like_path(model):
        if not os.path.isdir(model):
            raise HubError(f"{quoted(model)} is not a Hugging Face model id (org/name), nor a "
                           "folder")
        raise HubError(f"{model!r} is a folder path, not a Hugging Face model id (org/name): "
                       f"nothing to download; serve it with --model {model}")
    wanted = revision or DEFAULT_REVISION
    snapshot = _download(model, revision)
    serve_with = model if wanted == DEFAULT_REVISION else str(snapshot)
    size = folder_size(snapshot)
    if not check:
        problems = snapshot_problems(snapshot)
        if problems:
            raise HubError(f"{model} downloaded ({snapshot}), but it is not a model embedserve "
                           f"can load: {'; '.join(problems)}")
        return Pulled(model, snapshot.name, str(snapshot), size, "not checked (--no-check)",
                      serve_with)
    return Pulled(model, snapshot.name, str(snapshot), size,
                  check_serves(serve_with, timeout=check_timeout, snapshot=snapshot),
                  serve_with)


def _download(model: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # before the id names a folder in the cache (one 300 characters long: OSError)
        validate_repo_id(model)
    except HFValidationError:
        raise HubError(f"{quoted(model)} is not a Hugging Face model id (org/name: letters, "
                       "digits, '-', '_' and '.', at most 96 characters a part)") from None
    wanted = revision or DEFAULT_REVISION
    if hub_settings()[2]:
        # Nothing may go online; a model already cached is still "pulled".
        try:
            folder = Path(snapshot_download(model, revision=wanted, local_files_only=True))
        except Exception:
            raise HubError(f"HF_HUB_OFFLINE is set and {model} is not in the cache "
                           f"({cache_folder()}): unset HF_HUB_OFFLINE to download it") from None
        print(f"{model}: HF_HUB_OFFLINE is set: the cached copy is used, and no newer one "
              "looked for", file=sys.stderr)
        return folder
    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    print(f"pulling {model}" + (f" (revision {revision})" if revision else "")
          + f" from {hub_settings()[0]} into {cache_folder()}", file=sys.stderr, flush=True)
    repo_folder = Path(cache_folder(), "models--" + model.replace("/", "--"))
    existed = repo_folder.exists()
    bars: list[Any] = []
    try:
        # First the model's page, with a timeout: snapshot_download's own look-up has none
        # (a hub that accepts and never answers would hang it), and its errors are the
        # clearest (404, gated, private) before any file is fetched.
        HfApi().model_info(model, revision=revision, timeout=timeout)
        return Path(snapshot_download(model, revision=wanted, etag_timeout=timeout,
                                      tqdm_class=progress_bar_class(bars)))
    except Exception as exc:
        if not existed and not any(repo_folder.glob("snapshots/*")):
            # A failed first pull leaves a stub (refs, a file listing) that would show up in
            # `embedserve models` as a damaged copy.
            shutil.rmtree(repo_folder, ignore_errors=True)
        raise HubError(explain(exc, model, revision)) from exc
    finally:
        for bar in bars:  # their last state now, not when collected (after later output)
            bar.close()


def progress_bar_class(opened: list[Any]) -> type[Any]:
    """huggingface_hub's bars hide themselves when stderr is not a terminal -- exactly where a
    container build runs. These show anyway (HF_HUB_DISABLE_PROGRESS_BARS still hides them):
    in a log, all on one line (no cursor moves between nested bars), at most once a second."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from tqdm import tqdm  # type: ignore[import-untyped]

    quiet, terminal = are_progress_bars_disabled(), sys.stderr.isatty()

    class Progress(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub's own bars take a group name; tqdm not
            kwargs["disable"] = quiet
            if not terminal:
                kwargs.update(mininterval=1.0, position=0)
            super().__init__(*args, **kwargs)
            opened.append(self)

    return Progress


def check_serves(model: str, *, timeout: float = CHECK_TIMEOUT,
                 snapshot: Path | None = None) -> str:
    """Start `python -m embedserve --model MODEL` offline and ask it for one embedding: what a
    container started from this cache will do. Returns what it served; HubError otherwise."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # The check asks the model for an embedding: a key it would demand, or a model set to load
    # on first use, is not what is being checked. --model and friends come as flags.
    for name in ("EMBEDSERVE_API_KEY", "EMBEDSERVE_API_KEY_FILE", "EMBEDSERVE_PRELOAD",
                 "EMBEDSERVE_SERVED_MODEL_NAME"):
        env.pop(name, None)
    # This very embedserve serves the check, wherever it was imported from.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "embedserve", "--model", model, "--host", "127.0.0.1",
               "--port", "0", "--workers", "1", "--watch-stdin"]
    print(f"checking that {model} serves offline: HF_HUB_OFFLINE=1 python "
          f"{' '.join(command[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = _watch_for_ready_line(proc, lines)
    try:
        try:
            announced = ready.get(timeout=timeout)
        except queue.Empty:
            raise HubError(f"{model}: the server did not load it within {timeout:g} s "
                           f"(--check-timeout){_why(lines)}") from None
        if announced is None:  # its output ended: it exited, or is about to
            try:
                code: int | str = proc.wait(30)
            except subprocess.TimeoutExpired:
                code = "none yet"
            raise HubError(f"{model} downloaded, but the server cannot load it offline (exit "
                           f"code {code}){_why(lines, snapshot)}")
        if announced.backend == HASH_MODEL:
            raise HubError(f"{model} downloaded, but the server would serve the hash tier "
                           f"instead{_why(lines, snapshot)}")
        dimensions = _embed_once(announced)
        return f"serves offline (backend={announced.backend}, dimensions={dimensions})"
    finally:
        _stop(proc)


def _watch_for_ready_line(proc: subprocess.Popen[str], lines: list[str]
                          ) -> queue.Queue[ReadyLine | None]:
    found: queue.Queue[ReadyLine | None] = queue.Queue()

    def read() -> None:
        # Reads to the end: a full pipe would block the server's logging.
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            announced = parse_ready_line(line)
            if announced:
                found.put(announced)
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    return found


def _embed_once(server: ReadyLine) -> int:
    """One TEI /embed request (it names no model, so any served name will do)."""
    host = server.url.split("//", 1)[1].rsplit(":", 1)[0]
    conn = http.client.HTTPConnection(host, server.port, timeout=120)
    try:
        conn.request("POST", "/embed", body=json.dumps({"inputs": ["embedserve pull check"]}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:
        raise HubError(f"the server loaded the model but did not answer: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise HubError(f"the server loaded the model but answered {response.status}: "
                       f"{body[:300].decode('utf-8', 'replace')}")
    vectors = json.loads(body)
    return len(vectors[0])


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: the graceful stop
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdin:
        proc.stdin.close()


def _why(lines: list[str], snapshot: Path | None = None) -> str:
    """The server's own words: its warnings and errors (else its last lines), and what the
    downloaded files lack."""
    said = [LOG_PREFIX.sub("", line) for line in lines if any(word in line for word in (
        "WARNING", "ERROR", "CRITICAL", "skipped", "failed", "Error"))] or lines
    text = (":\n  " + "\n  ".join(said[-8:])) if said else ""
    problems = snapshot_problems(snapshot) if snapshot else []
    return text + (f"\n  the downloaded files: {'; '.join(problems)}" if problems else "")


def explain(exc: BaseException, model: str, revision: str | None = None) -> str:
    """A download's failure in words that say what to do."""
    from huggingface_hub import errors

    endpoint, chain = hub_settings()[0], list(_causes(exc))
    for cause in chain:
        status = _status(cause)
        if isinstance(cause, errors.GatedRepoError):
            return (f"{model} is gated on {endpoint} ({status}): accept its conditions on its "
                    "page there, then give a token of that account (HF_TOKEN, or `hf auth "
                    "login`)")
        if isinstance(cause, errors.RevisionNotFoundError):
            return f"{model} has no revision {revision!r} on {endpoint} ({status})"
        if isinstance(cause, errors.RepositoryNotFoundError) or (
                isinstance(cause, errors.HfHubHTTPError) and status == 404):
            return (f"no model {model!r} on {endpoint} ({status}): check the id (org/name, as "
                    "on the model's page); a private model needs a token (HF_TOKEN)")
        if isinstance(cause, errors.HfHubHTTPError) and status in (401, 403):
            return (f"not allowed to download {model} from {endpoint} ({status}): set HF_TOKEN "
                    "to a token that may read it")
        if isinstance(cause, errors.HfHubHTTPError) and status is not None:
            return (f"{endpoint} answered {status} for {model}: "
                    f"{_first_line(cause)}; try again later")
    for cause in chain:
        if isinstance(cause, errors.OfflineModeIsEnabled):
            return f"HF_HUB_OFFLINE is set: unset it to download {model}"
        if {k.__name__ for k in type(cause).__mro__} & NETWORK_ERRORS or (
                isinstance(cause, OSError) and cause.errno in (
                    errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                    errno.ENETUNREACH, errno.ETIMEDOUT)):
            return (f"cannot reach the model hub at {endpoint} ({_first_line(cause)}). Check "
                    "the network, or set HF_ENDPOINT to a mirror this machine can reach; "
                    "offline, copy a Hugging Face cache from a machine that has the model "
                    f"(into {cache_folder()}) and set HF_HUB_OFFLINE=1, or serve a local "
                    "folder with --model FOLDER")
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"the disk is full while downloading {model} into {cache_folder()}: free "
                    "space (`embedserve models`, `embedserve rm MODEL`) or point HF_HOME at "
                    "a bigger disk")
        if isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM,
                                                          errno.EROFS):
            return (f"cannot write the Hugging Face cache ({cause.filename or cache_folder()}: "
                    f"{cause.strerror}): set HF_HOME to a folder you can write")
    return f"downloading {model} failed: {type(exc).__name__}: {_first_line(exc)}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it was raised from: huggingface_hub wraps the network's errors
    (a LocalEntryNotFoundError raised from the ConnectError that caused it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
