// The JavaScript hash embedding against the specification's golden vectors
// (tests/data/hash_golden.json, made by the Python implementation): bit for bit.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { HashEmbedder, crc32, hashEmbed, hashModelName, tokenize } from '../index.js';
import { exactSumOfSquares } from '../lib/hash.js';
import { loadGolden } from '../test-support/helpers.js';

const golden = loadGolden();
const skip = golden ? false : 'tests/data/hash_golden.json not found (run from the embedserve repository)';

function float32Base64(vector) {
  return Buffer.from(new Float32Array(vector).buffer).toString('base64');
}

test('every golden vector is reproduced exactly', { skip, timeout: 10_000 }, () => {
  assert.ok(golden.cases.length >= 20);
  for (const { text, dimensions, vector, unnormalized, float32_base64: base64 } of golden.cases) {
    const embedder = new HashEmbedder(dimensions);
    const label = `${JSON.stringify(text.slice(0, 40))} at D=${dimensions}`;
    const got = embedder.embedOne(text);
    assert.equal(got.length, dimensions, label);
    // Exact double equality, element by element (=== semantics, -0 and 0 alike).
    got.forEach((x, i) => assert.ok(x === vector[i], `${label}: [${i}] ${x} !== ${vector[i]}`));
    assert.deepEqual(embedder.embedOne(text, { normalize: false }), unnormalized, label);
    assert.equal(float32Base64(got), base64, `${label}: float32 bytes`);
  }
});

test('golden model names follow hash-v<version>-<D>', { skip }, () => {
  for (const [dimensions, name] of Object.entries(golden.models)) {
    assert.equal(hashModelName(Number(dimensions)), name);
    assert.equal(new HashEmbedder(Number(dimensions)).model, name);
  }
});

test('CRC-32 is zlib\'s', () => {
  assert.equal(crc32(new TextEncoder().encode('123456789')), 0xcbf43926);
  assert.equal(crc32(new Uint8Array()), 0);
  assert.equal(crc32(new TextEncoder().encode('xx123456789yy'), 2, 11), 0xcbf43926);
});

test('words are lower-cased Unicode letter/number/underscore runs, by code point', () => {
  assert.deepEqual(tokenize('Hello, WORLD! snake_case 42x 😀 ΣΊΣΥΦΟΣ'),
    ['hello', 'world', 'snake_case', '42x', 'σίσυφος']);
  assert.deepEqual(tokenize('!!! ---'), []);
});

test('golden vectors pin the sizes a request may ask the hash tier for', { skip }, () => {
  const sizes = new Set(golden.cases.map((c) => c.dimensions));
  for (const d of [16, 32, 64, 128, 384]) assert.ok(sizes.has(d), `no golden cases at D=${d}`);
});

test('a text without words is embedded as one whole-text word: unit length, never zeros', () => {
  const embedder = new HashEmbedder(384);
  const unit = (v) => Math.abs(Math.sqrt(v.reduce((s, x) => s + x * x, 0)) - 1) < 1e-12;
  const cos = (a, b) => a.reduce((s, x, i) => s + x * b[i], 0);
  const plain = embedder.embedOne('unit length please');
  assert.ok(unit(plain));
  for (const text of ['!!!', '???', '... !!!', '   ', '\t\n', '\ud800', '🙂🙂', '\udc00x\ud83d']) {
    const v = embedder.embedOne(text);
    assert.ok(unit(v), JSON.stringify(text));
    assert.ok(Number.isFinite(cos(v, plain)), JSON.stringify(text));
  }
  assert.notDeepEqual(embedder.embedOne('!!!'), embedder.embedOne('???'));
  // A lone surrogate is hashed as U+FFFD, as TextEncoder encodes it (and Python matches).
  assert.deepEqual(embedder.embedOne('\ud800'), embedder.embedOne('\ufffd'));
  // Every size, even D = 1: the whole-text word has an odd number of features.
  for (let d = 1; d <= 8; d++) assert.ok(unit(new HashEmbedder(d).embedOne('!')), `D=${d}`);
});

test('the empty string has no hash embedding', () => {
  assert.throws(() => new HashEmbedder().embedOne(''), RangeError);
  assert.throws(() => hashEmbed(['ok', '']), RangeError);
});

test('the word cache changes no result, even when it is dropped', { skip, timeout: 10_000 }, () => {
  const texts = golden.cases.filter((c) => c.dimensions === 384).map((c) => c.text);
  const cold = texts.map((t) => new HashEmbedder(384).embedOne(t));
  const warm = new HashEmbedder(384);
  warm.embed(texts); // fill
  for (let i = 0; i < 20_000; i++) warm.embedOne(`w${i}`); // overflow: the cache is dropped
  assert.deepEqual(warm.embed(texts), cold);
});

test('the sum of squares is exact beyond 2^53', () => {
  const big = 2 ** 27 + 1;
  const buckets = new Float64Array([big, big, 3]);
  const exact = 2n * BigInt(big) ** 2n + 9n;
  assert.equal(exactSumOfSquares(buckets), Number(exact));
  assert.equal(exactSumOfSquares(new Float64Array([3, -4])), 25);
});

test('bad dimensions and non-strings are rejected', () => {
  for (const bad of [0, -1, 1.5, NaN, '384']) {
    assert.throws(() => new HashEmbedder(bad), RangeError);
  }
  assert.throws(() => new HashEmbedder().embedOne(42), TypeError);
});
