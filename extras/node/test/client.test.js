// embed(), embedSingle(), health() and info() against a real `python -m embedserve` that
// the test started itself (so the client must leave it running).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { EmbedServeClient, HashEmbedder, NomicEmbedder } from '../index.js';
import { clientOptions, loadGolden, processGone, startServer } from '../test-support/helpers.js';

const golden = loadGolden();
let server;
let client;

before(async () => {
  server = await startServer();
  client = new EmbedServeClient(clientOptions({ url: server.url }));
});

after(async () => {
  await client?.close();
  await server?.stop();
});

test('embed() returns one vector per text, in order, tagged with model and backend', { timeout: 20_000 }, async () => {
  const texts = ['hello world', 'the quick brown fox', 'hello world'];
  const vectors = await client.embed(texts);
  assert.ok(Array.isArray(vectors));
  assert.equal(vectors.length, 3);
  assert.equal(vectors.model, 'hash-v1-384');
  assert.equal(vectors.backend, 'hash');
  assert.equal(vectors.source, 'server');
  // Tags are not data: JSON and spreading see only the vectors.
  assert.deepEqual(Object.keys(vectors), ['0', '1', '2']);
  assert.equal(JSON.stringify(vectors), JSON.stringify([...vectors]));
  for (const v of vectors) assert.equal(v.length, 384);
  assert.deepEqual(vectors[0], vectors[2]);
  assert.notDeepEqual(vectors[0], vectors[1]);
  // Default transport is base64 float32: exactly the JavaScript hash rounded to float32.
  const expected = new HashEmbedder(384).embed(texts).map((v) => v.map(Math.fround));
  assert.deepEqual([...vectors], expected);
});

test('embedSingle() returns one tagged vector', { timeout: 20_000 }, async () => {
  const vector = await client.embedSingle('hello world');
  assert.equal(vector.length, 384);
  assert.equal(vector.model, 'hash-v1-384');
  assert.equal(vector.backend, 'hash');
  assert.deepEqual([...vector], (await client.embed(['hello world']))[0]);
});

test('NomicEmbedder is the same client under its old name', () => {
  assert.equal(NomicEmbedder, EmbedServeClient);
});

test('the server\'s vectors equal the golden vectors (float: exact doubles; base64: float32)',
  { skip: !golden && 'no golden file', timeout: 20_000 }, async () => {
    const cases = golden.cases.filter((c) => c.dimensions === 384);
    const texts = cases.map((c) => c.text);
    const floats = new EmbedServeClient(clientOptions({ url: server.url, encodingFormat: 'float' }));
    try {
      const exact = await floats.embed(texts);
      cases.forEach((c, i) => {
        assert.ok(exact[i].every((x, j) => x === c.vector[j]), JSON.stringify(c.text));
      });
    } finally {
      await floats.close();
    }
    const packed = await client.embed(texts);
    cases.forEach((c, i) => {
      assert.equal(Buffer.from(new Float32Array(packed[i]).buffer).toString('base64'), c.float32_base64);
    });
  });

test('embed([]) answers [] without a request; bad arguments are caught before sending', async () => {
  const none = await client.embed([]);
  assert.deepEqual(none, []);
  assert.equal(none.model, null);
  await assert.rejects(client.embed('not an array'), TypeError);
  await assert.rejects(client.embed(['ok', 7]), { name: 'TypeError', message: /texts\[1\] must be a string, got number/ });
  await assert.rejects(client.embedSingle(['a']), TypeError);
  // The server would answer 400 too; checked first so that a fallback agrees with it.
  await assert.rejects(client.embed(['ok', '']), {
    name: 'EmbedServeError', code: 'validation', status: 400, param: 'input', message: /texts\[1\] is an empty string/,
  });
  await assert.rejects(client.embed(['ok'], { dimensions: 0 }), { code: 'validation', param: 'dimensions' });
});

test('embed(texts, {dimensions}) shortens the vectors on the server', { timeout: 10_000 }, async () => {
  const short = await client.embed(['hello world', 'shorter vectors'], { dimensions: 32 });
  assert.equal(short[0].length, 32);
  const norm = Math.sqrt(short[1].reduce((s, x) => s + x * x, 0));
  assert.ok(Math.abs(norm - 1) < 1e-6);
});

test('large inputs are split by the server\'s max_batch_size, order kept', { timeout: 30_000 }, async () => {
  // Without the split this server would answer 413 (more than 3 inputs in one request).
  const small = await startServer(['--max-batch-size', '3']);
  const chunked = new EmbedServeClient(clientOptions({ url: small.url, batchSize: 100 }));
  try {
    assert.equal((await chunked.info()).max_batch_size, 3);
    const texts = Array.from({ length: 10 }, (_, i) => `text number ${i} ${'x'.repeat(i)}`);
    const vectors = await chunked.embed(texts);
    const expected = new HashEmbedder(384).embed(texts).map((v) => v.map(Math.fround));
    assert.deepEqual([...vectors], expected);
    assert.equal(vectors.model, 'hash-v1-384');
  } finally {
    await chunked.close();
    await small.stop();
  }
});

test('health() and info() describe the server; a server the client did not start is not owned', async () => {
  const health = await client.health();
  assert.deepEqual(health, { ok: true, status: 'ok', url: server.url, owned: false });
  const info = await client.info();
  assert.equal(info.backend, 'hash');
  assert.equal(info.model, 'hash-v1-384');
  assert.equal(client.ownsServer, false);
});

test('close() never stops a server the client did not start', { timeout: 20_000 }, async () => {
  const other = new EmbedServeClient(clientOptions({ url: server.url }));
  await other.embed(['x']);
  await other.close();
  await other.close(); // idempotent
  assert.equal(processGone(server.pid), false);
  const res = await fetch(`${server.url}/health`);
  assert.equal(res.status, 200);
  await assert.rejects(other.embed(['x']), { name: 'EmbedServeError', code: 'closed' });
  assert.deepEqual(await other.health(), { ok: false, status: 'closed', url: server.url, owned: false });
});
