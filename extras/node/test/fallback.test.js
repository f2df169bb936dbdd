// The fallback policy: the JavaScript hash embedding answers only when no server can be
// had and the policy allows; its vectors are the golden ones (so the server's own hash
// tier's, bit for bit), and the result says which model made them and where.

import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { EmbedServeClient, HashEmbedder } from '../index.js';
import { PYTHON, clientOptions, freePort, loadGolden, portIsFree, startServer } from '../test-support/helpers.js';

const golden = loadGolden();
const needsGolden = { skip: !golden && 'no golden file', timeout: 20_000 };
const scratch = mkdtempSync(join(tmpdir(), 'embedserve-node-fallback-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

/** A client whose server cannot be had: nothing listens, and it may not start one. */
async function orphanClient(options = {}) {
  const port = await freePort();
  return new EmbedServeClient({ url: `http://127.0.0.1:${port}`, autoStart: false, retries: 0, ...options });
}

function float32Base64(vector) {
  return Buffer.from(new Float32Array(vector).buffer).toString('base64');
}

test('fallback "never": the error is raised, saying there was no fallback', { timeout: 10_000 }, async () => {
  const client = await orphanClient({ fallback: 'never' });
  await assert.rejects(client.embed(['x']), {
    code: 'unreachable', message: /no fallback: fallback is off \(fallback: 'never'\)/,
  });
});

test('default "same-model", nothing served yet: golden vectors, labelled as the fallback (float: exact doubles)', needsGolden, async () => {
  const cases = golden.cases.filter((c) => c.dimensions === 384);
  const client = await orphanClient({ encodingFormat: 'float' });
  const events = [];
  client.on('fallback', (event) => events.push(event));
  const vectors = await client.embed(cases.map((c) => c.text));
  assert.equal(vectors.source, 'fallback');
  assert.equal(vectors.backend, 'hash');
  assert.equal(vectors.model, 'hash-v1-384');
  cases.forEach((c, i) => assert.ok(vectors[i].every((x, j) => x === c.vector[j]), JSON.stringify(c.text)));
  assert.deepEqual(events.map((e) => [e.error.code, e.model]), [['unreachable', 'hash-v1-384']]);
  const single = await client.embedSingle(cases[0].text);
  assert.equal(single.source, 'fallback');
  assert.deepEqual([...single], cases[0].vector);
  assert.deepEqual([client.lastModel, client.lastBackend, client.lastSource], ['hash-v1-384', 'hash', 'fallback']);
});

test('fallback with base64 (the default format): the golden float32 bytes, as the server sends them', needsGolden, async () => {
  for (const dimensions of [384, 16]) {
    const cases = golden.cases.filter((c) => c.dimensions === dimensions);
    const client = await orphanClient({ dimensions });
    const vectors = await client.embed(cases.map((c) => c.text));
    assert.equal(vectors.model, `hash-v1-${dimensions}`);
    cases.forEach((c, i) => assert.equal(float32Base64(vectors[i]), c.float32_base64, JSON.stringify(c.text)));
  }
});

test('"same-model" refuses when the server would use another model; "always" accepts', { timeout: 10_000 }, async () => {
  const strict = await orphanClient({ backend: 'sentence-transformers' });
  await assert.rejects(strict.embed(['x']), {
    code: 'unreachable',
    message: /no fallback: the server's model is sentence-transformers \(sentence-transformers\), the in-process fallback would be hash-v1-384/,
  });
  const lax = await orphanClient({ backend: 'sentence-transformers', fallback: 'always' });
  const vectors = await lax.embed(['x']);
  assert.equal(vectors.source, 'fallback');
  assert.equal(vectors.model, 'hash-v1-384');
});

test('a server that cannot start: fallback, and no new start attempt for a moment', { timeout: 20_000 }, async () => {
  // A "python" that records each run, then runs the real one with a bad flag.
  const runs = join(scratch, 'runs');
  const python = join(scratch, 'python-counting');
  writeFileSync(python, `#!/bin/sh\necho run >> ${runs}\nexec ${PYTHON} "$@" --backend no-such-backend\n`, { mode: 0o755 });
  const port = await freePort();
  const client = new EmbedServeClient(clientOptions({ url: `http://127.0.0.1:${port}`, python, retries: 0 }));
  const reasons = [];
  client.on('fallback', (event) => reasons.push(event.error.code));
  const first = await client.embed(['a']);
  const second = await client.embed(['b']); // within the recheck interval
  assert.equal(first.source, 'fallback');
  assert.equal(second.source, 'fallback');
  assert.deepEqual(reasons, ['start_failed', 'start_failed']);
  assert.equal(readFileSync(runs, 'utf8'), 'run\n');
  assert.match(client.serverLog.join('\n'), /invalid choice: 'no-such-backend'/);
  assert.ok(await portIsFree(port));
});

test('fallback dimensions: bit for bit what a server started with --dimensions 32 serves', { timeout: 20_000 }, async () => {
  // "single": the first 32 of its 384 buckets are zero; only 32 buckets computed directly match.
  const texts = ['single', 'a b', 'The cat sat on the mat.', 'naïve café ☕'];
  const server = await startServer(['--dimensions', '32']);
  let served;
  try {
    for (const encodingFormat of ['base64', 'float']) {
      const client = new EmbedServeClient({ url: server.url, autoStart: false, encodingFormat });
      served = await client.embed(texts);
      assert.equal(served.model, 'hash-v1-32');
      const local = await (await orphanClient({ encodingFormat })).embed(texts, { dimensions: 32 });
      assert.equal(local.source, 'fallback');
      assert.equal(local.model, 'hash-v1-384'); // the configured model's name, as a server labels it
      assert.deepEqual([...local], [...served]);
    }
  } finally {
    await server.stop();
  }
});

describeWithServer();

function describeWithServer() {
  let server;
  before(async () => {
    server = await startServer(['--dimensions', '16']);
  });
  after(() => server?.stop());

  test('the fallback equals the server\'s hash tier in both formats, size taken from the server', { timeout: 20_000 }, async () => {
    const texts = ['Déjà vu', 'the the the the', 'ΣΊΣΥΦΟΣ', '東京は日本の首都です', '!!!'];
    for (const encodingFormat of ['base64', 'float']) {
      const client = new EmbedServeClient({ url: server.url, autoStart: false, encodingFormat });
      const fromServer = await client.embed(texts);
      assert.equal(fromServer.source, 'server');
      assert.equal(fromServer.model, 'hash-v1-16');
      const rounded = encodingFormat === 'base64';
      const local = new HashEmbedder(16).embed(texts).map((v) => (rounded ? v.map(Math.fround) : v));
      assert.deepEqual([...fromServer], local);
      await client.close();
    }
  });

  test('a server\'s validation error is never hidden by the fallback', { timeout: 10_000 }, async () => {
    const client = new EmbedServeClient({ url: server.url, autoStart: false, fallback: 'always' });
    let fellBack = false;
    client.on('fallback', () => { fellBack = true; });
    await assert.rejects(client.embed(['x'], { dimensions: 17 }), { code: 'validation', status: 422 });
    assert.equal(fellBack, false);
  });

  // Last: it stops the server.
  test('after the server went away, the fallback keeps its model, size and values', { timeout: 20_000 }, async () => {
    const texts = ['same words, same vector', 'another text'];
    const client = new EmbedServeClient({ url: server.url, autoStart: false, backoffMs: 10 });
    const served = await client.embed(texts);
    const shortBefore = await client.embed(texts, { dimensions: 8 });
    assert.equal(served.source, 'server');
    await server.stop();
    const changes = [];
    client.on('modelChange', (event) => changes.push(event));
    const afterwards = await client.embed(texts);
    assert.equal(afterwards.source, 'fallback');
    assert.equal(afterwards.model, 'hash-v1-16');
    assert.deepEqual([...afterwards], [...served]);
    assert.deepEqual(changes, []); // same model: nothing to warn about
    // dimensions: 8 is hash-v1-8 computed directly, as the server's hash tier answers it,
    // labelled with the served model's name: bit for bit the server's, float32 included.
    const shortAfter = await client.embed(texts, { dimensions: 8 });
    assert.equal(shortAfter.source, 'fallback');
    assert.equal(shortAfter.model, shortBefore.model);
    assert.equal(shortAfter.model, 'hash-v1-16');
    assert.deepEqual([...shortAfter], [...shortBefore]);
    assert.deepEqual([...shortAfter], new HashEmbedder(8).embed(texts).map((v) => v.map(Math.fround)));
    await assert.rejects(client.embed(texts, { dimensions: 17 }), { code: 'validation', status: 422 });
  });
}
