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

test('a text without words is the zero vector; others are unit length', () => {
  assert.deepEqual(hashEmbed(['... !!!'], { dimensions: 8 })[0], new Array(8).fill(0));
  const [v] = hashEmbed(['unit length please']);
  const norm = Math.sqrt(v.reduce((s, x) => s + x * x, 0));
  assert.ok(Math.abs(norm - 1) < 1e-12);
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
