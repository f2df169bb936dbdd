"""What the two PyTorch tiers share: device and dtype choice, prompts, token counting, and
the forward-pass contract the batcher drives. Imported only when an ML tier is tried.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import socket
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from embedserve.backends import BackendError, Token, model_folder_problem
from embedserve.config import Config

log = logging.getLogger("embedserve.backends")

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Pairs of forward passes timed to learn what a pass costs (the median estimate is kept).
OVERHEAD_ROUNDS = 5
# nomic-embed models expect a task prefix and ship no prompts of their own.
NOMIC_PROMPTS = {"search_query": "search_query: ", "search_document": "search_document: ",
                 "classification": "classification: ", "clustering": "clustering: "}


def locate_model(model_id: str) -> str:
    """A local folder for `model_id` when there is one (a folder, or a cached hub snapshot:
    then nothing touches the network); else `model_id` itself, for the library to download
    with its progress bars -- after a quick check that the hub can be reached at all, so an
    offline machine gets a clear error at once instead of minutes of retries."""
    problem = model_folder_problem(model_id)
    if problem:  # a path, not an id: neither the cache nor the hub can help
        raise BackendError(problem)
    folder = os.path.expanduser(model_id)  # ~ stays literal when set through the env
    if os.path.isdir(folder):
        return folder
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # not cached (or not a hub id): decided below
        pass
    if constants.HF_HUB_OFFLINE:
        raise BackendError(f"model {model_id!r} is not a folder and not in the local Hugging "
                           f"Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set")
    endpoint = urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or 443), timeout=5).close()
    except OSError as exc:
        raise BackendError(f"model {model_id!r} is not in the local Hugging Face cache "
                           f"({constants.HF_HUB_CACHE}) and {host} cannot be reached "
                           f"({exc}); download it once while online, or pass a local "
                           "folder with --model") from None
    log.info("downloading %s from %s into %s (first use only)", model_id, host,
             constants.HF_HUB_CACHE)
    return model_id


def first_line(exc: BaseException) -> str:
    """The gist of a library's (often many-line) exception, for a one-line reason."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"--device {requested}: CUDA is not available to this torch "
                           f"({torch.__version__})")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise BackendError("--device mps: MPS is not available on this machine")
    return requested


def pick_dtype(device: str, fp32: bool) -> Any:
    import torch

    # Half precision on CUDA: about twice the throughput, same rankings. CPUs and MPS stay
    # in fp32, where fp16 is slow or unsupported.
    return torch.float16 if device.startswith("cuda") and not fp32 else torch.float32


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def read_json(folder: str, name: str) -> dict[str, Any]:
    path = Path(folder, name)
    if path.is_file():
        try:
            return json.loads(path.read_text("utf-8"))
        except ValueError:
            log.warning("ignoring unreadable %s", path)
    return {}


class TorchBackend:
    """Subclasses load a model and implement `_forward`; this class holds the rest."""

    name = ""
    model: str
    dimensions: int
    device: str
    max_input_tokens: int | None
    tokenizer: Any
    prompts: dict[str, str]
    default_prompt_name: str | None
    # What one forward pass costs beyond its padded tokens, in tokens (set by warm_up).
    pass_overhead_tokens: float = 0.0
    # Request threads take turns on their tokenizer; the model thread has its own.
    _tokenizer_lock = threading.Lock()

    @property
    def _handler_tokenizer(self) -> Any:
        """A tokenizer of its own for the request threads. A fast tokenizer keeps its
        truncation and padding settings as state: shared with the model thread, which
        tokenizes with padding and truncation, the two raced and batches failed."""
        tokenizer = self.__dict__.get("_counting")
        if tokenizer is None:
            tokenizer = self.__dict__["_counting"] = copy.deepcopy(self.tokenizer)
        return tokenizer

    def _locate(self, config: Config) -> tuple[str, Any]:
        """Set model and device; return where to load the model from, and the dtype."""
        self.model = config.model or DEFAULT_MODEL
        self.device = pick_device(config.device)
        return locate_model(self.model), pick_dtype(self.device, config.fp32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts, special tokens included."""
        with self._tokenizer_lock:
            encoded = self._handler_tokenizer(list(texts), add_special_tokens=True,
                                              truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def forward(self, texts: Sequence[str], truncate_left: bool = False) -> Any:
        """Pooled, unnormalised float32 embeddings on the CPU, one row per text. Only the
        model thread uses self.tokenizer, so setting its truncation side is safe."""
        import torch

        self.tokenizer.truncation_side = "left" if truncate_left else "right"
        with torch.inference_mode():
            return self._forward(list(texts)).float().cpu()

    def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool = True
                 ) -> list[list[Token]]:
        with self._tokenizer_lock:
            encoded = self._handler_tokenizer(
                list(texts), add_special_tokens=add_special_tokens, truncation=False,
                return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False)
        result = []
        for text, ids, offsets, special in zip(texts, encoded["input_ids"],
                                               encoded["offset_mapping"],
                                               encoded["special_tokens_mask"]):
            tokens = self._handler_tokenizer.convert_ids_to_tokens(ids)
            result.append([
                Token(i, piece, True, None, None) if is_special else
                Token(i, text[start:stop], False, start, stop)
                for i, piece, (start, stop), is_special in zip(ids, tokens, offsets, special)])
        return result

    def _forward(self, texts: list[str]) -> Any:
        raise NotImplementedError

    def _setup_prompts(self, model_id: str, prompts: dict[str, str] | None,
                       default_prompt_name: str | None, config: Config) -> None:
        merged = dict(prompts or {})
        if not merged and "nomic-embed" in model_id.lower():
            merged = dict(NOMIC_PROMPTS)
        self.prompts = merged
        name = config.default_prompt_name or default_prompt_name or None
        if name is not None and name not in merged:
            known = ", ".join(sorted(merged)) or "none"
            raise BackendError(f"--default-prompt-name {name!r} is not a prompt of {model_id} "
                               f"(its prompts: {known})")
        self.default_prompt_name = name

    def warm_up(self) -> None:
        # The first forward pass pays for lazy initialisation (kernels, allocator); pay it
        # before /health says ready. Then time a few more to learn what a pass costs.
        self.forward(["warm up"])
        self.pass_overhead_tokens = self._measure_pass_overhead()

    def _measure_pass_overhead(self) -> float:
        """The fixed cost of one forward pass, in padded tokens: what merging two batches
        saves. Timed, not assumed, as it depends on model and device: 56-70 tokens for
        all-MiniLM-L6-v2 on two CPU cores (8 ms a pass + 0.14 ms a token); on a GPU, where a
        pass should cost about the same whatever it holds, far more (inf when the long pass
        is no slower: fill the batches)."""

        def seconds(texts: list[str]) -> float:
            began = time.perf_counter()
            self.forward(texts)
            return time.perf_counter() - began

        short, long = ["warm up"], ["warm up " * 30] * 4
        short_tokens = self.count_tokens(short)[0]
        long_tokens = len(long) * min(max(self.count_tokens(long)),
                                      self.max_input_tokens or 1 << 30)
        estimates = []
        # Short and long back to back, then the median estimate: a busy spell (another
        # server loading beside this one) slows one pair, not the answer.
        for _ in range(OVERHEAD_ROUNDS):
            short_s, long_s = seconds(short), seconds(long)
            per_token = (long_s - short_s) / max(1, long_tokens - short_tokens)
            estimates.append(max(0.0, short_s / per_token - short_tokens) if per_token > 0
                             else math.inf)
        return statistics.median(estimates)
