"""`embedserve embed|health|info`: the Python client from a shell. `embed` and `info` start
a server the way the client does when none answers, and stop it when the command ends;
`health` is a probe and never starts one (a started server would always answer ready).
`embedserve pull|models|rm`: the models in the Hugging Face cache (hub.py does the work)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from embedserve import hub, modelcache

if TYPE_CHECKING:
    from embedserve.client import Client

CLIENT_COMMANDS = ("embed", "health", "info")
MODEL_COMMANDS = ("pull", "models", "rm")
COMMANDS = CLIENT_COMMANDS + MODEL_COMMANDS
# Lines of stdin embedded and printed at a time: a long file is never held whole (100,000
# lines' vectors took 1.5 GB).
STDIN_CHUNK = 1024
# `embedserve --help` is the server's parser (config.py), which names the client commands;
# cli.py adds this for the model commands, which live here.
MODEL_COMMANDS_HELP = (
    "Model commands, for offline machines and container builds (the Hugging Face cache, "
    "HF_HOME): `embedserve pull MODEL...` downloads models and checks that each one serves "
    "offline; `embedserve models` lists the cached ones, their sizes and whether they load "
    "offline; `embedserve rm MODEL...` deletes them.")


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="embedserve", description=(
        "Talk to an embedserve server (EMBEDSERVE_URL or http://127.0.0.1:8765). embed and "
        "info start one if nothing answers and stop it afterwards; health never starts one. "
        "pull, models and rm manage the models in the Hugging Face cache. "
        "`embedserve --help` lists the server's options."))
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser(
        "embed", help="print the embeddings of texts",
        description="Print the embeddings of texts. Starts a server if none answers (and "
                    "stops it afterwards); with no server at all, embeds in-process when that "
                    "gives the same vectors, unless --no-fallback.")
    embed.add_argument("texts", nargs="*", metavar="TEXT",
                       help="texts to embed; none or '-': one text per line of stdin, "
                            f"embedded and printed {STDIN_CHUNK} lines at a time")
    embed.add_argument("--json", action="store_true",
                       help="one JSON object with model, backend and embeddings, printed "
                            "once all are in (default: one JSON array per text, one per "
                            "line)")
    embed.add_argument("--dimensions", type=int, help="shorten vectors to this many values")
    embed.add_argument("--no-fallback", action="store_true",
                       help="fail instead of embedding locally when no server can be used")
    health = commands.add_parser(
        "health", help="probe: exit 0 when a server answers ready, else 1; starts nothing",
        description="Probe the server: print its /health and exit 0 when it answers ready, "
                    "exit 1 otherwise. Never starts a server.")
    commands.add_parser(
        "info", help="print the server's /info",
        description="Print the server's /info. Starts a server if none answers (and stops "
                    "it afterwards), unless --no-autostart.")
    for sub in commands.choices.values():
        sub.add_argument("--url", help="server address (default $EMBEDSERVE_URL or "
                                       "http://127.0.0.1:8765)")
        # health never starts a server, so the flag means nothing there; it is still
        # accepted, hidden, so scripts written as `health --no-autostart` keep working.
        sub.add_argument("--no-autostart", action="store_true",
                         help=argparse.SUPPRESS if sub is health else "never start a server")
        sub.add_argument("--timeout", type=float, default=60.0,  # checked by the Client
                         help="seconds to wait for a response (default 60)")
    _add_model_commands(commands)
    args = parser.parse_args(argv)
    if args.command in MODEL_COMMANDS:
        return _run_model_command(args, parser)

    from embedserve.client import Client, EmbedServeError, FallbackPolicy

    autostart = args.command != "health" and not args.no_autostart
    fallback: FallbackPolicy = ("never" if args.command != "embed" or args.no_fallback
                                else "same-model")
    try:
        with Client(args.url, autostart=autostart, timeout=args.timeout,
                    fallback=fallback) as client:
            if args.command == "health":
                print(json.dumps(client.health()))
            elif args.command == "info":
                print(json.dumps(client.info(), indent=2))
            else:
                return _embed(client, args, parser)
    except ValueError as exc:  # a bad --url or option, as the client words it
        parser.error(str(exc))
    except EmbedServeError as exc:
        print(f"embedserve {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _embed(client: Client, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Texts from the arguments, or from stdin a chunk at a time, each chunk printed as soon
    as it is embedded (--json waits for all). All vectors come from one model: a change
    between chunks (a server swapped for another model) stops with exit 1."""
    if "-" in args.texts and len(args.texts) > 1:
        parser.error("'-' (read stdin) cannot be mixed with texts")
    chunks = iter([args.texts]) if args.texts and args.texts != ["-"] else \
        _stdin_chunks(parser)
    if args.json:
        texts = [text for chunk in chunks for text in chunk]
        if not texts:
            parser.error("no texts given (as arguments or on stdin)")
        vectors = client.embed(texts, dimensions=args.dimensions)
        print(json.dumps({"model": vectors.model, "backend": vectors.backend,
                          "source": vectors.source, "embeddings": vectors}))
        return 0
    model, done = None, 0
    for texts in chunks:
        vectors = client.embed(texts, dimensions=args.dimensions)
        if model is not None and vectors.model != model:
            print(f"embedserve embed: stopped after {done} lines: the model changed from "
                  f"{model} to {vectors.model}, and vectors of different models are not "
                  "comparable", file=sys.stderr)
            return 1
        model = vectors.model
        sys.stdout.writelines(json.dumps(v) + "\n" for v in vectors)
        done += len(texts)
    if not done:
        parser.error("no texts given (as arguments or on stdin)")
    return 0


def _stdin_chunks(parser: argparse.ArgumentParser) -> Iterator[list[str]]:
    """One text a line, STDIN_CHUNK lines at a time. A blank line is an error, not skipped:
    the output's lines must pair with the input's one for one (lines before it that were
    embedded are printed already)."""
    chunk: list[str] = []
    for number, line in enumerate(sys.stdin, 1):
        text = line.rstrip("\r\n")
        if not text.strip():
            parser.error(f"line {number} of stdin is blank: each line is one text, and its "
                         "vector is the same line of the output; remove blank lines first")
        chunk.append(text)
        if len(chunk) == STDIN_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _seconds(text: str) -> float:
    """A flag's number of seconds: positive and finite (a bad one is argparse's exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, "
                                         f"got {text!r}")
    return value


def _add_model_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pull = commands.add_parser(
        "pull", help="download models into the Hugging Face cache and check each one serves",
        description="Download models into the Hugging Face cache (HF_HOME; from HF_ENDPOINT, "
                    "default https://huggingface.co), with progress bars on stderr, then check "
                    "that each one serves offline: start `python -m embedserve --model MODEL` "
                    "with HF_HUB_OFFLINE=1 and ask it for an embedding. What a container "
                    "build runs to bake its models in. 'hash' needs no download. Exit status "
                    "0 when every model is in and serves, 1 otherwise.")
    pull.add_argument("models", nargs="+", metavar="MODEL",
                      help="Hugging Face model ids (org/name), or 'hash'")
    pull.add_argument("--revision", help="a branch, tag or commit (default: main, what "
                                         "--model MODEL serves; another one is served from "
                                         "its snapshot folder, which pull prints)")
    pull.add_argument("--no-check", action="store_true",
                      help="only download (and look at the files): for a machine without the "
                           "ML packages that prepares a cache for one that has them")
    pull.add_argument("--check-timeout", type=_seconds, default=hub.CHECK_TIMEOUT,
                      help="seconds the check waits for the server to load a model "
                           f"(default {hub.CHECK_TIMEOUT:.0f})")
    models = commands.add_parser(
        "models", help="list the models in the Hugging Face cache",
        description="List the models in the Hugging Face cache: id, cached revisions (short "
                    "commit hashes and their branches), size on disk, and whether `--model "
                    "ID` loads offline (judged by the files: config.json, weights, tokenizer, "
                    "a complete download); nothing is loaded.")
    models.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    remove = commands.add_parser(
        "rm", help="delete models from the Hugging Face cache",
        description="Delete models from the Hugging Face cache, every revision, and print "
                    "what was freed. A model the server at --url serves is kept (its "
                    "workers hold it in memory, but one it restarts would not find it) "
                    "unless --force. Exit status 1 if a model is not in the cache or kept.")
    remove.add_argument("models", nargs="+", metavar="MODEL", help="cached model ids")
    remove.add_argument("--url", help="the server to ask what it serves (default "
                                      "$EMBEDSERVE_URL or http://127.0.0.1:8765); none "
                                      "answering is no objection")
    remove.add_argument("--force", action="store_true",
                        help="delete a model even while that server serves it")


def _run_model_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        hub.require_hub()
        if args.command == "pull":
            return _pull(args)
        if args.command == "models":
            return _models(args.json)
        return _remove(args.models, ("", frozenset()) if args.force
                       else _served_models(args.url, parser))
    except modelcache.HubError as exc:
        print(f"embedserve {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C in a download: a word, not a traceback
        print(f"embedserve {args.command}: interrupted", file=sys.stderr)
        return 130


def _pull(args: argparse.Namespace) -> int:
    failed = 0
    for model in args.models:
        try:
            got = hub.pull(model, revision=args.revision, check=not args.no_check,
                           check_timeout=args.check_timeout)
        except modelcache.HubError as exc:
            print(f"embedserve pull: {exc}", file=sys.stderr)
            failed += 1
            continue
        if not got.commit:  # the hash tier
            print(f"{model}: {got.check}")
            continue
        line = f"{model}: revision {got.commit[:8]}, {modelcache.human_size(got.size)}: {got.check}"
        if got.serve_with != model:
            line += (f"; serve this revision with --model {got.serve_with} (--model {model} "
                     f"serves '{modelcache.DEFAULT_REVISION}')")
        print(line, flush=True)
    return 1 if failed else 0


def _models(as_json: bool) -> int:
    cache = modelcache.cached_models()
    for warning in cache.warnings:
        print(f"embedserve models: skipped a folder: {warning}", file=sys.stderr)
    if as_json:
        print(json.dumps({"cache": cache.folder, "models": [{
            "id": m.id, "size_bytes": m.size, "path": m.path,
            "loads_offline": m.loads_offline, "problems": list(m.problems),
            "revisions": [{"commit": r.commit, "refs": list(r.refs), "size_bytes": r.size,
                           "snapshot": r.snapshot, "problems": list(r.problems)}
                          for r in m.revisions]} for m in cache.models]}, indent=2))
        return 0
    if not cache.models:
        print(f"no models in the Hugging Face cache ({cache.folder})")
        return 0
    rows = [("MODEL", "REVISIONS", "SIZE", "LOADS OFFLINE")] + [
        (m.id, ", ".join(r.commit[:8] + (f" ({', '.join(r.refs)})" if r.refs else "")
                         for r in m.revisions) or "-",
         modelcache.human_size(m.size), "yes" if m.loads_offline else "no: " + "; ".join(m.problems))
        for m in cache.models]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    total = sum(m.size for m in cache.models)
    count = len(cache.models)
    print(f"{count} model{'' if count == 1 else 's'}, {modelcache.human_size(total)} in "
          f"{cache.folder}")
    return 0


# What rm says of a server that answers but will not say what it serves: it may serve any.
_NOT_YET = "answers but does not serve yet (loading or busy) and may be loading"
_KEYED = ("asks for an API key (set EMBEDSERVE_API_KEY) before it says what it serves, and "
          "may be serving")
_FORBIDDEN = ("refuses this client (403: its --allowed-hosts or --cors-origins, or the API "
              "key) before it says what it serves, and may be serving")


def _served_models(url: str | None, parser: argparse.ArgumentParser
                   ) -> tuple[str, frozenset[str] | str]:
    """The URL of the server `url` finds and what it serves (each model's id and names,
    lower-cased): none when no server answers there (nothing is started to ask); why not,
    when one answers but will not say (loading, busy, or its API key not given), and so may
    be serving any model. A bad --url is a usage error, as elsewhere."""
    from embedserve.client import AuthenticationError, Client, EmbedServeError, ServerUnavailable
    from embedserve.client.transport import RETRYABLE_STATUSES

    try:
        client = Client(url, autostart=False, fallback="never", retries=0, timeout=5.0,
                        retry_timeout=5.0)  # a server stuck loading is not waited 60 s
    except ValueError as exc:
        parser.error(str(exc))
    with client:
        try:
            info = client.info()
        except ServerUnavailable as exc:
            busy = exc.status is not None and exc.status in RETRYABLE_STATUSES
            return client.url, _NOT_YET if busy else frozenset()
        except AuthenticationError as exc:  # an embedserve server with --api-key, most likely
            return client.url, _KEYED if exc.status == 401 else _FORBIDDEN
        except EmbedServeError:  # something answers, but not as embedserve does
            return client.url, frozenset()
    entries = info.get("models")
    return client.url, frozenset(
        str(name).lower()
        for entry in (entries if isinstance(entries, list) else [info])
        if isinstance(entry, dict)
        for name in [entry.get("model"), *(entry.get("names") or [])] if name)


def _remove(models: Sequence[str], served: tuple[str, frozenset[str] | str]) -> int:
    where, names = served
    failed = 0
    for model in models:
        if isinstance(names, str) or model.lower() in names:
            doing = names if isinstance(names, str) else "serves"
            print(f"embedserve rm: the server at {where} {doing} {model}: its workers hold it "
                  "in memory, and one it restarts (a crash, a SIGHUP) would not find it; "
                  "stop that server first, or pass --force", file=sys.stderr)
            failed += 1
            continue
        try:
            removed = modelcache.remove(model)
        except modelcache.HubError as exc:
            print(f"embedserve rm: {exc}", file=sys.stderr)
            failed += 1
            continue
        n = removed.revisions
        what = f"{n} revision{'' if n == 1 else 's'}" if n else "a damaged copy"
        print(f"removed {removed.model} ({what}): {modelcache.human_size(removed.freed)} freed")
    return 1 if failed else 0
