"""What the two PyTorch tiers share: device and dtype choice, prompts, tokenizing, and the
BatchedModel contract the batcher drives (normalising and out-of-memory handling included,
so that the batcher needs no torch). Imported only when an ML tier is tried.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from embedserve.backends import (DEFAULT_MODEL, EMBED, EMBEDDING, BackendError, BatchedModel,
                                 Encoding, Token, model_folder_problem)
from embedserve.backends.tokens import RequestTokenizer, TokenIds
from embedserve.config import Config
from embedserve.quantize import CALIBRATION_TEXTS, Ranges, calibrate

log = logging.getLogger("embedserve.backends")

# Calibration texts a forward pass (small: a big model on a small GPU must not run out).
CALIBRATION_BATCH = 16
# Pairs of forward passes timed to learn what a pass costs (the median estimate is kept).
OVERHEAD_ROUNDS = 5
# nomic-embed models expect a task prefix and ship no prompts of their own.
# Checked through both tokenizing paths at load (with spaces and a long text beside it):
# case, accents, symbols and special tokens written as text.
PROBE_TEXT = "Embedserve CHECKS its tokens: ÜNÏCÖDÉ ✓ 3.14 [SEP] <s> </s> <|endoftext|>"
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
    except Exception as exc:  # not cached (or not a hub id): decided below
        # huggingface_hub >= 2.4 refuses a cached copy that lacks any file of the repo's
        # listing (a README, another framework's weights): a copy with its config serves.
        partial = getattr(exc, "snapshot_path", None)
        if partial and os.path.isfile(os.path.join(partial, "config.json")):
            log.info("serving the cached copy of %s without files it does not need (%s)",
                     model_id, first_line(exc))
            return str(partial)
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


def batch_difference(theirs: dict[str, Any], ours: dict[str, Any]) -> str | None:
    """How the library's padded batch (tensors) differs from ours, or None: the check that
    lets request threads tokenize."""
    import torch

    if theirs.keys() != ours.keys():
        return f"the library's batches hold {sorted(theirs)}, not {sorted(ours)}"
    for key, value in theirs.items():
        if not torch.equal(value, ours[key]):
            return f"the library's {key} differ from the tokenizer's"
    return None


def pick_dtype(device: str, fp32: bool) -> Any:
    import torch

    # Half precision on CUDA: about twice the throughput, same rankings. CPUs and MPS stay
    # in fp32, where fp16 is slow or unsupported.
    return torch.float16 if device.startswith("cuda") and not fp32 else torch.float32


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


class TorchRows:
    """A forward pass's pooled rows (float32, on the CPU), turned into lists on request."""

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def lists(self, *, normalize: bool) -> list[list[float]]:
        import torch

        rows = torch.nn.functional.normalize(self.tensor, dim=1) if normalize else self.tensor
        return rows.tolist()


def read_json(folder: str, name: str) -> dict[str, Any]:
    path = Path(folder, name)
    if path.is_file():
        try:
            return json.loads(path.read_text("utf-8"))
        except ValueError:
            log.warning("ignoring unreadable %s", path)
    return {}


class TorchBackend:
    """Subclasses load a model, call `_setup_tokenization`, and implement `_forward` (a
    padded batch to pooled rows) and `_library_features` (texts to a padded batch, as their
    library makes it); this class holds the rest."""

    name = ""
    capabilities = frozenset({EMBED})
    kind = EMBEDDING
    model: str
    dimensions: int
    device: str
    max_input_tokens: int | None
    tokenizer: Any  # the model thread's: only it pads and calls the library with it
    prompts: dict[str, str]
    default_prompt_name: str | None
    # What one forward pass costs beyond its padded tokens, in tokens (set by warm_up).
    pass_overhead_tokens: float = 0.0
    # int8 / uint8 ranges, calibrated by warm_up (quantize.py).
    quantization_ranges: Ranges | None = None
    _request_tokenizer: RequestTokenizer
    # Whether request threads tokenize into ids that the model thread pads (checked against
    # the library's own tokenization at load), or the model thread tokenizes with the library.
    _pads_ids = False
    # What the library's batches carry besides tensors (sentence-transformers: "modality").
    _extra_features: dict[str, Any]
    # --max-batch-tokens: the most tokens a forward pass may hold, one text alone included.
    _max_pass_tokens: int

    def _locate(self, config: Config) -> tuple[str, Any]:
        """Set model and device; return where to load the model from, and the dtype."""
        self.model = config.model_id or DEFAULT_MODEL
        self.device = pick_device(config.device)
        self._max_pass_tokens = config.max_batch_tokens
        return locate_model(self.model), pick_dtype(self.device, config.fp32)

    def _from_pretrained(self, auto_class: Any, config: Config, what: str) -> tuple[Any, str]:
        """Locate the model (see _locate), set self.tokenizer, and return `auto_class`'s
        network, loaded with transformers, and where it came from; BackendError naming the
        model otherwise."""
        from transformers import AutoTokenizer

        source, dtype = self._locate(config)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=config.trust_remote_code)
            network = auto_class.from_pretrained(
                source, trust_remote_code=config.trust_remote_code, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load {what} {self.model!r} with transformers: "
                               f"{first_line(exc)}") from exc
        return network, source

    def _usable_limit(self, model_limit: int | None) -> int:
        """The tokens a text is cut to: the model's limit, or --max-batch-tokens where that is
        lower or the model has none. The batcher keeps a pass within --max-batch-tokens but
        always runs a text, alone if need be, so a text over it would make a longer pass,
        and a pass grows quadratically with its length: a tiny BERT took 16 s for one text
        of 65,536 tokens on two CPU cores, and a pass that outlasts --worker-timeout gets the
        worker killed."""
        if model_limit is not None and model_limit <= self._max_pass_tokens:
            return model_limit
        log.warning("%s: texts are cut at %d tokens (--max-batch-tokens), not the model's %s; "
                    "raise --max-batch-tokens to use more of them", self.model,
                    self._max_pass_tokens, model_limit or "unlimited")
        return self._max_pass_tokens

    def _setup_tokenization(self) -> None:
        """Once tokenizer and limit are known: tokenize in the request threads if that gives
        what the library gives, else leave tokenizing to the library in the model thread."""
        self._request_tokenizer = RequestTokenizer(self.tokenizer, self.max_input_tokens)
        self._extra_features = {}
        problem = self._why_not_pad_ids()
        self._pads_ids = problem is None
        if problem:
            log.info("%s: the model thread tokenizes with the library (%s)", self.name, problem)

    def _why_not_pad_ids(self) -> str | None:
        """Why ids made in the request threads would not give the library's batches, or None:
        checked on a few texts, both truncation sides, not assumed (a library may render a
        chat template around a text, or strip it, before tokenizing)."""
        import torch

        if not self._request_tokenizer.can_encode_ids:
            return "not a fast tokenizer"
        probes = [PROBE_TEXT, "  spaced  out  "]
        if self.max_input_tokens:  # over the limit, its ends unlike: the side cut shows
            probes.append(f"{PROBE_TEXT} {'word ' * self.max_input_tokens} the end.")
        try:
            counts = self._request_tokenizer.count(probes)
            for left in (False, True):
                theirs = self._library_features(probes, left)
                encodings = self._request_tokenizer.encode_ids(probes, left)
                if [e.untruncated for e in encodings] != counts:
                    return "the untruncated counts differ from the tokenizer's"
                ours = self._pad([e.data for e in encodings])
                tensors = {k: v for k, v in theirs.items() if isinstance(v, torch.Tensor)}
                if (problem := batch_difference(tensors, ours)) is not None:
                    return problem
        except Exception as exc:  # whatever the cause, the library's own path still works
            return f"checking failed: {type(exc).__name__}: {exc}"
        finally:
            self.tokenizer.truncation_side = "right"
        self._extra_features = {k: v for k, v in theirs.items() if k not in tensors}
        return None

    def prepare(self, texts: Sequence[str], *, truncate_left: bool = False, prompt: str = ""
                ) -> list[Encoding]:
        """Tokenize each text once, in the calling (request) thread; many may call at once.
        (Where the library tokenizes in the model thread, a prompt is cut as it cuts it.)"""
        if self._pads_ids:
            return self._request_tokenizer.encode_ids(texts, truncate_left, prompt)
        return self._request_tokenizer.encode_for_library(
            [prompt + text for text in texts] if prompt else texts, truncate_left)

    def prepare_pairs(self, query: str, documents: Sequence[str]) -> list[Encoding]:
        raise NotImplementedError(f"{self.model} is not a reranker")

    def _probe_items(self, texts: list[str]) -> list[Encoding]:
        """Items to time passes with (warm_up): what this model's requests bring."""
        return self.prepare(texts)

    def forward(self, batch: Sequence[Encoding]) -> TorchRows:
        """Pooled, unnormalised float32 embeddings on the CPU, one row per text. Only the
        model thread calls it, so it alone uses self.tokenizer."""
        import torch

        try:
            with torch.inference_mode():
                return TorchRows(self._pass(list(batch)).float().cpu())
        except Exception as exc:
            if is_out_of_memory(exc) and torch.cuda.is_available():
                # Give the failed pass's memory back before the batcher retries its halves.
                torch.cuda.empty_cache()
            raise

    @property
    def memory_bytes(self) -> int:
        """The weights' size (parameters and buffers x their dtype): what this model costs
        in memory, in each worker that loads it."""
        network = getattr(self, "network", None)
        if network is None:
            return 0
        tensors = list(network.parameters()) + list(network.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return is_out_of_memory(exc)

    def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool = True
                 ) -> list[list[Token]]:
        return self._request_tokenizer.tokens(texts, add_special_tokens)

    def _pass(self, batch: list[Encoding]) -> Any:
        if self._pads_ids:
            return self._forward({**self._pad([e.data for e in batch]), **self._extra_features})
        import torch

        # The library truncates a whole call from one side: texts cut from each side are
        # tokenized apart, and their rows put back in the batch's order.
        rows: list[Any] = [None] * len(batch)
        for left in (False, True):
            picked = [i for i, e in enumerate(batch) if e.data.truncate_left == left]
            if len(picked) == len(batch):
                return self._forward(self._library_features([e.data.text for e in batch],
                                                            left))
            if picked:
                out = self._forward(self._library_features([batch[i].data.text
                                                            for i in picked], left))
                for i, row in zip(picked, out):
                    rows[i] = row
        return torch.stack(rows)

    def _pad(self, ids: list[TokenIds]) -> dict[str, Any]:
        """One padded batch from ids made in the request threads, by the tokenizer's own
        `pad` (its side, pad id and inputs: token_type_ids only where its calls give them)."""
        inputs: dict[str, list[list[int]]] = {"input_ids": [t.ids for t in ids]}
        if ids and ids[0].type_ids is not None:
            inputs["token_type_ids"] = [t.type_ids or [] for t in ids]
        return dict(self.tokenizer.pad(inputs, padding=True, return_tensors="pt"))

    def _forward(self, features: dict[str, Any]) -> Any:
        """A padded batch (tensors on the CPU) to pooled rows."""
        raise NotImplementedError

    def _library_features(self, texts: list[str], truncate_left: bool) -> dict[str, Any]:
        """A padded batch made by the library from texts, cut from the side asked."""
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
        self.forward(self._probe_items(["warm up"]))
        self.pass_overhead_tokens = self._measure_pass_overhead()
        if self.kind == EMBEDDING:  # a reranker's scores are not quantized
            self.quantization_ranges = self._calibrate()

    def _calibrate(self) -> Ranges:
        """The per-dimension ranges of int8 / uint8 codes: min and max of this model's
        normalised embeddings of the built-in calibration texts (no prompt), found once here,
        so that a vector's codes never depend on what else its request held."""
        vectors: list[list[float]] = []
        for start in range(0, len(CALIBRATION_TEXTS), CALIBRATION_BATCH):
            batch = self.prepare(CALIBRATION_TEXTS[start:start + CALIBRATION_BATCH])
            vectors += self.forward(batch).lists(normalize=True)
        return calibrate(vectors, f"calibration: per-dimension min and max of the model's "
                                  f"normalised embeddings of {len(vectors)} built-in texts")

    def _measure_pass_overhead(self) -> float:
        """The fixed cost of one forward pass, in padded tokens: what merging two batches
        saves. Timed, not assumed, as it depends on model and device: 56-70 tokens for
        all-MiniLM-L6-v2 on two CPU cores (8 ms a pass + 0.14 ms a token); on a GPU, where a
        pass should cost about the same whatever it holds, far more (inf when the long pass
        is no slower: fill the batches). Tokenizing is not timed: the request threads do it."""

        def seconds(batch: list[Encoding]) -> float:
            began = time.perf_counter()
            self.forward(batch)
            return time.perf_counter() - began

        short, long = self._probe_items(["warm up"]), self._probe_items(["warm up " * 30] * 4)
        short_tokens = short[0].tokens
        long_tokens = len(long) * max(e.tokens for e in long)
        estimates = []
        # Short and long back to back, then the median estimate: a busy spell (another
        # server loading beside this one) slows one pair, not the answer.
        for _ in range(OVERHEAD_ROUNDS):
            short_s, long_s = seconds(short), seconds(long)
            per_token = (long_s - short_s) / max(1, long_tokens - short_tokens)
            estimates.append(max(0.0, short_s / per_token - short_tokens) if per_token > 0
                             else math.inf)
        return statistics.median(estimates)


if TYPE_CHECKING:
    def _is_a_batched_model(backend: TorchBackend) -> BatchedModel:
        return backend  # mypy checks the PyTorch tiers against the protocol here
