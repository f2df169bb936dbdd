"""sentence-transformers tier: the model's own modules (transformer, pooling, dense,
normalize) exactly as `SentenceTransformer.encode` runs them, driven batch by batch (a
final normalize by the batcher, when the request asks for it)."""

from __future__ import annotations

import logging
from typing import Any

from embedserve.backends import BackendError
from embedserve.backends.torch_base import TorchBackend, first_line
from embedserve.config import Config

log = logging.getLogger("embedserve.backends")


class SentenceTransformersBackend(TorchBackend):
    name = "sentence-transformers"

    def __init__(self, config: Config) -> None:
        from sentence_transformers import SentenceTransformer

        source, dtype = self._locate(config)
        model_id = self.model
        try:
            network = SentenceTransformer(source, device=self.device,
                                          trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load model {model_id!r} with sentence-transformers: "
                               f"{first_line(exc)}") from exc
        if dtype != next(network.parameters()).dtype:
            network = network.to(dtype)
        self.network = network.eval()
        # A trailing Normalize module is left to the batcher, whose normalising is the same
        # call (rows.lists): normalize=false then gets the vector before it, as TEI gives it
        # and the transformers tier gives it for the same folder.
        modules = list(network.children())
        self._until_normalize = modules[:-1] if modules and \
            type(modules[-1]).__name__ == "Normalize" else None
        self.tokenizer = network.tokenizer
        self.max_input_tokens = self._usable_limit(network.max_seq_length)
        if network.max_seq_length != self.max_input_tokens:
            # Where its own tokenizing cuts too (the model thread's path when ids made in
            # the request threads would differ).
            network.max_seq_length = self.max_input_tokens
        dimension = getattr(network, "get_embedding_dimension", None) or \
            network.get_sentence_embedding_dimension
        self.dimensions = int(dimension() or 0)
        prompts = {name: text or "" for name, text in network.prompts.items()}
        self._setup_prompts(model_id, prompts, network.default_prompt_name, config)
        self._setup_tokenization()
        log.info("sentence-transformers: %s on %s (%s), max %s tokens", model_id, self.device,
                 dtype, self.max_input_tokens)

    def _library_features(self, texts: list[str], truncate_left: bool) -> dict[str, Any]:
        # What encode tokenizes with: the model's own input module (a chat template, a text
        # stripped first, ...). preprocess is tokenize's name since sentence-transformers 6
        # (tokenize warns).
        self.tokenizer.truncation_side = "left" if truncate_left else "right"
        prepare = getattr(self.network, "preprocess", None) or self.network.tokenize
        return dict(prepare(texts))

    def _forward(self, features: dict[str, Any]) -> Any:
        features = {k: v.to(self.device) if hasattr(v, "to") else v
                    for k, v in features.items()}
        if self._until_normalize is None:
            return self.network(features)["sentence_embedding"]
        for module in self._until_normalize:  # as SentenceTransformer.forward runs them
            features = module(features)
        return features["sentence_embedding"]
