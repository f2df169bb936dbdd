// The hash embedding `hash-v1-<D>` in JavaScript: a second implementation of the
// specification in docs/hash-embedding.md, bit for bit equal to embedserve's Python hash
// tier (test/hash.test.js checks it against tests/data/hash_golden.json).
//
// Every bucket holds an exact integer until the final division, so the result depends
// neither on the order features are visited in nor on floating-point summation order.

export const HASH_VERSION = 1;
export const DEFAULT_DIMENSIONS = 384;

// Same bounds as the Python implementation: memory stays flat whatever the input; a word
// longer than this is hashed on every use instead of cached, and the cache is dropped
// when it fills up.
const MAX_CACHED_WORD = 64;
const MAX_CACHED_WORDS = 16384;

const NGRAM_SIZES = [3, 5];

// Python's re `\w` on str, spelled out for JavaScript (the spec gives this exact class).
const WORD = /[\p{L}\p{N}_]+/gu;

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/**
 * CRC-32 (ISO-HDLC, zlib's crc32) of bytes[start, end), as an unsigned 32-bit integer.
 * @param {Uint8Array} bytes
 */
export function crc32(bytes, start = 0, end = bytes.length) {
  let c = 0xffffffff;
  for (let i = start; i < end; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** The model id of the hash tier: vectors of different sizes never share a name. */
export function hashModelName(dimensions = DEFAULT_DIMENSIONS) {
  return `hash-v${HASH_VERSION}-${dimensions}`;
}

/** Lower-cased word tokens, as the spec (and Python's `re.findall(r"\w+", text.lower())`). */
export function tokenize(text) {
  return text.toLowerCase().match(WORD) ?? [];
}

/**
 * The one word a text without a usable word is embedded as: all of it (lower-cased), with
 * each lone surrogate as U+FFFD. TextEncoder would make that replacement anyway; doing it
 * here keeps the cache key and the hashed bytes the same thing, as in Python.
 * @param {string} lowered
 */
function wholeTextWord(lowered) {
  return lowered.replace(/\p{Cs}/gu, '\ufffd');
}

const utf8 = new TextEncoder();

export class HashEmbedder {
  /** @param {number} [dimensions] */
  constructor(dimensions = DEFAULT_DIMENSIONS) {
    if (!Number.isSafeInteger(dimensions) || dimensions < 1) {
      throw new RangeError(`dimensions must be a positive integer, got ${dimensions}`);
    }
    this.dimensions = dimensions;
    this.model = hashModelName(dimensions);
    /** @type {Map<string, Int32Array>} word -> signed bucket codes (see #codes) */
    this._cache = new Map();
  }

  /**
   * @param {string[]} texts
   * @param {{normalize?: boolean}} [options]
   * @returns {number[][]}
   */
  embed(texts, { normalize = true } = {}) {
    return texts.map((text) => this.embedOne(text, { normalize }));
  }

  /**
   * @param {string} text
   * @param {{normalize?: boolean}} [options]
   * @returns {number[]}
   */
  embedOne(text, { normalize = true } = {}) {
    if (typeof text !== 'string') {
      throw new TypeError(`expected a string, got ${text === null ? 'null' : typeof text}`);
    }
    const lowered = text.toLowerCase();
    const counts = new Map();
    for (const word of lowered.match(WORD) ?? []) counts.set(word, (counts.get(word) ?? 0) + 1);
    let buckets = this.#accumulate(counts);
    let squares = exactSumOfSquares(buckets);
    if (squares === 0) {
      // No words (or, rarely, words whose features cancel): a zero vector would make every
      // cosine NaN, so the text is embedded as one word (the spec's whole-text rule).
      if (text === '') throw new RangeError('the empty string has no hash embedding');
      buckets = this.#accumulate(new Map([[wholeTextWord(lowered), 1]]));
      squares = exactSumOfSquares(buckets);
    }

    const vector = Array.from(buckets);
    if (!normalize) return vector;
    const norm = Math.sqrt(squares);
    for (let i = 0; i < vector.length; i++) vector[i] /= norm;
    return vector;
  }

  /** Integer buckets of distinct words with their term frequencies (spec step 6). */
  #accumulate(counts) {
    // Doubles hold every integer below 2^53 exactly: the buckets stay exact integers.
    const buckets = new Float64Array(this.dimensions);
    for (const [word, tf] of counts) {
      const weight = 32 - Math.clz32(tf); // bit length of tf = 1 + floor(log2(tf))
      for (const code of this.#codes(word)) {
        // code >= 0: +1 into bucket `code`; code < 0: -1 into bucket `~code`.
        if (code >= 0) buckets[code] += weight;
        else buckets[~code] -= weight;
      }
    }
    return buckets;
  }

  /** Each feature of `word` as one signed bucket code, cached per word (bounded). */
  #codes(word) {
    const cached = this._cache.get(word);
    if (cached) return cached;
    const codes = this.#computeCodes(word);
    if (word.length <= MAX_CACHED_WORD) {
      if (this._cache.size >= MAX_CACHED_WORDS) this._cache.clear();
      this._cache.set(word, codes);
    }
    return codes;
  }

  #computeCodes(word) {
    const padded = ` ${word} `;
    const bytes = utf8.encode(padded);
    // Byte offset where each code point starts (plus the end): n-grams are counted in
    // code points, not UTF-16 units, and hashed over their UTF-8 bytes.
    const starts = [];
    let offset = 0;
    for (const ch of padded) {
      starts.push(offset);
      const cp = ch.codePointAt(0);
      offset += cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    }
    starts.push(offset);
    const n = starts.length - 1;

    const codes = [this.#code(crc32(bytes))];
    for (const size of NGRAM_SIZES) {
      for (let i = 0; i + size <= n; i++) {
        codes.push(this.#code(crc32(bytes, starts[i], starts[i + size])));
      }
    }
    return Int32Array.from(codes);
  }

  #code(h) {
    const bucket = h % this.dimensions;
    return h >= 0x80000000 ? ~bucket : bucket;
  }
}

/**
 * sum(b[i]^2) of integer-valued doubles, rounded once to the nearest double (ties to
 * even), as the spec's double(S). The double sum is exact while it stays below 2^53; only
 * beyond that is the exact sum taken with BigInt.
 * @param {Float64Array} buckets
 */
export function exactSumOfSquares(buckets) {
  let sum = 0;
  for (const b of buckets) sum += b * b;
  if (sum <= Number.MAX_SAFE_INTEGER) return sum;
  let exact = 0n;
  for (const b of buckets) {
    const big = BigInt(b);
    exact += big * big;
  }
  return Number(exact); // BigInt -> Number rounds to nearest, ties to even
}

/**
 * Hash embeddings of `texts` without a server (a fresh cache per call).
 * @param {string[]} texts
 * @param {{dimensions?: number, normalize?: boolean}} [options]
 */
export function hashEmbed(texts, { dimensions = DEFAULT_DIMENSIONS, normalize = true } = {}) {
  return new HashEmbedder(dimensions).embed(texts, { normalize });
}
