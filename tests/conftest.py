"""Shared test helpers: real server processes on 127.0.0.1 and a small HTTP helper."""

from __future__ import annotations

import atexit
import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from embedserve.contracts import STATE_ENV, ReadyLine, parse_ready_line

ROOT = Path(__file__).resolve().parent.parent


# What clients remember of servers (embedserve.client.lastseen) goes to a folder of the test
# run's, never the user's; each test gets its own (below), so that no test goes by what
# another test's server on a reused port served.
os.environ[STATE_ENV] = tempfile.mkdtemp(prefix="embedserve-test-state-")
atexit.register(shutil.rmtree, os.environ[STATE_ENV], True)


@pytest.fixture(autouse=True)
def client_state(tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.mktemp("client-state")
    monkeypatch.setenv(STATE_ENV, str(folder))
    return folder


def server_env(**extra: str) -> dict[str, str]:
    # STATE_ENV is the clients' (a test's client scripts and CLI runs), not a server option.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EMBEDSERVE_") or k == STATE_ENV}
    # The hash tier unless a test asks otherwise: with the ML extras installed, `auto`
    # would import torch (seconds) in every server a test starts.
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", EMBEDSERVE_BACKEND="hash")
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    pid: int
    log: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def request(self, method: str, path: str, body: Any = None, *,
                headers: dict[str, str] | None = None, raw: bytes | None = None
                ) -> tuple[int, dict[str, str], Any]:
        return request(self.host, self.port, method, path, body, headers=headers, raw=raw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise


def start_server(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
                 python: str = sys.executable) -> Server:
    proc = subprocess.Popen([python, "-m", "embedserve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or server_env(), cwd=ROOT)
    lines: list[str] = []
    ready: queue.Queue[ReadyLine | None] = queue.Queue()

    def drain() -> None:
        # Keeps reading for the server's whole life: a full pipe would block its logging.
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            announced = parse_ready_line(line)
            if announced:
                ready.put(announced)
        ready.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        announced = ready.get(timeout=timeout)
    except queue.Empty:
        announced = None
    if announced is None:
        proc.kill()
        proc.wait(5)
        time.sleep(0.1)
        raise AssertionError(f"server did not become ready; output:\n{''.join(lines)}")
    return Server(proc, announced.url, announced.pid, lines)


def request(host: str, port: int, method: str, path: str, body: Any = None, *,
            headers: dict[str, str] | None = None, raw: bytes | None = None,
            timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        payload = raw if raw is not None else (None if body is None else
                                               json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=payload, headers=hdrs)
        response = conn.getresponse()
        data = response.read()
        parsed = json.loads(data) if data else None
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = start_server()
    yield srv
    assert srv.stop() == 0


@pytest.fixture
def fresh_server() -> Iterator[list[Server]]:
    """Factory-style: tests start servers with their own flags; all are stopped after."""
    started: list[Server] = []
    yield started
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.kill()
        srv.proc.wait(10)


def children_of(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may contain spaces; fields after its closing paren are fixed.
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
