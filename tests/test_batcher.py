"""How the batcher plans forward passes: the cut of a window into batches (pure logic, so
checked exhaustively here); and the batcher driving a pure-Python model with no torch
anywhere (the batcher driving a real model is tested in test_ml.py)."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator

import pytest

from conftest import ROOT, server_env
from embedserve.backends import Encoding
from embedserve.batcher import (Batcher, _Item, _Job, lead_batch, pick_batch,
                                plan_batches)
from embedserve.config import Config


def items(lengths: list[int]) -> list[_Item]:
    job = _Job(normalize=True, vectors=[None] * len(lengths), remaining=len(lengths))
    job.waiting.extend(_Item(job, i, Encoding(n, n, f"text {i}"), n)
                       for i, n in enumerate(lengths))
    return list(job.waiting)


def cost(batches: list[list[_Item]], overhead: float) -> float:
    return sum(overhead + len(b) * max(i.tokens for i in b) for b in batches)


def partitions(pool: list[_Item]) -> Iterator[list[list[_Item]]]:
    """Every way to split `pool` into batches, order ignored."""
    if not pool:
        yield []
        return
    first, rest = pool[0], pool[1:]
    for smaller in partitions(rest):
        yield [[first], *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1:]]


def valid(batches: list[list[_Item]], max_texts: int, max_tokens: int) -> bool:
    return all(len(b) <= max_texts and (len(b) == 1 or len(b) * max(i.tokens for i in b)
                                        <= max_tokens) for b in batches)


@pytest.mark.parametrize("seed", range(60))
def test_the_plan_costs_least_of_every_possible_split(seed: int) -> None:
    rng = random.Random(seed)
    window = items([rng.choice([3, 5, 8, 12, 30, 64, 200]) for _ in range(rng.randint(1, 7))])
    overhead = rng.choice([0.0, 10.0, 60.0, 1000.0])
    max_texts, max_tokens = rng.choice([(32, 16384), (3, 16384), (32, 100)])
    planned = plan_batches(window, overhead, max_texts, max_tokens)
    assert sorted(i.index for b in planned for i in b) == list(range(len(window)))
    assert valid(planned, max_texts, max_tokens)
    cheapest = min(cost(p, overhead) for p in partitions(window)
                   if valid(p, max_texts, max_tokens))
    assert cost(planned, overhead) == pytest.approx(cheapest)


def test_a_long_text_does_not_pad_many_short_ones() -> None:
    # About what a forward pass costs for all-MiniLM-L6-v2 on two CPU cores: 60 tokens.
    planned = plan_batches(items([200] + [10] * 12), 60.0, 32, 16384)
    assert sorted(len(b) for b in planned) == [1, 12]
    # Shortest first: those requests are answered soonest.
    assert [i.tokens for i in planned[0]] == [10] * 12


def test_when_passes_cost_more_than_padding_batches_are_filled() -> None:
    # A GPU: a pass costs about the same whatever it holds.
    planned = plan_batches(items(list(range(1, 101))), 16384.0, 32, 16384)
    assert len(planned) == 4  # the fewest that 32 texts a pass allow (then least padding)
    planned = plan_batches(items([100] * 10), 16384.0, 32, 300)
    assert [len(b) for b in planned] == [1, 3, 3, 3]


def test_limits_hold_and_a_text_over_the_token_limit_still_goes_alone() -> None:
    planned = plan_batches(items([500, 40, 40, 40, 40]), 1e9, 2, 100)
    assert sorted(len(b) for b in planned) == [1, 2, 2]
    assert any([i.tokens for i in b] == [500] for b in planned)




def test_equal_lengths_share_a_pass_even_when_passes_cost_nothing() -> None:
    planned = plan_batches(items([7] * 5), 0.0, 32, 16384)
    assert [len(b) for b in planned] == [5]


def test_an_empty_window_plans_nothing() -> None:
    assert plan_batches([], 60.0, 32, 16384) == []


def test_each_pass_takes_the_planned_batch_that_holds_the_oldest_text() -> None:
    pool = items([200] + [10] * 8)
    assert pick_batch(pool, 60.0, 32, 16384) == pool[:1]  # the long one alone, first
    pool = items([10] * 4 + [200] + [10] * 4)
    assert pick_batch(pool, 60.0, 32, 16384) == pool[:4] + pool[5:]


def test_a_newcomer_gets_a_short_pass_of_its_own_where_passes_cost_their_tokens() -> None:
    bulk = items([60] * 64)
    bulk[0].job.served = 32  # an indexing request that has had passes already
    search = items([12])
    pool = search + bulk[:31]  # turn order: the one never served leads
    # CPU-like costs: 31 bulk texts would make the search's pass 60x longer.
    assert pick_batch(pool, 60.0, 32, 16384) == search
    # GPU-like costs (a pass costs a full batch whatever it holds): the bulk fills it.
    assert pick_batch(pool, 16384.0, 32, 16384) == pool
    # An indexing request that has had no pass yet is no newcomer: it does not get one.
    fresh_bulk = items([60] * 64)
    pool = fresh_bulk[:31] + search
    assert pick_batch(pool, 60.0, 32, 16384) == lead_batch(pool, 60.0, 32, 16384)
    # Bulk texts as short as the search, enough to make its pass twice as costly: none ride
    # along (they would lengthen the search's pass), nor do longer ones (they would pad it).
    many_short = items([12] * 31)
    many_short[0].job.served = 31
    assert pick_batch(search + many_short, 60.0, 32, 16384) == search
    longer = items([30] * 31)
    longer[0].job.served = 31
    assert pick_batch(search + longer, 60.0, 32, 16384) == search
    # Two searches arriving together share their pass.
    searches = items([12]) + items([14])
    assert pick_batch(searches + many_short, 60.0, 32, 16384) == searches
    # A few bulk texts as short as the search cost it little: they share its pass.
    short_bulk = items([12] * 4)
    short_bulk[0].job.served = 4
    assert pick_batch(search + short_bulk, 60.0, 32, 16384) == search + short_bulk


class Overhead:
    """Just enough of a BatchedModel for a Batcher to start: the measured pass cost."""

    device = "cpu"

    def __init__(self, tokens: float) -> None:
        self.pass_overhead_tokens = tokens


@pytest.mark.parametrize(("overhead", "pass_tokens"), [
    (100.0, 800),  # a CPU's: a pass holds at most 8 overheads of padded tokens
    (20.0, 512),  # never so few that per-pass costs would dominate
    (1e9, 16384),  # a GPU's (a pass costs a batch whatever it holds): the whole budget
])
def test_a_pass_is_bounded_by_its_overhead(overhead: float, pass_tokens: int) -> None:
    batcher = Batcher(Overhead(overhead), Config(max_batch_tokens=16384),  # type: ignore[arg-type]
                      track_call=contextlib.nullcontext)
    try:
        assert batcher.pass_tokens == pass_tokens
        pool = items([100] * 64)
        assert sum(len(b) for b in plan_batches(pool, overhead, 32, batcher.pass_tokens)) == 64
        assert all(len(b) * 100 <= max(batcher.pass_tokens, 100)
                   for b in plan_batches(pool, batcher.overhead, 32, batcher.pass_tokens))
    finally:
        batcher.stop()


def test_no_length_is_starved_under_a_stream_of_newcomers() -> None:
    """Closed loop: each pass's texts are replaced by new ones of random lengths, as clients
    that got their answer send the next request. Every length waits about as many passes as
    the others (the longest included), none waits long, and passes carry several texts."""
    rng = random.Random(7)
    lengths = [8, 10, 12, 14, 20, 25, 30, 40, 60, 90, 140, 256]
    pool = items([rng.choice(lengths) for _ in range(32)])
    arrived = {id(item): 0 for item in pool}
    waits: dict[int, list[int]] = {n: [] for n in lengths}
    passes = 300
    for number in range(passes):
        batch = pick_batch(pool, 60.0, 32, 16384)
        for item in batch:
            waits[item.tokens].append(number - arrived.pop(id(item)))
        newcomers = items([rng.choice(lengths) for _ in batch])
        arrived.update((id(item), number + 1) for item in newcomers)
        pool = [item for item in pool if item not in batch] + newcomers
    every = [n for per_length in waits.values() for n in per_length]
    mean = sum(every) / len(every)
    assert max(every) <= 10  # 32 texts waiting, several a pass
    for per_length in waits.values():
        assert sum(per_length) / len(per_length) <= 1.5 * mean
    assert len(every) / passes > 4


# --- the batcher drives any BatchedModel -----------------------------------------------------

PURE_PYTHON = r"""
import json, sys, threading
sys.modules["torch"] = None  # any import of torch, however indirect, fails
from embedserve.backends import Encoding, Loaded
from embedserve.config import Config
from embedserve.errors import ApiError
from embedserve.requests import EmbedRequest
from embedserve.service import EmbeddingService


class Rows:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def lists(self, *, normalize):
        if not normalize:
            return [list(row) for row in self.rows]
        return [[x / sum(y * y for y in row) ** 0.5 for x in row] for row in self.rows]


class WordModel:
    # A text's vector: (its word count, its first word's length, 1); a token is a word.
    name, model, kind, dimensions, device = "words", "word-model", "embedding", 3, "cpu"
    max_input_tokens, prompts, default_prompt_name = 6, {}, None
    capabilities = frozenset({"embed"})
    pass_overhead_tokens = 0.0  # then the plan is the least padding
    batches = []

    def prepare(self, texts, *, truncate_left=False, prompt=""):
        out = []
        for text in texts:
            words = (prompt + text).split()
            kept = words[-6:] if truncate_left else words[:6]
            out.append(Encoding(len(kept), len(words), kept))
        return out

    def forward(self, batch):
        self.batches.append([len(e.data) for e in batch])
        return Rows([[float(len(e.data)), float(len(e.data[0])), 1.0] for e in batch])

    def is_out_of_memory(self, exc):
        return False

    def tokenize(self, texts, *, add_special_tokens=True):
        return []


model = WordModel()
service = EmbeddingService(Config(max_batch_texts=4))
service.attach(Loaded(None, model, {}))
# One request first, alone: its seven texts are planned together (in the queue at once).
planned = service.embed(EmbedRequest(["a", "b c d e f g", "h", "i j k l m n o p q", "r",
                                      "s t u v w x", "y"], normalize=False))
answers = {"planned": [planned.vectors, planned.prompt_tokens]}
passes = list(model.batches)
requests = {
    "a": EmbedRequest(["one", "two words here", "a b c d e f g h"], normalize=False),
    "b": EmbedRequest(["xx yy", "x yyyyy b c d e f"], normalize=False, truncate_left=True),
    "c": EmbedRequest(["three", "four four"]),
}

def run(key):
    result = service.embed(requests[key])
    answers[key] = [result.vectors, result.prompt_tokens]

threads = [threading.Thread(target=run, args=(key,)) for key in requests]
for t in threads:
    t.start()
for t in threads:
    t.join(30)
# A model that declares no "embed" is not asked to embed.
scorer = WordModel()
scorer.capabilities = frozenset({"score"})
scoring = EmbeddingService(Config())
scoring.attach(Loaded(None, scorer, {}))
try:
    scoring.embed(EmbedRequest(["x"]))
    refused = None
except ApiError as exc:
    refused = [exc.status, exc.message]
print(json.dumps({"answers": answers, "passes": passes, "refused": refused,
                  "info": {k: service.info()[k] for k in ("backend", "pass_overhead_tokens")},
                  "heavy": [name for name in ("torch", "transformers", "sentence_transformers",
                                              "tokenizers", "numpy") if sys.modules.get(name)]}))
"""


def test_the_batcher_drives_a_pure_python_model_without_torch() -> None:
    """The service and batcher need nothing from a model but the BatchedModel protocol: a
    word-counting model in plain Python (torch made unimportable) is planned, batched and
    answered in each request's order, normalised or not, cut from the side asked; one that
    declares no "embed" capability is refused."""
    done = subprocess.run([sys.executable, "-c", PURE_PYTHON], capture_output=True, text=True,
                          env=server_env(), cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    answers = result["answers"]
    # Planned: shortest first, four a pass at most, the least padding (the nine-word text
    # is cut to the model's six); each text's vector in its request's order.
    assert result["passes"] == [[1, 1, 1, 1], [6, 6, 6]]
    assert answers["planned"] == [[[1, 1, 1], [6, 1, 1], [1, 1, 1], [6, 1, 1], [1, 1, 1],
                                   [6, 1, 1], [1, 1, 1]], 4 + 3 * 6]
    # Concurrent requests, each answered in its own order, normalised or not.
    assert answers["a"] == [[[1, 3, 1], [3, 3, 1], [6, 1, 1]], 1 + 3 + 6]
    # Cut from the left: the last six words, the first of them "yyyyy".
    assert answers["b"] == [[[2, 2, 1], [6, 5, 1]], 2 + 6]
    unit = [[x / (1 + 25 + 1) ** 0.5 for x in (1, 5, 1)],
            [x / (4 + 16 + 1) ** 0.5 for x in (2, 4, 1)]]
    assert [pytest.approx(row) for row in unit] == answers["c"][0] and answers["c"][1] == 3
    assert result["info"] == {"backend": "words", "pass_overhead_tokens": 0}
    assert result["refused"] == [400, "model word-model does not embed text (it can: score)"]
    assert result["heavy"] == []  # nor anything else an ML tier imports
