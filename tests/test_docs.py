"""The docs tell the truth: every option is in the README with its real default, and every
example in the README runs as written against a live server."""

from __future__ import annotations

import configparser
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedserve.config import Config, env_name

from embedserve.contracts import parse_ready_line

from conftest import ROOT, Server, server_env

README = (ROOT / "README.md").read_text("utf-8")
# Where the README's examples expect the server: the default port.
README_ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1):8765\b")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def shell_commands(block: str) -> list[str]:
    """One command per line, backslash continuations joined, comments and blanks dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line for line in (line.strip() for line in lines) if line and line[0] != "#"]


def is_curl(block: str) -> bool:
    return all(command.startswith("curl ") for command in shell_commands(block))


def is_cli(block: str) -> bool:
    return all(re.match(r"(echo .*\| )?embedserve ", command)
               for command in shell_commands(block))


def is_setup(block: str) -> bool:
    """Install, test and benchmark commands: what they do is checked elsewhere (the test
    command against CI) or takes minutes, so they are not run here."""
    return all(re.match(r"(pip install |python extras/bench/|python -m pytest)", command)
               or command == "pip install . && python -m embedserve"
               for command in shell_commands(block))


def at_server(code: str, server: Server) -> str:
    """The example, aimed at the live server instead of the default port."""
    aimed = README_ADDRESS.sub(f"{server.host}:{server.port}", code)
    assert "8765" not in aimed, f"an example names port 8765 in a way not substituted:\n{code}"
    return aimed


def example_env(server: Server, **extra: str) -> dict[str, str]:
    # EMBEDSERVE_URL: what embedserve.Client and the embedserve commands use when no url
    # is given, so examples that name none find the live server instead of starting one on
    # 8765. NO_PROXY: a proxy configured on the machine must not take 127.0.0.1 requests.
    return server_env(EMBEDSERVE_URL=server.url, NO_PROXY="127.0.0.1,localhost",
                      no_proxy="127.0.0.1,localhost", **extra)


def vectors_in(value: Any) -> Iterator[list[float]]:
    """Every list of numbers anywhere in a JSON document."""
    if isinstance(value, list) and value and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from vectors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from vectors_in(item)


def assert_unit_vectors(document: Any, where: str) -> None:
    vectors = list(vectors_in(document))
    assert vectors, f"{where}: no vectors in {document!r:.300}"
    for vector in vectors:
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5), where


def test_every_option_is_documented_with_its_default() -> None:
    for f in dataclasses.fields(Config):
        default = "(none)" if f.default in ("", ()) else f.default
        row = (f"| `--{f.name.replace('_', '-')}` | `{env_name(f.name)}` | `{default}` |")
        assert row in README, f"README lacks the row for --{f.name}: {row}"


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    command = re.search(r"```sh\n(pip install torch==[^\n]+)\n```", README)
    assert command, "README lacks the test command"
    assert command.group(1) in ci


def test_every_shell_example_is_run_or_a_setup_command() -> None:
    # A new example must be one the tests below run, or be added to is_setup knowingly.
    blocks = code_blocks("sh")
    assert any(is_curl(b) for b in blocks) and any(is_cli(b) for b in blocks)
    for block in blocks:
        assert is_curl(block) or is_cli(block) or is_setup(block), (
            f"README example neither run by tests/test_docs.py nor a setup command:\n{block}")


def test_readme_installs_from_the_clone_only() -> None:
    # embedserve is not on the package index: `pip install embedserve` would fail (or,
    # worse, install someone else's package of that name).
    installs = [c.split("&&")[0] for c in re.findall(r"pip install [^\n`]*", README)]
    assert installs
    for command in installs:
        names = [word.strip("'\"") for word in command.split()[2:]]
        assert not any(re.match(r"embedserve\b", name) for name in names), (
            f"installs embedserve from the index: {command}")
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg", encoding="utf-8")
    extras = set(setup["options.extras_require"])
    named = set(re.findall(r"'\.\[(\w+)\]'", README))
    assert named and named <= extras, f"README names extras setup.cfg lacks: {named - extras}"


def test_readme_speaks_to_users() -> None:
    # Target columns and pass/fail marks belong to the issue tracker, not the README.
    assert "✅" not in README and "❌" not in README
    assert "| target |" not in README


def test_ready_line_is_the_servers(server: Server) -> None:
    shown = re.search(r"^embedserve ready at .*$", README, re.M)
    assert shown, "README does not show the ready line"
    printed = next(line.strip() for line in server.log if parse_ready_line(line))

    def general(line: str) -> str:  # the port and pid differ from run to run
        return re.sub(r"pid=\d+", "pid=N", re.sub(r":\d+ ", ":PORT ", line))

    assert general(shown.group(0)) == general(printed)


def test_curl_examples(server: Server) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (apt-get install curl): the README's curl "
                    "examples were not run")
    commands = [c for block in code_blocks("sh") if is_curl(block)
                for c in shell_commands(block)]
    assert len(commands) >= 2
    for command in commands:
        argv = shlex.split(at_server(command, server))
        # -w: the status after the body, so a 4xx is a failure here even though the
        # example (-s, for readers) prints the error body and exits 0.
        done = subprocess.run([curl, *argv[1:], "-S", "-w", "\n%{http_code}"],
                              capture_output=True, text=True, timeout=60,
                              env=example_env(server))
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        body, status = done.stdout.rsplit("\n", 1)
        assert status == "200", f"{command}\nHTTP {status}: {body}"
        assert_unit_vectors(json.loads(body), command)


def cli_bin_dir(scratch: Path) -> str:
    """A folder holding an `embedserve` command for the interpreter running the tests: the
    installed console script beside it, or else a stand-in that runs the same module."""
    beside = Path(sys.executable).parent
    if (beside / "embedserve").exists():
        return str(beside)
    script = scratch / "embedserve"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m embedserve "$@"\n')
    script.chmod(0o755)
    return str(scratch)


def test_shell_command_examples(server: Server, tmp_path: Path) -> None:
    commands = [c for block in code_blocks("sh") if is_cli(block)
                for c in shell_commands(block)]
    assert len(commands) >= 3
    env = example_env(server)
    env["PATH"] = os.pathsep.join([cli_bin_dir(tmp_path), env.get("PATH", "")])
    for command in commands:
        done = subprocess.run(["bash", "-o", "pipefail", "-c", at_server(command, server)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        if "--json" in command:  # one object; the server answered, not the fallback
            result = json.loads(done.stdout)
            assert result["source"] == "server", command
            assert_unit_vectors(result["embeddings"], command)
        elif " embed " in f"{command} ":  # one JSON vector per line
            assert_unit_vectors([json.loads(line) for line in done.stdout.splitlines()],
                                command)
        elif command.startswith("embedserve health"):
            assert json.loads(done.stdout) == {"status": "ok"}, command
        elif command.startswith("embedserve info"):
            assert json.loads(done.stdout)["model"] == "hash-v1-384", command


def test_python_examples(server: Server, tmp_path: Path) -> None:
    blocks = code_blocks("python")
    assert len(blocks) >= 2
    for code in blocks:
        # A print's trailing comment is what the README says it prints.
        expected = [m.group(1).strip() for m in
                    re.finditer(r"^\s*print\(.*\)\s*#\s*(.+)$", code, re.M)]
        assert expected, f"a Python example prints nothing it promises:\n{code}"
        done = subprocess.run([sys.executable, "-c", at_server(code, server)],
                              capture_output=True, text=True, timeout=120,
                              env=example_env(server), cwd=tmp_path)
        assert done.returncode == 0, f"{code}\n{done.stderr}"
        assert done.stdout.splitlines() == expected, code
