"""Rerankers (cross-encoders): a query and a document read together, one relevance score out.
Two tiers, as for embeddings: sentence-transformers' `CrossEncoder` (its own modules and
activation, exactly as `CrossEncoder.predict` runs them), and below it transformers'
`AutoModelForSequenceClassification` (a sigmoid over its one logit, as TEI does).

A pair is one item for the batcher: tokenized once in the request thread (both sides, cut
'longest_first' to the model's limit as the libraries cut pairs), planned by its tokens like
a text, and scored in the one model thread. A pass's rows are [raw score, activated score]:
the request picks (TEI's raw_scores), so the batcher stays the same for both kinds.

Which kind a model is, is read from its folder (`model_kind`): a CrossEncoder's
sentence-transformers config, or a transformers config whose architecture is a
`...ForSequenceClassification` with one label. Imported only when an ML tier is tried.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from embedserve.backends import (EMBEDDING, RERANKER, SCORE, BackendError, BatchedModel,
                                 Encoding)
from embedserve.backends.torch_base import (TorchBackend, batch_difference, first_line,
                                            locate_model, read_json)
from embedserve.config import Config

log = logging.getLogger("embedserve.backends")

# Pairs checked through both tokenizing paths at load: the ids made in the request threads
# must be the library's (special tokens, the pair's separator and type ids, the cut).
PROBE_PAIRS = [("Embedserve CHECKS its tokens: ÜNÏCÖDÉ ✓", "3.14 [SEP] <s> </s> the end"),
               ("  spaced  out  ", "x")]


class PairText(NamedTuple):
    """A pair's `Encoding.data` when the model thread tokenizes with the library itself."""

    query: str
    document: str


def model_kind(model_id: str) -> str:
    """RERANKER or EMBEDDING, from the model's files: sentence-transformers' config says
    CrossEncoder, or config.json's architecture is a sequence classifier (one label). A hub
    id not cached is asked for its config.json alone (when online); unknown: EMBEDDING."""
    folder = model_id if os.path.isdir(os.path.expanduser(model_id)) else None
    if folder is None:
        try:
            folder = locate_model(model_id)
        except BackendError:
            return EMBEDDING  # the embedding tier says why, in its own words
    folder = os.path.expanduser(folder)
    if os.path.isdir(folder):
        st = read_json(folder, "config_sentence_transformers.json")
        config = read_json(folder, "config.json")
    else:
        st, config = {}, _hub_config(model_id)
    if str(st.get("model_type", "")).lower() == "crossencoder":
        return RERANKER
    if st or os.path.isfile(os.path.join(folder, "modules.json")):
        return EMBEDDING  # a sentence-transformers embedding model, whatever its base
    architectures = config.get("architectures") or []
    labels = config.get("id2label") or {"0": ""}
    classifier = any(str(a).endswith("ForSequenceClassification") for a in architectures)
    return RERANKER if classifier and len(labels) == 1 else EMBEDDING


def _hub_config(model_id: str) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        return read_json(os.path.dirname(hf_hub_download(model_id, "config.json")),
                         "config.json")
    except Exception:  # the loader that follows reports what is wrong with the model
        return {}


class RerankBackend(TorchBackend):
    """What both reranker tiers share: pairs in, [raw, activated] score rows out."""

    capabilities = frozenset({SCORE})
    kind = RERANKER
    dimensions = 2  # a row: [raw score, activated score]
    prompts: dict[str, str] = {}
    default_prompt_name: str | None = None

    def _setup_pairs(self) -> None:
        """Once tokenizer and limit are known: tokenize pairs in the request threads if that
        gives the library's batches (checked on probe pairs), else in the model thread."""
        from embedserve.backends.tokens import RequestTokenizer

        self._request_tokenizer = RequestTokenizer(self.tokenizer, self.max_input_tokens)
        self._extra_features = {}
        problem = self._why_not_pad_pair_ids()
        self._pads_ids = problem is None
        if problem:
            log.info("%s: the model thread tokenizes pairs with the library (%s)", self.name,
                     problem)

    def _why_not_pad_pair_ids(self) -> str | None:
        import torch

        if not self._request_tokenizer.can_encode_ids:
            return "not a fast tokenizer"
        probes = list(PROBE_PAIRS)
        if self.max_input_tokens:  # both sides over the limit: the cut shows
            long = "word " * self.max_input_tokens
            probes += [(f"a query {long}", f"a document {long} the end."),
                       ("a short query", f"a long document {long} the end.")]
        try:
            theirs = self._library_pairs([PairText(q, d) for q, d in probes])
            ours = self._pad([e.data for q, d in probes
                              for e in self._request_tokenizer.encode_pair_ids(q, [d])])
            tensors = {k: v for k, v in theirs.items() if isinstance(v, torch.Tensor)}
            if (problem := batch_difference(tensors, ours)) is not None:
                return problem
        except Exception as exc:  # whatever the cause, the library's own path still works
            return f"checking failed: {type(exc).__name__}: {exc}"
        self._extra_features = {k: v for k, v in theirs.items() if k not in tensors}
        return None

    def prepare(self, texts: Sequence[str], *, truncate_left: bool = False, prompt: str = ""
                ) -> list[Encoding]:
        raise NotImplementedError(f"{self.model} is a reranker: it scores pairs")

    def prepare_pairs(self, query: str, documents: Sequence[str]) -> list[Encoding]:
        """Each (query, document) pair tokenized once, here in the request thread."""
        tokenizer = self._request_tokenizer
        if self._pads_ids:
            return tokenizer.encode_pair_ids(query, documents)
        limit = self.max_input_tokens or 1 << 62
        return [Encoding(min(count, limit), count, PairText(q, d))
                for q, d, count in tokenizer.count_pairs(query, documents)]

    def _probe_items(self, texts: list[str]) -> list[Encoding]:
        return self.prepare_pairs("warm up", texts)

    def _pass(self, batch: list[Encoding]) -> Any:
        import torch

        if self._pads_ids:
            raw = self._forward({**self._pad([e.data for e in batch]), **self._extra_features})
        else:
            raw = self._forward(self._library_pairs([e.data for e in batch]))
        raw = raw.float()
        return torch.cat([raw, self._activate(raw)], dim=1)

    def _activate(self, raw: Any) -> Any:
        import torch

        return torch.sigmoid(raw)

    def _library_pairs(self, pairs: list[PairText]) -> dict[str, Any]:
        """A padded batch of pairs, made by the library as it makes them for itself."""
        raise NotImplementedError

    def _check_one_label(self, labels: int) -> None:
        if labels != 1:
            raise BackendError(f"{self.model} classifies into {labels} labels; a reranker "
                               "gives one score (num_labels=1)")

    def warm_up(self) -> None:
        self._setup_pairs()
        super().warm_up()


class CrossEncoderBackend(RerankBackend):
    """sentence-transformers' CrossEncoder: its tokenizing, modules and activation."""

    name = "sentence-transformers"

    def __init__(self, config: Config) -> None:
        from sentence_transformers import CrossEncoder

        source, dtype = self._locate(config)
        try:
            network = CrossEncoder(source, device=self.device,
                                   trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load reranker {self.model!r} with "
                               f"sentence-transformers: {first_line(exc)}") from exc
        self._check_one_label(int(network.num_labels))
        if dtype != next(network.parameters()).dtype:
            network = network.to(dtype)
        self.network = network.eval()
        self.activation = network.activation_fn
        self.tokenizer = network.tokenizer
        limit = getattr(network, "max_seq_length", None)
        self.max_input_tokens = self._usable_limit(limit if isinstance(limit, int) else None)
        if limit != self.max_input_tokens:
            network.max_seq_length = self.max_input_tokens
        log.info("sentence-transformers: reranker %s on %s (%s), max %s tokens a pair, "
                 "activation %s", self.model, self.device, dtype, self.max_input_tokens,
                 type(self.activation).__name__)

    def _library_pairs(self, pairs: list[PairText]) -> dict[str, Any]:
        return dict(self.network.preprocess([(p.query, p.document) for p in pairs]))

    def _forward(self, features: dict[str, Any]) -> Any:
        features = {k: v.to(self.device) if hasattr(v, "to") else v
                    for k, v in features.items()}
        return self.network(features)["scores"]

    def _activate(self, raw: Any) -> Any:
        # The model's own (CrossEncoder.predict's): a sigmoid unless its config names one.
        return self.activation(raw) if self.activation is not None else raw


class SequenceClassificationBackend(RerankBackend):
    """transformers' AutoModelForSequenceClassification with one label: its logit is the
    raw score, its sigmoid the score."""

    name = "transformers"

    def __init__(self, config: Config) -> None:
        from transformers import AutoModelForSequenceClassification

        network, _ = self._from_pretrained(AutoModelForSequenceClassification, config,
                                           "reranker")
        self._check_one_label(int(network.config.num_labels))
        self.network = network.to(self.device).eval()
        limits = [n for n in (getattr(network.config, "max_position_embeddings", None),
                              self.tokenizer.model_max_length) if isinstance(n, int) and n > 0]
        self.max_input_tokens = self._usable_limit(min(limits) if limits else None)
        log.info("transformers: reranker %s on %s (%s), max %s tokens a pair", self.model,
                 self.device, network.dtype, self.max_input_tokens)

    def _library_pairs(self, pairs: list[PairText]) -> dict[str, Any]:
        return dict(self.tokenizer([p.query for p in pairs], [p.document for p in pairs],
                                   padding=True, truncation=True,
                                   max_length=self.max_input_tokens, return_tensors="pt"))

    def _forward(self, features: dict[str, Any]) -> Any:
        batch = {k: v.to(self.device) for k, v in features.items() if hasattr(v, "to")}
        return self.network(**batch).logits


if TYPE_CHECKING:
    def _is_a_batched_model(backend: RerankBackend) -> BatchedModel:
        return backend  # mypy checks the rerankers against the protocol here
