"""`embedserve embed|health|info`: the client from a shell, as real processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from embedserve.commands import COMMANDS, STDIN_CHUNK
from embedserve.config import BACKENDS
from embedserve.hashing import HashEmbedder

from conftest import Server, server_env, start_server


def run(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    # COLUMNS: argparse wraps help to the terminal's width and may break a line at a hyphen
    # ("sentence-" / "transformers"); a wide fixed width keeps the phrases tests look for whole.
    return subprocess.run([sys.executable, "-m", "embedserve", *args], input=stdin,
                          capture_output=True, text=True, timeout=120,
                          env=server_env(COLUMNS="200", **env))


def unwrapped(text: str) -> str:
    """Help text with argparse's line wrapping undone, so phrases can be searched."""
    return " ".join(text.split())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_embed_prints_one_vector_per_line(server: Server) -> None:
    done = run("embed", "--url", server.url, "first text", "second")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    expected = HashEmbedder().embed(["first text", "second"])
    for line, want in zip(lines, expected):
        got = json.loads(line)
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-7  # base64 float32


def test_embed_json_from_stdin(server: Server) -> None:
    done = run("embed", "--url", server.url, "--json", "--dimensions", "16", stdin="a\nb\n")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["model"] == "hash-v1-384" and result["source"] == "server"
    assert [len(v) for v in result["embeddings"]] == [16, 16]


def test_embed_refuses_a_blank_line_on_stdin(server: Server) -> None:
    # Skipped before: the output's lines no longer paired with the input's.
    done = run("embed", "--url", server.url, stdin="one\n\ntwo\n")
    assert done.returncode == 2 and "line 2 of stdin is blank" in done.stderr
    assert done.stdout == ""
    done = run("embed", "--url", server.url, stdin="one\r\ntwo")  # CRLF, no final newline
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2
    done = run("embed", "--url", server.url, "-", "extra", stdin="one\n")  # "-" was a text
    assert done.returncode == 2 and "cannot be mixed" in done.stderr


def vm_hwm_kb(pid: int) -> int:
    """A running process's peak resident memory so far, in KiB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status.splitlines()
                 if line.startswith("VmHWM:")), 0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_embed_prints_stdin_a_chunk_at_a_time_and_never_holds_it_whole(
        server: Server, tmp_path: Path) -> None:
    # 40,000 lines' vectors as Python lists are about 500 MB: the CLI held all of them.
    texts = [f"line {i} of a long file" for i in range(40_000)]
    source, output = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("".join(text + "\n" for text in texts))
    with source.open() as stdin, output.open("w") as stdout:
        child = subprocess.Popen([sys.executable, "-m", "embedserve", "embed", "--url",
                                  server.url], stdin=stdin, stdout=stdout,
                                 stderr=subprocess.PIPE, env=server_env())
        # The child's own peak, read while it runs: getrusage's would count the test
        # process's memory too, which the child shared between fork and exec.
        peak_kb = 0
        while child.poll() is None:
            peak_kb = max(peak_kb, vm_hwm_kb(child.pid))
            time.sleep(0.02)
    assert child.returncode == 0, child.stderr.read() if child.stderr else ""
    assert 0 < peak_kb < 200 * 1024, f"{peak_kb // 1024} MB"
    lines = output.read_text().splitlines()
    assert len(lines) == len(texts)
    embedder = HashEmbedder()
    for i in (0, STDIN_CHUNK - 1, STDIN_CHUNK, len(texts) - 1):
        assert json.loads(lines[i]) == pytest.approx(embedder.embed_one(texts[i]), abs=1e-7)


def test_a_blank_line_far_into_stdin_stops_there_after_the_lines_before_it(
        server: Server) -> None:
    stdin = "".join(f"text {i}\n" for i in range(1, 1500)) + "\n" + "after\n"
    done = run("embed", "--url", server.url, stdin=stdin)
    assert done.returncode == 2 and "line 1500 of stdin is blank" in done.stderr
    assert len(done.stdout.splitlines()) == STDIN_CHUNK  # printed before it was read


def test_health_and_info(server: Server) -> None:
    done = run("health", "--url", server.url)
    assert done.returncode == 0 and json.loads(done.stdout) == {"status": "ok"}
    done = run("info", "--url", server.url)
    assert done.returncode == 0 and json.loads(done.stdout)["model"] == "hash-v1-384"


def test_health_of_several_servers_is_one_serving(server: Server) -> None:
    # It asked the first only: a dead first replica made it fail while the second served.
    dead = f"http://127.0.0.1:{free_port()}"
    done = run("health", EMBEDSERVE_URL=f"{dead},{server.url}")
    assert done.returncode == 0 and json.loads(done.stdout) == {"status": "ok"}, done.stderr
    done = run("health", EMBEDSERVE_URL=f"{dead},http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "no answer from" in done.stderr


def test_health_of_nothing_fails_clearly() -> None:
    done = run("health", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "no answer from" in done.stderr


def test_embed_auto_starts_a_server_and_stops_it() -> None:
    port = free_port()
    done = run("embed", "--url", f"http://127.0.0.1:{port}", "--json", "auto started")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"] == "server"
    with socket.socket() as probe:  # the server it started is gone with it
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_bad_url_is_a_usage_error() -> None:
    done = run("embed", "--url", "not a url", "x")
    assert done.returncode == 2 and "url must look like" in done.stderr


def test_help_lists_the_commands_and_the_backends() -> None:
    done = run("--help")
    assert done.returncode == 0, done.stderr
    text = unwrapped(done.stdout)
    for command in COMMANDS:
        assert f"`embedserve {command}" in text, f"--help does not name {command}"
    # --backend's metavar hides argparse's own list of choices: the text must give them.
    assert f"Backends (--backend): {', '.join(BACKENDS)}" in text
    assert "`embedserve health` only probes" in text and "never starts one" in text


def test_health_help_says_it_is_a_probe() -> None:
    done = run("health", "--help")
    assert done.returncode == 0, done.stderr
    text = unwrapped(done.stdout)
    assert "Never starts a server." in text
    assert "--no-autostart" not in text  # it would suggest health could start one


def test_health_never_starts_a_server() -> None:
    # Through EMBEDSERVE_URL, the way the README's shell examples find a server. Had health
    # started one, it would have answered ready and the exit status would be 0.
    url = f"http://127.0.0.1:{free_port()}"
    done = run("health", EMBEDSERVE_URL=url)
    assert done.returncode == 1 and "no answer from" in done.stderr, done.stderr
    # The old spelling is still accepted (status 1, not a usage error's 2).
    done = run("health", "--no-autostart", EMBEDSERVE_URL=url)
    assert done.returncode == 1 and "no answer from" in done.stderr, done.stderr


def test_model_commands_say_what_they_do() -> None:
    # Their parsers live in commands.py, beside the client's; `embedserve --help` names them.
    expected = {"pull": "check that each one serves offline",
                "models": "whether `--model ID` loads offline",
                "rm": "Delete models from the Hugging Face cache"}
    for command, phrase in expected.items():
        done = run(command, "--help")
        assert done.returncode == 0, done.stderr
        assert phrase in unwrapped(done.stdout), command
        # No server is involved, but rm asks the one at --url whether it serves the model.
        assert ("--url" in done.stdout) == (command == "rm")


def test_rm_of_a_model_not_cached_fails_clearly(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")  # the model commands need it; the core does not
    done = run("rm", "org/absent", HF_HOME=str(tmp_path))
    assert done.returncode == 1
    assert "org/absent is not in the Hugging Face cache" in done.stderr, done.stderr
    # A --url that is no URL: a usage error before anything is deleted (it was ignored, as
    # if no server answered there).
    done = run("rm", "org/absent", "--url", "not a url", HF_HOME=str(tmp_path))
    assert done.returncode == 2 and "url must look like http://HOST:PORT" in done.stderr
    assert "not in the Hugging Face cache" not in done.stderr


def test_embed_stops_when_the_model_changes_between_chunks_of_stdin() -> None:
    # A server swapped for another model between two chunks: the lines after would pair
    # with another model's vectors.
    from test_client import Stub

    holder: list[Stub] = []

    def swap_after_the_first(data: list[dict[str, object]]) -> None:
        if holder[0].posts > 1:
            holder[0].model = "another-model"

    stub = Stub(mangle=swap_after_the_first)
    holder.append(stub)
    try:
        stdin = "".join(f"text {i}\n" for i in range(STDIN_CHUNK + 10))
        done = run("embed", "--url", stub.url, "--no-autostart", stdin=stdin)
    finally:
        stub.stop()
    assert done.returncode == 1, done.stderr
    assert f"stopped after {STDIN_CHUNK} lines: the model changed from hash-v1-384 to " \
           "another-model" in done.stderr
    assert len(done.stdout.splitlines()) == STDIN_CHUNK


def test_rm_refuses_beside_a_server_that_wants_its_api_key(tmp_path: Path) -> None:
    # Its 401 to /info was taken for "no server here": rm deleted what it may serve.
    pytest.importorskip("huggingface_hub")
    srv = start_server("--api-key", "sesame")
    try:
        def rm(*extra: str, **env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "embedserve", "rm", "org/absent", "--url", srv.url,
                 *extra], capture_output=True, text=True, timeout=60,
                env=server_env(HF_HOME=str(tmp_path), **env))

        refused, forced, keyed = rm(), rm("--force"), rm(EMBEDSERVE_API_KEY="sesame")
    finally:
        assert srv.stop() == 0
    assert refused.returncode == 1 and "asks for an API key (set EMBEDSERVE_API_KEY)" in \
        refused.stderr and "not in the Hugging Face cache" not in refused.stderr
    for done in (forced, keyed):  # with the key, rm sees that it does not serve that model
        assert done.returncode == 1 and "org/absent is not in the Hugging Face cache" in \
            done.stderr, done


@pytest.mark.parametrize("status", [503, 429])
def test_rm_refuses_soon_beside_a_server_still_loading(tmp_path: Path, status: int) -> None:
    # A server answering 503 (loading) to everything: rm's question was retried for the
    # client's 60 s retry_timeout, and then went on as if no server were there -- while
    # that server might be loading the very model. It refuses, soon; --force deletes.
    pytest.importorskip("huggingface_hub")
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Loading(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"error": "loading"}'
            self.send_response(status)  # loading; or busy (was taken for no server)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Loading)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        done, forced = (subprocess.run([sys.executable, "-m", "embedserve", "rm", "org/absent",
                                        "--url", url, *force], capture_output=True, text=True,
                                       timeout=30, env=server_env(HF_HOME=str(tmp_path)))
                        for force in ([], ["--force"]))
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1, done
    assert f"the server at {url} answers but does not serve yet (loading or busy) and may be " \
           "loading org/absent" in done.stderr
    assert "--force" in done.stderr and "not in the Hugging Face cache" not in done.stderr
    assert forced.returncode == 1 and "org/absent is not in the Hugging Face cache" in \
        forced.stderr

