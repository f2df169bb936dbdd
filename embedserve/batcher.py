"""Dynamic batching for the ML tiers: one thread owns the model; concurrent requests queue
their texts here (tokenized already: see backends.BatchedModel.prepare) and are merged into
batches bounded by a token budget, grouped by length at the least cost in padding and
passes, and each request gets its own vectors back in order. It drives any BatchedModel
through that protocol alone, and imports no tensor library.

Fair under pressure: the model is shared between requests, not handed to the oldest text.
Each pass is led by the waiting request that has had the least of the model so far (texts
put in passes; the oldest on a tie), and planned from the waiting requests in that order,
a text from each in turn. So a one-text search sent while eight 256-text indexing requests
run goes into the next pass, not behind their turns, and the indexing requests share the
rest between them; on a CPU that pass holds the search alone, when the bulk texts would
make it more than twice as slow (see pick_batch). A request whose client has gone is dropped
between passes.

A reranker's query-document pairs are items like texts (one Encoding each, made by
BatchedModel.prepare_pairs), planned, shared and split the same way; their rows are
scores, asked for unnormalised.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from embedserve.backends import BatchedModel, Encoding
from embedserve.config import Config
from embedserve.errors import ApiError, ClientGone

log = logging.getLogger("embedserve.batcher")

# Texts planned together before each pass, in batches of --max-batch-texts: enough to group
# by length (at 2, big requests on a CPU got 10 texts a pass instead of 14). Planning is
# O(texts x --max-batch-texts) in Python: 0.6 ms a pass at the default 32 here.
POOL_BATCHES = 4
# How often a waiting request looks whether its client is still there: about a pass. More
# often wakes every waiting thread for nothing (32 waiting requests at 50 ms: 640 wake-ups
# a second, on cores the model thread needs).
ABANDON_POLL = 0.2
# The most padded tokens a pass holds, in pass overheads (see Batcher.pass_tokens).
PASS_OVERHEADS = 8
# ...but never fewer than this: with a small or unmeasured overhead, per-pass Python costs
# (planning, tensors in and out) would then dominate.
MIN_PASS_TOKENS = 512
# Retry-After for a full queue: the measured time to drain it, within these bounds.
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1, 60
# Weight of the newest pass in the measured rate (texts per second).
RATE_WEIGHT = 0.2
SWITCH_INTERVAL = 0.0005  # seconds: see Batcher.__init__
STOP_WAIT = 30.0  # seconds a stopping model thread may take to finish its pass
# Seconds a CPU model thread waits for work before it ends, while another model's thread
# lives (the next request starts another): see Batcher.__init__.
IDLE_END = 2.0
_IDLE: list[Any] = []  # _peek's answer to a model thread that is to end, idle
_cpu_threads: set[threading.Thread] = set()  # CPU model threads alive, under _count_lock
_count_lock = threading.Lock()


def _leave_idle() -> bool:
    """Whether an idle CPU model thread ends: while another lives. Decided and left in one
    step, so that two idling together never both end."""
    with _count_lock:
        if len(_cpu_threads) > 1:
            _cpu_threads.discard(threading.current_thread())
            return True
        return False


@dataclass(eq=False)
class _Job:
    normalize: bool
    vectors: list[Any]
    remaining: int
    waiting: deque[_Item] = field(default_factory=deque)  # not yet in a pass
    served: int = 0  # its texts put in passes so far: who leads the next pass
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
                 observe_batch: Callable[[int, float], None] = lambda size, seconds: None
                 ) -> None:
        self.model = model
        self.max_batch_texts = config.max_batch_texts
        self.max_queue = config.max_queue
        self.wait = config.batch_wait_ms / 1000.0
        # A pass that costs as much as a full batch of padding (a GPU's: inf) means: fill
        # the batches. Capped, so the costs planned with stay finite.
        self.overhead = min(model.pass_overhead_tokens, float(config.max_batch_tokens))
        # Bounded in time: a pass holds at most PASS_OVERHEADS x its fixed cost in padded
        # tokens, so a request arriving mid-pass never waits out an unusually long one (on
        # a CPU the longest were twice the mean), for at most 1 / (PASS_OVERHEADS + 1) of
        # a pass spent on the extra overhead. Where the overhead is a whole batch (a GPU)
        # this is --max-batch-tokens itself.
        self.pass_tokens = min(config.max_batch_tokens,
                               max(MIN_PASS_TOKENS, math.ceil(PASS_OVERHEADS * self.overhead)))
        log.info("a forward pass costs about %.0f padded tokens more than its texts; batches "
                 "are planned with that", self.overhead)
        self._track_call = track_call
        self._observe_batch = observe_batch
        # Requests with texts waiting, in turn order; the lock guards them and _queued.
        self._jobs: deque[_Job] = deque()
        self._queued = 0
        self._ready = threading.Condition()
        self._closed: ApiError | None = None
        self._in_pass: list[_Item] = []
        self._rate = 0.0  # texts per second through the model, measured
        self.batches = 0
        self.abandoned = 0  # requests dropped because their client had gone
        # On a GPU, a pass is mostly Python dispatching kernels: the model thread lets the
        # GIL go in every op and needs it back at once for the next, and at the default
        # 5 ms switch interval it waits out whichever request thread holds it. A shorter
        # interval tripled the in-process throughput of 8 clients x 32 texts on an H200.
        # (On two CPU cores the 1-text client beside a bulk load then took more of it.)
        if not model.device.startswith("cpu"):
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        # On a CPU, beside another model's thread, an idle model thread ends: torch's OpenMP
        # keeps a team of threads for each thread that runs ops while it lives, and with
        # more teams than CPUs every op waits for its team to wake. Measured on two cores
        # with a second model loaded and idle, the first one's passes took 20-30% longer
        # while the idle one's thread lived. A lone model keeps its thread: a new one's
        # first pass took 22 ms against 14 (a 1-text pass after 2.5 s idle).
        self._idle_end = IDLE_END if model.device.startswith("cpu") else None
        self._thread: threading.Thread | None = None  # started by the first request

    def check_room(self, texts: int) -> None:
        """429 unless `texts` more fit in the queue: asked before a request is tokenized,
        so that refusing one costs next to nothing."""
        with self._ready:
            self._check_room(texts)

    def _check_room(self, texts: int) -> None:
        if self._closed is not None:
            raise self._closed
        if self._queued + texts > self.max_queue:
            raise ApiError(429, f"the queue is full ({self._queued} texts waiting, limit "
                                f"{self.max_queue}); retry shortly",
                           headers={"Retry-After": str(self._drain_seconds())})

    def _drain_seconds(self) -> int:
        """When the queue should have room again, from the measured rate of the model."""
        if not self._rate:
            return RETRY_AFTER_MIN
        return max(RETRY_AFTER_MIN, min(RETRY_AFTER_MAX, math.ceil(self._queued / self._rate)))

    def embed(self, encodings: Sequence[Encoding], normalize: bool,
              client_gone: Callable[[], bool] | None = None) -> list[list[float]]:
        """The texts' vectors, in order, once the model thread has run them. While waiting,
        `client_gone` is asked now and then: once it says yes, the request's texts leave
        the queue and ClientGone is raised."""
        if not encodings:
            return []
        job = _Job(normalize, [None] * len(encodings), len(encodings))
        job.waiting.extend(_Item(job, i, encoding, encoding.tokens)
                           for i, encoding in enumerate(encodings))
        with self._ready:
            self._check_room(len(encodings))
            self._jobs.append(job)
            self._queued += len(encodings)
            self._ready.notify()
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="model", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # the process is out of threads: nothing waits
                    self._jobs.remove(job)
                    self._queued -= len(encodings)
                    raise ApiError(503, f"cannot start the model thread ({exc}); retry",
                                   headers={"Retry-After": "1"}) from None
                self._thread = thread
        # No timeout of our own: a wedged model stops the worker's heartbeat, and the
        # supervisor replaces the worker.
        while not job.done.wait(ABANDON_POLL):
            if client_gone is not None and client_gone():
                self._drop(job)
                raise ClientGone(f"client gone; {len(job.waiting)} of its texts dropped")
        if job.error is not None:
            raise job.error
        return job.vectors

    def _drop(self, job: _Job) -> None:
        with self._ready:
            if job in self._jobs:
                self._jobs.remove(job)
                self._queued -= len(job.waiting)
            job.waiting.clear()
            self.abandoned += 1

    def close(self, error: ApiError) -> None:
        """Answer every request still waiting with `error` (a worker that must stop now),
        and refuse new ones with it. A pass in progress finishes, unread."""
        with self._ready:
            self._closed = error
            jobs = self._take_jobs()
        _answer(jobs, error)

    def stop(self) -> None:
        """For an unloaded model: refuse what waits, and let the model thread end (it holds
        the model: while it lives, the memory cannot be given back)."""
        self.close(ApiError(503, "the model was unloaded; retry", headers={"Retry-After": "1"}))
        with self._ready:
            self._ready.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(STOP_WAIT)  # a pass in progress finishes first

    def queue_depth(self) -> int:
        return self._queued

    # -- the model thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self._idle_end is not None:
            with _count_lock:
                _cpu_threads.add(threading.current_thread())
        try:
            self._serve()
        except BaseException as exc:
            # Past the guarded planning and passes (the queue's own bookkeeping): answer
            # what waits and let the next request start a thread, rather than leave every
            # request waiting for a thread that is gone.
            log.exception("the model thread failed")
            self._fail_all(ApiError(500, f"the model thread failed: {type(exc).__name__}: "
                                         f"{exc}"))
        finally:
            with _count_lock:
                _cpu_threads.discard(threading.current_thread())

    def _serve(self) -> None:
        """Passes until stopped or idle beside another model's thread."""
        first = True  # a new thread: its first pass may wait for company (see _peek)
        while True:
            pool, first = self._peek(first), False
            if pool is None:  # stopped
                self.model = None  # type: ignore[assignment]  # its memory can go now
                return
            if pool is _IDLE:  # the next request starts another thread
                return
            try:
                batch = pick_batch(pool, self.overhead, self.max_batch_texts,
                                   self.pass_tokens)
            except Exception as exc:
                # Fail these texts' requests rather than let this thread die: with it, every
                # request to come would wait forever (the heartbeat only sees model calls).
                log.exception("planning a batch of %d texts failed", len(pool))
                self._remove(pool)
                self._fail(pool, ApiError(500, f"batching failed: {type(exc).__name__}: {exc}"))
                continue
            self._remove(batch)
            self._in_pass = batch
            try:
                self._forward(batch)
            except Exception as exc:  # past the model call (a backend's odd output): as above
                log.exception("finishing a batch of %d texts failed", len(batch))
                self._fail(batch, ApiError(500, f"inference failed: {type(exc).__name__}: "
                                                f"{exc}"))
            self._in_pass = []

    def _peek(self, first: bool) -> list[_Item] | None:
        """A few batches' worth of waiting texts, taken from the waiting requests in turn
        (the first text of each, then the second...), least served first. They stay
        queued, so that the length admission checks stays true while they are planned.
        None once stopped; _IDLE when this thread is to end, having waited IDLE_END beside
        another model's thread."""
        with self._ready:
            idle = first or not self._jobs
            while not self._jobs:
                if self._closed is not None:
                    return None
                if not self._ready.wait(self._idle_end) and not self._jobs and \
                        self._closed is None and _leave_idle():
                    self._thread = None  # under the lock: embed() sees it and starts one
                    return _IDLE
            if idle and self.wait:
                # An optional short wait for company, once per busy spell: more texts per
                # forward pass, at the price of that much latency for a lone request.
                deadline = time.monotonic() + self.wait
                while self._queued < self.max_batch_texts:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._ready.wait(left):
                        break
            size = POOL_BATCHES * self.max_batch_texts
            # Among the equally served the smallest first (a search that arrives just after
            # an indexing request does not wait for its first pass), then the oldest.
            turns = sorted(self._jobs, key=lambda job: (job.served, len(job.waiting)))
            rounds = itertools.zip_longest(*(itertools.islice(job.waiting, size)
                                             for job in turns))
            pool = [item for turn in rounds for item in turn if item is not None]
            return pool[:size]

    def _remove(self, taken: list[_Item]) -> None:
        """Take `taken` out of the queue and count them as served. (Only this thread removes
        texts; others add requests at the back or drop their own, so a dropped request's
        items are simply gone.)"""
        gone = {id(item) for item in taken}
        with self._ready:
            for job in {id(item.job): item.job for item in taken}.values():
                before = len(job.waiting)
                job.waiting = deque(item for item in job.waiting if id(item) not in gone)
                job.served += before - len(job.waiting)
                if job in self._jobs:
                    self._queued -= before - len(job.waiting)
            self._jobs = deque(job for job in self._jobs if job.waiting)

    def _forward(self, batch: list[_Item]) -> None:
        began = time.monotonic()
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
        seconds = time.monotonic() - began
        self._observe_batch(len(batch), seconds)
        rate = len(batch) / max(seconds, 1e-6)
        self._rate = rate if not self._rate else (1 - RATE_WEIGHT) * self._rate + \
            RATE_WEIGHT * rate
        if len(rows) != len(batch):  # answered as a failure past the model call (_run)
            raise RuntimeError(f"the model gave {len(rows)} rows for {len(batch)} texts")
        unit = rows.lists(normalize=True) if any(item.job.normalize for item in batch) else []
        plain = rows.lists(normalize=False) if not all(item.job.normalize for item in batch) \
            else []
        for i, item in enumerate(batch):
            self._finish(item, unit[i] if item.job.normalize else plain[i], None)

    def _fail_all(self, error: ApiError) -> None:
        """Answer every request waiting with `error` (this thread is gone), and clear the
        way for the next request to start another."""
        with self._ready:
            jobs = self._take_jobs()
            self._thread = None  # this one: only it clears the field, when it ends idle
        _answer(jobs, error)
        self._in_pass = []

    def _take_jobs(self) -> list[_Job]:
        """Every request waiting, in the queue or in the pass in progress; the queue
        emptied (the lock held)."""
        jobs, self._jobs, self._queued = list(self._jobs), deque(), 0
        return jobs + [item.job for item in self._in_pass]

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
    """The next forward pass, led by pool[0] (the pool is in turn order: see _peek).

    A request that has had no pass yet and fits in one (a search beside an indexing job)
    gets a pass of such newcomers alone when the others' texts would make it at least twice
    as costly: on a CPU, where a pass costs about its tokens, it then waits for the pass in
    progress and a short one of its own, not for a full one. Others' texts do not ride
    along: they would pad the search to their length or lengthen its pass, doing less work
    in that time than a pass of their own does. Where a pass costs about the same however
    full (a GPU's overhead is a whole batch), the others fill it."""
    batch = lead_batch(pool, overhead, max_texts, max_tokens)
    if not is_newcomer(pool[0].job, max_texts):  # the usual case: one plan a pass
        return batch
    fresh = [item for item in pool if is_newcomer(item.job, max_texts)]
    if len(fresh) < len(pool):
        alone = lead_batch(fresh, overhead, max_texts, max_tokens)
        if 2 * pass_cost(alone, overhead) <= pass_cost(batch, overhead):
            return alone
    return batch


def is_newcomer(job: _Job, max_texts: int) -> bool:
    """A request that has had no pass yet and fits in one: a search, not an indexing job."""
    return job.served == 0 and len(job.waiting) <= max_texts


def lead_batch(pool: list[_Item], overhead: float, max_texts: int, max_tokens: int
               ) -> list[_Item]:
    """Plan `pool` and take the planned batch that holds pool[0]. Planned again before every
    pass, texts left over from one plan can meet newcomers of their length in the next
    (measured: 7 texts a pass instead of 6 under 32 one-text clients, against running a
    whole plan in turn), and the lead goes first, so no length waits behind the others."""
    plan = plan_batches(pool, overhead, max_texts, max_tokens)
    return next(batch for batch in plan if any(item is pool[0] for item in batch))


def pass_cost(batch: list[_Item], overhead: float) -> float:
    """What plan_batches minimises, for one batch: padded tokens plus the pass overhead."""
    return overhead + len(batch) * max(item.tokens for item in batch)


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


def _answer(jobs: list[_Job], error: ApiError) -> None:
    """End each job's wait with `error` (one that already failed keeps its own)."""
    for job in jobs:
        if job.error is None:
            job.error = error
        job.done.set()
