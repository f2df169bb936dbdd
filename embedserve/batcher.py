"""Dynamic batching for the ML tiers: one thread owns the model; concurrent requests queue
their texts here and are merged into batches bounded by a token budget, sorted by length so
little is spent on padding, and each request gets its own vectors back in order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from embedserve.backends.torch_base import TorchBackend, is_out_of_memory
from embedserve.config import Config
from embedserve.errors import ApiError

log = logging.getLogger("embedserve.batcher")

# A batch is closed before padding would make it this much bigger than its real tokens:
# on a CPU the cost of a forward pass grows with padded tokens, so a few long texts must
# not pad many short ones (measured: 2-4x the real tokens without this rule).
PADDING_SLACK = 1.25


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
    text: str
    tokens: int
    left: bool


class Batcher:
    def __init__(self, backend: TorchBackend, config: Config,
                 track_call: Callable[[], AbstractContextManager[None]],
                 observe_batch: Callable[[int], None] = lambda size: None) -> None:
        self.backend = backend
        self.max_batch_tokens = config.max_batch_tokens
        self.max_batch_texts = config.max_batch_texts
        self.max_queue = config.max_queue
        self.wait = config.batch_wait_ms / 1000.0
        self._track_call = track_call
        self._observe_batch = observe_batch
        self._pending: deque[_Item] = deque()
        self._ready = threading.Condition()
        self.batches = 0
        threading.Thread(target=self._run, name="model", daemon=True).start()

    def embed(self, texts: Sequence[str], tokens: Sequence[int], normalize: bool,
              truncate_left: bool = False) -> list[list[float]]:
        job = _Job(normalize, [None] * len(texts), len(texts))
        with self._ready:
            if len(self._pending) + len(texts) > self.max_queue:
                raise ApiError(429, f"the queue is full ({len(self._pending)} texts waiting, "
                                    f"limit {self.max_queue}); retry shortly",
                               headers={"Retry-After": "1"})
            self._pending.extend(_Item(job, i, text, n, truncate_left)
                                 for i, (text, n) in enumerate(zip(texts, tokens)))
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
            window = self._take()
            # Longest first, then cut into batches under the budget: texts of similar
            # length share a batch, so padding stays small. (Texts to be cut from the left
            # go in batches of their own.)
            window.sort(key=lambda item: (item.left, item.tokens), reverse=True)
            batch: list[_Item] = []
            real = 0  # tokens in the batch before padding
            for item in window:
                if batch:
                    padded = batch[0].tokens * (len(batch) + 1)
                    if (padded > self.max_batch_tokens or len(batch) >= self.max_batch_texts
                            or padded > PADDING_SLACK * (real + item.tokens)
                            or item.left != batch[0].left):
                        self._forward(batch)
                        batch, real = [], 0
                batch.append(item)
                real += item.tokens
            if batch:
                self._forward(batch)

    def _take(self) -> list[_Item]:
        with self._ready:
            while not self._pending:
                self._ready.wait()
            if self.wait:
                # An optional short wait for company: more texts per forward pass, at the
                # price of that much latency for a lone request.
                deadline = time.monotonic() + self.wait
                while len(self._pending) < self.max_batch_texts:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._ready.wait(left):
                        break
            # Take a few batches' worth at a time: enough to sort by length, few enough
            # that a request arriving now is not kept waiting behind a long backlog.
            count = min(len(self._pending), 4 * self.max_batch_texts)
            return [self._pending.popleft() for _ in range(count)]

    def _forward(self, batch: list[_Item]) -> None:
        import torch

        try:
            with self._track_call():
                rows = self.backend.forward([item.text for item in batch], batch[0].left)
        except Exception as exc:
            if is_out_of_memory(exc) and len(batch) > 1:
                # Halve and retry instead of failing every request in the batch.
                log.warning("out of memory on a batch of %d texts; splitting it", len(batch))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
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
        normalized = torch.nn.functional.normalize(rows, dim=1)
        for row, plain, item in zip(normalized.tolist(), rows.tolist(), batch):
            self._finish(item, row if item.job.normalize else plain, None)

    @staticmethod
    def _finish(item: _Item, vector: list[float] | None, error: BaseException | None) -> None:
        job = item.job
        if error is not None and job.error is None:
            job.error = error
        job.vectors[item.index] = vector
        job.remaining -= 1  # only the model thread writes jobs: no lock needed
        if job.remaining == 0:
            job.done.set()
