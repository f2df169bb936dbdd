"""The container image (extras/docker/Dockerfile), built from this working tree with podman
and run: /health answers, the healthcheck passes, an embedding equals the host server's,
the API key comes from a mounted secret file, and SIGTERM drains and stops it within the
grace period. Skipped, with the reason, where podman cannot build images.

No image registry is needed: the base is made locally (mmdebstrap or debootstrap from the
Debian mirror apt uses, imported into podman once and then reused), and the Dockerfile
installs python3 into it with apt, as it does for any base without Python. Set
EMBEDSERVE_TEST_BASE_IMAGE to use another base (python:3.12-slim where a registry is
reachable).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Server, request, server_env, start_server

LOCAL_BASE = "localhost/embedserve-test-base:bookworm"
IMAGE = "localhost/embedserve-test:latest"
KEY = "container-s3cret"
BUILD_TIMEOUT = 900


def _podman_problem() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (.ci/run installs it: apt-get install podman runc)"
    if os.geteuid() != 0:
        return "builds as root only (rootless podman needs subuid/subgid ranges set up)"
    return None


requires_podman = pytest.mark.skipif(_podman_problem() is not None,
                                     reason=_podman_problem() or "")


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """podman's environment: a containers.conf with what this machine class needs (runc,
    since crun fails on hybrid cgroups; ulimits the host can grant)."""
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = "" if hard == resource.RLIM_INFINITY else f'"nofile={hard}:{hard}", '
    conf.write_text("[containers]\n"
                    f'default_ulimits = [{nofile}"nproc=32768:32768"]\n'
                    + ('[engine]\nruntime = "runc"\n' if shutil.which("runc") else ""))
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    probe = subprocess.run(["podman", "info"], capture_output=True, text=True, env=env,
                           timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run here: {probe.stderr.strip()[-300:]}")
    return env


def podman(env: dict[str, str], *args: str, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def debian_mirror() -> str:
    """The mirror apt already uses (no other is reachable on some machines)."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        text = path.read_text() if path.exists() else ""
        found = re.search(r"^URIs:\s*(\S+)", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)
        if found and "security" not in found.group(1):
            return found.group(1)
    return "http://deb.debian.org/debian"


def base_image(env: dict[str, str], workdir: Path) -> str:
    """A base to build on: the one named, or a local Debian made once and kept."""
    named = os.environ.get("EMBEDSERVE_TEST_BASE_IMAGE")
    if named:
        return named
    if podman(env, "image", "exists", LOCAL_BASE, check=False).returncode == 0:
        return LOCAL_BASE
    mirror = debian_mirror()
    if shutil.which("mmdebstrap"):
        command = (f"mmdebstrap --variant=minbase --format=tar bookworm - {mirror} | "
                   f"podman import - {LOCAL_BASE}")
    elif shutil.which("debootstrap"):
        root = workdir / "rootfs"
        command = (f"debootstrap --variant=minbase bookworm {root} {mirror} && "
                   f"tar -C {root} -c . | podman import - {LOCAL_BASE}")
    else:
        pytest.skip("no base image: install mmdebstrap or debootstrap (.ci/run does), or "
                    "name one in EMBEDSERVE_TEST_BASE_IMAGE")
    made = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                          text=True, env=env, timeout=BUILD_TIMEOUT)
    assert made.returncode == 0, f"making the base image failed:\n{made.stderr[-3000:]}"
    return LOCAL_BASE


def ca_bundle() -> str | None:
    """The CA bundle this host trusts, for pip inside the build (a build secret: it is
    not kept in the image)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      ssl.get_default_verify_paths().cafile):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    base = base_image(podman_env, tmp_path_factory.mktemp("base"))
    args = ["build", "--format", "docker", "--network", "host", "--build-arg",
            f"BASE_IMAGE={base}", "-f", str(ROOT / "extras/docker/Dockerfile"), "-t", IMAGE]
    bundle = ca_bundle()
    if bundle:
        args += ["--secret", f"id=ca_bundle,src={bundle}"]
    before = podman(podman_env, "image", "inspect", "--format", "{{.Id}}", IMAGE,
                    check=False).stdout.strip()
    podman(podman_env, *args, str(ROOT), timeout=BUILD_TIMEOUT)
    after = podman(podman_env, "image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    # The image of an earlier tree, now untagged, would only pile up. An unchanged tree
    # builds from cache to the very same image: removing "before" then removed this one.
    if before and before != after:
        podman(podman_env, "rmi", before, check=False)
    return IMAGE


@pytest.fixture
def container(podman_env: dict[str, str], image: str, tmp_path: Path
              ) -> Iterator[tuple[str, int]]:
    """A running container from the image: (name, host port). The API key is a mounted
    secret file; the port is published on loopback at a free port."""
    secret = tmp_path / "api_key"
    secret.write_text(KEY + "\n")
    secret.chmod(0o644)  # the image's user is not this host's
    name = f"embedserve-test-{os.getpid()}-{tmp_path.name}"[:60]
    # --read-only, as the Kubernetes manifests run it (podman mounts a fresh /tmp).
    podman(podman_env, "run", "-d", "--read-only", "--name", name, "-p", "127.0.0.1::8765",
           "-v", f"{secret}:/run/secrets/embedserve_api_key:ro",
           "-e", "EMBEDSERVE_API_KEY_FILE=/run/secrets/embedserve_api_key",
           image, "--graceful-timeout", "10")
    try:
        mapping = podman(podman_env, "port", name, "8765/tcp").stdout.strip().splitlines()[0]
        port = int(mapping.rsplit(":", 1)[1])
        yield name, port
    finally:
        podman(podman_env, "rm", "-f", "-t", "0", name, check=False)


def wait_healthy(port: int, name: str, env: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if request("127.0.0.1", port, "GET", "/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    logs = podman(env, "logs", name, check=False)
    raise AssertionError(f"container not healthy; its log:\n{logs.stdout}{logs.stderr}")


def metrics_text(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def host_server() -> Iterator[Server]:
    srv = start_server()
    yield srv
    srv.stop()


@requires_podman
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_the_image_serves_the_hosts_embeddings(container: tuple[str, int],
                                               podman_env: dict[str, str],
                                               host_server: Server) -> None:
    name, port = container
    wait_healthy(port, name, podman_env)
    assert podman(podman_env, "healthcheck", "run", name, check=False).returncode == 0
    auth = {"Authorization": f"Bearer {KEY}"}
    assert request("127.0.0.1", port, "GET", "/info")[0] == 401  # the secret file's key
    status, _, info = request("127.0.0.1", port, "GET", "/info", headers=auth)
    assert status == 200 and info["backend"] == "hash"
    assert info["supervisor_pid"] == 1  # exec form: the supervisor is PID 1, no shell
    body = {"input": ["a text from the container", "zweiter Text, ünïcödé"],
            "model": "hash-v1-384"}
    status, _, served = request("127.0.0.1", port, "POST", "/v1/embeddings", body,
                                headers=auth)
    assert status == 200
    _, _, expected = host_server.request("POST", "/v1/embeddings", body)
    assert [d["embedding"] for d in served["data"]] == [d["embedding"]
                                                        for d in expected["data"]]
    user = podman(podman_env, "exec", name, "id", "-u").stdout.strip()
    assert user == "10001"  # not root


@requires_podman
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_sigterm_drains_and_stops_it_within_the_grace_period(
        container: tuple[str, int], podman_env: dict[str, str]) -> None:
    name, port = container
    wait_healthy(port, name, podman_env)
    body = json.dumps({"inputs": ["in flight at SIGTERM " * 4000]}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # A request in flight: its headers and part of its body (over 64 KiB: a large body
        # counts as in flight while it arrives; a small one only once it is in).
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
        deadline = time.monotonic() + 30
        while "\nembedserve_requests_in_flight 1\n" not in metrics_text(port):
            assert time.monotonic() < deadline, "the request never came in"
            time.sleep(0.05)
        # podman stop: SIGTERM, then SIGKILL after 30 s, far beyond --graceful-timeout 10.
        stopping = subprocess.Popen(["podman", "stop", "-t", "30", name], env=podman_env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while "received SIGTERM" not in podman(podman_env, "logs", name).stderr:
                assert time.monotonic() < deadline, "SIGTERM never reached the supervisor"
                time.sleep(0.1)
            sock.sendall(body[5:])
            reply = b""
            while not reply.endswith(b"]]"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        finally:
            stopping.wait(60)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    state = podman(podman_env, "inspect", "--format", "{{.State.ExitCode}}", name)
    # 0: the supervisor drained and exited by itself; a SIGKILL at the timeout gives 137.
    assert state.stdout.strip() == "0"
    assert "stopped" in podman(podman_env, "logs", name).stderr


def test_the_api_key_can_come_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text(KEY + "\n")
    srv = start_server("--host", "0.0.0.0", "--api-key-file", str(secret))
    try:
        assert request("127.0.0.1", srv.port, "GET", "/info")[0] == 401
        assert request("127.0.0.1", srv.port, "GET", "/info", headers={
            "Authorization": f"Bearer {KEY}"})[0] == 200
    finally:
        srv.stop()
    for args, message in [(["--api-key-file", str(tmp_path / "missing")], "cannot read"),
                          (["--api-key-file", str(secret), "--api-key", "x"], "once")]:
        refused = subprocess.run([sys.executable, "-m", "embedserve", "--port", "0", *args],
                                 capture_output=True, text=True, env=server_env(),
                                 timeout=60)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
