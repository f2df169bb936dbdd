"""Hugging Face transformers tier: AutoTokenizer + AutoModel and pooling (masked mean by
default; a sentence-transformers pooling config in the model folder is honoured)."""

from __future__ import annotations

import logging
import os
from typing import Any

from embedserve.backends.torch_base import TorchBackend, read_json
from embedserve.config import Config

log = logging.getLogger("embedserve.backends")


class TransformersBackend(TorchBackend):
    name = "transformers"

    def __init__(self, config: Config) -> None:
        from transformers import AutoModel

        network, source = self._from_pretrained(AutoModel, config, "model")
        self.network = network.to(self.device).eval()
        folder = source if os.path.isdir(source) else _snapshot_folder(self.model)
        self.pooling = _pooling_mode(folder)
        st_config = read_json(folder, "sentence_bert_config.json") if folder else {}
        limits = [n for n in (st_config.get("max_seq_length"),
                              getattr(network.config, "max_position_embeddings", None),
                              self.tokenizer.model_max_length) if isinstance(n, int) and n > 0]
        self.max_input_tokens = self._usable_limit(min(limits) if limits else None)
        self.dimensions = int(network.config.hidden_size)
        st_meta = read_json(folder, "config_sentence_transformers.json") if folder else {}
        self._setup_prompts(self.model, st_meta.get("prompts"), st_meta.get("default_prompt_name"),
                            config)
        self._setup_tokenization()
        log.info("transformers: %s on %s (%s), %s pooling, max %s tokens", self.model,
                 self.device, network.dtype, self.pooling, self.max_input_tokens)

    def _library_features(self, texts: list[str], truncate_left: bool) -> dict[str, Any]:
        self.tokenizer.truncation_side = "left" if truncate_left else "right"
        return dict(self.tokenizer(texts, padding=True, truncation=True,
                                   max_length=self.max_input_tokens, return_tensors="pt"))

    def _forward(self, features: dict[str, Any]) -> Any:
        import torch

        batch = {k: v.to(self.device) for k, v in features.items() if hasattr(v, "to")}
        hidden = self.network(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        if self.pooling == "lasttoken":
            last = batch["attention_mask"].sum(dim=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        # Masked mean in fp32: summing hundreds of fp16 values loses precision.
        summed = (hidden.float() * mask.float()).sum(dim=1)
        return summed / mask.float().sum(dim=1).clamp(min=1e-9)


def _pooling_mode(folder: str | None) -> str:
    if not folder:
        return "mean"
    for candidate in ("1_Pooling", "pooling"):
        config = read_json(folder, os.path.join(candidate, "config.json"))
        if config:
            if config.get("pooling_mode_cls_token"):
                return "cls"
            if config.get("pooling_mode_max_tokens"):
                return "max"
            if config.get("pooling_mode_lasttoken"):
                return "lasttoken"
            return "mean"
    return "mean"


def _snapshot_folder(model_id: str) -> str | None:
    """The local cache folder of a hub model (already downloaded by from_pretrained)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # pooling config is optional: mean pooling is the default
        return None
