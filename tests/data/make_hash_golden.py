"""Regenerate hash_golden.json. These vectors are the contract that every implementation
(Python server, Python fallback, Node client) must meet bit for bit, so a change to an
existing case's vector needs a new HASH_VERSION (docs/hash-embedding.md, Versioning); adding
texts or sizes does not. Run: python tests/data/make_hash_golden.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from embedserve.encoding import float32_base64
from embedserve.hashing import HASH_VERSION, HashEmbedder, model_name

TEXTS = [
    "hello world",
    "Hello, World!",
    "The quick brown fox jumps over the lazy dog.",
    "the the the the the the the the the cat",  # tf 9: weight 4
    "a an I x",  # one-letter words: the padded word is also a 3-gram
    "snake_case identifiers and CamelCase ones, v2.0 and 3.14159",
    "Déjà vu: naïve café façade, Ärger, ßtraße",
    "ΣΊΣΥΦΟΣ και ΟΔΥΣΣΕΑΣ",  # final sigma when lower-cased
    "İstanbul",  # lower-cases to two code points, the second a combining mark
    "東京は日本の首都です。北京、서울",
    "emoji 😀 between 🚀 words 👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # astral code points
    "tabs\tnew\nlines\r\nand    spaces",
    "!!! ... ??? ---",  # no words at all: embedded as one whole-text word
    "x" * 100,  # longer than the cache limit for words
    "Use this metaclass to create an ABC. An ABC can be subclassed directly, and then "
    "acts as a mix-in class.",
    # Texts without words, each embedded as one whole-text word:
    "!!!",
    "   ",  # whitespace only
    "\t\n",
    "\ud800",  # a lone surrogate: hashed as U+FFFD, as JavaScript's TextEncoder does
    "🙂🙂",  # emoji only
    "a\ud800b",  # words beside a lone surrogate: an ordinary text
    "ad nx",  # two words whose features cancel exactly at D = 16 and 32 (CRC is affine)
]
DIMENSIONS = [384, 16, 32, 64, 128]
# A lone surrogate cannot be written as UTF-8: such code points go in as JSON escapes.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def main() -> None:
    cases = []
    for dims in DIMENSIONS:
        embedder = HashEmbedder(dims)
        for text in TEXTS:
            vector = embedder.embed_one(text)
            cases.append({
                "text": text,
                "dimensions": dims,
                "vector": vector,
                "float32_base64": float32_base64(vector),
                "unnormalized": embedder.embed_one(text, normalize=False),
            })
    out = {
        "hash_version": HASH_VERSION,
        "models": {str(d): model_name(d) for d in DIMENSIONS},
        "cases": cases,
    }
    path = Path(__file__).with_name("hash_golden.json")
    text = json.dumps(out, ensure_ascii=False, indent=1)
    text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
