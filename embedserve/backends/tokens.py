"""Tokenizing for the PyTorch tiers in the request threads, each text once: token ids cut to
the model's limit exactly as the library's own call cuts them, so that the model thread only
pads them and runs the pass. Needs no torch; imported only when an ML tier is tried.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

from embedserve.backends import Encoding, Token


class TokenIds(NamedTuple):
    """A text's `Encoding.data` when the model thread pads ids made here."""

    ids: list[int]
    type_ids: list[int] | None  # only where the tokenizer's own calls give them


class LibraryText(NamedTuple):
    """A text's `Encoding.data` when the model thread tokenizes with the library itself (a
    model whose library does more than tokenize, e.g. renders a chat template)."""

    text: str
    truncate_left: bool


class RequestTokenizer:
    """The request threads' tokenizer: copies of the model's, never the model thread's own. A
    fast tokenizer keeps its truncation and padding settings as state: shared with the model
    thread, which tokenized with padding and truncation, the two raced and batches failed."""

    def __init__(self, tokenizer: Any, max_tokens: int | None) -> None:
        self._limit = max_tokens
        # For /tokenize and the library path's counts: the library's own call, whose settings
        # it may change as it goes, so callers take turns.
        self._library = copy.deepcopy(tokenizer)
        self._library_lock = threading.Lock()
        # For encode_ids: the tokenizers library's Tokenizer underneath a fast tokenizer, one
        # copy per truncation side, each set up once (no padding, truncation at the limit)
        # and never again. Then every call only reads it (encoding takes it shared), so
        # request threads use it at once, without a lock.
        self._cutters: dict[bool, Any] = {}
        self._specials = 0
        self._type_ids = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        if getattr(tokenizer, "is_fast", False):
            for left in (False, True):
                cutter = copy.deepcopy(tokenizer.backend_tokenizer)
                cutter.no_padding()
                if max_tokens is None:
                    cutter.no_truncation()
                else:
                    cutter.enable_truncation(max_tokens, stride=0, strategy="longest_first",
                                             direction="left" if left else "right")
                # What the library's call sets before each encode: whether "[SEP]" written
                # in a text is the special token or plain text.
                cutter.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens",
                                                            False))
                self._cutters[left] = cutter
            self._specials = self._cutters[False].num_special_tokens_to_add(False)

    @property
    def can_encode_ids(self) -> bool:
        return bool(self._cutters)

    def encode_ids(self, texts: Sequence[str], truncate_left: bool) -> list[Encoding]:
        """Each text's ids as `tokenizer(text, truncation=True, max_length=limit)` makes them
        (cut from the side asked), tokenized once: what was cut comes back beside the ids
        (as overflowing pieces, each with its own special tokens), which gives the
        untruncated count too."""
        cutter, limit, specials = self._cutters[truncate_left], self._limit, self._specials
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, unused here.
        encode = getattr(cutter, "encode_batch_fast", cutter.encode_batch)
        encodings = []
        for encoded in encode(list(texts), add_special_tokens=True):
            tokens = untruncated = len(encoded)
            if limit is not None and tokens >= limit:
                untruncated += sum(len(piece) - specials for piece in encoded.overflowing)
            data = TokenIds(encoded.ids, encoded.type_ids if self._type_ids else None)
            encodings.append(Encoding(tokens, untruncated, data))
        return encodings

    def encode_for_library(self, texts: Sequence[str], truncate_left: bool) -> list[Encoding]:
        """The texts themselves for the model thread's library call, with their counts."""
        limit = self._limit or 1 << 62
        return [Encoding(min(n, limit), n, LibraryText(text, truncate_left))
                for text, n in zip(texts, self.count(texts))]

    def count(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts, special tokens included."""
        with self._library_lock:
            encoded = self._library(list(texts), add_special_tokens=True, truncation=False,
                                    verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def tokens(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[Token]]:
        """/tokenize: each token with its text and offsets, as TEI reports them."""
        with self._library_lock:
            encoded = self._library(
                list(texts), add_special_tokens=add_special_tokens, truncation=False,
                return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False)
            pieces = [self._library.convert_ids_to_tokens(ids) for ids in encoded["input_ids"]]
        result = []
        for text, ids, offsets, special, names in zip(texts, encoded["input_ids"],
                                                      encoded["offset_mapping"],
                                                      encoded["special_tokens_mask"], pieces):
            result.append([
                Token(i, piece, True, None, None) if is_special else
                Token(i, text[start:stop], False, start, stop)
                for i, piece, (start, stop), is_special in zip(ids, names, offsets, special)])
        return result
