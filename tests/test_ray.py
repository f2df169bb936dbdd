"""embedserve on Ray Serve (embedserve/ray.py), on a local Ray instance: the same answers as
the standalone server through the `openai` SDK (hash tier and a tiny ML model), both of two
replicas serving, the server's auth and errors, and a replica killed under load replaced
while the Python client loses no call."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import ROOT, request, start_server
from tiny_models import make_tiny_models

ray = pytest.importorskip("ray", reason="Ray Serve tests need the ray extra: "
                                        "pip install 'ray[serve]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve tests need ray[serve]")
openai = pytest.importorskip("openai")

from embedserve import Client  # noqa: E402
from embedserve.ray import build_app  # noqa: E402

pytestmark = pytest.mark.timeout(600)

TEXTS = [line for line in (ROOT / "tests" / "data" / "texts.txt").read_text("utf-8")
         .splitlines() if line.strip()][:20]
# Replicas share the 2 CPUs this Ray instance is given: a fraction each, so that the
# hash app's two, the keyed app's one and the ML app's one all fit with room for a
# replacement.
REPLICA_CPUS = "0.25"


@dataclass
class Serve:
    url: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _deploy(app: Any, name: str, prefix: str) -> None:
    serve.run(app, name=name, route_prefix=prefix, blocking=False)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise AssertionError(f"{name} failed to deploy: {status}")
        time.sleep(0.2)
    raise AssertionError(f"{name} not running within 180 s: {serve.status()}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[Serve]:
    port = _free_port()
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # The replicas import this checkout's embedserve; nothing of Ray leaves loopback.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _deploy(build_app({"backend": "hash", "num_replicas": "2", "num_cpus": REPLICA_CPUS}),
                "hash", "/")
        yield Serve(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


def openai_vectors(base_url: str, model: str, texts: list[str]) -> list[list[float]]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    return [item.embedding for item in client.embeddings.create(model=model, input=texts).data]


def replica_pids(url: str, tries: int = 60) -> set[int]:
    """The pids that answer /info over `tries` requests (Serve picks the replica)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    seen = set()
    for _ in range(tries):
        status, _, body = request(host, int(port), "GET", "/info")
        assert status == 200, body
        seen.add(body["pid"])
    return seen


def test_openai_sdk_through_serve_gets_the_standalone_servers_vectors(ray_serve: Serve) -> None:
    standalone = start_server("--backend", "hash")
    try:
        expected = openai_vectors(standalone.url + "/v1", "hash-v1-384", TEXTS)
    finally:
        assert standalone.stop() == 0
    assert openai_vectors(ray_serve.url + "/v1", "hash-v1-384", TEXTS) == expected


def test_every_dialect_and_error_is_the_servers(ray_serve: Serve) -> None:
    host, port = ray_serve.url.split("//", 1)[1].rsplit(":", 1)
    status, _, body = request(host, int(port), "POST", "/embed", {"inputs": ["a b"]})
    assert status == 200 and len(body[0]) == 384
    status, _, body = request(host, int(port), "POST", "/api/embed",
                              {"model": "hash-v1-384", "input": "a b"})
    assert status == 200 and len(body["embeddings"][0]) == 384
    status, _, body = request(host, int(port), "POST", "/v1/embeddings",
                              {"model": "nope", "input": "a"})
    assert status == 404 and body["error"]["param"] == "model", body
    status, headers, body = request(host, int(port), "GET", "/v1/embeddings")
    assert status == 405 and "POST" in headers["allow"]
    status, _, body = request(host, int(port), "POST", "/embed", raw=b"{not json")
    assert status == 400 and body["error_type"]
    with urllib.request.urlopen(ray_serve.url + "/metrics", timeout=30) as answer:
        assert answer.status == 200
        assert "embedserve_requests_total" in answer.read().decode()


def test_api_key_and_route_prefix(ray_serve: Serve) -> None:
    _deploy(build_app({"backend": "hash", "api_key": "sesame", "num_cpus": REPLICA_CPUS,
                       "served-model-name": "text-embedding-3-small"}), "keyed", "/keyed")
    try:
        host, port = ray_serve.url.split("//", 1)[1].rsplit(":", 1)
        status, _, _ = request(host, int(port), "GET", "/keyed/health")
        assert status == 200  # open: load balancers hold no key
        status, headers, body = request(host, int(port), "GET", "/keyed/v1/models")
        assert status == 401 and headers["www-authenticate"] == "Bearer", body
        client = openai.OpenAI(base_url=ray_serve.url + "/keyed/v1", api_key="sesame",
                               max_retries=0)
        result = client.embeddings.create(model="text-embedding-3-small", input="a")
        assert result.model == "text-embedding-3-small"
        assert len(result.data[0].embedding) == 384
    finally:
        serve.delete("keyed")


def test_bad_options_are_refused_before_deploying() -> None:
    with pytest.raises(ValueError, match="unknown option 'modle'"):
        build_app({"modle": "x"})
    with pytest.raises(ValueError, match="does not apply on Ray Serve"):
        build_app({"workers": "2"})
    with pytest.raises(ValueError, match="give one or the other"):
        build_app({"num_replicas": "2", "max_replicas": "4"})
    with pytest.raises(ValueError, match="backend"):
        build_app({"backend": "nope"})
    with pytest.raises(ValueError, match="API key"):
        build_app({"host": "0.0.0.0"})


def test_autoscaling_and_gpu_options_reach_serve() -> None:
    app = build_app({"min_replicas": "1", "max_replicas": "4",
                     "target_ongoing_requests": "8", "num_gpus": "0.25", "backend": "hash"})
    deployment = app._bound_deployment  # what serve.run would deploy
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas,
            scaling.target_ongoing_requests) == (1, 4, 8.0)
    assert deployment.ray_actor_options["num_gpus"] == 0.25


def test_two_replicas_both_serve(ray_serve: Serve) -> None:
    assert len(replica_pids(ray_serve.url)) == 2


def test_a_replica_killed_under_load_is_replaced_and_no_call_is_lost(ray_serve: Serve) -> None:
    before = replica_pids(ray_serve.url)
    assert len(before) == 2
    victim = min(before)
    done: list[int] = []
    failures: list[BaseException] = []
    killed = threading.Event()
    calls_after_kill = 200

    def load(client: Client) -> None:
        after = 0
        while after < calls_after_kill:
            try:
                vectors = client.embed(TEXTS[:4])
                assert len(vectors) == 4
                done.append(1)
            except BaseException as exc:  # every failure counts, whatever it is
                failures.append(exc)
                return
            if killed.is_set():
                after += 1

    with Client(ray_serve.url, autostart=False, fallback="never", retry_timeout=60) as client:
        threads = [threading.Thread(target=load, args=(client,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        while len(done) < 50 and not failures:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        killed.set()
        for thread in threads:
            thread.join(180)
        assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures[:3]
    # Serve replaces the dead replica: two answer again, one of them new.
    deadline = time.monotonic() + 120
    now = before
    while time.monotonic() < deadline:
        now = replica_pids(ray_serve.url, 30)
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.5)
    assert len(now) == 2 and victim not in now, (before, now)


def test_ml_model_through_serve_matches_the_standalone_server(
        ray_serve: Serve, tiny: tuple[str, str]) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    folder = tiny[1]
    standalone = start_server("--backend", "transformers", "--model", folder, timeout=120)
    try:
        model = standalone.request("GET", "/v1/models")[2]["data"][0]["id"]
        expected = openai_vectors(standalone.url + "/v1", model, TEXTS)
    finally:
        assert standalone.stop() == 0
    _deploy(build_app({"backend": "transformers", "model": folder,
                       "num_cpus": REPLICA_CPUS}), "tiny", "/tiny")
    try:
        got = openai_vectors(ray_serve.url + "/tiny/v1", model, TEXTS)
    finally:
        serve.delete("tiny")
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a == pytest.approx(b, abs=1e-5)
