"""Dynamic batching for the ML tiers: one thread owns the model; concurrent requests queue
their texts here (tokenized already: see backends.BatchedModel.prepare) and are merged into
batches bounded by a token budget, grouped by length at the least cost in padding and
passes, and each request gets its own vectors back in order. It drives any BatchedModel
through that protocol alone, and imports no tensor library.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from embedserve.backends import BatchedModel, Encoding
from embedserve.config import Config
from embedserve.errors import ApiError

log = logging.getLogger("embedserve.batcher")

# Texts planned together before each pass, in batches of --max-batch-texts: enough to group
# by length (at 2, big requests on a CPU got 10 texts a pass instead of 14). Planning is
# O(texts x --max-batch-texts) in Python: 0.6 ms a pass at the default 32 here.
POOL_BATCHES = 4


@dataclass(eq=False)
class _Job:
    normalize: bool
    vectors: list[Any]
    remaining: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(eq=False)
class _Item:
    job: _Job
    index: int
    encoding: Encoding
    tokens: int  # encoding.tokens, read often while planning
    finished: bool = False


class Batcher:
    def __init__(self, model: BatchedModel, config: Config,
                 track_call: Callable[[], AbstractContextManager[None]],
                 observe_batch: Callable[[int], None] = lambda size: None) -> None:
        self.model = model
        self.max_batch_tokens = config.max_batch_tokens
        self.max_batch_texts = config.max_batch_texts
        self.max_queue = config.max_queue
        self.wait = config.batch_wait_ms / 1000.0
        # A pass that costs as much as a full batch of padding (a GPU's: inf) means: fill
        # the batches. Capped, so the costs planned with stay finite.
        self.overhead = min(model.pass_overhead_tokens, float(config.max_batch_tokens))
        log.info("a forward pass costs about %.0f padded tokens more than its texts; batches "
                 "are planned with that", self.overhead)
        self._track_call = track_call
        self._observe_batch = observe_batch
        self._pending: deque[_Item] = deque()
        self._ready = threading.Condition()
        self.batches = 0
        threading.Thread(target=self._run, name="model", daemon=True).start()

    def embed(self, encodings: Sequence[Encoding], normalize: bool) -> list[list[float]]:
        """The texts' vectors, in order, once the model thread has run them."""
        if not encodings:
            return []
        job = _Job(normalize, [None] * len(encodings), len(encodings))
        with self._ready:
            if len(self._pending) + len(encodings) > self.max_queue:
                raise ApiError(429, f"the queue is full ({len(self._pending)} texts waiting, "
                                    f"limit {self.max_queue}); retry shortly",
                               headers={"Retry-After": "1"})
            self._pending.extend(_Item(job, i, encoding, encoding.tokens)
                                 for i, encoding in enumerate(encodings))
            self._ready.notify()
        # No timeout of our own: a wedged model stops the worker's heartbeat, and the
        # supervisor replaces the worker.
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.vectors

    def queue_depth(self) -> int:
        return len(self._pending)

    # -- the model thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            pool = self._peek()
            try:
                batch = pick_batch(pool, self.overhead, self.max_batch_texts,
                                   self.max_batch_tokens)
            except Exception as exc:
                # Fail these texts' requests rather than let this thread die: with it, every
                # request to come would wait forever (the heartbeat only sees model calls).
                log.exception("planning a batch of %d texts failed", len(pool))
                self._remove(pool, pool)
                self._fail(pool, ApiError(500, f"batching failed: {type(exc).__name__}: {exc}"))
                continue
            self._remove(pool, batch)
            try:
                self._forward(batch)
            except Exception as exc:  # past the model call (a backend's odd output): as above
                log.exception("finishing a batch of %d texts failed", len(batch))
                self._fail(batch, ApiError(500, f"inference failed: {type(exc).__name__}: "
                                                f"{exc}"))

    def _peek(self) -> list[_Item]:
        """The oldest few batches' worth of waiting texts (enough to group by length; a
        longer backlog waits its turn in order), left in the queue so that its length, which
        admission checks, stays true while they are planned."""
        with self._ready:
            idle = not self._pending
            while not self._pending:
                self._ready.wait()
            if idle and self.wait:
                # An optional short wait for company, once per busy spell: more texts per
                # forward pass, at the price of that much latency for a lone request.
                deadline = time.monotonic() + self.wait
                while len(self._pending) < self.max_batch_texts:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._ready.wait(left):
                        break
            return list(itertools.islice(self._pending, POOL_BATCHES * self.max_batch_texts))

    def _remove(self, pool: list[_Item], taken: list[_Item]) -> None:
        """Take `taken` out of the queue; the rest of `pool` stays at its head, in order.
        (Only this thread removes texts, and others append at the tail: the queue's head is
        still `pool`.)"""
        gone = {id(item) for item in taken}
        with self._ready:
            head = [self._pending.popleft() for _ in pool]
            self._pending.extendleft(reversed([item for item in head if id(item) not in gone]))

    def _forward(self, batch: list[_Item]) -> None:
        try:
            with self._track_call():
                rows = self.model.forward([item.encoding for item in batch])
        except Exception as exc:
            if self.model.is_out_of_memory(exc) and len(batch) > 1:
                # Halve and retry instead of failing every request in the batch.
                log.warning("out of memory on a batch of %d texts; splitting it", len(batch))
                half = len(batch) // 2
                self._forward(batch[:half])
                self._forward(batch[half:])
                return
            log.exception("inference failed on a batch of %d texts", len(batch))
            error = ApiError(500, f"inference failed: {type(exc).__name__}: {exc}")
            for item in batch:
                self._finish(item, None, error)
            return
        self.batches += 1
        self._observe_batch(len(batch))
        if len(rows) != len(batch):  # answered as a failure past the model call (_run)
            raise RuntimeError(f"the model gave {len(rows)} rows for {len(batch)} texts")
        unit = rows.lists(normalize=True) if any(item.job.normalize for item in batch) else []
        plain = rows.lists(normalize=False) if not all(item.job.normalize for item in batch) \
            else []
        for i, item in enumerate(batch):
            self._finish(item, unit[i] if item.job.normalize else plain[i], None)

    def _fail(self, items: list[_Item], error: ApiError) -> None:
        for item in items:
            if not item.finished:
                self._finish(item, None, error)

    @staticmethod
    def _finish(item: _Item, vector: list[float] | None, error: BaseException | None) -> None:
        item.finished = True
        job = item.job
        if error is not None and job.error is None:
            job.error = error
        job.vectors[item.index] = vector
        job.remaining -= 1  # only the model thread writes jobs: no lock needed
        if job.remaining == 0:
            job.done.set()


def pick_batch(pool: list[_Item], overhead: float, max_texts: int, max_tokens: int
               ) -> list[_Item]:
    """The next forward pass: plan `pool` (the oldest texts waiting, oldest first) and take
    the planned batch that holds the oldest. Planned again before every pass, texts left
    over from one plan can meet newcomers of their length in the next (measured: 7 texts a
    pass instead of 6 under 32 one-text clients, against running a whole plan in turn), and
    the oldest goes first, so no length waits behind the others."""
    plan = plan_batches(pool, overhead, max_texts, max_tokens)
    return next(batch for batch in plan if any(item is pool[0] for item in batch))


def plan_batches(pool: list[_Item], overhead: float, max_texts: int, max_tokens: int
                 ) -> list[list[_Item]]:
    """Cut `pool` into batches at the least total cost, a batch costing its padded tokens
    (texts x the longest) plus `overhead`, the fixed cost of a forward pass in tokens. Few
    big batches waste padding and many small ones waste passes; sorted by length, the best
    cut is found exactly by dynamic programming over where each batch starts. Batches come
    shortest first. (Texts cut from either side share batches: each arrives cut already.)"""
    items = sorted(pool, key=lambda item: item.tokens)
    # best[end]: the least cost of items[:end]; start[end]: where its last batch starts.
    best = [0.0] + [math.inf] * len(items)
    start = [0] * (len(items) + 1)
    for end in range(1, len(items) + 1):
        longest = items[end - 1].tokens
        for first in range(end - 1, max(0, end - max_texts) - 1, -1):
            padded = (end - first) * longest
            if padded > max_tokens and first < end - 1:
                break  # and larger batches only grow: a single text always goes
            if overhead + padded > best[end]:
                break  # so would every larger batch, whatever comes before it
            cost = best[first] + overhead + padded
            if cost <= best[end]:  # a tie goes to the bigger batch: fewer passes
                best[end], start[end] = cost, first
    batches: list[list[_Item]] = []
    end = len(items)
    while end:
        batches.append(items[start[end]:end])
        end = start[end]
    return batches[::-1]
