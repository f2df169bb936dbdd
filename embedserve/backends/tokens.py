"""Tokenizing for the PyTorch tiers in the request threads, each text once: token ids cut to
the model's limit exactly as the library's own call cuts them, so that the model thread only
pads them and runs the pass. Needs no torch; imported only when an ML tier is tried.

A text is cut to what the model can use before it is tokenized. Tokenized whole, an 8 MB
string of "!" is 8 million tokens (and their copies in the overflowing pieces): 20 s and
2.5 GB of the worker's memory, kept afterwards (the tiny test BERT; 40.7 s and 7.5 GB in the
issue), for the 32 or 256 tokens the model reads. Cut first: under 10 ms.

The cut keeps `CHARS_PER_TOKEN` characters per token of the limit from the side kept (the
head; the tail when cut from the left), and ends (a tail: starts) where a space follows a
word, so that every word in the piece is whole. The tokenizers here split words at spaces
(WordPiece, byte-level BPE and Metaspace pre-tokenizers), so a whole word tokenizes as it
does in the text, and a piece that holds more tokens than the limit gives exactly the ids
the whole text gives. A piece that holds no more (text sparse in tokens: runs of whitespace,
which WordPiece drops; words over its 100 characters, one [UNK] each) is grown by windows of
the same size, each tokenized only to count it, until it does or is the whole text, and is
then tokenized: a sparse start before dense text costs at most a window's worth of tokens
more. Such text costs time and memory by its characters, in its own request's thread: 8 MB
of spaces took 3.5 s and 0.5 GB while tokenized (all-MiniLM-L6-v2, two cores).

Counts: for a text cut before tokenizing, the untruncated count (checked for truncate=false,
and reported by its 422) is the piece's, a lower bound; it is over the limit whenever the
whole text's is, since a cut piece holds more tokens than the limit. Usage counts the tokens
the model reads, as before.

When no space follows a word in the far half of a piece (a run of over half of
`CHARS_PER_TOKEN` x limit characters without one: words joined by punctuation, a script
written without spaces, one very long "word"), the cut would fall inside the run, and the
word it broke could tokenize otherwise than whole: WordPiece makes one [UNK] of a word over
100 characters but wordpieces of a part of it, so a 175-token text of such words joined by
dots was read as 266 tokens, wrong ids and a wrong 422. So the piece then ends before the
run's last word as the tokenizer itself splits words (its pre-tokenizer: WordPiece at each
punctuation mark and CJK character, byte-level BPE between letters, digits and symbols;
a slow tokenizer, which gives no words, is still cut inside the run).
Only a run that is one word throughout the window is still cut inside: WordPiece gives the
same [UNK] for any part of it over 100 characters; a tokenizer reading such a run as one
unit (byte-level BPE on letters, a sentencepiece model that does not split at spaces) may
tokenize its end differently, which matters only if the kept tokens reached the cut, far past
the limit. (Were a tokenizer's counts not to add up across windows, a grown piece still short
of the limit is replaced by the whole text.)
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from embedserve.backends import Encoding, Token

# Characters kept per token of the model's limit before tokenizing. Real text has about 4
# a token (all-MiniLM-L6-v2's WordPiece on the shared corpus: median 4.0 over 2,151
# paragraphs, the most 6.2; CJK 1 to 2), so a piece holds the limit several times over and
# is tokenized once. Sparser text takes the window-by-window path: the bound sets the work
# done for a text, not the ids it gets. (256 tokens: 4,096 characters.)
CHARS_PER_TOKEN = 16
# Texts handed to the tokenizers library in one call (see RequestTokenizer._encode).
ENCODE_SLICE = 64
# The end of a word followed by a space: where a piece may end (the last one in a window) or
# a tail may start (the first one).
_LAST_WORD_END = re.compile(r".*\S(?= )", re.DOTALL)
_FIRST_WORD_END = re.compile(r"\S(?= )")


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
        # How many characters of a text are tokenized at first (None: all of them).
        self._reach = None if max_tokens is None else max_tokens * CHARS_PER_TOKEN
        # For /tokenize and the checks at load: the library's own call, whose settings it may
        # change as it goes, so callers take turns. Requests count with it only when the
        # tokenizer is not a fast one, and then a piece at a time (see _counts).
        self._library = copy.deepcopy(tokenizer)
        self._library_lock = threading.Lock()
        # For encode_ids: the tokenizers library's Tokenizer underneath a fast tokenizer, one
        # copy per truncation side, each set up once (no padding, truncation at the limit)
        # and never again. Then every call only reads it (encoding takes it shared), so
        # request threads use it at once, without a lock. One more copy, never truncating,
        # counts tokens.
        self._cutters: dict[bool, Any] = {}
        self._counter: Any = None
        self._type_ids = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        if getattr(tokenizer, "is_fast", False):
            for left in (False, True, None):
                cutter = copy.deepcopy(tokenizer.backend_tokenizer)
                cutter.no_padding()
                if max_tokens is None or left is None:
                    cutter.no_truncation()
                else:
                    cutter.enable_truncation(max_tokens, stride=0, strategy="longest_first",
                                             direction="left" if left else "right")
                # What the library's call sets before each encode: whether "[SEP]" written
                # in a text is the special token or plain text.
                cutter.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens",
                                                            False))
                if left is None:
                    self._counter = cutter
                else:
                    self._cutters[left] = cutter

    @property
    def can_encode_ids(self) -> bool:
        return bool(self._cutters)

    def encode_ids(self, texts: Sequence[str], truncate_left: bool, prompt: str = ""
                   ) -> list[Encoding]:
        """Each text's ids as `tokenizer(prompt + text, truncation=True, max_length=limit)`
        makes them (cut from the side asked), from a piece of the text no longer than the
        model can use (see the module's notes); a piece the tokenizer cut at the limit is
        counted again, untruncated. For a text cut before tokenizing, that count is the
        piece's: a lower bound, but over the limit, so truncate=false still refuses it. Cut
        from the left, a text loses its first tokens after the prompt, which stays whole
        (the library would cut the prompt first, a query's instruction gone)."""
        if prompt and truncate_left:
            return [self._prompt_kept(prompt, text) for text in texts]
        texts = [prompt + text for text in texts] if prompt else texts
        cutter = self._cutters[truncate_left]
        pieces = [self._piece(text, truncate_left) for text in texts]
        encodings = []
        for text, piece, encoded in zip(texts, pieces, self._encode(cutter, pieces)):
            encoding = self._encoding(encoded, piece)
            if len(piece) < len(text) and not self._over_limit(encoding.untruncated):
                # Sparse in tokens: a longer piece, tokenized again (in this request's thread
                # only; others go on meanwhile).
                piece = self._grown(text, piece, encoding.untruncated, truncate_left)
                encoding = self._encoding(self._encode(cutter, [piece])[0], piece)
                if len(piece) < len(text) and not self._over_limit(encoding.untruncated):
                    encoding = self._encoding(self._encode(cutter, [text])[0], text)  # _grown
            encodings.append(encoding)
        return encodings

    def _prompt_kept(self, prompt: str, text: str) -> Encoding:
        """`prompt + text` cut from the left with the prompt kept: the special tokens, the
        prompt's tokens, as many of the text's last tokens as fit, the closing special
        tokens. The text is first cut to its tail piece (as encode_ids cuts it), and the
        whole tokenized once, untruncated, with offsets to tell the prompt's tokens (those
        ending within it) from the text's."""
        piece = self._piece(text, True)
        if len(piece) < len(text):
            piece, _ = self._enough(text, piece, self._counts([piece])[0], True)
        if len(piece) < len(text) and prompt[-1:].isspace():
            # Its first tokens are cut anyway; the blank it begins with would be one more
            # token of the prompt's (byte-level BPE's "Ġ") than with a text not cut.
            piece = piece.lstrip()
        encoded = self._counter.encode(prompt + piece)
        ids, special, offsets = encoded.ids, encoded.special_tokens_mask, encoded.offsets
        limit = self._limit
        assert limit is not None  # cut from the left: there is a limit
        content = [i for i in range(len(ids)) if not special[i]]
        if len(ids) <= limit or not content:
            return self._kept(encoded, range(len(ids)), len(ids))
        # A token that takes the prompt's last space with the text's first word (byte-level
        # BPE's "Ġthe") is the text's.
        own = [i for i in content if offsets[i][1] <= len(prompt)]
        rest = [i for i in content if offsets[i][1] > len(prompt)]
        room = limit - (len(ids) - len(content)) - len(own)
        if room <= 0:  # the prompt fills the model: as the library, from the left
            return self.encode_ids([prompt + text], True)[0]
        kept = [*range(content[0]), *own, *rest[len(rest) - room:],
                *range(content[-1] + 1, len(ids))]
        return self._kept(encoded, kept, len(ids))

    def _kept(self, encoded: Any, kept: Sequence[int], untruncated: int) -> Encoding:
        type_ids = [encoded.type_ids[i] for i in kept] if self._type_ids else None
        return Encoding(len(kept), untruncated, TokenIds([encoded.ids[i] for i in kept],
                                                         type_ids))

    def encode_pair_ids(self, query: str, documents: Sequence[str]) -> list[Encoding]:
        """Each (query, document) pair's ids as `tokenizer(query, document, truncation=True,
        max_length=limit)` makes them: one input, special tokens around and between, cut
        'longest_first' (the longer side loses tokens first). A side longer than the model
        can use is cut first as encode_ids cuts a text: once it holds more tokens than the
        limit, the tokens kept of it depend only on the other side, so the ids are the
        whole text's. The untruncated count (for truncate=false) is the pair's."""
        cutter = self._cutters[False]
        head = self._pair_piece(query)
        pairs = [(head, self._pair_piece(document)) for document in documents]
        return [self._encoding(encoded, pair)
                for pair, encoded in zip(pairs, self._encode(cutter, pairs))]

    def count_pairs(self, query: str, documents: Sequence[str]) -> list[tuple[str, str, int]]:
        """For a model whose library tokenizes pairs itself: each pair cut as encode_pair_ids
        cuts it, with its untruncated count."""
        head = self._pair_piece(query)
        pairs = [(head, self._pair_piece(document)) for document in documents]
        if self._counter is not None:
            counts = self._encode(self._counter, pairs)
            return [(q, d, len(e)) for (q, d), e in zip(pairs, counts)]
        counted = []
        for q, d in pairs:
            with self._library_lock:
                ids = self._library(q, d, add_special_tokens=True, truncation=False,
                                    verbose=False)["input_ids"]
            counted.append((q, d, len(ids)))
        return counted

    def _pair_piece(self, text: str) -> str:
        """A side of a pair, cut as a text is (see _piece); a cut piece that is sparse in
        tokens (not over the limit by itself) is not enough: then the whole text."""
        piece = self._piece(text, False)
        if len(piece) < len(text) and not self._over_limit(self._counts([piece])[0]):
            return text
        return piece

    def encode_for_library(self, texts: Sequence[str], truncate_left: bool) -> list[Encoding]:
        """The texts, cut before tokenizing as encode_ids cuts them, for the model thread's
        library call, with their counts (for a cut text, a lower bound over the limit)."""
        limit = self._limit or 1 << 62
        pieces = [self._piece(text, truncate_left) for text in texts]
        encodings = []
        for text, piece, count in zip(texts, pieces, self._counts(pieces)):
            piece, count = self._enough(text, piece, count, truncate_left)
            encodings.append(Encoding(min(count, limit), count,
                                      LibraryText(piece, truncate_left)))
        return encodings

    def count(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts, special tokens included, by the library's own call (what
        the checks at load compare with); requests count through _counts."""
        with self._library_lock:
            encoded = self._library(list(texts), add_special_tokens=True, truncation=False,
                                    verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    # -- cutting before tokenizing -------------------------------------------------------------
    def _piece(self, text: str, left: bool) -> str:
        """What is tokenized of `text` at first: all of it, or at most `_reach` characters
        from the side kept, ending (or, cut from the left, starting) where a space follows a
        word in the far half of that span, if a space does."""
        reach = self._reach
        if reach is None or len(text) <= reach:
            return text
        if left:
            return text[self._tail_start(text, len(text)):]
        return text[:self._head_end(text, 0)]

    def _enough(self, text: str, piece: str, count: int, left: bool) -> tuple[str, int]:
        """`piece` of `text`, with its `count` of tokens, if it holds more than the limit
        (or is the text); else grown until it does (sparse in tokens), else the text."""
        if len(piece) == len(text) or self._over_limit(count):
            return piece, count
        piece = self._grown(text, piece, count, left)
        [count] = self._counts([piece])
        if len(piece) < len(text) and not self._over_limit(count):
            piece, [count] = text, self._counts([text])  # see _grown
        return piece, count

    def _grown(self, text: str, piece: str, found: int, left: bool) -> str:
        """A piece of `text` that should hold more tokens than the limit (or the text
        itself), grown from `piece`, which holds `found` (special tokens included), by further
        windows of `_reach` characters, each tokenized only to count its tokens, so that
        memory stays that of a window however long the sparse stretch. Counts add up across
        pieces cut where a space follows a word; should the grown piece still hold no more
        than the limit (a tokenizer whose counts do not add up), callers take the whole
        text."""
        reach = self._reach
        assert reach is not None  # a piece shorter than its text was cut at the reach
        kept = len(piece)
        while not self._over_limit(found) and kept < len(text):
            if left:
                start = self._tail_start(text, len(text) - kept)
                found += self._count_content(text[start:len(text) - kept])
                kept = len(text) - start
            else:
                end = self._head_end(text, kept)
                found += self._count_content(text[kept:end])
                kept = end
        return text[len(text) - kept:] if left else text[:kept]

    def _head_end(self, text: str, start: int) -> int:
        """Where a window of `text` that begins at `start` ends (see _window_end); cut inside
        a run, before the run's last word as this tokenizer splits words (see _run_cut)."""
        assert self._reach is not None
        end, whole = _window_end(text, start, self._reach)
        cut = None if whole else self._run_cut(text[start:end], last=True)
        return end if cut is None else start + cut

    def _tail_start(self, text: str, stop: int) -> int:
        """Where a window of `text` that ends at `stop` begins (see _window_start); cut inside
        a run, after the run's first word as this tokenizer splits words."""
        assert self._reach is not None
        start, whole = _window_start(text, stop, self._reach)
        cut = None if whole else self._run_cut(text[start:stop], last=False)
        return start if cut is None else start + cut

    def _run_cut(self, window: str, last: bool) -> int | None:
        """Where `window`, cut from its text inside a run of characters without a space,
        should end instead (`last`: before its last word; else begin, after its first), the
        words being the tokenizer's own (WordPiece splits at punctuation, byte-level BPE
        between letters, digits and symbols), so that no word the cut broke is tokenized:
        WordPiece makes one [UNK] of a word over 100 characters but wordpieces of a part of
        it, and so 34 such words joined by dots were read as 266 tokens, not 175. None where
        the window is one word (or no tokenizer of ours can tell)."""
        if self._counter is None or window.isspace():
            return None
        encoded = self._counter.encode(window, add_special_tokens=False)
        words = encoded.word_ids
        if not words or words[0] == words[-1]:
            return None
        if last:  # (0, all blank before the last word: no cut that leaves a word)
            first_of_last = words.index(words[-1])
            return len(window[:encoded.offsets[first_of_last][0]].rstrip()) or None
        last_of_first = len(words) - 1 - words[::-1].index(words[0])
        return encoded.offsets[last_of_first][1]

    def _over_limit(self, tokens: int) -> bool:
        """Whether a piece with `tokens` (special tokens included) holds more than the model
        takes: then its first (or last) tokens are the whole text's, and truncate=false
        refuses it as it would refuse the whole text."""
        return self._limit is not None and tokens > self._limit

    def _counts(self, pieces: list[str]) -> list[int]:
        """The pieces' tokens, special tokens included: without a lock when the tokenizer is
        a fast one, else by the library's call, a piece at a time (each is short), so a big
        request does not keep the others' turns waiting."""
        if self._counter is not None:
            return [len(encoded) for encoded in self._encode(self._counter, pieces)]
        counts = []
        for piece in pieces:
            with self._library_lock:
                ids = self._library(piece, add_special_tokens=True, truncation=False,
                                    verbose=False)["input_ids"]
            counts.append(len(ids))
        return counts

    def _count_content(self, window: str) -> int:
        """A window's tokens without the special tokens: what it adds to a piece."""
        if self._counter is not None:
            return len(self._encode(self._counter, [window], add_special_tokens=False)[0])
        with self._library_lock:
            ids = self._library(window, add_special_tokens=False, truncation=False,
                                verbose=False)["input_ids"]
        return len(ids)

    # -- tokenizing ------------------------------------------------------------------------------
    @staticmethod
    def _encode(tokenizer: Any, texts: Sequence[str | tuple[str, str]],
                add_special_tokens: bool = True) -> list[Any]:
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, unused here.
        encode: Callable[..., list[Any]] = getattr(tokenizer, "encode_batch_fast",
                                                   tokenizer.encode_batch)
        # In slices: the library runs every call's texts on one thread pool, first come first
        # served, so a search's call waited out whole bulk requests' calls (a 3-pair rerank
        # took 1-4 s behind four 1000-pair ones, 24 ms passes). Between slices it gets in.
        encoded: list[Any] = []
        for start in range(0, len(texts), ENCODE_SLICE):
            encoded += encode(texts[start:start + ENCODE_SLICE],
                              add_special_tokens=add_special_tokens)
        return encoded

    def _encoding(self, encoded: Any, piece: str | tuple[str, str]) -> Encoding:
        tokens = untruncated = len(encoded)
        if self._limit is not None and tokens >= self._limit:
            # Cut at the limit: counted again, untruncated. (The overflowing pieces the cut
            # leaves would give the count without tokenizing again, but how the tokenizers
            # library fills them changed between releases: 0.23.2 gave 258 where 291 was
            # right, and every pass then went the slow way, tokenized in the model thread.)
            untruncated = len(self._encode(self._counter, [piece])[0])
        data = TokenIds(encoded.ids, encoded.type_ids if self._type_ids else None)
        return Encoding(tokens, untruncated, data)

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


def _window_end(text: str, start: int, reach: int) -> tuple[int, bool]:
    """Where a window of `text` that begins at `start` ends: the text's end if it is within
    `reach`, else after the last word followed by a space in the window's second half, else
    at `reach` (no such space: the cut falls inside a run, see the module's notes); and
    whether that end leaves every word whole (False: inside a run)."""
    if len(text) - start <= reach:
        return len(text), True
    low, high = start + reach // 2, start + reach
    found = _LAST_WORD_END.match(text, low - 1, high + 1)
    return (found.end(), True) if found else (high, False)


def _window_start(text: str, stop: int, reach: int) -> tuple[int, bool]:
    """Where a window of `text` that ends at `stop` begins: the text's start if it is within
    `reach`, else at the space after the first word in the window's first half, so the window
    begins with the whitespace before its first whole word (byte-level BPE tokenizers join a
    space to the word after it), else at `stop - reach`; and whether every word is whole."""
    if stop <= reach:
        return 0, True
    low, high = stop - reach, stop - reach // 2
    found = _FIRST_WORD_END.search(text, low - 1, high + 1)
    return (found.end(), True) if found else (low, False)
