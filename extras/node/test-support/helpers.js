// Shared test helpers: real `python -m embedserve` processes on free ports of 127.0.0.1,
// process and port checks, and child Node programs. (Outside test/: `node --test` runs
// every .js file under a test/ folder as a test file.)

import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { afterEach, beforeEach } from 'node:test';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseReadyLine } from '../lib/server-process.js';

export const REPO_ROOT = fileURLToPath(new URL('../../../', import.meta.url));
export const GOLDEN_PATH = fileURLToPath(new URL('../../../tests/data/hash_golden.json', import.meta.url));
export const PYTHON = process.env.EMBEDSERVE_PYTHON || 'python3';

// What clients remember of servers (lib/lastseen.js) goes to a folder of each test's own,
// never the user's, so that no test goes by what another test's server on a reused port
// served. (Hooks registered here apply to every test of the file that imports this.)
beforeEach(() => {
  process.env.EMBEDSERVE_STATE_DIR = mkdtempSync(join(tmpdir(), 'embedserve-state-'));
});
afterEach(() => {
  rmSync(process.env.EMBEDSERVE_STATE_DIR, { recursive: true, force: true });
});

/**
 * Environment for servers: embedserve from this checkout, on its hash backend (fast to
 * start, and the vectors the tests compare with), never reaching out to a model hub.
 */
export function serverEnv() {
  const paths = [REPO_ROOT.replace(/\/$/, ''), process.env.PYTHONPATH].filter(Boolean);
  return { PYTHONPATH: paths.join(delimiter), HF_HUB_OFFLINE: '1', EMBEDSERVE_BACKEND: 'hash' };
}

/** Client options every test needs to start servers from this checkout. */
export function clientOptions(extra = {}) {
  return { python: PYTHON, env: serverEnv(), cwd: REPO_ROOT, startTimeoutMs: 20_000, ...extra };
}

export function loadGolden() {
  if (!existsSync(GOLDEN_PATH)) return null;
  return JSON.parse(readFileSync(GOLDEN_PATH, 'utf8'));
}

/** A port nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Whether 127.0.0.1:port can be bound (nothing holds it). */
export function portIsFree(port) {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/**
 * Whether the process is gone. A zombie counts as gone: it runs nothing and holds no
 * port; an orphan's zombie lingers where PID 1 does not reap (some containers).
 */
export function processGone(pid) {
  try {
    process.kill(pid, 0);
  } catch (error) {
    if (error.code === 'ESRCH') return true;
    throw error;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'Z';
  } catch {
    return true;
  }
}

/** Poll `check` until it returns truthy; throws with `what` after `timeoutMs`. */
export async function waitFor(check, what, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(50);
  }
}

export async function assertStopped(pids, port) {
  for (const pid of pids.filter(Boolean)) {
    await waitFor(() => processGone(pid), `process ${pid} to exit`);
  }
  if (port) await waitFor(() => portIsFree(port), `port ${port} to be free`);
}


/**
 * A server started by the test itself (not by a client): clients must never stop it.
 * @returns {Promise<{proc, url, port, pid, stop: () => Promise<void>}>}
 */
export function startServer(args = [], { timeoutMs = 20_000 } = {}) {
  return new Promise((resolve, reject) => {
    const proc = spawn(PYTHON, ['-m', 'embedserve', '--host', '127.0.0.1', '--port', '0', ...args], {
      cwd: REPO_ROOT,
      env: { ...process.env, ...serverEnv() },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const output = [];
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`test server not ready in ${timeoutMs} ms:\n${output.join('')}`));
    }, timeoutMs);
    proc.stderr.on('data', (chunk) => output.push(String(chunk)));
    proc.stdout.on('data', (chunk) => {
      output.push(String(chunk));
      const ready = parseReadyLine(output.join(''));
      if (!ready) return;
      clearTimeout(timer);
      const { url, port, pid } = ready;
      resolve({
        proc,
        url,
        port,
        pid,
        stop: async () => {
          if (proc.exitCode !== null || proc.signalCode !== null) return;
          const exited = new Promise((done) => proc.once('exit', done));
          proc.kill('SIGTERM');
          const killer = setTimeout(() => proc.kill('SIGKILL'), 10_000);
          await exited;
          clearTimeout(killer);
        },
      });
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`test server exited with ${code}:\n${output.join('')}`));
    });
  });
}

/**
 * Run test-support/app.js in a child Node process. Resolves once it printed its first
 * JSON line, with that line and a promise of its exit.
 */
export function runApp(args, { timeoutMs = 20_000 } = {}) {
  const app = fileURLToPath(new URL('./app.js', import.meta.url));
  const child = spawn(process.execPath, [app, ...args], {
    cwd: REPO_ROOT,
    env: { ...process.env, EMBEDSERVE_PYTHON: PYTHON },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const exited = new Promise((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
  });
  let stdout = '';
  let stderr = '';
  child.stderr.on('data', (chunk) => { stderr += chunk; });
  const first = new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`app printed nothing in ${timeoutMs} ms; stderr:\n${stderr}`));
    }, timeoutMs);
    child.stdout.on('data', (chunk) => {
      stdout += chunk;
      const newline = stdout.indexOf('\n');
      if (newline >= 0) {
        clearTimeout(timer);
        resolve(JSON.parse(stdout.slice(0, newline)));
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`app exited (${code ?? signal}) before reporting; stderr:\n${stderr}`));
    });
  });
  return first.then((report) => ({ child, report, exited, stderr: () => stderr }));
}

/**
 * A tiny sentence-transformers model made by tests/tiny_models.py under `root` (random
 * weights, loads in seconds, no download): its folder, or null when PYTHON lacks the ML
 * extra (torch, sentence-transformers).
 */
export function makeTinyModel(root) {
  const env = { ...process.env, ...serverEnv() };
  try {
    execFileSync(PYTHON, ['-c', 'import torch, sentence_transformers'], { env, stdio: 'ignore', timeout: 120_000 });
  } catch {
    return null;
  }
  const code = 'import sys; from pathlib import Path; from tiny_models import make_tiny_models; ' +
    'print(make_tiny_models(Path(sys.argv[1]))[1])';
  const out = execFileSync(PYTHON, ['-c', code, root], {
    cwd: join(REPO_ROOT, 'tests'), env, encoding: 'utf8', timeout: 300_000, stdio: ['ignore', 'pipe', 'ignore'],
  });
  return out.trim().split('\n').at(-1);
}
