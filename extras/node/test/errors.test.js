// Clear errors: a bad URL, nothing to talk to, a server that never becomes ready or dies
// while starting, a validation error from the server, something else on the port; and the
// retry policy (429/503 retried with backoff, 4xx raised at once, timeouts bounded).

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createServer as createNetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { EmbedServeClient, EmbedServeError } from '../index.js';
import { MAX_RESPONSE_BYTES, retryAfterMs } from '../lib/http.js';
import {
  PYTHON, REPO_ROOT, assertStopped, clientOptions, freePort, portIsFree, serverEnv, startServer, waitFor,
} from '../test-support/helpers.js';

const scratch = mkdtempSync(join(tmpdir(), 'embedserve-node-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

/** A stand-in "python" that logs a line, writes its pid to a file, and never gets ready. */
function neverReadyPython() {
  const path = join(scratch, 'python-never-ready');
  const pidFile = join(scratch, 'never-ready.pid');
  writeFileSync(path, `#!/bin/sh\necho "loading a very large model..." >&2\necho $$ > ${pidFile}\nexec sleep 60\n`,
    { mode: 0o755 });
  return { path, pidFile };
}

/** A local HTTP peer for behaviours a real server does not show on demand. */
async function fakeServer(handler) {
  const server = createServer(handler);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${server.address().port}`;
  return {
    url,
    close: () => new Promise((resolve) => {
      server.closeAllConnections();
      server.close(resolve);
    }),
  };
}

function json(res, status, body, headers = {}) {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify(body));
}

test('a bad URL is an invalid_option error at construction', () => {
  for (const url of ['not a url', 'ftp://127.0.0.1:8765', 'http://127.0.0.1:8765/?x=1', 'http://user:pw@127.0.0.1:1']) {
    assert.throws(() => new EmbedServeClient({ url }),
      (error) => error instanceof EmbedServeError && error.code === 'invalid_option' &&
        error.message.includes(JSON.stringify(url)));
  }
  assert.throws(() => new EmbedServeClient({ fallback: 'sometimes' }), /fallback.*same-model, always, never/);
  assert.throws(() => new EmbedServeClient({ retries: -1 }), { code: 'invalid_option' });
  assert.throws(() => new EmbedServeClient({ retryTimeoutMs: -1 }), { code: 'invalid_option', message: /retryTimeoutMs/ });
  assert.throws(() => new EmbedServeClient({ timeout: 5 }), { code: 'invalid_option', message: /timeout: not an option/ });
});

test('a bad EMBEDSERVE_* setting is an invalid_option error at construction, as the server refuses it', { timeout: 60_000 }, async () => {
  const bad = [
    ['EMBEDSERVE_DIMENSIONS', 'abc'], ['EMBEDSERVE_DIMENSIONS', '0'], ['EMBEDSERVE_DIMENSIONS', '-3'],
    ['EMBEDSERVE_DIMENSIONS', '1.5'], ['EMBEDSERVE_DIMENSIONS', ''], ['EMBEDSERVE_BACKEND', 'bogus'],
    ['EMBEDSERVE_BACKEND', ''],
  ];
  for (const [key, value] of bad) {
    const named = { code: 'invalid_option', message: new RegExp(`${key}=${JSON.stringify(value)}`) };
    assert.throws(() => new EmbedServeClient({ autoStart: false, env: { [key]: value } }), named);
    process.env[key] = value;
    try {
      assert.throws(() => new EmbedServeClient({ autoStart: false }), named);
    } finally {
      delete process.env[key];
    }
    // The server refuses the same value (exit 2: a usage error).
    const { status } = spawnSync(PYTHON, ['-m', 'embedserve', '--port', '0'], {
      cwd: REPO_ROOT, env: { ...process.env, ...serverEnv(), [key]: value }, timeout: 30_000,
    });
    assert.equal(status, 2, `${key}=${JSON.stringify(value)}`);
  }
  // A good value is read as the server reads it (int(' 32 ') is 32): the fallback's size.
  const port = await freePort();
  const client = new EmbedServeClient({ url: `http://127.0.0.1:${port}`, autoStart: false, env: { EMBEDSERVE_DIMENSIONS: ' 32 ' } });
  const vectors = await client.embed(['x']);
  assert.deepEqual([vectors.source, vectors.model, vectors[0].length], ['fallback', 'hash-v1-32', 32]);
});

test('nothing answers and autoStart is off: unreachable, at once', { timeout: 10_000 }, async () => {
  const port = await freePort();
  const client = new EmbedServeClient({ url: `http://127.0.0.1:${port}`, autoStart: false, fallback: 'never' });
  const startedAt = Date.now();
  await assert.rejects(client.embed(['x']), (error) => {
    assert.equal(error.code, 'unreachable');
    assert.equal(error.serverUnavailable, true);
    assert.match(error.message, new RegExp(`no embedserve server answers at http://127.0.0.1:${port} .*ECONNREFUSED.*autoStart is off`));
    assert.match(error.message, /no fallback: fallback is off/);
    return true;
  });
  assert.ok(Date.now() - startedAt < 2000);
  assert.ok(await portIsFree(port));
});

test('a client that starts nothing waits retryTimeoutMs for a server stuck loading, not startTimeoutMs', { timeout: 20_000 }, async () => {
  // It waited startTimeoutMs (60 s here) whatever timeoutMs and retryTimeoutMs said.
  const peer = await fakeServer((req, res) => json(res, 503, { error: 'loading' }));
  try {
    const client = new EmbedServeClient({
      url: peer.url, autoStart: false, fallback: 'never', retryTimeoutMs: 1000, startTimeoutMs: 60_000,
    });
    const startedAt = Date.now();
    await assert.rejects(client.embed(['x']), { code: 'start_timeout', message: /within 1000 ms/ });
    assert.ok(Date.now() - startedAt < 8000);
  } finally {
    await peer.close();
  }
});

test('a server is never started for a remote URL', { timeout: 10_000 }, async () => {
  // 192.0.2.0/24 is TEST-NET-1: nothing there answers.
  const client = new EmbedServeClient({ url: 'http://192.0.2.1:8765', healthTimeoutMs: 300, retries: 1, fallback: 'never' });
  await assert.rejects(client.embed(['x']), { code: 'unreachable', message: /only started for http:\/\/ on this machine/ });
});

test('a server that never becomes ready: start_timeout with its last output, and it is killed', { timeout: 20_000 }, async () => {
  const port = await freePort();
  const { path, pidFile } = neverReadyPython();
  const client = new EmbedServeClient(clientOptions({
    url: `http://127.0.0.1:${port}`, python: path, startTimeoutMs: 1500, fallback: 'never',
  }));
  const startedAt = Date.now();
  await assert.rejects(client.embed(['x']), (error) => {
    assert.equal(error.code, 'start_timeout');
    assert.match(error.message, /did not become ready within \d+ ms/);
    assert.match(error.message, /loading a very large model/);
    assert.deepEqual(error.serverLog, ['loading a very large model...']);
    return true;
  });
  assert.ok(Date.now() - startedAt < 6000);
  const pid = Number(readFileSync(pidFile, 'utf8'));
  await assertStopped([pid], port);
});

test('a server that exits while starting: start_failed with its error output', { timeout: 20_000 }, async () => {
  const client = new EmbedServeClient(clientOptions({
    url: `http://127.0.0.1:${await freePort()}`, serverArgs: ['--backend', 'no-such-backend'], fallback: 'never',
  }));
  await assert.rejects(client.embed(['x']), (error) => {
    assert.equal(error.code, 'start_failed');
    assert.match(error.message, /exited with code 2 before it was ready/);
    assert.match(error.message, /invalid choice: 'no-such-backend'/);
    return true;
  });
  assert.equal(client.ownsServer, false);
});

test('a python that does not exist: start_failed that says how to fix it', { timeout: 10_000 }, async () => {
  const client = new EmbedServeClient(clientOptions({
    url: `http://127.0.0.1:${await freePort()}`, python: join(scratch, 'no-python-here'), fallback: 'never',
  }));
  await assert.rejects(client.embed(['x']), {
    code: 'start_failed', message: /ENOENT.*Set the `python` option or EMBEDSERVE_PYTHON/s,
  });
});

test('a python without embedserve: start_failed that says how to fix it', { timeout: 20_000 }, async () => {
  // python -S: no site-packages, so not even an editable install of embedserve is found.
  const python = join(scratch, 'python-without-site');
  writeFileSync(python, `#!/bin/sh\nexec ${clientOptions().python} -S "$@"\n`, { mode: 0o755 });
  const client = new EmbedServeClient({ url: `http://127.0.0.1:${await freePort()}`, python, cwd: scratch, fallback: 'never' });
  await assert.rejects(client.embed(['x']), (error) => {
    assert.equal(error.code, 'start_failed');
    assert.match(error.message, /exited with code 1 before it was ready/);
    assert.match(error.message, /Install it for .* \(pip install embedserve\)/);
    assert.match(error.message, /No module named embedserve/);
    return true;
  });
});

describeServer();

function describeServer() {
  let server;
  let client;
  before(async () => {
    server = await startServer(['--max-batch-size', '2']);
    client = new EmbedServeClient(clientOptions({ url: server.url, autoStart: false }));
  });
  after(async () => {
    await client?.close();
    await server?.stop();
  });

  test('a validation error from the server is raised at once, with its message', { timeout: 10_000 }, async () => {
    let fellBack = false;
    client.on('fallback', () => { fellBack = true; });
    await assert.rejects(client.embed(['fine', 'texts'], { dimensions: 1000 }), (error) => {
      assert.ok(error instanceof EmbedServeError);
      assert.equal(error.code, 'validation');
      assert.equal(error.serverUnavailable, false);
      assert.equal(error.status, 422);
      assert.equal(error.param, 'dimensions');
      assert.equal(error.type, 'invalid_request_error');
      assert.match(error.serverMessage, /'dimensions' must be between 1 and 384/);
      assert.match(error.message, /^422 invalid_value: 'dimensions' must be between 1 and 384/);
      return true;
    });
    assert.equal(fellBack, false); // never hidden by a fallback
  });
}

test('something else on the port: not_embedserve, and nothing is started', { timeout: 10_000 }, async () => {
  const peer = await fakeServer((req, res) => json(res, 404, { message: 'no such thing' }));
  try {
    const client = new EmbedServeClient(clientOptions({ url: peer.url, fallback: 'never' }));
    await assert.rejects(client.embed(['x']), { code: 'not_embedserve', message: /answered 404/ });
    assert.equal(client.ownsServer, false);
  } finally {
    await peer.close();
  }
});

/** A peer that acts as a ready embedserve and answers embeddings with `onEmbed`. */
function fakeEmbedServe(onEmbed) {
  return fakeServer((req, res) => {
    if (req.url === '/health') return json(res, 200, { status: 'ok' });
    if (req.url === '/info') {
      return json(res, 200, {
        backend: 'hash', model: 'hash-v1-4', dimensions: 4, max_batch_size: 8, pid: 1,
        models: [{ names: ['hash-v1-4'], model: 'hash-v1-4', kind: 'embedding', backend: 'hash', dimensions: 4 }],
      });
    }
    let body = '';
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => onEmbed(req, res, JSON.parse(body)));
  });
}

function answer(res, input) {
  json(res, 200, {
    object: 'list',
    model: 'hash-v1-4',
    data: input.map((_, index) => ({ object: 'embedding', index, embedding: [index, 0, 0, 1] })),
    usage: { prompt_tokens: 1, total_tokens: 1 },
  });
}

test('429 and 503 are retried with backoff (Retry-After honoured), then succeed', { timeout: 10_000 }, async () => {
  const seen = [];
  const peer = await fakeEmbedServe((req, res, body) => {
    seen.push(Date.now());
    if (seen.length === 1) return json(res, 429, { error: { message: 'busy' } }, { 'retry-after': '1' });
    if (seen.length === 2) return json(res, 503, { error: { message: 'draining' } });
    return answer(res, body.input);
  });
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, backoffMs: 20, maxBackoffMs: 2000 });
    const vectors = await client.embed(['a', 'b']);
    assert.deepEqual([...vectors], [[0, 0, 0, 1], [1, 0, 0, 1]]);
    assert.equal(seen.length, 3);
    assert.ok(seen[1] - seen[0] >= 950, 'waited Retry-After: 1');
  } finally {
    await peer.close();
  }
});

test('retries are bounded: the last error is raised', { timeout: 10_000 }, async () => {
  let calls = 0;
  const peer = await fakeEmbedServe((req, res) => {
    calls++;
    json(res, 503, { error: { message: 'still loading', type: 'server_error', code: 'service_unavailable' } });
  });
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, retries: 2, backoffMs: 10, fallback: 'never' });
    await assert.rejects(client.embed(['a']), {
      code: 'unavailable', status: 503, serverMessage: 'still loading',
      message: /POST http:.*\/v1\/embeddings failed 3 times in [\d.]+ s; last: HTTP 503: still loading/,
    });
    assert.equal(calls, 3);
  } finally {
    await peer.close();
  }
});

test('retries end at retryTimeoutMs: a server that stays 503 fails the call then, not before', { timeout: 10_000 }, async () => {
  const seen = [];
  const peer = await fakeEmbedServe((req, res) => {
    seen.push(Date.now());
    json(res, 503, { error: { message: 'loading' } }, { 'retry-after': '0.1' });
  });
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, retryTimeoutMs: 700, fallback: 'never' });
    const startedAt = Date.now();
    await assert.rejects(client.embed(['a']), { code: 'unavailable', status: 503, message: /failed \d+ times in/ });
    // Retried for the whole retryTimeoutMs (Retry-After: 0.1 s apart), and no longer.
    assert.ok(seen.length >= 2, `${seen.length} attempts`);
    assert.ok(seen.at(-1) - startedAt >= 600, 'still retrying near the deadline');
  } finally {
    await peer.close();
  }
});

test('4xx is not retried', { timeout: 10_000 }, async () => {
  let calls = 0;
  const peer = await fakeEmbedServe((req, res) => {
    calls++;
    json(res, 422, { error: { message: "'dimensions' must be between 1 and 4", param: 'dimensions' } });
  });
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, retries: 5 });
    await assert.rejects(client.embed(['a']), { code: 'validation', status: 422, param: 'dimensions' });
    assert.equal(calls, 1);
  } finally {
    await peer.close();
  }
});

test('a request that gets no answer times out (AbortSignal.timeout), retries included', { timeout: 10_000 }, async () => {
  let calls = 0;
  const peer = await fakeEmbedServe(() => { calls++; /* never answers */ });
  try {
    const client = new EmbedServeClient({
      url: peer.url, autoStart: false, timeoutMs: 200, retries: 1, backoffMs: 10, fallback: 'never',
    });
    const startedAt = Date.now();
    await assert.rejects(client.embed(['a']), { code: 'timeout', message: /failed 2 times in [\d.]+ s; last: no answer from .* within 200 ms/ });
    assert.equal(calls, 2);
    assert.ok(Date.now() - startedAt < 2000);
  } finally {
    await peer.close();
  }
});

test('a server error in one request of a split call says which texts it covered', { timeout: 10_000 }, async () => {
  let calls = 0;
  const peer = await fakeEmbedServe((req, res, body) => {
    calls++;
    if (calls === 1) return answer(res, body.input);
    return json(res, 400, { error: { message: "'input[1]' is not acceptable", param: 'input', code: 'invalid_request' } });
  });
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, batchSize: 2 });
    await assert.rejects(client.embed(['a', 'b', 'c', 'd']), (error) => {
      assert.equal(error.code, 'validation');
      assert.equal(error.inputOffset, 2);
      assert.match(error.message, /^400 invalid_request: 'input\[1\]' is not acceptable \(in the request for texts\[2:\]\)$/);
      return true;
    });
  } finally {
    await peer.close();
  }
});

test('a malformed answer is a bad_response error', { timeout: 10_000 }, async () => {
  const peer = await fakeEmbedServe((req, res) => json(res, 200, { data: [] }));
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false });
    await assert.rejects(client.embed(['a']), { code: 'bad_response' });
  } finally {
    await peer.close();
  }
});

test('vectors of mixed sizes, or of another size than asked, are a bad_response error', { timeout: 10_000 }, async () => {
  // Accepted before: one call could return vectors of two models.
  const peer = await fakeEmbedServe((req, res, body) => json(res, 200, {
    object: 'list', model: 'hash-v1-4', usage: { prompt_tokens: 1, total_tokens: 1 },
    data: body.input.map((_, index) => ({ object: 'embedding', index, embedding: index ? [1, 0, 0, 0] : [1, 0] })),
  }));
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, fallback: 'never' });
    await assert.rejects(client.embed(['a', 'b']), { code: 'bad_response', message: /vectors of 2, 4 values$/ });
    await assert.rejects(client.embed(['b'], { dimensions: 3 }), { code: 'bad_response', message: /vectors of 2 values, not 3$/ });
  } finally {
    await peer.close();
  }
});

test('a client closed while its server starts stops it and says closed', { timeout: 20_000 }, async () => {
  const port = await freePort();
  const client = new EmbedServeClient(clientOptions({ url: `http://127.0.0.1:${port}` }));
  let pid;
  client.on('serverSpawn', (event) => { pid = event.pid; });
  const pending = client.embed(['x']);
  await waitFor(() => pid !== undefined, 'the server to be spawned');
  const closing = client.close();
  await assert.rejects(pending, { code: 'closed' });
  await closing;
  await assertStopped([pid], port);
});

test('a port written in the URL is the one used, the scheme\'s own included (":80" read as 8765 before)', () => {
  const cases = [['http://127.0.0.1:80', 'http://127.0.0.1:80'], ['http://[::1]:80/x', 'http://[::1]:80/x'],
    ['http://127.0.0.1', 'http://127.0.0.1:8765'], ['https://h:443', 'https://h:443'], ['https://h', 'https://h:443'],
    ['127.0.0.1:9000', 'http://127.0.0.1:9000']];
  for (const [given, used] of cases) {
    assert.equal(new EmbedServeClient({ url: given, autoStart: false }).url, used, given);
  }
});

/** float32 values as the server's base64 encoding_format sends them. */
function base64Of(values) {
  return Buffer.from(new Float32Array(values).buffer).toString('base64');
}

test('vectors that cannot be embeddings are a bad_response error', { timeout: 20_000 }, async () => {
  // Accepted before: strings, null, booleans, NaN and infinities as values, empty vectors,
  // and vectors of another size than /info gives the model that answered.
  let embedding;
  let model = 'hash-v1-4';
  const peer = await fakeEmbedServe((req, res, body) => json(res, 200, {
    object: 'list', model, usage: { prompt_tokens: 1, total_tokens: 1 },
    data: body.input.map((_, index) => ({ object: 'embedding', index, embedding: embedding(index) })),
  }));
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, fallback: 'never', retries: 0 });
    const bad = [
      [() => ['0.5', 0, 0, 1], /embedding 0 holds a value that is not a finite number/],
      [() => [null, 0, 0, 1], /not a finite number/],
      [() => [true, false, true, true], /not a finite number/],
      [() => base64Of([NaN, 0, 0, 1]), /base64 embedding holds a value that is not a finite number/],
      [() => base64Of([0, Infinity, 0, 1]), /not a finite number/],
      [() => base64Of([0, 0, 1]).slice(0, 8), /not a whole number of float32 values/], // 6 bytes
      [() => [], /empty vectors/],
      [() => base64Of([]), /empty vectors/],
      [() => [0, 0, 1], /vectors of 3 values, not the 4 that \/info gives hash-v1-4/],
    ];
    for (const [make, message] of bad) {
      embedding = make;
      await assert.rejects(client.embed(['a', 'b']), (error) => {
        assert.equal(error.code, 'bad_response');
        assert.ok(error.message.includes(peer.url), error.message);
        assert.match(error.message, message);
        return true;
      });
    }
    // /info's size binds only the model it describes; `dimensions` binds any.
    embedding = () => [0, 0, 1];
    model = 'another-model';
    assert.deepEqual([...await client.embed(['a'])], [[0, 0, 1]]);
    await assert.rejects(client.embed(['a'], { dimensions: 2 }), { code: 'bad_response', message: /vectors of 3 values, not 2$/ });
  } finally {
    await peer.close();
  }
});

test('each request of a split call gets one vector per text it sent', { timeout: 10_000 }, async () => {
  // One short and one over would add up to the call's count.
  let calls = 0;
  const peer = await fakeEmbedServe((req, res, body) => {
    calls++;
    answer(res, calls === 1 ? body.input.slice(1) : [...body.input, 'extra']);
  });
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, fallback: 'never', batchSize: 2 });
    await assert.rejects(client.embed(['a', 'b', 'c', 'd']),
      { code: 'bad_response', message: /1 embeddings for the 2 texts of one request/ });
  } finally {
    await peer.close();
  }
});

test('a Retry-After that is no positive wait is ignored: the normal backoff applies, never no delay', { timeout: 30_000 }, async () => {
  for (const value of ['0', '-5', '', 'garbage', 'x-5', 'Wed, 21 Oct 2015 07:28:00 GMT', 'Infinity']) {
    assert.equal(retryAfterMs(new Headers({ 'retry-after': value })), undefined, JSON.stringify(value));
  }
  assert.equal(retryAfterMs(new Headers({ 'retry-after': '1.5' })), 1500);
  const future = new Date(Date.now() + 60_000).toUTCString(); // IMF-fixdate
  assert.ok(retryAfterMs(new Headers({ 'retry-after': future })) > 50_000);

  // A reviewer saw ~890 requests in 3 s with 'Retry-After: 0'. With backoff of at least
  // 50 ms (100 ms halved by the jitter), 600 ms hold a dozen at most.
  for (const value of ['0', '-5', '', 'Wed, 21 Oct 2015 07:28:00 GMT']) {
    let calls = 0;
    const peer = await fakeEmbedServe((req, res) => {
      calls++;
      json(res, 503, { error: { message: 'busy' } }, { 'retry-after': value });
    });
    try {
      const client = new EmbedServeClient({
        url: peer.url, autoStart: false, fallback: 'never', retryTimeoutMs: 600, backoffMs: 100, maxBackoffMs: 100,
      });
      await assert.rejects(client.embed(['a']), { code: 'unavailable' });
      assert.ok(calls >= 2 && calls <= 14, `Retry-After ${JSON.stringify(value)}: ${calls} requests in 600 ms`);
    } finally {
      await peer.close();
    }
  }
});

test('an answer over 256 MiB is a bad_response naming the limit, not buffered whole', { timeout: 60_000 }, async () => {
  // A valid answer padded with spaces past the limit: accepted before, however big.
  const answerText = JSON.stringify({
    object: 'list', model: 'hash-v1-4', data: [{ object: 'embedding', index: 0, embedding: [0, 0, 0, 1] }],
  });
  const pad = Buffer.alloc(1024 * 1024, ' ');
  let aborted = false;
  const peer = await fakeEmbedServe(async (req, res) => {
    res.on('close', () => { aborted = !res.writableFinished; });
    res.writeHead(200, { 'content-type': 'application/json' });
    res.write(answerText.slice(0, 1));
    // 32 MiB past the limit: more than the sockets' buffers hold, so the client must stop reading.
    for (let sent = 0; sent < MAX_RESPONSE_BYTES + 32 * pad.length && !res.destroyed; sent += pad.length) {
      if (!res.write(pad)) await new Promise((resolve) => { res.once('drain', resolve); res.once('close', resolve); });
    }
    res.end(answerText.slice(1));
  });
  try {
    assert.equal(MAX_RESPONSE_BYTES, 256 * 1024 * 1024);
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, fallback: 'never', retries: 0 });
    await assert.rejects(client.embed(['a']), (error) => {
      assert.equal(error.code, 'bad_response');
      assert.match(error.message, /its body is larger than 256 MiB, the most this client reads/);
      assert.ok(error.message.includes(peer.url), error.message);
      return true;
    });
    await waitFor(() => aborted, 'the client to drop the connection');
  } finally {
    await peer.close();
  }
});

test('a redirect is an http_error naming its Location: not followed, not retried', { timeout: 10_000 }, async () => {
  // fetch followed 302 and 307 to another origin, and returned its vectors.
  let elsewhere = 0;
  const other = await fakeEmbedServe((req, res, body) => {
    elsewhere++;
    answer(res, body.input);
  });
  for (const status of [301, 302, 307, 308]) {
    let calls = 0;
    const peer = await fakeEmbedServe((req, res) => {
      calls++;
      res.writeHead(status, { location: `${other.url}/v1/embeddings` });
      res.end();
    });
    try {
      const client = new EmbedServeClient({ url: peer.url, autoStart: false, fallback: 'always', retries: 3, apiKey: 'secret' });
      await assert.rejects(client.embed(['a']), (error) => {
        assert.equal(error.code, 'http_error');
        assert.equal(error.status, status);
        assert.equal(error.serverUnavailable, false); // no fallback hides it
        assert.ok(error.message.includes(`Location: ${other.url}/v1/embeddings`), error.message);
        assert.match(error.message, /embedserve servers do not redirect: give the client the final URL/);
        return true;
      });
      assert.equal(calls, 1);
    } finally {
      await peer.close();
    }
  }
  assert.equal(elsewhere, 0);
  await other.close();
});

test('a program on the port that does not speak HTTP: not_embedserve at once, not start_timeout', { timeout: 30_000 }, async () => {
  const sockets = new Set();
  const banner = createNetServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.write('SSH-2.0-OpenSSH_9.6\r\n'); // and then waits, as sshd does
  });
  await new Promise((resolve) => banner.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${banner.address().port}`;
  try {
    const client = new EmbedServeClient(clientOptions({ url, fallback: 'never', startTimeoutMs: 10_000 }));
    const startedAt = Date.now();
    await assert.rejects(client.embed(['x']), {
      code: 'not_embedserve', message: /answered something that is not HTTP/,
    });
    assert.ok(Date.now() - startedAt < 3000, `${Date.now() - startedAt} ms`);
    assert.equal(client.ownsServer, false);
    assert.equal((await client.health()).status, 'not_embedserve');
  } finally {
    for (const socket of sockets) socket.destroy();
    await new Promise((resolve) => banner.close(resolve));
  }
});

test('the size /info gives a model binds its answers by the served name, not the default id', { timeout: 10_000 }, async () => {
  // /info's top-level model is the default's id (a folder for a local model); answers carry
  // the served name. The check compared the two, so it never held for such a model.
  const peer = await fakeServer((req, res) => {
    if (req.url === '/health') return json(res, 200, { status: 'ok' });
    if (req.url === '/info') {
      return json(res, 200, {
        backend: 'sentence-transformers', model: '/models/mini', dimensions: 4, max_batch_size: 8, pid: 1,
        models: [{ names: ['mini'], model: '/models/mini', kind: 'embedding', backend: 'sentence-transformers', dimensions: 4 }],
      });
    }
    req.resume();
    req.on('end', () => json(res, 200, {
      object: 'list', model: 'mini', usage: { prompt_tokens: 1, total_tokens: 1 },
      data: [{ object: 'embedding', index: 0, embedding: [0, 0, 1] }],
    }));
  });
  try {
    const client = new EmbedServeClient({ url: peer.url, autoStart: false, fallback: 'never', retries: 0 });
    await assert.rejects(client.embed(['a']), {
      code: 'bad_response', message: /vectors of 3 values, not the 4 that \/info gives mini/,
    });
  } finally {
    await peer.close();
  }
});
