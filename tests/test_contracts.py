"""The contracts between processes: the ready line as printed and as parsed (Python here,
Node in extras/node/test/contracts.test.js, from the same samples), a server's name in the
clients' shared memory of servers (same samples again), exit codes, variables."""

from __future__ import annotations

import json
import subprocess
import sys

from embedserve.client import Client
from embedserve.config import FLAGS, Config, build_parser
from embedserve.contracts import (EXIT_USAGE, ReadyLine, env_name, parse_ready_line)

from conftest import ROOT, Server, server_env

SAMPLES = json.loads((ROOT / "tests" / "data" / "ready_lines.json").read_text("utf-8"))


def test_samples_parse_to_their_fields() -> None:
    assert len(SAMPLES["cases"]) >= 5
    for case in SAMPLES["cases"]:
        ready = parse_ready_line(case["line"])
        fields = None if ready is None else {**vars(ready), "port": ready.port}
        assert fields == case["parsed"], case["line"]


def test_both_clients_name_a_server_alike_however_its_url_is_spelled() -> None:
    """The key of lastseen's file, shared by the Python and the Node client: a server given
    as http://127.1:9000 to one and http://127.0.0.1:9000 to the other is one server."""
    cases = json.loads((ROOT / "tests" / "data" / "server_urls.json").read_text("utf-8"))
    assert len(cases["cases"]) >= 10
    for case in cases["cases"]:
        assert Client(case["url"], autostart=False).url == case["name"], case["url"]


def test_format_and_parse_round_trip() -> None:
    line = ReadyLine("http://[::1]:1234", "transformers", "/m/a, b (c)", 32, 7, 3)
    assert parse_ready_line("prefix: " + line.format()) == line


def test_a_real_server_prints_the_line(server: Server) -> None:
    printed = [parse_ready_line(line) for line in server.log if parse_ready_line(line)]
    assert len(printed) == 1 and printed[0].url == server.url
    assert (printed[0].backend, printed[0].model, printed[0].workers) == ("hash", "hash-v1-384", 1)


def test_a_bad_variable_is_a_usage_error_for_the_server_and_the_client() -> None:
    env = server_env(**{env_name("dimensions"): "abc"})
    done = subprocess.run([sys.executable, "-m", "embedserve", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == EXIT_USAGE and "EMBEDSERVE_DIMENSIONS" in done.stderr
    probe = ("import embedserve\ntry:\n    embedserve.Client(autostart=False)\n"
             "except ValueError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert "EMBEDSERVE_DIMENSIONS='abc'" in done.stdout, done.stderr
    assert Config.dimensions == 384


def test_a_list_option_given_one_string_is_an_error_not_its_letters() -> None:
    import pytest

    with pytest.raises(ValueError, match="tuple of strings"):
        Config(model="sentence-transformers/all-MiniLM-L6-v2")  # type: ignore[arg-type]
    assert Config(model=("hash",)).model_id == "hash"


def test_the_flags_the_clients_know_are_the_servers() -> None:
    # The clients read server_args by them (abbreviations included): a flag the parser
    # gained or lost there would be misread.
    parser = build_parser({})
    assert FLAGS == {flag for action in parser._actions for flag in action.option_strings
                     if flag.startswith("--")}
