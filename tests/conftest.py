"""Shared test helpers: real server processes on 127.0.0.1 and a small HTTP helper."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"embedserve ready at (http://\S+) .*pid=(\d+)")


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
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
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = READY.search(line)
            if match:
                server = Server(proc, match.group(1), int(match.group(2)), lines)
                return server
        elif proc.poll() is not None:
            break
    proc.kill()
    rest = proc.stdout.read()
    proc.wait(5)
    raise AssertionError(f"server did not become ready; output:\n{''.join(lines)}{rest}")


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
