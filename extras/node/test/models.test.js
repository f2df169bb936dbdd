// Models by name: models() lists what the server serves, a call (or the client's `model`
// option) names one in every request it sends, an unknown name is a model_not_found error
// listing the served names, and the fallback answers a named model only when it is the
// hash tier's. Against real servers (one model under several --served-model-name names),
// and a local HTTP peer where the request bodies themselves are checked.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { EmbedServeClient, EmbedServeError, HashEmbedder } from '../index.js';
import { PYTHON, REPO_ROOT, clientOptions, freePort, makeTinyModel, startServer } from '../test-support/helpers.js';

const scratch = mkdtempSync(join(tmpdir(), 'embedserve-node-models-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

const TEXTS = ['The cat sat on the mat.', 'Feature hashing is deterministic', 'naïve café ☕'];

/** What the server's hash tier delivers over base64: float32-rounded vectors. */
function expected(texts, dimensions = 384) {
  return new HashEmbedder(dimensions).embed(texts).map((v) => v.map(Math.fround));
}

/** A client whose server cannot be had: nothing listens, and it may not start one. */
async function orphanClient(options = {}) {
  const port = await freePort();
  return new EmbedServeClient({ url: `http://127.0.0.1:${port}`, autoStart: false, retries: 0, ...options });
}

/** A local peer that embeds with the hash tier, labels answers `model`, and keeps the bodies. */
async function recordingServer({ model = 'hash-v1-384', backend = 'hash' } = {}) {
  const bodies = [];
  const embedder = new HashEmbedder(384);
  const server = createServer((req, res) => {
    let text = '';
    req.on('data', (chunk) => { text += chunk; });
    req.on('end', () => {
      const reply = (body) => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify(body));
      };
      if (req.url === '/health') return reply({ status: 'ok' });
      if (req.method === 'GET') return reply({ backend, model, dimensions: 384, max_batch_size: 2048 });
      const body = JSON.parse(text);
      bodies.push(body);
      return reply({
        object: 'list',
        model,
        data: embedder.embed(body.input).map((vector, index) => ({
          object: 'embedding',
          index,
          embedding: body.encoding_format === 'base64'
            ? Buffer.from(new Float32Array(vector).buffer).toString('base64') : vector,
        })),
      });
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    bodies,
    close: () => new Promise((resolve) => {
      server.closeAllConnections();
      server.close(resolve);
    }),
  };
}

test('models() lists the served names in order; a call names one, by any of its names', { timeout: 30_000 }, async () => {
  const server = await startServer(['--served-model-name', 'small,large']);
  const client = new EmbedServeClient(clientOptions({ url: server.url, autoStart: false, fallback: 'never' }));
  const changes = [];
  client.on('modelChange', (change) => changes.push(change));
  try {
    assert.deepEqual(await client.models(), ['small', 'large']); // the default first
    const named = await client.embed(TEXTS, { model: 'large' });
    const byDefault = await client.embed(TEXTS);
    const single = await client.embedSingle('one text', { model: 'LARGE' }); // any case
    // 'hash' (what --model hash serves) names the server's hash tier.
    const tier = await client.embed(TEXTS, { model: 'hash' });
    assert.deepEqual([tier.model, tier.source, [...tier]], ['small', 'server', expected(TEXTS)]);
    // Answers carry the model's first name, whichever name the call used.
    assert.deepEqual([named.model, named.source, byDefault.model, single.model], ['small', 'server', 'small', 'small']);
    assert.deepEqual([...named], expected(TEXTS));
    assert.deepEqual([...byDefault], expected(TEXTS));
    assert.deepEqual([...single], expected(['one text'])[0]);
    assert.deepEqual(changes, []);
  } finally {
    await client.close();
    await server.stop();
  }
});

test("the call's model, else the client's, travels in every chunk", { timeout: 20_000 }, async () => {
  const peer = await recordingServer();
  const texts = ['text 0', 'text 1', 'text 2', 'text 3', 'text 4'];
  try {
    const plain = new EmbedServeClient({ url: peer.url, autoStart: false, batchSize: 2 });
    assert.deepEqual([...await plain.embed(texts)], expected(texts));
    assert.deepEqual([...await plain.embed(texts, { model: 'hash-v1-384' })], expected(texts));
    const theirs = new EmbedServeClient({ url: peer.url, autoStart: false, batchSize: 2, model: 'theirs' });
    await theirs.embed(texts);
    await theirs.embed(texts, { model: 'mine' }); // the call's own model wins over the client's
    // Three requests per call (2 + 2 + 1 texts), each naming the call's model.
    assert.deepEqual(peer.bodies.map((body) => body.model), [
      ...Array(3).fill(undefined), ...Array(3).fill('hash-v1-384'), ...Array(3).fill('theirs'), ...Array(3).fill('mine'),
    ]);
    assert.deepEqual(peer.bodies.map((body) => body.input.length), [2, 2, 1, 2, 2, 1, 2, 2, 1, 2, 2, 1]);
  } finally {
    await peer.close();
  }
});

test('an unknown model is a model_not_found error listing the served names, never a fallback', { timeout: 30_000 }, async () => {
  const server = await startServer(['--served-model-name', 'small,large', '--max-batch-size', '2']);
  const client = new EmbedServeClient(clientOptions({ url: server.url, autoStart: false, fallback: 'always' }));
  const option = new EmbedServeClient(clientOptions({ url: server.url, autoStart: false, model: 'huge' }));
  try {
    const error = await client.embed(TEXTS, { model: 'huge' }).then(() => null, (e) => e);
    assert.ok(error instanceof EmbedServeError, String(error));
    assert.deepEqual([error.code, error.status, error.param, error.model, error.serverUnavailable],
      ['model_not_found', 404, 'model', 'huge', false]);
    assert.deepEqual(error.available, ['small', 'large']);
    // The server's own words, which name what it serves.
    assert.equal(error.serverMessage, "model 'huge' is not served here; this server serves 'small', 'large'");
    assert.ok(error.message.includes(error.serverMessage));
    assert.equal((await client.embed(TEXTS, { model: 'large' })).source, 'server'); // the client is fine
    // The client's `model` option names every call's model the same way.
    await assert.rejects(option.embed(TEXTS), { code: 'model_not_found', model: 'huge', message: /serves 'small', 'large'/ });
    await assert.rejects(client.embed(TEXTS, { model: ' ' }), { code: 'validation', param: 'model' });
    await assert.rejects(client.embed(TEXTS, { model: 3 }), TypeError);
  } finally {
    await client.close();
    await option.close();
    await server.stop();
  }
});

test("a client for model 'hash' starts the hash tier and asks for it", { timeout: 30_000 }, async () => {
  const client = new EmbedServeClient(clientOptions({ port: 0, model: 'hash', fallback: 'never' }));
  try {
    const result = await client.embed(TEXTS);
    assert.deepEqual([result.model, result.backend, result.source], ['hash-v1-384', 'hash', 'server']);
    assert.deepEqual([...result], expected(TEXTS));
  } finally {
    await client.close();
  }
});

test('a bad model option is an invalid_option error; EMBEDSERVE_MODEL names the default first', async () => {
  for (const model of ['', ' ', 3]) {
    assert.throws(() => new EmbedServeClient({ model }), { code: 'invalid_option', message: /model/ });
  }
  // Several models for a server that serves several: the first is the one to expect.
  const client = await orphanClient({ env: { EMBEDSERVE_MODEL: 'org/first, org/second', EMBEDSERVE_BACKEND: 'auto' } });
  await assert.rejects(client.embed(TEXTS), { message: /the server's model is org\/first \(auto\)/ });
});

test('the fallback answers a named model only when it is the hash tier', { timeout: 20_000 }, async () => {
  for (const fallback of ['same-model', 'always']) {
    const client = await orphanClient({ fallback });
    const events = [];
    client.on('fallback', (event) => events.push(event.model));
    for (const [name, dimensions] of [['hash', 384], ['hash-v1-384', 384], ['HASH-v1-32', 32]]) {
      const result = await client.embed(TEXTS, { model: name });
      assert.deepEqual([result.source, result.model], ['fallback', `hash-v1-${dimensions}`]);
      assert.deepEqual([...result], expected(TEXTS, dimensions));
    }
    assert.deepEqual(events, ['hash-v1-384', 'hash-v1-384', 'hash-v1-32']);
    // Another model's vectors are never made up, whatever the policy.
    await assert.rejects(client.embed(TEXTS, { model: 'text-embedding-3-small' }), {
      code: 'unreachable', message: /asked for model "text-embedding-3-small"/,
    });
  }
  const never = await orphanClient({ fallback: 'never' });
  await assert.rejects(never.embed(TEXTS, { model: 'hash' }), { message: /fallback is off/ });
});

test('a named hash model falls back even after an ML model answered', { timeout: 20_000 }, async () => {
  const peer = await recordingServer({ model: 'all-MiniLM-L6-v2', backend: 'sentence-transformers' });
  const client = new EmbedServeClient({ url: peer.url, autoStart: false, retries: 0 });
  assert.equal((await client.embed(TEXTS)).model, 'all-MiniLM-L6-v2');
  await peer.close();
  // Calls that name no model get no fallback: the default model was an ML one ...
  await assert.rejects(client.embed(TEXTS), { message: /all-MiniLM-L6-v2/ });
  // ... but a call that names the hash tier asks for exactly what the fallback makes.
  const result = await client.embed(TEXTS, { model: 'hash-v1-384' });
  assert.deepEqual([result.source, result.model], ['fallback', 'hash-v1-384']);
  assert.deepEqual([...result], expected(TEXTS));
});

test("a name the server gave its hash tier falls back to that tier's vectors", { timeout: 30_000 }, async () => {
  const server = await startServer(['--dimensions', '32', '--served-model-name', 'small,large']);
  const client = new EmbedServeClient(clientOptions({ url: server.url, autoStart: false, retries: 0 }));
  let served;
  let listed;
  try {
    served = await client.embed(TEXTS, { model: 'large' });
    listed = 'models' in await client.info();
  } finally {
    await server.stop();
  }
  try {
    // Its /info said which model that is: hash-v1-32, whose vectors the fallback makes.
    const local = await client.embed(TEXTS, { model: 'hash-v1-32' });
    assert.deepEqual([local.source, [...local]], ['fallback', [...served]]);
    assert.equal((await client.embed(TEXTS, { model: 'hash' }))[0].length, 32); // the server's hash tier
    if (listed) { // a server whose /info lists its models' names: those names too
      const byName = await client.embed(TEXTS, { model: 'large' });
      assert.deepEqual([byName.source, byName.model, [...byName]], ['fallback', 'small', [...served]]);
    }
  } finally {
    await client.close();
  }
});

test('two models in one server, each by name: its own vectors, and a fallback for the hash tier only', { timeout: 300_000 }, async (t) => {
  const tinyModel = makeTinyModel(scratch);
  if (!tinyModel) return t.skip('needs the ML extra (torch, sentence-transformers) in that Python');
  const server = await startServer(['--backend', 'sentence-transformers', '--model', 'hash', '--model', tinyModel,
    '--served-model-name', 'hashy', '--served-model-name', 'tiny,mini'], { timeoutMs: 120_000 });
  const client = new EmbedServeClient(clientOptions({ url: server.url, autoStart: false, retries: 0 }));
  let byDefault;
  try {
    if (!((await client.info()).models?.length >= 2)) {
      return t.skip('this server serves one model (several --model flags need the multi-model server)');
    }
    assert.deepEqual(await client.models(), ['hashy', 'tiny', 'mini']);
    byDefault = await client.embed(TEXTS);
    assert.deepEqual([byDefault.model, byDefault.backend, byDefault[0].length], ['hashy', 'hash', 384]);
    assert.deepEqual([...byDefault], expected(TEXTS));
    const tier = await client.embed(TEXTS, { model: 'hash' }); // what --model hash serves, by any name
    assert.deepEqual([tier.model, [...tier]], ['hashy', expected(TEXTS)]);
    const ml = await client.embed(TEXTS, { model: 'mini' });
    assert.deepEqual([ml.model, ml.backend, ml[0].length, ml.source], ['tiny', 'sentence-transformers', 32, 'server']);
    // Split into requests of two texts, every one for the model the call named.
    const chunked = new EmbedServeClient(clientOptions({ url: server.url, autoStart: false, batchSize: 2 }));
    const split = await chunked.embed(['a', 'b', 'c', 'd', 'e'], { model: 'mini' });
    await chunked.close();
    assert.deepEqual([split.model, split.length, split[0].length], ['tiny', 5, 32]);
    await assert.rejects(client.embed(TEXTS, { model: 'huge' }), { code: 'model_not_found', available: ['hashy', 'tiny', 'mini'] });
  } finally {
    await server.stop();
  }
  try {
    // Gone: the ML model's vectors are never made up; the hash tier's are its own.
    await assert.rejects(client.embed(TEXTS, { model: 'mini' }), { message: /asked for model "mini"/ });
    const local = await client.embed(TEXTS, { model: 'hashy' });
    assert.deepEqual([local.source, local.model, [...local]], ['fallback', 'hashy', [...byDefault]]);
    const fallback = await client.embed(TEXTS); // the default model is the hash tier, as /info said
    assert.deepEqual([fallback.source, fallback.model, [...fallback]], ['fallback', 'hashy', [...byDefault]]);
  } finally {
    await client.close();
  }
});

test('a later client does not stand hash vectors in for the model its server last served; the Python client reads the same memory', { timeout: 60_000 }, async () => {
  const peer = await recordingServer({ model: 'all-MiniLM-L6-v2', backend: 'sentence-transformers' });
  const first = new EmbedServeClient({ url: peer.url, autoStart: false, retries: 0 });
  assert.equal((await first.embed(TEXTS)).source, 'server');
  await first.close();
  await peer.close();
  const file = join(process.env.EMBEDSERVE_STATE_DIR, 'served-models.json');
  assert.equal(JSON.parse(readFileSync(file, 'utf8')).servers[peer.url].info.model, 'all-MiniLM-L6-v2');

  // A client of another process would know no more than this fresh one.
  const later = new EmbedServeClient({ url: peer.url, autoStart: false, retries: 0 });
  await assert.rejects(later.embed(TEXTS), {
    code: 'unreachable',
    message: /the server's model is all-MiniLM-L6-v2 \(what it last said it serves, kept in .*served-models\.json\)/,
  });
  const anyway = new EmbedServeClient({ url: peer.url, autoStart: false, retries: 0, fallback: 'always' });
  assert.equal((await anyway.embed(TEXTS)).source, 'fallback');
  // The Python CLI, run as a script runs it, goes by the file the Node client wrote.
  const env = { ...process.env, PYTHONPATH: REPO_ROOT, HF_HUB_OFFLINE: '1' };
  delete env.EMBEDSERVE_BACKEND;
  const run = spawnSync(PYTHON, ['-m', 'embedserve', 'embed', '--url', peer.url, '--no-autostart', '--timeout', '5', 'x'],
    { env, encoding: 'utf8', timeout: 50_000 });
  assert.equal(run.status, 1, run.stderr);
  assert.match(run.stderr, /all-MiniLM-L6-v2/);
  assert.equal(run.stdout, '');

  // Nothing remembered: nothing known to mix with, as before.
  rmSync(file);
  assert.equal((await new EmbedServeClient({ url: peer.url, autoStart: false, retries: 0 }).embed(TEXTS)).source, 'fallback');
});

test('a private server on port 0 is not remembered (its port is another at every start)', { timeout: 30_000 }, async () => {
  const client = new EmbedServeClient(clientOptions({ port: 0, fallback: 'never' }));
  try {
    assert.equal((await client.embed(TEXTS)).source, 'server');
  } finally {
    await client.close();
  }
  assert.ok(!existsSync(join(process.env.EMBEDSERVE_STATE_DIR, 'served-models.json')));
});
