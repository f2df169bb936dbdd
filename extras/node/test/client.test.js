// embed(), embedSingle(), health() and info() against a real `python -m embedserve` that
// the test started itself (so the client must leave it running).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { EmbedServeClient, HashEmbedder, NomicEmbedder } from '../index.js';
import {
  PYTHON, clientOptions, loadGolden, processGone, serverEnv, startServer,
} from '../test-support/helpers.js';

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

/** Whether this runtime parses `await using` (explicit resource management). */
function supportsAwaitUsing() {
  try {
    // eslint-disable-next-line no-new-func
    new Function('return async () => { await using resource = null; };');
    return true;
  } catch {
    return false;
  }
}

/** Run a Node program; resolves to {code, signal, stdout, stderr}. */
function runNode(file, env) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [file], { cwd: join(file, '..'), env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => { stdout += chunk; });
    child.stderr.on('data', (chunk) => { stderr += chunk; });
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

test('every JavaScript example of README.md runs as written', { timeout: 180_000 }, async (t) => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
  // ```js examples must run on this Node as they are; the ```ts one is the same JavaScript
  // with `await using`, which TypeScript 5.2+ compiles for Node 20 and only some runtimes
  // parse themselves: it runs where this one can.
  const examples = [...readme.matchAll(/^```(js|ts)\n([\s\S]*?)^```$/gm)]
    .map(([, lang, code]) => ({ lang, code }));
  assert.ok(examples.filter((e) => e.lang === 'js').length >= 3, `${examples.length} examples found`);
  // A project that installed this package: `import ... from 'embedserve'` resolves to it.
  const project = mkdtempSync(join(tmpdir(), 'embedserve-readme-'));
  try {
    mkdirSync(join(project, 'node_modules'));
    symlinkSync(fileURLToPath(new URL('..', import.meta.url)), join(project, 'node_modules', 'embedserve'), 'dir');
    writeFileSync(join(project, 'package.json'), '{ "type": "module" }\n');
    // The examples' default server is the test's (EMBEDSERVE_URL); one that starts a private
    // server runs this checkout's embedserve with EMBEDSERVE_PYTHON.
    const env = { ...process.env, ...serverEnv(), EMBEDSERVE_URL: server.url, EMBEDSERVE_PYTHON: PYTHON };
    let ran = 0;
    const problems = [];
    for (const [i, { lang, code }] of examples.entries()) {
      if (lang === 'ts' && !supportsAwaitUsing()) {
        t.diagnostic(`example ${i + 1} (await using) not run: Node ${process.version} cannot parse it`);
        continue;
      }
      const file = join(project, `example-${i + 1}.js`);
      writeFileSync(file, code);
      const result = await runNode(file, env);
      if (result.code !== 0 || result.signal !== null) {
        problems.push(`example ${i + 1} failed (${result.code ?? result.signal}):\n${code}\n${result.stderr}`);
      } else if (result.stdout === '') {
        problems.push(`example ${i + 1} printed nothing:\n${code}`);
      }
      ran++;
    }
    assert.deepEqual(problems, []);
    assert.ok(ran >= 3);
  } finally {
    rmSync(project, { recursive: true, force: true });
  }
  assert.equal(processGone(server.pid), false); // the examples left the test's server alone
});

