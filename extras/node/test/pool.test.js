// One client over two servers (the urls option, and EMBEDSERVE_URL="A,B"): 1,000 calls
// spread between them, one server killed mid-run costs no call, and it is used again once
// it is back on its port. Real servers on 127.0.0.1, real SIGKILLs.

import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { afterEach, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { EmbedServeClient } from '../index.js';
import { clientOptions, startServer, waitFor } from '../test-support/helpers.js';

const TEXTS = ['first text', 'second text', 'a third one'];
let servers = [];

afterEach(async () => {
  await Promise.all(servers.map((server) => server.stop()));
  servers = [];
});

/** Embedding requests a server answered 200, from its /metrics (every worker's). */
async function served(server) {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  return text.split('\n')
    .filter((line) => line.startsWith('embedserve_requests_total{') &&
      line.includes('route="/v1/embeddings"') && line.includes('status="200"'))
    .reduce((sum, line) => sum + Number(line.slice(line.lastIndexOf(' ') + 1)), 0);
}

function childrenOf(pid) {
  const found = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[1]) === pid && fields[0] !== 'Z') found.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

/** SIGKILL the supervisor and its workers at once: a crashed machine, not a drain. */
async function killHard(server) {
  const exited = new Promise((done) => server.proc.once('exit', done));
  for (const pid of [...childrenOf(server.pid), server.pid]) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  await exited;
}

/** A new server on `port`, once the killed one's workers have let go of it. */
async function restartOn(port) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      return await startServer(['--port', String(port)]);
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await sleep(200);
    }
  }
}

/** `calls` embed calls, `concurrency` at a time; resolves to the failures. */
async function runCalls(client, calls, concurrency, onCall = () => {}) {
  const failures = [];
  let next = 0;
  const worker = async () => {
    while (next < calls) {
      const number = next++;
      await onCall(number);
      try {
        const vectors = await client.embed(TEXTS);
        assert.equal(vectors.length, 3);
        assert.equal(vectors.source, 'server');
      } catch (error) {
        failures.push(error);
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return failures;
}

test('calls spread over two servers, survive one killed, and return to it', { timeout: 120_000 }, async () => {
  servers = [await startServer(), await startServer()];
  const [first] = servers;
  let second = servers[1];
  const client = new EmbedServeClient(clientOptions({ urls: [first.url, second.url], fallback: 'never' }));
  try {
    assert.equal(client.url, `${first.url},${second.url}`);
    // 1,000 calls, both up: each server gets at least 30% of them.
    assert.deepEqual(await runCalls(client, 1000, 8), []);
    const counts = [await served(first), await served(second)];
    const total = counts[0] + counts[1];
    assert.ok(total >= 1000 && Math.min(...counts) >= 0.3 * total, `counts ${counts}`);

    // One server dies mid-run: no call fails.
    const before = await served(first);
    let killed = false;
    const failures = await runCalls(client, 500, 8, async (number) => {
      if (number === 100) {
        await killHard(second);
        killed = true;
      }
    });
    assert.deepEqual(failures, []);
    assert.ok(killed);
    assert.ok(await served(first) - before >= 390);
    assert.equal(client.ownsServer, false);

    // Back on its port: it serves again once its back-off (at most maxBackoffMs) has passed.
    // Calls go on until it does: a few hundred quick calls may all fall inside the back-off.
    second = await restartOn(second.port);
    servers[1] = second;
    assert.deepEqual(await runCalls(client, 300, 4), []);
    await waitFor(async () => {
      assert.deepEqual(await runCalls(client, 20, 4), []);
      return (await served(second)) > 0;
    }, 'the restarted server to be used');
  } finally {
    await client.close();
  }
});

test('EMBEDSERVE_URL lists several servers; none is started when all are down', { timeout: 60_000 }, async () => {
  servers = [await startServer(), await startServer()];
  const [first, second] = servers;
  process.env.EMBEDSERVE_URL = `${first.url}, ${second.url}`;
  let client;
  try {
    client = new EmbedServeClient(clientOptions({ fallback: 'never', retryTimeoutMs: 500 }));
  } finally {
    delete process.env.EMBEDSERVE_URL;
  }
  try {
    assert.deepEqual(await client.models(), ['hash-v1-384']);
    for (let i = 0; i < 10; i++) await client.embed(TEXTS);
    assert.ok(await served(first) >= 5 && await served(second) >= 5);
    await killHard(first);
    await killHard(second);
    await assert.rejects(client.embed(TEXTS), (error) => error.code === 'unavailable');
    assert.equal(client.ownsServer, false);
  } finally {
    await client.close();
  }
});

test('health of several servers is that of one serving', { timeout: 60_000 }, async () => {
  // It probed the first only: a dead first replica made it fail while the second served.
  servers = [await startServer(), await startServer()];
  const [first, second] = servers;
  const client = new EmbedServeClient(clientOptions({ urls: [first.url, second.url], fallback: 'never' }));
  try {
    await killHard(first);
    assert.equal((await client.health()).ok, true);
    await killHard(second);
    assert.equal((await client.health()).ok, false);
  } finally {
    await client.close();
  }
});

test('bad server lists are refused', () => {
  assert.throws(() => new EmbedServeClient({ urls: [] }), (error) => error.code === 'invalid_option');
  assert.throws(() => new EmbedServeClient({ urls: ['http://127.0.0.1:9', 'http://127.0.0.1:9'] }),
    /listed twice/);
  assert.throws(() => new EmbedServeClient({ urls: ['http://127.0.0.1:9', 'http://127.0.0.1:10'], port: 11 }),
    /applies to one server/);
  assert.throws(() => new EmbedServeClient({ url: 'http://127.0.0.1:9', urls: ['http://127.0.0.1:10'] }),
    /one or the other/);
});
