// The server's life as the client manages it: started when nothing answers, shared when
// two clients start it at once, restarted after a crash, and stopped (only if the client
// started it) on close() and when the program exits, by any way.

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { get } from 'node:http';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { EmbedServeClient } from '../index.js';
import {
  PYTHON, REPO_ROOT, assertStopped, clientOptions, freePort, makeTinyModel, portIsFree,
  processGone, runApp, serverEnv, startServer, waitFor,
} from '../test-support/helpers.js';

/** Whether this embedserve stops when its stdin closes (EMBEDSERVE_WATCH_STDIN). */
function serverWatchesStdin() {
  try {
    const help = execFileSync(PYTHON, ['-m', 'embedserve', '--help'], {
      cwd: REPO_ROOT, env: { ...process.env, ...serverEnv() }, encoding: 'utf8', timeout: 20_000,
    });
    return /--watch-stdin/.test(help);
  } catch {
    return false;
  }
}

test('auto-start when nothing answers; close() stops it: no process left, port free', { timeout: 30_000 }, async () => {
  const port = await freePort();
  const client = new EmbedServeClient(clientOptions({ url: `http://127.0.0.1:${port}` }));
  const started = [];
  client.on('serverStart', (event) => started.push(event));
  try {
    assert.equal((await client.health()).ok, false); // health() never starts one
    const vectors = await client.embed(['start me']);
    assert.equal(vectors.model, 'hash-v1-384');
    assert.equal(client.ownsServer, true);
    assert.equal(started.length, 1);
    assert.equal(started[0].url, `http://127.0.0.1:${port}`);
    const { pid: workerPid } = await client.info();
    const serverPid = client.serverPid;
    assert.equal(serverPid, started[0].pid);
    assert.equal(processGone(serverPid), false);
    assert.equal(await portIsFree(port), false);
    await client.close();
    await assertStopped([serverPid, workerPid], port);
    assert.equal(client.ownsServer, false);
  } finally {
    await client.close();
  }
});

test('url port 0: a private server on a free port', { timeout: 30_000 }, async () => {
  const client = new EmbedServeClient(clientOptions({ url: 'http://127.0.0.1:0' }));
  try {
    await client.embed(['anywhere']);
    const port = Number(new URL(client.url).port);
    assert.ok(port > 0);
    const pid = client.serverPid;
    await client.close();
    await assertStopped([pid], port);
  } finally {
    await client.close();
  }
});

test('two clients starting at once on one port share one server', { timeout: 40_000 }, async () => {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const a = new EmbedServeClient(clientOptions({ url }));
  const b = new EmbedServeClient(clientOptions({ url }));
  try {
    const [va, vb] = await Promise.all([a.embed(['same text']), b.embed(['same text'])]);
    assert.deepEqual(va, vb);
    // Exactly one started the server that serves; the other's lost the port and exited.
    assert.equal(Number(a.ownsServer) + Number(b.ownsServer), 1);
    const [ia, ib] = await Promise.all([a.info(), b.info()]);
    assert.equal(ia.pid, ib.pid);
    const [owner, guest] = a.ownsServer ? [a, b] : [b, a];
    const serverPid = owner.serverPid;
    await guest.close();
    assert.equal(processGone(serverPid), false); // the guest did not stop it
    assert.equal((await owner.health()).ok, true);
    await owner.close();
    await assertStopped([serverPid, ia.pid], port);
  } finally {
    await Promise.all([a.close(), b.close()]);
  }
});

test('a server killed mid-use is restarted; no call fails', { timeout: 40_000 }, async () => {
  const port = await freePort();
  const client = new EmbedServeClient(clientOptions({ url: `http://127.0.0.1:${port}`, retries: 5 }));
  const exits = [];
  client.on('serverExit', (event) => exits.push(event));
  try {
    await client.embed(['warm up']);
    const firstPid = client.serverPid;
    const { pid: firstWorker } = await client.info();

    // Embed continuously while the server is killed under the client's feet.
    let stop = false;
    let calls = 0;
    const load = (async () => {
      while (!stop) {
        const vectors = await client.embed([`call ${calls}`, 'and another text']);
        assert.equal(vectors.length, 2);
        assert.equal(vectors.backend, 'hash'); // the real server, not a fallback
        calls++;
      }
    })();
    await waitFor(() => calls >= 5, 'some calls before the crash');
    process.kill(firstPid, 'SIGKILL');
    await waitFor(() => exits.length === 1, 'the crash to be noticed');
    const callsAtCrash = calls;
    await waitFor(() => calls >= callsAtCrash + 5, 'calls after the crash', 20_000);
    stop = true;
    await load;

    assert.equal(exits[0].pid, firstPid);
    assert.equal(exits[0].signal, 'SIGKILL');
    assert.equal(exits[0].expected, false);
    const secondPid = client.serverPid;
    assert.notEqual(secondPid, firstPid);
    assert.equal(client.ownsServer, true);
    await assertStopped([firstPid, firstWorker]);
    const { pid: secondWorker } = await client.info();
    await client.close();
    await assertStopped([secondPid, secondWorker], port);
  } finally {
    await client.close();
  }
});

test('a worker reloading its model after kill -9: no call fails, none falls back', { timeout: 300_000 }, async (t) => {
  // A model server's replacement worker answers 503 "loading" (Retry-After: 1) while its
  // model loads; calls in flight when the worker died see their connection reset. Both are
  // retried within retryTimeoutMs: the program notices nothing.
  const root = mkdtempSync(join(tmpdir(), 'embedserve-node-model-'));
  after(() => rmSync(root, { recursive: true, force: true }));
  const model = makeTinyModel(root);
  if (!model) {
    t.skip('needs the ML extra (torch, sentence-transformers) in EMBEDSERVE_PYTHON');
    return;
  }
  const server = await startServer(['--backend', 'sentence-transformers', '--model', model], { timeoutMs: 120_000 });
  // fallback 'always': a call that gave up would not throw but come back as 'fallback'.
  const client = new EmbedServeClient({ url: server.url, autoStart: false, fallback: 'always' });
  let stop = false;
  try {
    const { pid: oldWorker } = await client.info();
    const sources = [[], [], [], []];
    const loops = sources.map(async (seen, i) => {
      while (!stop) {
        const vectors = await client.embed([`the cat sat on the mat ${i}`, 'hello world']);
        seen.push(vectors.source);
      }
    });
    const failed = Promise.race(loops).then(() => {}, (error) => error);
    let failure = null;
    failed.then((error) => { failure = error ?? null; });
    await waitFor(() => failure || sources.every((seen) => seen.length >= 3), 'calls before the kill', 60_000);
    assert.equal(failure, null);
    process.kill(oldWorker, 'SIGKILL');
    // A 503 "loading" window really happened: the new worker answers it while loading.
    const health = await freshGet(`${server.url}/health`);
    assert.deepEqual([health.statusCode, health.headers['retry-after']], [503, '1']);
    // Once the new worker serves, every loop gets through again.
    const before = sources.map((seen) => seen.length);
    await waitFor(() => failure || sources.every((seen, i) => seen.length >= before[i] + 2),
      'calls after the restart', 120_000);
    stop = true;
    await Promise.all(loops);
    assert.ok(sources.flat().every((source) => source === 'server'));
    assert.notEqual((await client.info()).pid, oldWorker);
  } finally {
    stop = true;
    await client.close();
    await server.stop();
  }
});

test('a server someone else restarts (nothing listens for a moment) is waited for', { timeout: 60_000 }, async () => {
  // autoStart: false: the program's server is run by someone else (systemd, a container),
  // who restarts it. The call in between waits for it within retryTimeoutMs.
  const port = await freePort();
  const first = await startServer(['--port', String(port)]);
  const client = new EmbedServeClient({ url: first.url, autoStart: false, fallback: 'never' });
  let second = null;
  let restarted = null;
  try {
    assert.equal((await client.embed(['before'])).source, 'server');
    await first.stop();
    restarted = (async () => {
      await sleep(1500);
      second = await startServer(['--port', String(port)]);
    })();
    const vectors = await client.embed(['during the restart']);
    await restarted;
    assert.equal(vectors.source, 'server');
    assert.equal((await client.info()).supervisor_pid, second.pid);
    assert.equal(client.ownsServer, false);
  } finally {
    await client.close();
    await first.stop();
    await restarted?.catch(() => {}); // even after a failure: no server outlives the test
    await second?.stop();
  }
});

/** GET on a new connection (fetch could reuse one the killed worker held). */
function freshGet(url) {
  return new Promise((resolve, reject) => {
    get(url, { agent: false }, (response) => {
      response.resume();
      response.on('end', () => resolve(response));
    }).on('error', reject);
  });
}

/** After a failed assertion: no server of a test may outlive it. */
function killLeftovers({ serverPid, workerPid }) {
  for (const pid of [serverPid, workerPid]) {
    if (!pid || processGone(pid)) continue; // gone, as it should be: never signal a reused pid
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // It went in the meantime.
    }
  }
}

// The program using the client never calls close(): the server must still go with it.
for (const mode of ['natural', 'exit', 'SIGTERM', 'SIGINT']) {
  test(`a program that ends (${mode}) takes the server it started with it`, { timeout: 40_000 }, async () => {
    const port = await freePort();
    const signal = mode.startsWith('SIG') ? mode : null;
    // The server's own stdin watch is off: only the client's exit hooks can stop it.
    const app = await runApp([`http://127.0.0.1:${port}`, signal ? 'wait' : mode, 'nowatch']);
    try {
      const { serverPid, workerPid, owned, model } = app.report;
      assert.equal(owned, true);
      assert.equal(model, 'hash-v1-384');
      assert.equal(processGone(serverPid), false);
      if (signal) app.child.kill(signal);
      const result = await app.exited;
      if (signal) {
        // The client's handler did not swallow the signal: Node's default still applies.
        assert.deepEqual(result, { code: null, signal }, app.stderr());
      } else {
        assert.deepEqual(result, { code: 0, signal: null }, app.stderr());
      }
      await assertStopped([serverPid, workerPid], port);
    } finally {
      app.child.kill('SIGKILL');
      killLeftovers(app.report);
    }
  });
}

test('a program that ends leaves alone a server it did not start', { timeout: 40_000 }, async () => {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const host = new EmbedServeClient(clientOptions({ url }));
  try {
    await host.connect();
    const app = await runApp([url, 'natural']);
    assert.equal(app.report.owned, false);
    assert.deepEqual(await app.exited, { code: 0, signal: null });
    assert.equal(processGone(host.serverPid), false);
    assert.equal((await host.health()).ok, true);
  } finally {
    await host.close();
  }
});

test('restart: false: a server that died is not replaced', { timeout: 30_000 }, async () => {
  const port = await freePort();
  const client = new EmbedServeClient(clientOptions({
    url: `http://127.0.0.1:${port}`, restart: false, fallback: 'never', retries: 1, backoffMs: 10,
  }));
  try {
    await client.embed(['first']);
    const pid = client.serverPid;
    const { pid: workerPid } = await client.info();
    process.kill(pid, 'SIGKILL');
    // Its worker holds the socket too, and serves until it sees its supervisor gone.
    await assertStopped([pid, workerPid], port);
    await assert.rejects(client.embed(['second']), { code: 'unreachable', message: /restart is off/ });
    assert.ok(await portIsFree(port));
  } finally {
    await client.close();
  }
});

test('a program killed with SIGKILL (no exit hook runs) still takes its server with it',
  { timeout: 40_000, skip: !serverWatchesStdin() && 'this embedserve does not support EMBEDSERVE_WATCH_STDIN yet' },
  async () => {
    const port = await freePort();
    const app = await runApp([`http://127.0.0.1:${port}`, 'wait']);
    const { serverPid, workerPid } = app.report;
    try {
      app.child.kill('SIGKILL');
      assert.deepEqual(await app.exited, { code: null, signal: 'SIGKILL' });
      await assertStopped([serverPid, workerPid], port);
    } finally {
      killLeftovers(app.report);
    }
  });

/**
 * Run `code` (an ES module) in a child Node process, with nothing else keeping its event
 * loop alive: resolves to its exit code and output. Node ends a program whose event loop
 * runs dry inside a top-level await with exit code 13 and no word.
 */
function runModule(code, timeoutMs = 30_000) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', code], {
      cwd: REPO_ROOT, env: { ...process.env, ...serverEnv() }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk) => { stdout += chunk; });
    child.stderr.on('data', (chunk) => { stderr += chunk; });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`the child program ran over ${timeoutMs} ms; stderr:\n${stderr}`));
    }, timeoutMs);
    child.once('exit', (exitCode) => {
      clearTimeout(timer);
      resolve({ exitCode, stdout, stderr });
    });
  });
}

const INDEX = JSON.stringify(fileURLToPath(new URL('../index.js', import.meta.url)));

test('close() of a server that outlives stopTimeoutMs resolves: the program does not end inside it', { timeout: 60_000 }, async () => {
  // After the SIGKILL timer fired, close() awaited the exit of an unref'd child: nothing
  // kept the event loop alive, and the program ended (exit 13) with close() unsettled.
  const port = await freePort();
  const options = clientOptions({ url: `http://127.0.0.1:${port}`, stopTimeoutMs: 1 });
  const { exitCode, stdout, stderr } = await runModule(`
    import { EmbedServeClient } from ${INDEX};
    const client = new EmbedServeClient(${JSON.stringify(options)});
    await client.embed(['x']);
    const pid = client.serverPid;
    await client.close();
    console.log(JSON.stringify({ closed: true, pid }));
  `);
  assert.equal(exitCode, 0, `exit code ${exitCode}; stderr:\n${stderr}`);
  const report = JSON.parse(stdout.trim().split('\n').at(-1));
  assert.equal(report.closed, true);
  await assertStopped([report.pid], port);
});

test('a server that never gets ready and ignores SIGTERM: the start rejects with start_timeout, the program does not just end', { timeout: 60_000 }, async () => {
  const scratch = mkdtempSync(join(tmpdir(), 'embedserve-node-'));
  try {
    const python = join(scratch, 'python-deaf');
    const pidFile = join(scratch, 'deaf.pid');
    writeFileSync(python, `#!/bin/sh\ntrap '' TERM\necho "loading..." >&2\necho $$ > ${pidFile}\n` +
      'while :; do sleep 1; done\n', { mode: 0o755 });
    const port = await freePort();
    const options = { url: `http://127.0.0.1:${port}`, python, fallback: 'never', startTimeoutMs: 1000, stopTimeoutMs: 1000 };
    const { exitCode, stdout, stderr } = await runModule(`
      import { EmbedServeClient } from ${INDEX};
      const client = new EmbedServeClient(${JSON.stringify(options)});
      try {
        await client.embed(['x']);
        console.log(JSON.stringify({ code: 'none' }));
      } catch (error) {
        console.log(JSON.stringify({ code: error.code, message: error.message }));
      }
      await client.close();
    `);
    assert.equal(exitCode, 0, `exit code ${exitCode}; stderr:\n${stderr}`);
    const report = JSON.parse(stdout.trim().split('\n').at(-1));
    assert.equal(report.code, 'start_timeout', report.message);
    assert.match(report.message, /loading\.\.\./);
    await assertStopped([Number(readFileSync(pidFile, 'utf8'))], port);
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
});
