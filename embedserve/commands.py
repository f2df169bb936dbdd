"""`embedserve embed|health|info`: the Python client from a shell. `embed` and `info` start
a server the way the client does when none answers, and stop it when the command ends;
`health` is a probe and never starts one (a started server would always answer ready)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

COMMANDS = ("embed", "health", "info")


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="embedserve", description=(
        "Talk to an embedserve server (EMBEDSERVE_URL or http://127.0.0.1:8765). embed and "
        "info start one if nothing answers and stop it afterwards; health never starts one. "
        "`embedserve --help` lists the server's options."))
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser(
        "embed", help="print the embeddings of texts",
        description="Print the embeddings of texts. Starts a server if none answers (and "
                    "stops it afterwards); with no server at all, embeds in-process when that "
                    "gives the same vectors, unless --no-fallback.")
    embed.add_argument("texts", nargs="*", metavar="TEXT",
                       help="texts to embed; none or '-': one text per line of stdin")
    embed.add_argument("--json", action="store_true",
                       help="one JSON object with model, backend and embeddings "
                            "(default: one JSON array per text, one per line)")
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
        sub.add_argument("--timeout", type=float, default=60.0,
                         help="seconds to wait for a response (default 60)")
    args = parser.parse_args(argv)

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
                texts = args.texts if args.texts and args.texts != ["-"] else [
                    line.rstrip("\n") for line in sys.stdin if line.strip()]
                if not texts:
                    parser.error("no texts given (as arguments or on stdin)")
                vectors = client.embed(texts, dimensions=args.dimensions)
                if args.json:
                    print(json.dumps({"model": vectors.model, "backend": vectors.backend,
                                      "source": vectors.source, "embeddings": vectors}))
                else:
                    sys.stdout.writelines(json.dumps(v) + "\n" for v in vectors)
    except ValueError as exc:  # a bad --url or option, as the client words it
        parser.error(str(exc))
    except EmbedServeError as exc:
        print(f"embedserve {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
